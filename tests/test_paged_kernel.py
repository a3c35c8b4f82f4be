"""The Pallas paged kernel (ktjax/pallas/paged.py, interpret mode on the CPU; compiled on a GPU under
KTJAX_PALLAS_COMPILED=1) against the paged XLA path,
in every cache format: decode and prefill rows, pages scattered over the pool, ragged lengths. Outputs are
poisoned (NaN-filled): an element the kernel never writes fails the comparison."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ktjax.kv import formats as cf
from ktjax.kv.cache import LatentCache
from ktjax.pallas import KernelConfig
from ktjax.pallas.backend import ATTENTION as PALLAS_ATTENTION
from ktjax.pallas.paged import paged_attention
from ktjax.kv.quant import quantize, to_bits
from pallas_mode import INTERPRET, kernel_test_context, run_jitted, skip_without_gpu
from triton_ir import triton_modules

RANK, ROPE, HEADS, PAGE, N_PAGES, LAYERS = 24, 8, 4, 16, 9, 2


pytestmark = skip_without_gpu


@pytest.fixture(autouse=True)
def _kernel_test_context():
    with kernel_test_context():
        yield


def random_pool(rng, fmt, table):
    lead = (LAYERS, N_PAGES, PAGE)
    stored, scales = quantize(fmt, jnp.asarray(rng.normal(size=lead + (RANK,)), jnp.float32))
    k_pe = jnp.asarray(rng.normal(size=lead + (ROPE,)), jnp.float32).astype(fmt.k_pe_dtype)
    return LatentCache(to_bits(stored), scales, to_bits(k_pe), fmt=fmt, rank=RANK, attention=None,
                       page_table=jnp.asarray(table, jnp.int32))


@pytest.mark.parametrize("fmt_name,num_splits", [("float32", 1), ("bf16", 2), ("fp8", 2), ("int8", 1), ("int4", 2)])
def test_paged_kernel_matches_paged_xla(fmt_name, num_splits):
    rng = np.random.default_rng(7)
    fmt = cf.resolve_format(fmt_name)
    table = rng.permutation(N_PAGES)[:8].reshape(2, 4)   # 64 positions per sequence
    cache = random_pool(rng, fmt, table)
    lengths = jnp.array([61, 18], jnp.int32)
    scale = float((RANK + ROPE) ** -0.5)
    config = KernelConfig(num_splits=num_splits)
    for q_positions in (jnp.array([[60], [17]]), jnp.array([[40, 60], [2, 17]])):  # decode, prefill rows
        q_lat = jnp.asarray(rng.normal(size=(2, q_positions.shape[1], HEADS, RANK)), jnp.float32)
        q_pe = jnp.asarray(rng.normal(size=(2, q_positions.shape[1], HEADS, ROPE)), jnp.float32)
        want = cache.attend_latent(1, q_lat, q_pe, q_positions, lengths, scale=scale)
        got = run_jitted(lambda c, a, b, p, n: paged_attention(a, b, c, 1, p, n, scale=scale, config=config,
                                                               interpret=INTERPRET, poison_outputs=True),
                         cache, q_lat, q_pe, q_positions, lengths)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt_name", ["bf16", "int4"])
def test_paged_kernel_lowers_to_valid_triton_ir(fmt_name):
    """DeepSeek dimensions, a pool of a non-power-of-two page count: Triton IR that passes MLIR verification
    (compiling and running it needs a GPU)."""
    pytest.importorskip("jax._src.pallas.triton.lowering")
    fmt = cf.resolve_format(fmt_name)
    lead = (3, 100, 64)
    sds = jax.ShapeDtypeStruct
    cache = LatentCache(sds(lead + (fmt.stored_width(512),), cf.container(fmt.store_dtype)),
                        sds(lead + (fmt.n_groups(512),), jnp.float32) if fmt.quantized else None,
                        sds(lead + (64,), cf.container(fmt.k_pe_dtype)), fmt=fmt, rank=512,
                        attention=PALLAS_ATTENTION, page_table=sds((4, 32), jnp.int32))
    q_lat, q_pe = sds((4, 1, 16, 512), jnp.bfloat16), sds((4, 1, 16, 64), jnp.bfloat16)
    fn = jax.jit(lambda c, a, b, p, n: paged_attention(a, b, c, 2, p, n, scale=0.1, interpret=False,
                                                       config=KernelConfig(num_splits=4)))
    modules = triton_modules(fn, cache, q_lat, q_pe, sds((4, 1), jnp.int32), sds((4,), jnp.int32))
    assert len(modules) == 1 and modules[0].operation.verify()

"""Absorbed MLA decode attention as a Pallas Mosaic GPU kernel (Hopper, sm_90a, and later); bf16 cache only.

What it computes: ktjax.kv.attention.mla_decode_xla for one query per sequence. All heads share one latent
cache, so the score rows are heads: scores = (q_lat . c_kv + q_pe . k_pe) * scale over keys [0, lengths[b]),
an online float32 softmax, and o_lat = softmax @ c_kv (c_kv is both the keys and the values).

Layout on the GPU. One program (CTA, one warpgroup) per (head block, value block, split, sequence):
  * head block: 64 heads, the M of a wgmma; V2-Lite's 16 heads are padded to 64 (zero queries), V3's 128
    heads make two blocks that read the same cache tiles (shared through L2).
  * value block: 256 output channels of R = 512. A [64, 512] float32 accumulator would take 256 registers
    a thread, so each program owns half of the output and recomputes the (cheap, R-long) scores itself;
    the two halves' programs read the same tiles through L2.
  * split (flash-decoding): split j takes its share of the key tiles [0, cdiv(lengths[b], block_k)) (the
    share comes from the real length, so a short row in a long cache still spreads over every split), and
    writes its normalised partial output and log-sum-exp; `_merge_splits` combines them in JAX.
Key tiles (c_kv [block_k, R] and k_pe [block_k, r]) come into shared memory by TMA, double-buffered: tile
i + 1 is in flight while tile i is multiplied. The queries stay in shared memory for the whole walk.
scores [64, block_k] = q_lat @ c_kv^T + q_pe @ k_pe^T and out [64, 256] += p @ c_kv[:, value block] run on
the tensor cores (wgmma, bf16 operands, float32 accumulators); p goes through shared memory (bf16) as the
A operand. Shared memory with the defaults (block_k 32, R 512, r 64): ~212 KB of the 227 KB a Hopper CTA
may have (`smem_bytes`), so one CTA per SM and `choose_num_splits` (mla_kernels.py) aims at one wave of
programs over the SMs.

Not yet measured: this kernel has never run on a GPU, so neither its speed nor its compilation is known. It is
checked only in Mosaic GPU interpret mode (tests/test_mosaic.py), which runs the same kernel body on the CPU
with two substitutions: wgmma there cannot take a transposed shared-memory operand (transpose_ref), so the
c_kv / k_pe tiles are first copied, transposed, into scratch buffers; and register layouts (layout_cast) are
skipped. Interpret mode also ignores swizzling and tiling, TMA alignment and asynchrony (its race detector,
run by the tests, finds no race on the two buffers). Left for a Hopper run: the transposed wgmma B operand
with N = block_k = 32, the swizzle-64 p tile, the dynamic 256-column slice of a swizzled c_kv tile as a wgmma
operand, barrier phases across the two buffers, the scalar load of lengths[b] from global memory.
(pl.run_state, which would let the tensor cores add p @ c_kv onto the running accumulator, does not run in
interpret mode either: each tile's product goes into a fresh accumulator and is added in registers, on the GPU
too.)
Other cache formats (fp8, int8, int4, float32) raise NotImplementedError: the caller keeps the Triton
kernel (ktjax/pallas/mla_kernels.py) for them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ktjax.pallas import platform
from ktjax.pallas.mla_kernels import choose_num_splits

NEG = -1e30                 # finite "minus infinity": exp(NEG - m) is 0 with no inf - inf
HEAD_BLOCK = 64             # wgmma M: one warpgroup's rows
VALUE_BLOCK = 256           # output channels per program (the accumulator's registers)
LANE = 64                   # bf16 elements in a 128-byte swizzle row: R and r are padded to it
SMEM_LIMIT = 227 * 1024     # shared memory one Hopper CTA may use
MIN_CAPABILITY = (9, 0)     # wgmma and TMA: Hopper


# ------------------------------------------------------------------------------------------- sizing

def smem_bytes(rank_p: int, rope_p: int, block_k: int, value_block: int) -> int:
    """Shared memory of one program: queries, two buffers of key tiles, p, and the output staging."""
    bf16, f32 = 2, 4
    queries = HEAD_BLOCK * (rank_p + rope_p) * bf16
    key_tiles = 2 * block_k * (rank_p + rope_p) * bf16
    probabilities = HEAD_BLOCK * block_k * bf16
    staging = HEAD_BLOCK * value_block * f32 + HEAD_BLOCK * f32
    return queries + key_tiles + probabilities + staging


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ------------------------------------------------------------------------------------------- kernel

def _swizzled(shape, dtype=jnp.bfloat16):
    """A shared-memory buffer laid out for wgmma / TMA: 8-row tiles as wide as the swizzle (128 bytes, or
    less for a narrow minor axis such as p's block_k)."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = next(s for s in (128, 64, 32) if (shape[-1] * itemsize) % s == 0)
    transforms = (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def _split_tiles(length, split, num_splits: int, block_k: int):
    """[first, end) key tiles of this split: its share of the tiles holding keys [0, length)."""
    n_tiles = lax.div(length + block_k - 1, block_k)
    per_split = lax.div(n_tiles + num_splits - 1, num_splits)
    first = split * per_split
    return first, jnp.minimum(first + per_split, n_tiles)


def _transposed(tile, scratch):
    """A [k, n] shared-memory tile as the [n, k] operand of a wgmma. On the GPU a view (the tensor cores read
    it transposed); interpret mode cannot apply that view, so there it is copied into `scratch`."""
    if scratch is None:
        return plgpu.transpose_ref(tile, (1, 0))
    scratch[...] = tile[...].T
    return scratch


def _in_layout(x, layout, interpret: bool):
    """x in a register layout of the tensor cores; interpret mode has no layouts (layout_cast has no CPU rule)."""
    return x if interpret else plgpu.layout_cast(x, layout)


def _softmax_step(scores, visible, m, l):
    """One tile of the online softmax (float32, rows = heads): -> (p, correction of the old sums, m, l)."""
    scores = jnp.where(visible, scores, NEG)
    m_new = jnp.maximum(m, scores.max(axis=1))
    p = jnp.where(visible, jnp.exp(scores - lax.broadcast_in_dim(m_new, scores.shape, [0])), 0.0)
    correction = jnp.exp(m - m_new)
    return p, correction, m_new, l * correction + p.sum(axis=1)


def _decode_kernel(lengths_ref, q_lat_ref, q_pe_ref, c_kv_ref, k_pe_ref, o_ref, lse_ref, *,
                   scale: float, block_k: int, num_splits: int, value_blocks: int, interpret: bool):
    rank_p, rope_p = q_lat_ref.shape[-1], q_pe_ref.shape[-1]
    wgmma, wgmma_rows = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)  # accumulator tiles, their row vectors
    value_block = rank_p // value_blocks
    row_block = lax.axis_index("rows")
    head_block, value_index = lax.div(row_block, value_blocks), lax.rem(row_block, value_blocks)
    split, batch = lax.axis_index("split"), lax.axis_index("batch")
    heads = pl.ds(head_block * HEAD_BLOCK, HEAD_BLOCK)
    values = pl.ds(pl.multiple_of(value_index * value_block, value_block), value_block)
    length = lengths_ref[batch]
    first, end = _split_tiles(length, split, num_splits, block_k)

    def body(q_lat_smem, q_pe_smem, c_kv_smem, k_pe_smem, p_smem, o_smem, lse_smem, c_kv_t, k_pe_t,
             q_barrier, c_kv_barriers, k_pe_barriers):
        plgpu.copy_gmem_to_smem(q_lat_ref.at[batch, heads], q_lat_smem, q_barrier.at[0])
        plgpu.copy_gmem_to_smem(q_pe_ref.at[batch, heads], q_pe_smem, q_barrier.at[1])

        def fetch(tile, slot):
            keys = pl.ds(tile * block_k, block_k)
            plgpu.copy_gmem_to_smem(c_kv_ref.at[batch, keys], c_kv_smem.at[slot], c_kv_barriers.at[slot])
            plgpu.copy_gmem_to_smem(k_pe_ref.at[batch, keys], k_pe_smem.at[slot], k_pe_barriers.at[slot])

        pl.when(first < end)(lambda: fetch(first, 0))
        plgpu.barrier_wait(q_barrier.at[0])
        plgpu.barrier_wait(q_barrier.at[1])

        def step(tile, carry):
            acc, m, l = carry
            slot = lax.rem(tile - first, 2)
            # The other buffer's last readers (the previous step's wgmmas) have finished: refill it now.
            pl.when(tile + 1 < end)(lambda: fetch(tile + 1, 1 - slot))
            plgpu.barrier_wait(c_kv_barriers.at[slot])
            plgpu.barrier_wait(k_pe_barriers.at[slot])

            def scores_of(scores_ref):
                plgpu.wgmma(scores_ref, q_lat_smem, _transposed(c_kv_smem.at[slot], c_kv_t))
                plgpu.wgmma(scores_ref, q_pe_smem, _transposed(k_pe_smem.at[slot], k_pe_t))
                return scores_ref[...]

            scores = pl.run_scoped(scores_of, plgpu.ACC((HEAD_BLOCK, block_k), jnp.float32))
            key = tile * block_k + _in_layout(lax.broadcasted_iota(jnp.int32, scores.shape, 1), wgmma, interpret)
            p, correction, m, l = _softmax_step(scores * scale, key < length, m, l)
            p_smem[...] = p.astype(jnp.bfloat16)
            plgpu.commit_smem()  # p's stores visible to the tensor cores

            def weighted_values(out_ref):
                plgpu.wgmma(out_ref, p_smem, c_kv_smem.at[slot, :, values])
                return out_ref[...]

            # A fresh accumulator, added in registers: interpret mode cannot run pl.run_state(ACC.init(acc)),
            # which would let the tensor cores add onto acc directly.
            tile_out = pl.run_scoped(weighted_values, plgpu.ACC((HEAD_BLOCK, value_block), jnp.float32))
            return acc * lax.broadcast_in_dim(correction, acc.shape, [0]) + tile_out, m, l

        init = (_in_layout(jnp.zeros((HEAD_BLOCK, value_block), jnp.float32), wgmma, interpret),
                _in_layout(jnp.full((HEAD_BLOCK,), NEG, jnp.float32), wgmma_rows, interpret),
                _in_layout(jnp.zeros((HEAD_BLOCK,), jnp.float32), wgmma_rows, interpret))
        acc, m, l = lax.fori_loop(first, end, step, init)

        # An empty split (no tiles) writes o = 0 and lse = NEG: it weighs nothing in the merge.
        seen = l > 0
        safe_l = jnp.where(seen, l, 1.0)
        o_smem[...] = acc / lax.broadcast_in_dim(safe_l, acc.shape, [0])
        lse_smem[...] = jnp.where(seen, m + jnp.log(safe_l), NEG)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[batch, split, heads, values])

        @pl.when(value_index == 0)
        def _():
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, split, heads])

        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        body,
        q_lat_smem=_swizzled((HEAD_BLOCK, rank_p)),
        q_pe_smem=_swizzled((HEAD_BLOCK, rope_p)),
        c_kv_smem=_swizzled((2, block_k, rank_p)),          # two buffers of key tiles
        k_pe_smem=_swizzled((2, block_k, rope_p)),
        p_smem=_swizzled((HEAD_BLOCK, block_k)),
        o_smem=plgpu.SMEM((HEAD_BLOCK, value_block), jnp.float32),
        lse_smem=plgpu.SMEM((HEAD_BLOCK,), jnp.float32),
        c_kv_t=plgpu.SMEM((rank_p, block_k), jnp.bfloat16) if interpret else None,
        k_pe_t=plgpu.SMEM((rope_p, block_k), jnp.bfloat16) if interpret else None,
        q_barrier=plgpu.Barrier(num_barriers=2),
        c_kv_barriers=plgpu.Barrier(num_barriers=2),
        k_pe_barriers=plgpu.Barrier(num_barriers=2),
    )


# ------------------------------------------------------------------------------------------ wrapper

def _merge_splits(o, lse):
    """Partials o [b, splits, h, R] (each normalised over its keys), lse [b, splits, h] -> [b, h, R].
    A split that saw no key has lse = NEG and weighs exp(NEG - max) = 0."""
    lse_max = jnp.max(lse, axis=1, keepdims=True)
    weight = jnp.exp(lse - lse_max)
    weight = weight / jnp.sum(weight, axis=1, keepdims=True)
    return jnp.sum(o * weight[..., None], axis=1)


def _interpret_params(interpret):
    """None: compiled on a GPU, interpret mode elsewhere. True / False / an InterpretGPUParams as given."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    if interpret is None:
        interpret = not platform.on_gpu()
    if interpret is True:
        return InterpretGPUParams()
    return interpret or None


def supported() -> bool:
    """Whether the compiled kernel can run here: an NVIDIA GPU of compute capability >= 9.0."""
    cap = platform.compute_capability()
    return cap is not None and cap >= MIN_CAPABILITY


def chosen(fmt_name: str) -> bool:
    """Whether the Pallas backend runs this kernel for a decode step over a dense cache of this format: asked for
    ($KTJAX_MOSAIC=1: platform.MOSAIC_ENV), a bf16 cache, on a GPU that runs it."""
    return platform.mosaic_requested() and fmt_name == "bf16" and supported()


def _pad_axis(x, axis: int, size: int):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, extra)
    return jnp.pad(x, pads)


def _check_inputs(q_lat, q_pe, c_kv, k_pe, lengths):
    for name, x in (("c_kv", c_kv), ("k_pe", k_pe)):
        if x.dtype != jnp.bfloat16:
            raise NotImplementedError(f"mla_decode_mosaic: bf16 caches only, {name} is {x.dtype} "
                                      "(use the Triton kernel, ktjax.pallas.mla_kernels.mla_decode)")
    b, h, rank = q_lat.shape
    if q_pe.shape[:2] != (b, h) or c_kv.shape[0] != b or k_pe.shape[:2] != c_kv.shape[:2] \
            or c_kv.shape[2] != rank or k_pe.shape[2] != q_pe.shape[2] or lengths.shape != (b,):
        raise ValueError(f"mla_decode_mosaic: shapes q_lat {q_lat.shape}, q_pe {q_pe.shape}, c_kv {c_kv.shape}, "
                         f"k_pe {k_pe.shape}, lengths {lengths.shape} do not fit together")


def mla_decode_mosaic(q_lat, q_pe, c_kv, k_pe, lengths, *, scale: float, block_k: int = 32,
                      num_splits: int | None = None, interpret=None):
    """Absorbed decode attention over a bf16 latent cache: q_lat [b,h,R], q_pe [b,h,r], c_kv [b,T,R] bf16,
    k_pe [b,T,r] bf16, lengths [b] int32 (>= 1) -> o_lat [b,h,R] float32, the keys [0, lengths[b]) seen.

    The queries are rounded to bf16 (the tensor cores' operands); scores, softmax and sums are float32.
    block_k: keys per tile (a multiple of 16; the cache is padded to it if T is not). num_splits: splits
    of the key range per sequence, None for choose_num_splits. interpret: None (compiled on a GPU, interpret
    mode elsewhere), a bool, or a jax InterpretGPUParams."""
    _check_inputs(q_lat, q_pe, c_kv, k_pe, lengths)
    if block_k % 16:
        raise ValueError(f"block_k={block_k}: wgmma needs a multiple of 16")
    interpret = _interpret_params(interpret)
    if interpret is None and not supported():
        raise NotImplementedError("mla_decode_mosaic needs an NVIDIA GPU of compute capability >= 9.0 (Hopper)")

    b, h, rank = q_lat.shape
    rank_p, rope_p = _round_up(rank, LANE), _round_up(q_pe.shape[-1], LANE)
    value_blocks = -(-rank_p // VALUE_BLOCK)
    if rank_p % value_blocks:
        raise ValueError(f"R={rank} (padded {rank_p}) does not split into blocks of <= {VALUE_BLOCK} channels")
    head_blocks = -(-h // HEAD_BLOCK)
    heads_p = head_blocks * HEAD_BLOCK
    needed = smem_bytes(rank_p, rope_p, block_k, rank_p // value_blocks)
    if needed > SMEM_LIMIT:
        raise ValueError(f"block_k={block_k}: {needed} bytes of shared memory, more than a Hopper CTA's {SMEM_LIMIT}")

    cache_len = _round_up(c_kv.shape[1], block_k)
    c_kv = _pad_axis(_pad_axis(c_kv, 2, rank_p), 1, cache_len)   # no copy for R = 512 and T % block_k == 0
    k_pe = _pad_axis(_pad_axis(k_pe, 2, rope_p), 1, cache_len)
    q_lat = _pad_axis(_pad_axis(q_lat.astype(jnp.bfloat16), 2, rank_p), 1, heads_p)
    q_pe = _pad_axis(_pad_axis(q_pe.astype(jnp.bfloat16), 2, rope_p), 1, heads_p)
    if num_splits is None:
        # one CTA per SM (smem_bytes), so one wave of programs; a sequence has head x value blocks per split
        num_splits = choose_num_splits(b * head_blocks * value_blocks, cache_len, platform.core_count(), waves=1)

    kernel = functools.partial(_decode_kernel, scale=float(scale), block_k=block_k, num_splits=num_splits,
                               value_blocks=value_blocks, interpret=interpret is not None)
    o, lse = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((b, num_splits, heads_p, rank_p), jnp.float32),
                  jax.ShapeDtypeStruct((b, num_splits, heads_p), jnp.float32)),
        grid=(head_blocks * value_blocks, num_splits, b),
        grid_names=("rows", "split", "batch"),
        interpret=interpret,
    )(lengths.astype(jnp.int32), q_lat, q_pe, c_kv, k_pe)
    return _merge_splits(o, lse)[:, :h, :rank]

"""The backend door (ktjax/runtime/backend.py): the choice among XLA, the Pallas kernels and the CPU kernels made
once from the settings and the devices, every value it reports one the settings table declares, and the caches'
kernel protocol (a kernel that declines leaves the XLA path's result)."""
import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ktjax.errors import KtjaxError
from ktjax.kv import formats
from ktjax.kv.cache import AttentionKernel, LatentCache
from ktjax.runtime import backend
from ktjax.runtime.settings import SETTINGS, RuntimeConfig

DECLARED = SETTINGS["attention"].choices
FLOAT_STATE = {"layer": {"kernel": jnp.zeros((4, 3), jnp.float32)}}   # a matmul weight the CPU kernels read
BF16_STATE = {"layer": {"kernel": jnp.zeros((4, 3), jnp.bfloat16)}}  # one they do not


def choose(state=FLOAT_STATE, devices=1, **settings):
    return backend.choose(RuntimeConfig.from_overrides(**settings), state, devices)


def test_every_registered_backend_answers_the_door():
    for name, module in backend.BACKENDS.items():
        impl = importlib.import_module(module)
        assert name in DECLARED, f"backend {name} is no value of the setting attention"
        kernel = impl.attention_kernel(None)
        assert isinstance(kernel, AttentionKernel) and kernel.name == name and hash(kernel) == hash(type(kernel)())


@pytest.mark.usefixtures("cpu_kernels_built")
@pytest.mark.parametrize("settings, state, name, attention", [
    ({}, FLOAT_STATE, "cpu", "cpu"),
    ({"attention": "xla"}, FLOAT_STATE, "cpu", "xla"),
    ({"attention": "cpu"}, FLOAT_STATE, "cpu", "cpu"),
    ({"attention": "pallas"}, FLOAT_STATE, "cpu", "pallas"),
    ({"cpu_kernels": "off"}, FLOAT_STATE, "xla", "xla"),
    ({"attention": "xla"}, BF16_STATE, "xla", "xla"),   # nothing would use the kernels: not built
    ({"attention": "cpu"}, BF16_STATE, "cpu", "cpu"),
])
def test_resolution_on_one_cpu(settings, state, name, attention):
    chosen = choose(state, **settings)
    assert (chosen.name, chosen.attention) == (name, attention)
    assert chosen.attention in DECLARED and chosen.cpu_kernels == (name == "cpu")


# (the settings, the devices, what the message says)
REFUSALS = [
    ({"attention": "cpu", "cpu_kernels": "off"}, 1, r"attention cpu .*\(cpu_kernels off\)"),
    ({"attention": "cpu"}, 2, r"attention cpu .*2 cpu device\(s\)"),
    ({"cpu_kernels": "on"}, 2, r"cpu_kernels on: 2 cpu device\(s\)"),
    ({"attention": "gpu"}, 1, r"attention='gpu': one of auto, xla, pallas, cpu"),
]


@pytest.mark.parametrize("settings, devices, message", REFUSALS, ids=[m for _, _, m in REFUSALS])
def test_what_cannot_run_is_refused_with_why(settings, devices, message):
    with pytest.raises(KtjaxError, match=message):
        choose(devices=devices, **settings)


def test_a_mesh_runs_xla_without_building_the_kernels(monkeypatch):
    monkeypatch.setattr(backend, "implementation", lambda name: pytest.fail(f"asked {name} on a mesh"))
    chosen = choose(devices=2)
    assert (chosen.name, chosen.attention, chosen.why_not) == ("xla", "xla", "2 cpu device(s); the kernels run on "
                                                               "one CPU device")


def test_attention_kernel_rules():
    """A sequence-sharded cache runs XLA (noted where a kernel was asked for); pages the Pallas kernel cannot
    tile run XLA; the reported name is the kernel's, or xla."""
    pallas = backend.Backend("xla", "pallas", "pallas", out_in=False, int8_activations=False)
    kernel = pallas.attention_kernel()
    assert kernel is not None and pallas.attention_kernel(page_size=64) == kernel
    assert pallas.attention_kernel(page_size=24) is None and pallas.attention_kernel(page_size=8) is None
    notes = []
    assert pallas.attention_kernel(layout=object(), notes=notes) is None and "not pallas" in notes[0]
    auto = dataclasses.replace(pallas, setting="auto")
    notes = []
    assert auto.attention_kernel(layout=object(), notes=notes) is None and notes == []
    assert pallas.stats(kernel) == {"attention": "pallas", "cpu_kernels": False, "fp8_matmul": "dequantize"}
    assert pallas.stats(None)["attention"] == "xla"
    assert backend.Backend("xla", "xla", "xla", False, False).attention_kernel() is None


@dataclasses.dataclass(frozen=True)
class Declines(AttentionKernel):
    """A kernel that is asked and always declines."""
    name = "declines"
    asked: list = dataclasses.field(default_factory=list, hash=False, compare=False)

    def latent(self, cache, *args, **kw):
        self.asked.append("dense" if cache.dense else "paged")


def test_a_declining_kernel_leaves_the_xla_result(rng):
    """Dense and paged: a kernel that declines is asked once per trace, and the cache's result is the XLA
    path's, bit for bit."""
    cfg = type("Cfg", (), dict(num_hidden_layers=1, kv_lora_rank=32, qk_rope_head_dim=8))()
    fmt = formats.FORMATS["float32"]
    lat = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
    k_pe = jnp.asarray(rng.standard_normal((2, 16, 8)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    q_lat = jnp.asarray(rng.standard_normal((2, 1, 3, 32)), jnp.float32)
    q_pe = jnp.asarray(rng.standard_normal((2, 1, 3, 8)), jnp.float32)
    lengths = jnp.asarray([16, 5], jnp.int32)
    kernel = Declines()
    dense = LatentCache.create(cfg, fmt, 2, 16, block=16).write(0, pos, lat, k_pe)
    paged = LatentCache.pool(cfg, fmt, 4, 16, batch=2, max_pages=1).with_table(jnp.asarray([[2], [0]]))
    paged = paged.write(0, pos, lat, k_pe)
    for cache in (dense, paged):
        def run(c):
            return jax.jit(lambda c: c.attend_latent(0, q_lat, q_pe, (lengths - 1)[:, None], lengths, scale=0.2))(c)
        want = np.asarray(run(cache))
        got = np.asarray(run(dataclasses.replace(cache, attention=kernel)))
        np.testing.assert_array_equal(got, want)
    assert kernel.asked == ["dense", "paged"]


@pytest.mark.usefixtures("cpu_kernels_built")
def test_the_cli_reports_the_attention_that_ran_and_refuses_what_cannot(capsys):
    """On the demo model: --attention cpu runs and --json reports `cpu` (a declared value); with --cpu-kernels off
    it is one clear error, exit 2."""
    import json

    from ktjax.cli.generate import main

    assert main(["--attention", "cpu", "--max-new-tokens", "2", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["attention"] == "cpu" and stats["attention"] in DECLARED and stats["cpu_kernels"] is True
    assert main(["--attention", "cpu", "--cpu-kernels", "off", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "attention cpu runs in ktjax's C++ kernels" in err and "cpu_kernels off" in err and "Traceback" not in err

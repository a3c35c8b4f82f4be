"""Per-step cost follows the cache's fill, not its capacity: the compiled decode and prefill programs never copy
or convert a cache-sized buffer (the cache is updated in place), for every cache format."""
import re

import pytest

import ktjax

CAPACITY = 4096  # no other dimension of the tiny model is this large


def _cache_sized_ops(hlo: str) -> list[str]:
    """Instructions that make a new cache-sized array other than the in-place update itself."""
    found = []
    for line in hlo.splitlines():
        m = re.search(r"= (\S+\[[^\]]*\b" + str(CAPACITY) + r"\b[^\]]*\])\S* (copy|convert|transpose|concatenate|pad|"
                      r"broadcast|gather|dynamic-slice|slice)\(", line)
        if m:
            found.append(line.strip()[:160])
    return found


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "int8", "int4", "float32"])
def test_decode_and_prefill_never_copy_the_cache(hf_folder, fmt):
    folder, _ = hf_folder("v3")
    engine = ktjax.load(folder, cache_dtype=fmt, cache_lens=CAPACITY, max_new_tokens=2, ignore_eos=True,
                        chunk_size=16)
    engine.generate([[5, 6, 7, 8, 9]])
    programs = {key[0]: program for key, program in engine._compiled.items()}
    assert set(programs) == {"step", "decode"}  # runtime/batch.py's prefill step and decode loop
    for name, program in programs.items():
        assert _cache_sized_ops(program.as_text()) == [], name


def _expert_copies(hlo: str, shapes: set[str]) -> list[str]:
    """Instructions that compute a new array shaped like one expert's matrix (a copy of a stack's slice);
    parameters, tuple elements and bitcasts only name existing buffers."""
    found = []
    for line in hlo.splitlines():
        m = re.search(r"= f32\[([0-9,]+)\]\S* ([\w-]+)\(", line)
        if m and m.group(1) in shapes and m.group(2) not in ("parameter", "get-tuple-element", "bitcast", "tuple"):
            found.append(line.strip()[:160])
    return found


def test_routed_experts_are_read_in_place_on_the_cpu(hf_folder, rng):
    """XLA on the CPU copies a slice of a stacked expert weight before a matmul reads it; the Engine holds each
    expert as its own array (moe.PerExpert), so the compiled decode and prefill copy no expert matrix. The
    check itself is shown to catch the copy of a stacked slice. (Two prompts: a chunk of one would route 16 x 3 =
    48 rows, and the experts' activations [48, 24] would look like an expert matrix of this 48-wide model.)"""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ktjax.model.decoder import stack_layers
    from ktjax.model.moe import PerExpert, routed_experts
    from ktjax.model.quantized import in_out

    folder, _ = hf_folder("v3")
    engine = ktjax.load(folder, max_new_tokens=3, ignore_eos=True, chunk_size=16)
    mlp = engine.state["moe_layers"]["mlp"]
    w_gate = mlp["w_gate"].get_value().arrays[0]  # layer 0's
    assert isinstance(w_gate, PerExpert) and len(w_gate.arrays) == engine.cfg.n_routed_experts
    d, f = engine.cfg.hidden_size, engine.cfg.moe_intermediate_size
    shapes = {f"{d},{f}", f"{f},{d}"}
    engine.generate([[5, 6, 7, 8, 9], [4, 5]])
    programs = {key[0]: program for key, program in engine._compiled.items()}
    assert set(programs) == {"step", "decode"}  # runtime/batch.py's prefill step and decode loop
    for name, program in programs.items():
        assert _expert_copies(program.as_text(), shapes) == [], name

    stacked = stack_layers(engine.state)["moe_layers"]["mlp"]
    layer0 = tuple(stacked[name][...][0] for name in ("w_gate", "w_up", "w_down"))
    np.testing.assert_array_equal(np.asarray(layer0[0][2]), np.asarray(in_out(w_gate.arrays[2])))
    x, weights = jnp.ones((1, d)), jnp.ones((1, 2)) / 2
    idx = jnp.asarray([[1, 3]], jnp.int32)
    hlo = jax.jit(routed_experts, static_argnums=4).lower(x, weights, idx, layer0, "gather").compile().as_text()
    assert _expert_copies(hlo, shapes), "the check misses the copy of a stacked expert"

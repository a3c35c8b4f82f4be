"""The MoE router against a numpy transcription of DeepSeek's gates (tests/numpy_references.py), for the fields
transformers ignores."""
import jax.numpy as jnp
import numpy as np
import pytest

from ktjax.model.config import ModelConfig
from hf_models import CONFIGS
from numpy_references import route_ref


CASES = [  # (arch, scoring, method, n_group, topk_group, k, norm)
    ("v2", "softmax", "greedy", 1, 1, 3, True),      # V2 normalising: transformers ignores norm_topk_prob
    ("v2", "softmax", "greedy", 1, 1, 1, True),      # top-1: DeepSeek-V2 scales instead of normalising
    ("v2", "softmax", "group_limited_greedy", 4, 2, 3, False),
    ("v3", "softmax", "group_limited_greedy", 4, 2, 3, False),  # V3 fields transformers ignores
    ("v3", "softmax", "greedy", 1, 1, 2, True),
    ("v3", "sigmoid", "greedy", 1, 1, 2, True),
    ("v3", "sigmoid", "noaux_tc", 4, 2, 3, True),
    ("v3", "sigmoid", "noaux_tc", 2, 1, 2, False),
]


@pytest.mark.parametrize("arch,scoring,method,n_group,topk_group,k,norm", CASES)
def test_route_matches_deepseek_gate(rng, arch, scoring, method, n_group, topk_group, k, norm):
    from ktjax.model.moe import route

    kind, kwargs = CONFIGS["v3" if arch == "v3" else "v2"]
    raw = dict(kwargs, architectures=["DeepseekV3ForCausalLM" if arch == "v3" else "DeepseekV2ForCausalLM"],
               scoring_func=scoring, topk_method=method, n_group=n_group, topk_group=topk_group,
               num_experts_per_tok=k, norm_topk_prob=norm, routed_scaling_factor=2.5)
    cfg = ModelConfig.from_hf_dict(raw)
    logits = rng.normal(size=(64, cfg.n_routed_experts)).astype(np.float32) * 2
    bias = rng.normal(size=(cfg.n_routed_experts,)).astype(np.float32) * 0.3
    w, i = route(cfg, jnp.asarray(logits), jnp.asarray(bias) if method == "noaux_tc" else None)
    w, i = np.asarray(w), np.asarray(i)
    order = np.argsort(i, axis=1)
    w, i = np.take_along_axis(w, order, 1), np.take_along_axis(i, order, 1)
    w_ref, i_ref = route_ref(logits, bias, arch=arch, scoring=scoring, method=method, n_group=n_group,
                             topk_group=topk_group, k=k, norm=norm, scale=2.5)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-7)
    if method != "greedy":  # the group limit really bites: some rows pick differently without it
        _, i_free = route_ref(logits, bias, arch=arch, scoring=scoring, method="greedy", n_group=1, topk_group=1,
                              k=k, norm=norm, scale=2.5)
        assert (np.sort(i_free, 1) != i_ref).any()


def test_expert_implementations_agree(rng):
    """gather, ragged and blocked compute the same routed output, including experts that get no token."""
    from ktjax.model.moe import routed_experts

    t, d, f, e, k = 37, 16, 24, 8, 3
    x = rng.normal(size=(t, d)).astype(np.float32)
    experts = tuple(jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.3) for s in ((e, d, f), (e, d, f), (e, f, d)))
    idx = np.stack([rng.choice(e - 2, size=k, replace=False) for _ in range(t)]).astype(np.int32)  # 2 idle experts
    w = rng.random((t, k)).astype(np.float32)
    ref = np.zeros((t, d), np.float64)
    for ti in range(t):
        for j in range(k):
            wg, wu, wd = (np.asarray(a[idx[ti, j]], np.float64) for a in experts)
            h = x[ti] @ wg
            ref[ti] += w[ti, j] * (((h / (1 + np.exp(-h))) * (x[ti] @ wu)) @ wd)
    for impl in ("gather", "ragged", "blocked"):
        out = np.asarray(routed_experts(jnp.asarray(x), jnp.asarray(w), jnp.asarray(idx), experts, impl))
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=impl)


@pytest.mark.parametrize("weights", ["float32", "int8", "int4"])
def test_experts_held_apart_equal_the_stacks(rng, weights):
    """unstack_layers(split_experts=True) holds each layer's experts as separate arrays (moe.PerExpert, the
    Engine's layout on the CPU): every implementation gives the stacked result exactly, and stack_layers
    restores the stacks."""
    import jax

    from ktjax.model import quantized as wq
    from ktjax.model.decoder import PerLayer, stack_layers, unstack_layers
    from ktjax.model.moe import routed_experts

    t, d, f, e, k, layers = 9, 32, 24, 8, 3, 2
    stacks = [rng.normal(size=(layers, e) + s).astype(np.float32) * 0.3 for s in ((d, f), (d, f), (f, d))]
    if weights != "float32":
        stacks = [wq.QuantizedArray(*(jnp.asarray(a) for a in wq.quantize_weight(s, weights))) for s in stacks]
    else:
        stacks = [jnp.asarray(s) for s in stacks]
    state = {"moe_layers": {"mlp": dict(zip(("w_gate", "w_up", "w_down"), stacks))}}
    split = unstack_layers(jax.tree.map(lambda a: a + 0, state), split_experts=True)
    x = jnp.asarray(rng.normal(size=(t, d)).astype(np.float32))
    idx = jnp.asarray(np.stack([rng.choice(e, size=k, replace=False) for _ in range(t)]).astype(np.int32))
    w = jnp.asarray(rng.random((t, k)).astype(np.float32))
    for layer in range(layers):
        held = tuple(jax.tree.map(lambda p: p.arrays[layer], split["moe_layers"]["mlp"][n],
                                  is_leaf=lambda v: isinstance(v, PerLayer)) for n in ("w_gate", "w_up", "w_down"))
        stacked = tuple(s[layer] for s in stacks)
        for impl in ("gather", "blocked", "ragged"):
            want = routed_experts(x, w, idx, stacked, impl)
            np.testing.assert_allclose(np.asarray(routed_experts(x, w, idx, held, impl)), np.asarray(want),
                                       rtol=1e-6, atol=1e-6, err_msg=impl)
    for a, b in zip(jax.tree.leaves(stack_layers(split)), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

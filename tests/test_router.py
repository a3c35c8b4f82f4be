"""The MoE router against a numpy transcription of DeepSeek's gates (tests/numpy_references.py), for the fields
transformers ignores."""
import jax.numpy as jnp
import numpy as np
import pytest

from ktjax.config import ModelConfig
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
    from ktjax.moe import route

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
    from ktjax.moe import routed_experts

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

"""The unrolled layer loop (model/decoder.py, per-layer arrays as the Engine holds them) traces each stack's layer
once, not once per layer (issue 30: tracing and lowering a 27-layer program was most of what a run paid even
when JAX's persistent cache held the compiled program), and every layer still writes its own slice of the cache:
the logits and the whole cache equal those of the same model run as a scan over its stacked layers."""
from __future__ import annotations

import os
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from random_checkpoint import smoke_config  # noqa: E402  (V2-Lite's shape, every dimension small)

from ktjax.kv.cache import LatentCache  # noqa: E402
from ktjax.kv.formats import FORMATS  # noqa: E402
from ktjax.model import block  # noqa: E402
from ktjax.model.config import ModelConfig  # noqa: E402
from ktjax.model.decoder import DeepseekModel, RunOptions, unstack_layers  # noqa: E402

LAYERS = 3  # one dense layer, then two MoE layers
SEQ = 7


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.from_hf_dict(smoke_config(LAYERS))
    return nnx.split(DeepseekModel(cfg, rngs=nnx.Rngs(0)))


def _prefill(graphdef, state, tokens):
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    model = nnx.merge(graphdef, state)
    cache = LatentCache.create(model.cfg, FORMATS["float32"], b, 16, block=16)
    return model.forward_cached(tokens, positions, cache, jnp.full((b,), s, jnp.int32), None, RunOptions(True))


def _traced(graphdef, state, tokens, **options):
    """(logits, cache, how many times a layer was traced) of a jitted prefill."""
    traces = []
    original = block.DecoderLayer.attend_cached

    def counted(self, *args, **kwargs):
        traces.append(1)
        return original(self, *args, **kwargs)

    with mock.patch.object(block.DecoderLayer, "attend_cached", counted):
        logits, cache = jax.jit(_prefill, static_argnums=0)(graphdef, state, tokens)
    return np.asarray(logits), jax.tree.map(np.asarray, cache), len(traces)


def test_unrolled_stack_traces_one_layer_and_writes_each_layers_slice(model):
    graphdef, state = model
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(2, SEQ)))
    stacked_logits, stacked_cache, _ = _traced(graphdef, state, tokens)
    per_layer = unstack_layers(jax.tree.map(lambda x: x, state))
    logits, cache, traces = _traced(graphdef, per_layer, tokens)
    assert traces == 2  # the dense stack's layer and the MoE stack's layer, each once
    np.testing.assert_allclose(logits, stacked_logits, rtol=0, atol=1e-5)
    for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(stacked_cache)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    c_kv = cache.c_kv[:, :, :SEQ]
    assert all(not np.allclose(c_kv[i], c_kv[j]) for i in range(LAYERS) for j in range(i))  # each its own slice

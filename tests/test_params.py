"""The parameter table (ktjax/weights/params.py) is the single source of parameter names: every parameter of the model
has exactly one row, and the loader, sharding, the quantizer and the demo model's export all follow it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_models import CONFIGS
from ktjax.weights import params
from ktjax.weights import sharding
from ktjax.model import quantized as wq
from ktjax.weights import quantize as surgery
from ktjax.model.config import ModelConfig
from ktjax.weights.loader import layer_entries, top_entries
from ktjax.model.decoder import DeepseekModel, RunOptions

ARCH = {"v2": "DeepseekV2ForCausalLM", "v3": "DeepseekV3ForCausalLM", "v32": "DeepseekV32ForCausalLM"}
VARIANTS = {  # beyond tests/hf_models.py: tied embeddings, MLP biases with a dense layer, no shared experts
    "v3_tied": ("v3", dict(CONFIGS["v3"][1], tie_word_embeddings=True)),
    "v2_mlp_bias_dense": ("v2", dict(CONFIGS["v2"][1], first_k_dense_replace=1)),
    "v3_no_shared": ("v3", dict(CONFIGS["v3"][1], n_shared_experts=None)),
}


def config(name: str) -> ModelConfig:
    kind, raw = {**CONFIGS, **VARIANTS}[name]
    return ModelConfig.from_hf_dict(dict(raw, architectures=[ARCH[kind]]))


NAMES = sorted({**CONFIGS, **VARIANTS})


def state_paths(cfg) -> list[tuple]:
    abstract = nnx.eval_shape(lambda: DeepseekModel(cfg, rngs=nnx.Rngs(0)))
    return [params.key_names(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(abstract))]


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_has_exactly_one_row(name):
    cfg = config(name)
    paths = state_paths(cfg)
    rows = [params.lookup(p)[:2] for p in paths]  # a KeyError names a parameter the table lacks
    assert len(set(rows)) == len(paths)
    assert len(params.model_params(cfg)) == len(paths)
    for row, stack in rows:
        assert row.layer == (stack is not None)


def test_table_names_are_unambiguous():
    for row in params.TABLE:
        assert row.path[-1] not in (*params.PARTS, "value"), row  # those end a QuantizedArray's leaf path
        assert not row.layer or row.path[0] not in params.STACK_BY_NAME, row
    assert [s.name for s in params.STACKS] == ["dense_layers", "moe_layers"]
    cfg = config("v3_nonorm")
    layers = [i for s in params.STACKS for i in s.layers(cfg)]
    assert layers == list(range(cfg.num_hidden_layers))


@pytest.mark.parametrize("name", NAMES)
def test_loader_reads_each_row_from_its_hf_names(name):
    cfg = config(name)
    for stack in (None, *params.STACKS):
        for i in (stack.layers(cfg) if stack else [None])[:1]:
            entries = layer_entries(cfg, i, stack.moe, set()) if stack else top_entries(cfg)
            assert [e.param for e in entries] == [row for row, _ in params.stack_params(cfg, stack)]
            prefix = "" if stack is None else f"model.layers.{i}."
            for e in entries:
                want = prefix + e.param.hf
                assert e.sources == ([want.format(j=j) for j in range(e.shape[0])] if "{j}" in want else [want])


@pytest.mark.parametrize("name", NAMES)
def test_export_is_the_loaders_inverse(name):
    """Ours -> Hugging Face (the demo model's export) -> ours gives every parameter back, bit for bit."""
    cfg = config(name)
    state = nnx.state(DeepseekModel(cfg, rngs=nnx.Rngs(0))).to_pure_dict()
    hf = params.hf_tensors(cfg, state)
    used = set()
    for stack in (None, *params.STACKS):
        for j, i in enumerate(stack.layers(cfg) if stack else [None]):
            for s in params.hf_sources(cfg, stack, i, set(hf)):
                want = state if stack is None else state[stack.name]
                for key in s.row.path:
                    want = want[key]
                want = np.asarray(want) if stack is None else np.asarray(want)[j]
                got = s.convert(*[hf[n] for n in s.names])
                assert [hf[n].shape for n in s.names] == [tuple(x) for x in s.shapes]
                np.testing.assert_array_equal(got, want)
                used |= set(s.names)
    assert used == set(hf)


def test_sharding_and_quantizer_follow_the_table():
    cfg = config("v3")
    for path in state_paths(cfg):
        row, stack, _ = params.lookup(path)
        assert surgery.quantized_paths(path) == row.quantize
        ndim = len(row.axes or ()) + (stack is not None)
        if row.axes:
            assert sharding.logical_axes(path, ndim) == ((None,) if stack else ()) + row.axes
    # a quantized weight's scale keeps its values' leading (layer, expert) axes
    assert sharding.logical_axes(("moe_layers", "mlp", "w_gate", "scale"), 4) == (None, "experts", None, None)
    assert sharding.logical_axes(("moe_layers", "mlp", "w_gate", "values"), 4) == (None, "experts", None, None)
    assert sharding.logical_axes(("lm_head", "kernel", "scale"), 2) == (None, None)


def test_quantize_model_quantizes_exactly_the_rows_that_say_so():
    cfg = config("v2")
    model = surgery.quantize_model(DeepseekModel(cfg, rngs=nnx.Rngs(0)), "int8")
    for path, var in nnx.state(model).flat_state():
        row, _, _ = params.lookup(tuple(map(str, path)))
        assert isinstance(var[...], wq.QuantizedArray) == row.quantize, path
    # the quantized model runs under jit, its stacks scanned, values and scales together
    logits = jax.jit(lambda m, t: m(t, RunOptions(absorb=True)))(model, jnp.zeros((1, 3), jnp.int32))
    assert logits.shape == (1, 3, cfg.vocab_size) and bool(jnp.isfinite(logits).all())

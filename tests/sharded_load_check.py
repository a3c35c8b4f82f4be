"""Run by tests/test_sharding.py with 8 forced CPU devices: a converted checkpoint loaded with mesh=8 lands
straight in the sharded layout and gives the single-device logits.

usage: python tests/sharded_load_check.py HF_FOLDER WORK_DIR OUT.json
"""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import ktjax  # noqa: E402
from hf_models import rel_err  # noqa: E402  (tests/, this script's folder)
from ktjax.model.config import ModelConfig  # noqa: E402
from ktjax.weights.convert import main as convert  # noqa: E402
from ktjax.weights.loader import load_hf_model  # noqa: E402
from ktjax.model.decoder import PerLayer  # noqa: E402
from ktjax.weights.sharding import make_mesh  # noqa: E402

hf, work, out = sys.argv[1:4]
ids = np.random.default_rng(0).integers(0, 97, size=(2, 11))


def first_layer(value):
    """Layer 0 of an engine's per-layer parameter (model.PerLayer leaves, also inside a QuantizedArray)."""
    return jax.tree.map(lambda p: p.arrays[0], value, is_leaf=lambda v: isinstance(v, PerLayer))


def shard_shapes(array):
    return sorted({tuple(s.data.shape) for s in array.addressable_shards})


ckpt = os.path.join(work, "ckpt")
assert convert(["--hf-dir", hf, "--out", ckpt, "--quiet"]) == 0
one = ktjax.load(ckpt, mesh="1").logits(ids)
sharded = ktjax.load(ckpt, mesh="8")
# The engine holds each layer's parameters as separate arrays (model.PerLayer): the first MoE layer's experts.
w_gate = first_layer(sharded.state["moe_layers"]["mlp"]["w_gate"].get_value())
report = {
    "logits_error": rel_err(sharded.logits(ids), one),
    "w_gate_shape": list(w_gate.shape),
    "w_gate_shard_shapes": shard_shapes(w_gate),
    "w_gate_devices": len({s.device for s in w_gate.addressable_shards}),
    "devices": jax.device_count(),
}
for weights in ("int8", "int4"):
    path = os.path.join(work, weights)
    assert convert(["--hf-dir", hf, "--out", path, "--quiet", "--weights", weights]) == 0
    quantized = ktjax.load(path, mesh="8")
    report[f"{weights}_logits_error"] = rel_err(quantized.logits(ids), ktjax.load(path, mesh="1").logits(ids))
    w = first_layer(quantized.state["moe_layers"]["mlp"]["w_gate"].get_value())  # a QuantizedArray: values, scales
    report[f"{weights}_w_gate_shard_shapes"] = [shard_shapes(w.values), shard_shapes(w.scale)]
    report[f"{weights}_w_gate_shapes"] = [list(w.values.shape), list(w.scale.shape)]
# The Hugging Face loader itself returns sharded parameters (not only the Engine after placing them).
hf_model = load_hf_model(hf, ModelConfig.from_file(os.path.join(hf, "config.json")), mesh=make_mesh((8,)))
report["hf_w_gate_shard_shapes"] = shard_shapes(hf_model.moe_layers.mlp.w_gate[...])  # the stack [L, E, d, f]
report["hf_logits_error"] = rel_err(ktjax.load(hf, mesh="8").logits(ids), one)
with open(out, "w") as f:
    json.dump(report, f)

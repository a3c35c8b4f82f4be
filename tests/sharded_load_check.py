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
from ktjax.convert import main as convert  # noqa: E402

hf, work, out = sys.argv[1:4]
ckpt = os.path.join(work, "ckpt")
assert convert(["--hf-dir", hf, "--out", ckpt, "--quiet"]) == 0
ids = np.random.default_rng(0).integers(0, 97, size=(2, 11))
one = ktjax.load(ckpt, mesh="1").logits(ids)
sharded = ktjax.load(ckpt, mesh="8")
w_gate = sharded.state["moe_layers"]["mlp"]["w_gate"][...]
report = {
    "logits_error": float(np.abs(sharded.logits(ids) - one).max() / np.abs(one).max()),
    "w_gate_shape": list(w_gate.shape),
    "w_gate_shard_shapes": sorted({tuple(s.data.shape) for s in w_gate.addressable_shards}),
    "w_gate_devices": len({s.device for s in w_gate.addressable_shards}),
    "devices": jax.device_count(),
}
with open(out, "w") as f:
    json.dump(report, f)

"""Run by tests/test_dsa.py in a subprocess with 8 forced CPU devices: the V3.2 test model (index_topk 16) on
one device and on a mesh of 8, whose sequence-sharded cache (16 tokens per device) makes each device score
its own tokens and merge the global top-k; and on a 2x1 mesh, whose cache is split by sequence over `data`
only (each device attends over whole sequences: no merge). Writes one JSON file of results; the test makes
the assertions.

usage: python tests/dsa_sharding_check.py MODEL_FOLDER OUT.json
"""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402

import numpy as np  # noqa: E402

import ktjax  # noqa: E402
from hf_models import rel_err  # noqa: E402  (tests/, this script's folder)

CACHE_LENS = 128
# bf16 with absorbed prefill, int8 (e4m3 index keys) with naive prefill: both sparse prefill paths; int8 decodes.
RUNS = {"bf16": dict(cache_dtype="bf16", absorb_for_prefill=True),
        "int8": dict(cache_dtype="int8", absorb_for_prefill=False)}


def run(folder, mesh, ids, prompts):
    out = {}
    for name, settings in RUNS.items():
        engine = ktjax.load(folder, mesh=mesh, chunk_size=16, cache_lens=CACHE_LENS, max_new_tokens=12,
                            ignore_eos=True, **settings)
        out[f"cached_{name}"] = engine.cached_logits(ids)
        if name == "bf16":  # the decode loop once, with the e4m3 index cache (int8)
            continue
        gen = engine.generate(prompts)
        out[f"tokens_{name}"] = gen.tokens
        out[f"fraction_{name}"] = gen.stats["sparse_selected_fraction"]
        out[f"devices_{name}"] = gen.stats["devices"]
    return out


def main(folder, out_path):
    rng = np.random.default_rng(11)
    ids = rng.integers(0, 97, size=(2, 40))
    prompts = [rng.integers(0, 97, size=n).tolist() for n in (30, 9)]
    one, eight = run(folder, "1", ids, prompts), run(folder, "8", ids, prompts)
    report = {}
    for name in RUNS:
        report[name] = {"cached_error": rel_err(eight[f"cached_{name}"], one[f"cached_{name}"])}
    batch_only = ktjax.load(folder, mesh="2x1", chunk_size=16, cache_lens=CACHE_LENS, **RUNS["int8"])
    report["batch_only"] = {"cached_error": rel_err(batch_only.cached_logits(ids), one["cached_int8"])}
    report["int8"].update({key: [one[f"{key}_int8"], eight[f"{key}_int8"]]
                           for key in ("tokens", "fraction", "devices")})
    with open(out_path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:])

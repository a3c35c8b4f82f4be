"""Run by tests/test_sharding.py in a subprocess with 8 forced CPU devices (XLA_FLAGS must be set before JAX
starts): the same model on meshes of 1, 2, 4 and 8 devices (and 2x4), with the bf16 and the int8 cache.
Writes one JSON file of measurements; the test makes the assertions.

usage: python tests/sharding_check.py MODEL_FOLDER OUT.json
"""
import os
import re
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402

import numpy as np  # noqa: E402

import ktjax  # noqa: E402
from hf_models import rel_err  # noqa: E402  (tests/, this script's folder)

CACHE_LENS = 256  # no other dimension of the tiny model is 256: a collective of that size would move the cache
# bf16 prefill absorbed, int8 prefill naive: both attention paths over the sharded cache.
RUNS = {"bf16": dict(cache_dtype="bf16", absorb_for_prefill=True),
        "int8": dict(cache_dtype="int8", absorb_for_prefill=False)}
# The 2-D mesh (batch over `data`) runs one format, to keep the test short.
MESHES = {"1": ("bf16", "int8"), "2": ("bf16", "int8"), "4": ("bf16", "int8"), "8": ("bf16", "int8"),
          "2x4": ("int8",)}
COLLECTIVE = re.compile(r"= (\S+) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(")


def collectives(hlo_text):
    """(op, result shape) of every cross-device collective in a compiled program."""
    return sorted({(op, shape.split("{")[0]) for shape, op in COLLECTIVE.findall(hlo_text)})


def shard_report(engine, batch):
    """Each cache array's total bytes and its shards' bytes and sequence ranges, read from the shards."""
    cache = engine.new_cache(batch, engine.plan_cache(batch, CACHE_LENS))
    out = {}
    for name in ("c_kv", "scales", "k_pe"):
        leaf = getattr(cache, name)
        if leaf is not None:
            out[name] = {"nbytes": leaf.nbytes, "shards": [
                {"nbytes": s.data.nbytes, "seq": [s.index[2].start or 0, s.index[2].stop or leaf.shape[2]]}
                for s in leaf.addressable_shards]}
    return out


def run_mesh(folder, mesh, ids, prompts, formats):
    result = {}
    for fmt in formats:
        engine = ktjax.load(folder, mesh=mesh, chunk_size=8, cache_lens=CACHE_LENS, max_new_tokens=8,
                            ignore_eos=True, **RUNS[fmt])
        if "logits" not in result:
            result["logits"] = engine.logits(ids)
        result[f"cached_{fmt}"] = engine.cached_logits(ids)
        gen = engine.generate(prompts)
        result[f"tokens_{fmt}"] = gen.tokens
        result[f"stats_{fmt}"] = {k: gen.stats[k] for k in ("devices", "mesh", "cache_bytes", "cache_lens",
                                                             "cache_bytes_per_device", "sharding_notes")}
        if fmt == "int8":
            decode, = [program for key, program in engine._compiled.items() if key[0] == "decode"]
            result["decode_collectives"] = collectives(decode.as_text())
        if mesh == "8" and fmt == "int8":
            result["shards"] = shard_report(engine, len(prompts))
    return result


def main(folder, out_path):
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 97, size=(2, 21))
    prompts = [rng.integers(0, 97, size=n).tolist() for n in (13, 6)]
    runs = {mesh: run_mesh(folder, mesh, ids, prompts, formats) for mesh, formats in MESHES.items()}
    base = runs["1"]
    report = {"meshes": {}}
    for mesh, r in runs.items():
        entry = {"logits_error": rel_err(r["logits"], base["logits"])}
        for fmt in MESHES[mesh]:
            entry[f"cached_error_{fmt}"] = rel_err(r[f"cached_{fmt}"], base[f"cached_{fmt}"])
            entry[f"tokens_equal_{fmt}"] = r[f"tokens_{fmt}"] == base[f"tokens_{fmt}"]
            entry[f"stats_{fmt}"] = r[f"stats_{fmt}"]
        entry["decode_collectives"] = r["decode_collectives"]
        report["meshes"][mesh] = entry
    report["shards"] = runs["8"]["shards"]
    report["cache_lens"] = CACHE_LENS
    with open(out_path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:])

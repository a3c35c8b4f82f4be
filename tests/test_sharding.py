"""Sharding over a mesh, with the latent cache sharded along the sequence. The multi-device checks run once, in
a subprocess with 8 forced CPU devices (tests/sharding_check.py), and are asserted here piece by piece."""
import json
import os
import re
import subprocess
import sys

import pytest

from ktjax.errors import KtjaxError
from ktjax.runtime.settings import RuntimeConfig, parse_mesh

HERE = os.path.dirname(__file__)
# The project's float32 bound (README): logits agree to 1e-4 of the largest logit.
FLOAT32_BOUND = 1e-4
MESHES = ("1", "2", "4", "8", "2x4")


def formats(mesh):
    return ("int8",) if mesh == "2x4" else ("bf16", "int8")  # as tests/sharding_check.py runs them


def _forced_cpu_env(n=8):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(HERE, ".."), HERE, env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def report(hf_folder, tmp_path_factory):
    folder, _ = hf_folder("v3")
    out = str(tmp_path_factory.mktemp("sharding") / "report.json")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharding_check.py"), folder, out],
                          env=_forced_cpu_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("mesh", MESHES)
def test_logits_equal_single_device(report, mesh):
    r = report["meshes"][mesh]
    assert r["logits_error"] <= FLOAT32_BOUND
    for fmt in formats(mesh):
        assert r[f"cached_error_{fmt}"] <= FLOAT32_BOUND, (fmt, r[f"cached_error_{fmt}"])


@pytest.mark.parametrize("mesh", MESHES)
def test_greedy_generations_equal_single_device(report, mesh):
    r = report["meshes"][mesh]
    for fmt in formats(mesh):
        assert r[f"tokens_equal_{fmt}"], fmt


@pytest.mark.parametrize("mesh,devices,parts", [("1", 1, 1), ("2", 2, 2), ("4", 4, 4), ("8", 8, 8),
                                                ("2x4", 8, 8)])
def test_stats_report_per_device_cache_bytes(report, mesh, devices, parts):
    for fmt in formats(mesh):
        s = report["meshes"][mesh][f"stats_{fmt}"]
        assert s["devices"] == devices and s["cache_lens"] == report["cache_lens"]
        # 2x4: batch 2 over `data`, sequence over the 4 of `model`: each device holds 1/8.
        assert s["cache_bytes_per_device"] * parts == s["cache_bytes"]


def test_cache_shards_hold_one_nth_of_every_sequence(report):
    lens = report["cache_lens"]
    for name, leaf in report["shards"].items():
        shards = leaf["shards"]
        assert len(shards) == 8
        assert all(s["nbytes"] * 8 == leaf["nbytes"] for s in shards), name
        assert sorted(tuple(s["seq"]) for s in shards) == [(k * lens // 8, (k + 1) * lens // 8) for k in range(8)]


@pytest.mark.parametrize("mesh", ["2", "4", "8", "2x4"])
def test_decode_merges_by_log_sum_exp_and_never_gathers_the_cache(report, mesh):
    ops = [tuple(o) for o in report["meshes"][mesh]["decode_collectives"]]
    batch = 1 if mesh == "2x4" else 2  # per device: the batch is split over `data` on 2x4
    # The merge: a max of the log-sum-exp [b, 1, heads] and a sum of weighted outputs [b, 1, heads, rank + 1].
    assert ("all-reduce", f"f32[{batch},1,4]") in ops and ("all-reduce", f"f32[{batch},1,4,21]") in ops
    # Nothing the size of the cache's sequence moves: not the cache (256 tokens) nor a shard of it.
    shard_len = report["cache_lens"] // (4 if mesh == "2x4" else int(mesh))
    assert not any(re.search(rf"\b({report['cache_lens']}|{shard_len})\b", shape) for _, shape in ops), ops
    if mesh == "8":  # heads are not split on 8 devices: the merge and the partial sums are all that crosses
        assert {op for op, _ in ops} == {"all-reduce"}, ops


def test_replication_fallback_is_a_note(report):
    notes8 = report["meshes"]["8"]["stats_bf16"]["sharding_notes"]
    assert any(n.startswith("heads (4) not divisible by the 8 devices") and "w_uk" in n for n in notes8)
    assert any(n.startswith("vocab (97) not divisible") and "lm_head/kernel" in n for n in notes8)
    notes4 = report["meshes"]["4"]["stats_bf16"]["sharding_notes"]
    assert not any(n.startswith("heads") for n in notes4)  # 4 heads split over 4 devices
    assert report["meshes"]["1"]["stats_bf16"]["sharding_notes"] == []


def test_cli_mesh_8_reports_per_device_cache_bytes(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ktjax.cli.generate", "--mesh", "8", "--json", "--max-new-tokens", "4",
                           "--cache-dtype", "int8", "--ignore-eos"], env=_forced_cpu_env(), capture_output=True,
                          text=True, timeout=600, cwd=os.path.join(HERE, ".."))
    assert proc.returncode == 0, proc.stderr[-4000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])["stats"]
    assert stats["devices"] == 8 and stats["mesh"] == "8" and stats["generated_tokens"] == 4
    assert stats["cache_bytes_per_device"] * 8 == stats["cache_bytes"]


def test_mesh_strings():
    assert parse_mesh("8") == (8,) and parse_mesh("2x4") == (2, 4) and parse_mesh(None) is None
    assert RuntimeConfig.from_overrides(mesh=4).mesh == (4,)
    for bad in ("0", "2x", "x4", "two", "2x4x2"):
        with pytest.raises(KtjaxError, match="mesh="):
            RuntimeConfig.from_overrides(mesh=bad)


def test_mesh_larger_than_the_machine_is_a_clear_error(hf_folder):
    import jax

    import ktjax

    folder, _ = hf_folder("v2_lite")
    n = jax.device_count() + 1
    with pytest.raises(KtjaxError, match=f"needs {n} devices.*xla_force_host_platform_device_count={n}"):
        ktjax.load(folder, mesh=str(n))


@pytest.mark.slow
def test_two_processes_share_one_mesh(hf_folder, tmp_path):
    """The multi-host path on one machine: two processes of 4 CPU devices each, one mesh of 8 over both."""
    import socket

    import ktjax

    folder, _ = hf_folder("v3")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(HERE, ".."), HERE, env.get("PYTHONPATH", "")])
    outs = [str(tmp_path / f"p{i}.json") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_check.py"), str(i), str(port), folder,
                               outs[i]], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-3000:] for e in errors]
    results = []
    for out in outs:
        with open(out) as f:
            results.append(json.load(f))
    single = ktjax.load(folder, cache_dtype="bf16", chunk_size=8, max_new_tokens=6, ignore_eos=True).generate(
        results[0]["prompts"])
    for r in results:
        assert r["devices"] == 8 and r["local_devices"] == 4 and r["tokens"] == single.tokens
        assert r["stats"]["cache_bytes_per_device"] * 8 == r["stats"]["cache_bytes"]


def test_converted_checkpoint_loads_straight_into_the_sharded_layout(hf_folder, tmp_path):
    folder, _ = hf_folder("v3")
    out = str(tmp_path / "report.json")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharded_load_check.py"), folder, str(tmp_path), out],
                          env=_forced_cpu_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        r = json.load(f)
    assert r["devices"] == 8 and r["logits_error"] <= FLOAT32_BOUND
    assert r["int8_logits_error"] <= FLOAT32_BOUND and r["int4_logits_error"] <= FLOAT32_BOUND
    for weights in ("int8", "int4"):  # a quantized layer's scales split over experts like its values
        for shape, shards in zip(r[f"{weights}_w_gate_shapes"], r[f"{weights}_w_gate_shard_shapes"]):
            assert shards == [[shape[0] // 8, *shape[1:]]], (weights, shape, shards)
    experts = r["w_gate_shape"][0]  # one layer's [experts, d, f] (the engine's per-layer arrays): split over 8
    assert r["w_gate_devices"] == 8 and r["w_gate_shard_shapes"] == [[experts // 8, *r["w_gate_shape"][1:]]]
    # The loader's stack [layers, experts, d, f] is split the same way along its expert axis.
    assert r["hf_logits_error"] <= FLOAT32_BOUND
    assert [s[1:] for s in r["hf_w_gate_shard_shapes"]] == r["w_gate_shard_shapes"]

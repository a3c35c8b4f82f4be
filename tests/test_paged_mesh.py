"""The paged pool over 8 forced CPU devices (tests/paged_mesh_check.py, in a subprocess): its pages split
over the devices (N devices hold N times the pages), the same greedy tokens as one device, with and without
speculative decoding (speculative mtp); sparse attention (V3.2) refused there."""
import json
import os
import subprocess
import sys

import pytest

from test_sharding import HERE, _forced_cpu_env


@pytest.fixture(scope="module")
def report(hf_folder, tmp_path_factory):
    folder, _ = hf_folder("v2_lite")
    out = str(tmp_path_factory.mktemp("paged_mesh") / "report.json")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "paged_mesh_check.py"), folder, out],
                          env=_forced_cpu_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("fmt", ["int8"])
def test_greedy_tokens_equal_one_device(report, fmt):
    one, eight = report[fmt]["1"]["results"], report[fmt]["8"]["results"]
    assert [r["tokens"] for r in eight] == [r["tokens"] for r in one]
    assert all(len(r["tokens"]) == 6 for r in eight)
    assert eight[-1]["cached"] == 64 == one[-1]["cached"]  # the prefix hit works on the mesh too


def test_pool_pages_split_over_the_devices(report):
    shards = report["int8"]["8"]["shards"]
    assert len(shards) == 8
    assert sorted(tuple(s["pages"]) for s in shards) == [(4 * k, 4 * (k + 1)) for k in range(8)]
    assert all(s["nbytes"] * 8 == report["int8"]["8"]["nbytes"] for s in shards)


def test_speculative_greedy_tokens_equal_one_device(report):
    """speculative mtp (2 drafts) over the split pool, its MTP slice split with it: one device's tokens, drafts
    and acceptances, drafts both accepted and rejected, and the prefix hit (the pages whose next token matches);
    and a sampled request's tokens (the same seed: the same draws)."""
    one, eight = report["speculative"]["1"], report["speculative"]["8"]
    assert [r["tokens"] for r in eight["results"]] == [r["tokens"] for r in one["results"]]
    assert [r["spec"] for r in eight["results"]] == [r["spec"] for r in one["results"]]
    assert all(len(r["tokens"]) == 12 for r in eight["results"])
    assert eight["results"][-1]["tokens"] != eight["results"][1]["tokens"]  # sampled, not greedy
    assert 0 < sum(r["spec"]["accepted"] for r in eight["results"]) < sum(r["spec"]["drafted"]
                                                                          for r in eight["results"])
    assert eight["results"][2]["cached"] == one["results"][2]["cached"] > 0
    assert sorted(tuple(s["pages"]) for s in eight["shards"]) == [(4 * k, 4 * (k + 1)) for k in range(8)]


def test_sparse_attention_over_the_split_pool_is_refused(report):
    assert "sparse attention (DeepSeek-V3.2) over a page pool split over devices" in report["v32_refused"]

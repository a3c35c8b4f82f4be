"""benchmarks/gpu_check.py in its CPU smoke mode, in-process: the steps run, and gpu_check.json has the shape
that readers of a GPU run rely on. The kernel benchmark runs for real (tiny, interpreted); the kernel tests and
generation are stand-ins, to stay fast (`python benchmarks/gpu_check.py --cpu-smoke` runs everything for real,
in about a minute), and the stand-in generation reports a token mismatch, to check that it is reported."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu_check  # noqa: E402

# Prints what `python -m ktjax.generate --json` prints; the Pallas run of int4 differs at token 2.
FAKE_GENERATE = textwrap.dedent("""
    import json, sys
    a = sys.argv
    fmt, attention = a[a.index("--cache-dtype") + 1], a[a.index("--attention") + 1]
    ids = [5, 6, 7, 8]
    if fmt == "int4" and attention == "pallas":
        ids[2] = 99
    print("some streamed text")
    print(json.dumps({"completion": "x", "completion_ids": ids, "stats": {
        "decode_tokens_per_s": 10.0, "prefill_tokens_per_s": 20.0, "time_to_first_token_s": 0.1,
        "compile_s": 1.0, "generated_tokens": 4, "backend": "cpu", "attention": attention}}))
""")


FAKE_TESTS = textwrap.dedent("""
    import pytest

    def test_merge_splits():
        pass

    @pytest.mark.skip(reason="stand-in")
    def test_decode_default_config():
        pass
""")


def test_cpu_smoke_writes_one_json(tmp_path, monkeypatch, capsys):
    (tmp_path / "test_stand_in.py").write_text(FAKE_TESTS)  # outside tests/: no conftest, no torch import
    monkeypatch.setattr(gpu_check, "KERNEL_TESTS", [str(tmp_path / "test_stand_in.py")])
    monkeypatch.setattr(gpu_check, "GENERATE", [sys.executable, "-c", FAKE_GENERATE])
    out = tmp_path / "out"
    rc = gpu_check.main(["--cpu-smoke", "--out", str(out), "--formats", "bf16", "int4", "--bench-formats", "bf16",
                         "--batches", "1"])
    report = json.loads((out / "gpu_check.json").read_text())
    assert rc == 0, report
    assert report["schema"] == gpu_check.SCHEMA and report["mode"] == "cpu-smoke" and report["finished"]
    steps = report["steps"]
    assert list(steps) == list(gpu_check.STEPS)
    assert all(step["status"] == "ok" for step in steps.values())

    assert steps["env"]["info"]["backend"] == "cpu"
    tests = steps["pallas_tests"]
    assert (tests["compiled"], tests["passed"], tests["skipped"], tests["failures"], tests["failing"]) == (
        False, 1, 1, 0, [])

    bench = steps["kernel_bench"]
    assert bench["copy_bandwidth_gbps"] > 0 and bench["setup"]["interpret"] is True
    [point] = bench["points"]
    assert {"format", "context", "batch", "pallas_ms", "xla_ms", "cache_bytes", "pallas_gbps", "xla_gbps",
            "pallas_of_copy", "xla_of_copy", "max_err"} <= set(point)
    assert (point["format"], point["batch"]) == ("bf16", 1) and point["max_err"] < 1e-4

    gen = steps["generate"]
    assert [(r["format"], r["attention"]) for r in gen["runs"]] == [
        ("bf16", "pallas"), ("bf16", "xla"), ("int4", "pallas"), ("int4", "xla")]
    assert all(r["decode_tokens_per_s"] == 10.0 for r in gen["runs"])
    assert [(c["format"], c["tokens_equal"], c["first_mismatch"]) for c in gen["comparisons"]] == [
        ("bf16", True, None), ("int4", False, 2)]
    assert gen["mismatches"] == ["int4"]
    assert any("int4 NO (first at 2)" in line for line in report["summary"])
    assert "results in" in capsys.readouterr().out


def test_a_hanging_step_is_cut_and_recorded(tmp_path):
    result = gpu_check.run_command([sys.executable, "-c", "print('started', flush=True); import time; time.sleep(60)"],
                                   timeout=1, log=tmp_path / "hang.log")
    rec = gpu_check.step_record(result, ok=False)
    assert rec["status"] == "timeout" and result["seconds"] < 15 and "started" in rec["tail"]


def test_skipped_step_when_the_budget_is_spent(tmp_path):
    rc = gpu_check.main(["--cpu-smoke", "--out", str(tmp_path), "--budget", "1", "--steps", "env"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 1 and report["steps"]["env"]["status"] == "skipped"


@pytest.mark.parametrize("junit, expected", [
    ('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1"><testcase classname="t" name="a"/>'
     '<testcase classname="t" name="b"><failure message="boom&#10;more">x</failure></testcase></testsuite>'
     '</testsuites>', dict(tests=3, passed=1, failures=1, skipped=1, failing=[dict(test="t::b", message="boom")])),
])
def test_junit_counts(tmp_path, junit, expected):
    path = tmp_path / "j.xml"
    path.write_text(junit)
    counts = gpu_check.junit_counts(path)
    assert {k: counts[k] for k in expected} == expected


def test_counts_from_a_log_cut_short():
    log = ("tests/test_pallas.py::test_a[bf16-1] PASSED    [  2%]\n"
           "tests/test_pallas.py::test_b FAILED    [  4%]\n"
           "tests/test_pallas.py::test_c SKIPPED (no GPU)    [  6%]\n")
    counts = gpu_check.verbose_counts(log)
    assert (counts["tests"], counts["passed"], counts["failures"], counts["skipped"]) == (3, 1, 1, 1)
    assert counts["failing"] == [dict(test="tests/test_pallas.py::test_b", message="FAILED")]


def test_tiling_sweep_measures_each_config_against_the_reference(tmp_path, monkeypatch):
    """benchmarks/sweep_mla_kernels.py at tiny sizes (interpreted): one JSON point per (shape, tiling), each
    with the kernel's output checked against the XLA reference, and a tiling that does not exist recorded as an
    error, not a crash."""
    import sweep_mla_kernels as sweep

    monkeypatch.setattr(sweep, "CONFIGS", [(None, None, None, None, None), (16, 16, 4, 2, 2), (24, 16, 4, 2, None)])
    out = tmp_path / "sweep.jsonl"
    sweep.main(["--jsonl", str(out), "--shapes", "int8:64:1", "--heads", "4", "--rank", "64", "--rope", "16",
                "--repeats", "1", "--copy-mb", "1", "--matmul-n", "64"])
    header, *points = [json.loads(line) for line in out.read_text().splitlines()]
    assert header["kind"] == "header" and header["copy_gbps"] > 0 and header["matmul_bf16_tflops"] > 0
    assert [p["config"] for p in points] == [list(c) for c in sweep.CONFIGS]
    for p in points[:2]:
        # bf16 queries: the kernel's dots take bf16 operands (the probabilities rounded to 2^-9 relative) and the
        # outputs are O(1), so bf16 rounding, not float32's, bounds the difference.
        assert p["max_err"] < 2e-3 and p["ms"] > 0 and 0 < p["of_roof"]
    assert "power of two" in points[2]["error"]


# ---- benchmarks/gpu_lease.sh: the lease's two commands name scripts and flags that exist -------------------

def _lease_commands():
    """(script, flags) of every python step in gpu_lease.sh, read from the script itself."""
    import re

    text = (Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_lease.sh").read_text()
    text = text.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        m = re.search(r'"\$PYTHON" (benchmarks/\S+\.py)(.*)', line)
        if m:
            commands.append((m.group(1), re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", m.group(2))))
    return commands


def test_the_lease_script_runs_existing_scripts_with_flags_they_take():
    root = Path(__file__).resolve().parent.parent
    commands = _lease_commands()
    assert {script for script, _ in commands} == {"benchmarks/gpu_e2e.py", "benchmarks/bench_mla_kernels.py",
                                                  "benchmarks/gpu_check.py", "benchmarks/bench_fp8.py"}
    helps = {}
    for script, flags in commands:
        if script not in helps:
            helps[script] = subprocess.run([sys.executable, str(root / script), "--help"], capture_output=True,
                                           text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
        for flag in flags:
            assert flag in helps[script], (script, flag)
    usage = subprocess.run(["bash", str(root / "benchmarks" / "gpu_lease.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_each_lease_command_fits_nine_minutes():
    """gpu_lease.sh's steps' own limits add up to at most 9 minutes per part (a command may run 10)."""
    import re

    text = (Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_lease.sh").read_text()
    parts = re.findall(r"^\s+(\d)\)\n(.*?);;", text, flags=re.S | re.M)
    assert [p for p, _ in parts] == ["1", "2"]
    for part, body in parts:
        limits = [int(s) for s in re.findall(r"^\s+step \S+ (\d+) ", body, flags=re.M)]
        assert limits and sum(limits) <= 540, (part, limits)

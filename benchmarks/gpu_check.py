"""One command that checks ktjax on one NVIDIA GPU and writes every result into one JSON file.

    bash benchmarks/gpu_check.sh [OUT_DIR]                  # the GPU run (at most ~8 minutes); OUT_DIR=gpu_check_out
    python benchmarks/gpu_check.py --out OUT_DIR            # the same, without the shell wrapper's environment
    python benchmarks/gpu_check.py --cpu-smoke --out DIR    # this script end to end on a CPU: tiny sizes, interpret mode

Steps, each in its own subprocess with its own timeout, all under one time budget (`--budget`):

  env           jax / jaxlib / flax / torch / transformers versions, the devices, nvidia-smi
  pallas_tests  the Pallas kernel tests (dense, paged and sparse: KERNEL_TESTS) with the kernels compiled for the
                GPU (KTJAX_PALLAS_COMPILED=1)
  kernel_bench  benchmarks/bench_mla_kernels.py: one decode step at V3 dims (128 heads, rank 512, rope 64),
                batch 1 and 8, context 4k / 32k / 128k, every cache format, Pallas and XLA side by side
                against the copy bandwidth measured in the same run
  generate      python -m ktjax.generate with the demo model, per cache format, --attention pallas and xla:
                decode tokens/s, and whether the greedy tokens of the two are the same

A step that fails or times out is recorded (status, return code, the tail of its output) and the next one
runs. OUT_DIR/gpu_check.json is rewritten after every step, so a run cut short still leaves what it measured;
each step's full output is in OUT_DIR/logs/. The exit code is 0 when every step finished (token mismatches
are findings in the JSON and the summary, not failures), 1 otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# ---- ktjax names this script relies on: the one place to change when modules move. ----
from ktjax.kv.formats import FORMATS as CACHE_FORMATS  # noqa: E402  (the format names; imports no JAX)

# Every kernel test module honours KTJAX_PALLAS_COMPILED=1 (tests/pallas_mode.py).
KERNEL_TESTS = ["tests/test_pallas.py", "tests/test_paged_kernel.py", "tests/test_dsa_kernels.py",
                "tests/test_mosaic.py"]
KERNEL_BENCH = "benchmarks/bench_mla_kernels.py"
GENERATE = [sys.executable, "-m", "ktjax.cli.generate"]
# -----------------------------------------------------------------------------------------

SCHEMA = 1
PREFERRED_ORDER = ("bf16", "fp8", "int8", "int4", "float32")
FORMATS = ([name for name in PREFERRED_ORDER if name in CACHE_FORMATS]
           + [name for name in CACHE_FORMATS if name not in PREFERRED_ORDER])
ATTENTIONS = ("pallas", "xla")
STEPS = ("env", "pallas_tests", "kernel_bench", "generate")
TAIL_CHARS = 4000
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"

# Longest a step may take, in seconds (each is also cut to what is left of --budget).
GPU_CAPS = dict(env=60, pallas_tests=180, kernel_bench=170, generate=150)
SMOKE_CAPS = dict(env=60, pallas_tests=120, kernel_bench=120, generate=240)
GENERATE_RUN_CAP = 60          # one python -m ktjax.generate
MIN_STEP_SECONDS = 10          # a step with less time left than this is skipped

ENV_PROBE = r"""
import importlib, json, platform, sys
import jax
out = dict(python=sys.version.split()[0], platform=platform.platform(), jax=jax.__version__,
           backend=jax.default_backend())
for name in ("jaxlib", "flax", "torch", "transformers", "numpy"):
    try:
        out[name] = importlib.import_module(name).__version__
    except Exception as e:
        out[name] = f"unavailable: {type(e).__name__}"
devices = jax.devices()
out["device_count"] = len(devices)
out["device_kind"] = devices[0].device_kind
out["compute_capability"] = str(getattr(devices[0], "compute_capability", "")) or None
out["core_count"] = getattr(devices[0], "core_count", None)
try:
    stats = devices[0].memory_stats() or {}
    out["memory_bytes_limit"] = stats.get("bytes_limit")
except Exception:
    out["memory_bytes_limit"] = None
print(json.dumps(out))
"""


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def tail(text: str, n: int = TAIL_CHARS) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def run_command(cmd, *, timeout: float, log: Path, env: dict | None = None) -> dict:
    """Run cmd in its own process group from the repo root; kill the group on timeout.
    -> {command, returncode, seconds, timed_out, output}; output is stdout and stderr together."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timed_out = False
    with open(log, "w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        # PYTHONPATH: the children import this checkout's ktjax, whatever else is installed.
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})}, start_new_session=True)
        try:
            proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
    output = log.read_text(errors="replace").split("\n", 1)[-1]
    return dict(command=" ".join(map(str, cmd)), returncode=proc.returncode, seconds=round(time.perf_counter() - t0, 2),
                timed_out=timed_out, output=output)


def step_record(result: dict, ok: bool) -> dict:
    """The common fields of a step; the output's tail only when something went wrong."""
    status = "timeout" if result["timed_out"] else ("ok" if ok else "failed")
    rec = dict(status=status, command=result["command"], returncode=result["returncode"], seconds=result["seconds"])
    if status != "ok":
        rec["tail"] = tail(result["output"])
    return rec


class Check:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out).resolve()
        self.logs = self.out / "logs"
        self.smoke = args.cpu_smoke
        self.caps = SMOKE_CAPS if self.smoke else GPU_CAPS
        self.deadline = time.monotonic() + args.budget
        # Smoke: CPU only, kernels interpreted. GPU: kernels compiled (tests), GPU memory grown on demand.
        self.child_env = {"JAX_PLATFORMS": "cpu"} if self.smoke else {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        self.report = dict(schema=SCHEMA, mode="cpu-smoke" if self.smoke else "gpu", started=now_iso(),
                           finished=None, budget_s=args.budget, formats=args.formats, steps={})
        self.report["settings"] = dict(bench_formats=args.bench_formats, contexts=None if self.smoke else args.contexts,
                                       batches=args.batches, repeats=args.repeats, max_new_tokens=args.max_new_tokens)

    def time_for(self, step: str) -> float:
        return min(self.caps[step], self.deadline - time.monotonic() - 5)

    def save(self):
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "gpu_check.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.report, indent=1) + "\n")
        tmp.replace(path)  # never a half-written file
        return path

    def run(self) -> int:
        for step in STEPS:
            if step not in self.args.steps:
                continue
            budget = self.time_for(step)
            if self.no_gpu():
                rec = dict(status="skipped", reason="no GPU (benchmarks/gpu_check.py --cpu-smoke checks this script on a CPU)")
            elif budget < MIN_STEP_SECONDS:
                rec = dict(status="skipped", reason=f"{budget:.0f} s of the budget left")
            else:
                print(f"gpu_check: {step} (up to {budget:.0f} s)", flush=True)
                try:
                    rec = getattr(self, step)(budget)
                except Exception as e:  # noqa: BLE001 -- a bug in one step must not lose the others
                    rec = dict(status="error", error=f"{type(e).__name__}: {e}")
            self.report["steps"][step] = rec
            self.save()
        self.report["finished"] = now_iso()
        self.report["summary"] = summary_lines(self.report)
        path = self.save()
        print("\n".join(self.report["summary"]))
        print(f"gpu_check: results in {path}")
        statuses = [s["status"] for s in self.report["steps"].values()]
        return 0 if all(s == "ok" for s in statuses) else 1

    # ---------------------------------------------------------------------------------------------- steps

    def no_gpu(self) -> bool:
        """A GPU run whose env step found another backend: the other steps would measure nothing useful."""
        info = self.report["steps"].get("env", {}).get("info") or {}
        return not self.smoke and info.get("backend", "gpu") != "gpu"

    def env(self, budget: float) -> dict:
        result = run_command([sys.executable, "-c", ENV_PROBE], timeout=budget, log=self.logs / "env.log",
                             env=self.child_env)
        info = last_json_line(result["output"]) if result["returncode"] == 0 else None
        rec = step_record(result, info is not None)
        rec.update(command=f"{sys.executable} -c <ENV_PROBE in benchmarks/gpu_check.py>", info=info)
        if shutil.which("nvidia-smi"):
            smi = run_command(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.memory",
                               "--format=csv,noheader"], timeout=20, log=self.logs / "nvidia-smi.log")
            rec["nvidia_smi"] = smi["output"].strip()
        if info is not None and not self.smoke and info["backend"] != "gpu":
            rec["status"] = "failed"
            rec["error"] = f"no GPU: jax's backend is {info['backend']!r} (use --cpu-smoke on a CPU)"
        return rec

    def pallas_tests(self, budget: float) -> dict:
        xml = self.out / "pallas_tests.xml"
        xml.unlink(missing_ok=True)
        # -v: one line per test, so a run cut short by its timeout still says which tests passed.
        cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *KERNEL_TESTS, f"--junitxml={xml}",
               "-o", "junit_family=xunit1"]
        env = dict(self.child_env)
        if self.smoke:
            cmd += ["-k", self.args.smoke_tests]
        else:
            env["KTJAX_PALLAS_COMPILED"] = "1"
        result = run_command(cmd, timeout=budget, log=self.logs / "pallas_tests.log", env=env)
        rec = step_record(result, result["returncode"] == 0)
        rec["compiled"] = not self.smoke
        rec.update(junit_counts(xml) if xml.exists() else verbose_counts(result["output"]))
        if not self.smoke and rec.get("tests") and rec.get("skipped") == rec.get("tests"):
            rec["status"] = "failed"
            rec["error"] = "every test was skipped: the kernels were not compiled for a GPU"
        return rec

    def kernel_bench(self, budget: float) -> dict:
        jsonl = self.out / "kernel_bench.jsonl"
        jsonl.unlink(missing_ok=True)
        cmd = [sys.executable, KERNEL_BENCH, "--jsonl", jsonl, "--keep-going", "--formats", *self.args.bench_formats,
               "--batches", *map(str, self.args.batches)]
        if self.smoke:
            cmd += ["--smoke"]
        else:
            cmd += ["--contexts", *map(str, self.args.contexts), "--repeats", str(self.args.repeats)]
        result = run_command(cmd, timeout=budget, log=self.logs / "kernel_bench.log", env=self.child_env)
        lines = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()] if jsonl.exists() else []
        header = next((x for x in lines if x["kind"] == "header"), None)
        points = [{k: v for k, v in x.items() if k != "kind"} for x in lines if x["kind"] == "point"]
        errors = [{k: v for k, v in x.items() if k != "kind"} for x in lines if x["kind"] == "error"]
        rec = step_record(result, result["returncode"] == 0 and not errors)
        rec.update(setup=header, copy_bandwidth_gbps=header and header["copy_bandwidth_gbps"], points=points,
                   point_errors=errors)
        return rec

    def generate(self, budget: float) -> dict:
        t0 = time.monotonic()
        t_end = t0 + budget
        runs = []
        for fmt in self.args.formats:
            for attention in ATTENTIONS:
                left = t_end - time.monotonic()
                if left < MIN_STEP_SECONDS:
                    runs.append(dict(format=fmt, attention=attention, status="skipped",
                                     reason="the step's time ran out"))
                    continue
                runs.append(self.generate_one(fmt, attention, min(GENERATE_RUN_CAP, left)))
        comparisons = [compare_tokens(fmt, runs) for fmt in self.args.formats]
        ok = all(r["status"] == "ok" for r in runs)
        return dict(status="ok" if ok else "failed", seconds=round(time.monotonic() - t0, 2),
                    max_new_tokens=self.args.max_new_tokens, prompt=PROMPT,
                    runs=runs, comparisons=comparisons,
                    mismatches=[c["format"] for c in comparisons if c["tokens_equal"] is False])

    def generate_one(self, fmt: str, attention: str, timeout: float) -> dict:
        cmd = [*GENERATE, "--json", "--no-progress", "--attention", attention, "--cache-dtype", fmt,
               "--max-new-tokens", str(self.args.max_new_tokens), "--ignore-eos", "--temperature", "0",
               "--prompt", PROMPT]
        result = run_command(cmd, timeout=timeout, log=self.logs / f"generate_{fmt}_{attention}.log", env=self.child_env)
        parsed = last_json_line(result["output"]) if result["returncode"] == 0 else None
        rec = dict(format=fmt, attention=attention, **step_record(result, parsed is not None))
        if parsed is not None:
            stats = parsed.get("stats", {})
            rec.update(completion_ids=parsed.get("completion_ids"),
                       **{k: stats.get(k) for k in ("decode_tokens_per_s", "prefill_tokens_per_s",
                                                    "time_to_first_token_s", "compile_s", "generated_tokens",
                                                    "cache_bytes_per_token", "peak_memory_bytes", "backend",
                                                    "attention")})
        return rec


# ---------------------------------------------------------------------------------------------- helpers

def junit_counts(xml: Path) -> dict:
    """passed / failed / errors / skipped and the failing tests' names, from pytest's junit XML."""
    if not xml.exists():
        return {}
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as e:
        return dict(junit_error=str(e))
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failing = []
    for case in suite.iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            message = (bad.get("message") or "").strip().splitlines()
            failing.append(dict(test=f"{case.get('classname')}::{case.get('name')}",
                                message=message[0][:300] if message else ""))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failing"] = failing
    return counts


def verbose_counts(output: str) -> dict:
    """The same counts from `pytest -v` lines, for a run stopped before it wrote its XML (tests not reached
    are not counted)."""
    outcomes = re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", output, re.M)
    count = lambda *kinds: sum(1 for _, o in outcomes if o in kinds)  # noqa: E731
    return dict(tests=len(outcomes), passed=count("PASSED", "XFAIL", "XPASS"), failures=count("FAILED"),
                errors=count("ERROR"), skipped=count("SKIPPED"),
                failing=[dict(test=name, message=o) for name, o in outcomes if o in ("FAILED", "ERROR")],
                counted_from="log (no junit XML: the run was cut short)")


def last_json_line(output: str):
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def compare_tokens(fmt: str, runs: list[dict]) -> dict:
    """Greedy tokens of the Pallas run against the XLA run of one format (None when either did not finish)."""
    by = {r["attention"]: r for r in runs if r["format"] == fmt}
    ids = {a: by.get(a, {}).get("completion_ids") for a in ATTENTIONS}
    speed = {f"{a}_decode_tokens_per_s": by.get(a, {}).get("decode_tokens_per_s") for a in ATTENTIONS}
    if ids["pallas"] is None or ids["xla"] is None:
        return dict(format=fmt, tokens_equal=None, first_mismatch=None, **speed)
    first = next((i for i, (a, b) in enumerate(zip(ids["pallas"], ids["xla"])) if a != b), None)
    if first is None and len(ids["pallas"]) != len(ids["xla"]):
        first = min(len(ids["pallas"]), len(ids["xla"]))
    return dict(format=fmt, tokens_equal=first is None, first_mismatch=first, **speed)


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def summary_lines(report: dict) -> list[str]:
    lines = [f"gpu_check ({report['mode']}), {report['started']} .. {report['finished']}"]
    for name, rec in report["steps"].items():
        if "seconds" not in rec:  # skipped, or the step itself broke
            lines.append(f"  {name}: {rec['status']} ({rec.get('reason') or rec.get('error', '')})")
            continue
        head = f"  {name}: {rec['status']} in {rec['seconds']:.0f} s"
        lines += _STEP_SUMMARIES[name](head, rec)
        if rec.get("error"):
            lines.append(f"    {rec['error']}")
    return lines


def _env_summary(head, rec):
    info = rec.get("info") or {}
    return [f"{head}; {info.get('device_kind', '?')} x{info.get('device_count', '?')} ({info.get('backend', '?')}), "
            f"jax {info.get('jax', '?')}"]


def _tests_summary(head, rec):
    lines = [f"{head}; kernels {'compiled' if rec.get('compiled') else 'interpreted'}: {rec.get('passed', '?')} passed, "
             f"{rec.get('failures', '?')} failed, {rec.get('errors', '?')} errors, {rec.get('skipped', '?')} skipped"]
    return lines + [f"    FAILED {f['test']}: {f['message']}" for f in rec.get("failing", [])[:10]]


def _bench_summary(head, rec):
    points = rec.get("points", [])
    lines = [f"{head}; {len(points)} points, {len(rec.get('point_errors', []))} failed; copy bandwidth "
             f"{_fmt(rec.get('copy_bandwidth_gbps'), '.0f')} GB/s"]
    if points:
        lines.append("    format   context batch  pallas ms   xla ms   pallas GB/s (of copy)   xla GB/s (of copy)")
    for p in points:
        lines.append(f"    {p['format']:<8} {p['context']:>7} {p['batch']:>5} {p['pallas_ms']:>10.3f} {p['xla_ms']:>8.3f}"
                     f"  {p['pallas_gbps']:>10.1f} ({100 * p['pallas_of_copy']:>3.0f}%)"
                     f"  {p['xla_gbps']:>10.1f} ({100 * p['xla_of_copy']:>3.0f}%)")
    return lines + [f"    FAILED {e['format']} {e['context']} x{e['batch']}: {e['error'][:200]}"
                    for e in rec.get("point_errors", [])]


def _generate_summary(head, rec):
    said = {True: "yes", False: None, None: "?"}
    lines = [f"{head}; {rec['max_new_tokens']} greedy tokens per run; tokens pallas == xla: " + ", ".join(
        f"{c['format']} {said[c['tokens_equal']] or 'NO (first at %d)' % c['first_mismatch']}"
        for c in rec["comparisons"])]
    lines.append("    decode tok/s pallas / xla: " + ", ".join(
        f"{c['format']} {_fmt(c['pallas_decode_tokens_per_s'], '.1f')} / {_fmt(c['xla_decode_tokens_per_s'], '.1f')}"
        for c in rec["comparisons"]))
    return lines + [f"    {r['format']} {r['attention']}: {r['status']}" for r in rec["runs"] if r["status"] != "ok"]


_STEP_SUMMARIES = dict(env=_env_summary, pallas_tests=_tests_summary, kernel_bench=_bench_summary,
                       generate=_generate_summary)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json and the logs")
    p.add_argument("--cpu-smoke", "--dry-run", action="store_true",
                   help="run every step on the CPU with tiny sizes and the kernels interpreted (checks this script)")
    p.add_argument("--budget", type=float, help="seconds for all steps together (default 450; smoke 600)")
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    p.add_argument("--formats", nargs="+", choices=FORMATS, help=f"cache formats (default: {' '.join(FORMATS)}; "
                   "smoke: bf16 int4)")
    p.add_argument("--bench-formats", nargs="+", choices=FORMATS, help="kernel benchmark's formats (default: --formats)")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072],
                   help="kernel benchmark contexts (smoke: 128)")
    p.add_argument("--batches", type=int, nargs="+", help="kernel benchmark batches (default 1 8; smoke 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per benchmark point (median)")
    p.add_argument("--max-new-tokens", type=int, help="tokens per generation (default 48; smoke 4)")
    p.add_argument("--smoke-tests", default="test_decode_default_config or test_merge_splits",
                   help="pytest -k expression for the smoke run's kernel tests")
    a = p.parse_args(argv)
    a.budget = a.budget or (600.0 if a.cpu_smoke else 450.0)
    a.formats = a.formats or (["bf16", "int4"] if a.cpu_smoke else FORMATS)
    a.max_new_tokens = a.max_new_tokens or (4 if a.cpu_smoke else 48)
    a.bench_formats = a.bench_formats or a.formats
    a.batches = a.batches or ([1] if a.cpu_smoke else [1, 8])
    return a


def main(argv=None) -> int:
    return Check(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())

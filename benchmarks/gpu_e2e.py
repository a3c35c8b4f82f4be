"""End to end at DeepSeek-V2-Lite's size on one GPU: build a random int4 / int8 checkpoint, load it, prefill
32k and 128k tokens, decode at 1 and 8 sequences, against the bandwidth roof; and 128k inside 24 GiB (issue 30).

## Running it

    python3 benchmarks/gpu_e2e.py --out gpu_e2e.jsonl          # one H100 / H200: about 8 minutes (--deadline 460)
    python3 benchmarks/gpu_e2e.py --cpu --out cpu.jsonl --deadline 3600   # full size on the CPU, contexts 1k-16k
    python3 benchmarks/gpu_e2e.py --cpu --layers 2             # the CPU figures of a 2-layer, full-width model
    python3 benchmarks/gpu_e2e.py --cpu-smoke                  # tiny dimensions, seconds (tests/test_gpu_e2e.py)
    python3 benchmarks/gpu_e2e.py --hybrid --out hybrid.jsonl  # one GPU + host RAM: V3 dims, experts on the host
    python3 benchmarks/gpu_e2e.py --hybrid --cpu-smoke         # its tiny version (tests/test_gpu_e2e.py)

It writes one JSON object per line to stdout (and appends them to --out), as each measurement ends, then a
summary line; a measurement that fails (out of memory, say) is an `error` row and the rest go on. At
--deadline seconds (counted from the start, builds included) it stops: a case that would not finish in time
is a `skipped` row with its estimate, a phase still running is killed and said so, and the summary is written.
Exit code 0: every measurement ran; 1: some are error rows; 2: bad flags.

What it does, in order (the GPU run, the default; `--phases main budget` picks phases):
1. Writes two checkpoints of DeepSeek-V2-Lite's dimensions (27 layers, hidden 2048, 16 heads, kv_lora_rank 512,
   64 routed experts top-6, 2 shared, vocab 102400) with random weights, in the converter's layout
   (benchmarks/random_checkpoint.py): --weights int4 (8.4 GiB) and int8 (15.1 GiB), kept tensors bf16, under
   --out-dir (default: a temporary folder, removed at the end unless --keep; one already there from the same
   spec is reused, so a second run with --out-dir and --keep skips the writing).
2. Phase `int4` (key main): in a fresh process (XLA_PYTHON_CLIENT_MEM_FRACTION 0.92 unless set), ktjax.load(int4
   folder, dtype bfloat16, chunk_size 2048); a device copy for the bandwidth; then for caches of 32k and 128k
   tokens, int8 and bf16: a `generate` row (one sequence, a prompt of the cache less 65 tokens, 65 greedy
   tokens) and a `decode` row at 8 sequences. It gets 60% of the time left, the budget phase the rest.
3. Phase `int8-24GiB` (key budget): int8 weights (16.2 GB) in a process whose JAX memory pool is capped at 24 GiB
   (XLA_PYTHON_CLIENT_MEM_FRACTION = 24 GiB / the card's memory, read with nvidia-smi: JAX's allocator cannot
   grow past it, so a run that does not fit fails with out-of-memory; this, not the setting alone, is the test),
   with configs/deepseek-v2-lite-24gb.yaml's settings (bf16, int8 cache, cache_lens auto, chunk_size 1024) and
   memory_budget 24GiB (the planner's figure: the cache it sizes must fit too). 128k with the int8 cache first
   (docs/long-context.md, "the 24 GB arithmetic", promises it), then 128k bf16, then 32k at 1 and 8 sequences.
`--settings KEY=VALUE ...` adds load-time settings to every phase (attention=xla, moe_impl=ragged, ...).
`--cpu`: one phase, int4 weights with an int8 lm_head and cache, float32 (the issue's CPU figures), contexts
1k, 4k and 16k (`generate` at 1k only: a CPU prefills 16k tokens in minutes; `decode` rows at 1 and 8).
`--hybrid` (issue 28): DeepSeek-V3's dimensions (hidden 7168, 128 heads, q_lora 1536, 256 routed experts top-8,
vocab 129280) with --layers layers (default 3, the first dense: ~16 GB of int4 on disk, 11 GB of it experts),
int4 weights, int8 cache, bf16, prompts of 8k and 32k tokens at one sequence; two phases over one checkpoint:
`host` (experts: host, the routed experts in host memory computed by the CPU) and `host-deferN` (the same with
defer_experts N, --defer). Its workers get KTJAX_GPU_BRIDGE=1 (unless set): the GPU bridge's first runs. Each row adds the per-layer decode time, the rates extrapolated to V3's 61 layers,
and the experts' host reads per second against a `host_bandwidth` row (Hybrid below).
`--cpu-smoke`: tiny dimensions, both phases in this process (`--workers`: in fresh ones, as on a GPU), one
context of 64 tokens; a bf16 cache in the main phase, the budget phase's int8 (fewer programs to compile).

## The rows (field: meaning)

Every row: `row` (its kind), `phase`, `mode` (gpu, cpu, cpu_smoke), `t` (seconds since the start).
- build: `weights` (int8 / int4), `path`, `bytes` (stored weight bytes), `seconds` (writing; 0 when `reused`),
  `layers`.
- load: `load_s` (ktjax.load: reading, placing and splitting the weights), `weight_bytes` (Engine.weight_bytes,
  in memory), `expert_bytes` (all routed experts), `non_expert_bytes` (the rest but the embedding: read by
  every decode step), `device`, `peak_memory_bytes`, `settings`.
- bandwidth: `bytes_per_s` and `method`: on a GPU a jitted `x + 1` over `bytes` of float32 (read + write:
  2 x bytes moved, best of 5); on a CPU a BLAS matrix-vector product's reads (benchmarks/bench_generate.py).
- generate: one Engine.generate call at batch 1, its stats: `prompt_tokens`, `context` (the cache,
  cache_lens), `compile_s` (the prefill and decode programs), `ttft_s` (prefill + first token),
  `prefill_tokens_per_s`, `decode_tokens_per_s`, `peak_memory_bytes` (device peak of the process so far:
  memory_stats' peak_bytes_in_use, which JAX cannot reset, so rows come in growing size; the CPU: peak RSS),
  `first_tokens` (the first greedy tokens, which the CPU test checks against transformers).
- decode: Engine's decode program at `batch` sequences over a cache of `context` tokens holding
  `context_tokens` (zeros: a step's cost depends on the lengths, not the values; prefilling 8 x 128k tokens
  would take longer than the whole run), `steps` timed in each of `repeats` dispatches after a warm one:
  `decode_tokens_per_s` = batch x steps / the best dispatch's seconds; `compile_s` (that program).
- generate and decode rows also carry the roof: `weight_bytes_per_step` (every weight but the embedding and
  the routed experts, plus the experts the batch selects per MoE layer: k of E at batch 1, E (1 - (1 - k/E)^b)
  expected at batch b; bench_step.WeightBytes), `cache_bytes_per_step` (batch x context_tokens x
  `cache_bytes_per_token`), `bytes_per_step` (their sum), `bandwidth_bytes_per_s` (the bandwidth row's),
  `roof_tokens_per_s` = batch x bandwidth / bytes_per_step, `fraction_of_roof` = decode_tokens_per_s / roof.
- error: `case`, `error` (the exception, one line). skipped: `case`, `reason`.
- summary: `rows`, `errors`, `skipped`, `elapsed_s`, `deadline_s`, `stopped_at_deadline`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [p for p in (ROOT, HERE) if p not in sys.path]
import random_checkpoint  # noqa: E402  (benchmarks/random_checkpoint.py)

GIB = 2**30
BUDGET = 24 * GIB
PRESET_24GB = os.path.join(ROOT, "configs", "deepseek-v2-lite-24gb.yaml")
KILL_GRACE_S = 5  # a phase past its deadline gets this long to end by itself before it is killed


@dataclasses.dataclass(frozen=True)
class Case:
    cache: str
    context: int               # cache tokens: the prompt fills it but for the decoded tokens
    batches: tuple[int, ...]   # 1: a generate call (with prefill) where context <= the mode's prefill limit


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    weights: str
    settings: dict
    cases: tuple[Case, ...]
    share: float                 # of the time left when it starts (the later phases get the rest)
    key: str = "main"            # --phases
    mem_fraction: float | None = None  # XLA_PYTHON_CLIENT_MEM_FRACTION of its process (None: 0.92, or as set)


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    config: dict
    dtype: str
    chunk_size: int
    contexts: tuple[int, ...]
    caches: tuple[str, ...]
    batches: tuple[int, ...]
    new_tokens: int            # generated per generate call; decode rows time (new_tokens - 1) // 2 steps
    prefill_limit: int         # longest context run with a prefill (generate); longer: decode rows only
    lm_head: str
    budget: int | None         # the budget phase's device memory (None: no such phase)
    bandwidth_bytes: int
    defer: int | None = None   # --hybrid: the routed experts in host memory; defer_experts of its second phase


def make_mode(args) -> Mode:
    layers, contexts, batches = args.layers, args.contexts and tuple(args.contexts), tuple(args.batches or (1, 8))
    if args.hybrid:  # issue 28: DeepSeek-V3's dimensions, a few layers, the experts in host memory
        smoke = args.cpu_smoke
        config = random_checkpoint.smoke_v3_config(layers or 3) if smoke else \
            random_checkpoint.v3_config(layers or 3, dense=1)
        return Mode("hybrid_smoke" if smoke else "hybrid", config, dtype="float32" if smoke else "bfloat16",
                    chunk_size=16 if smoke else 2048, contexts=contexts or ((64,) if smoke else (8192, 32768)),
                    caches=("int8",), batches=tuple(args.batches or (1,)), new_tokens=9 if smoke else 33,
                    prefill_limit=2**20, lm_head="kept", budget=None,
                    bandwidth_bytes=16 * 2**20 if smoke else GIB, defer=args.defer)
    if args.cpu_smoke:
        return Mode("cpu_smoke", random_checkpoint.smoke_config(layers or 2), dtype="float32", chunk_size=16,
                    contexts=contexts or (64,), caches=("bf16",), batches=batches, new_tokens=9,
                    prefill_limit=2**20, lm_head="kept", budget=64 * 2**20, bandwidth_bytes=16 * 2**20)
    if args.cpu:  # the CPU figures: int4 weights, int8 lm_head and cache, float32 activations
        return Mode("cpu", random_checkpoint.v2_lite_config(layers or 27), dtype="float32", chunk_size=512,
                    contexts=contexts or (1024, 4096, 16384), caches=("int8",), batches=batches, new_tokens=33,
                    prefill_limit=1024, lm_head="int8", budget=None, bandwidth_bytes=512 * 2**20)
    return Mode("gpu", random_checkpoint.v2_lite_config(layers or 27), dtype="bfloat16", chunk_size=2048,
                contexts=contexts or (32768, 131072), caches=("int8", "bf16"), batches=batches, new_tokens=65,
                prefill_limit=2**20, lm_head="kept", budget=BUDGET, bandwidth_bytes=GIB)


def phases(mode: Mode, extra: dict | None = None) -> list[Phase]:
    """What runs, in order; `extra`: --settings, over every phase's."""
    extra = extra or {}
    base = {"dtype": mode.dtype, "chunk_size": mode.chunk_size, **extra}
    cases = tuple(Case(c, ctx, mode.batches) for ctx in sorted(mode.contexts) for c in mode.caches)
    if mode.defer is not None:  # --hybrid: the same checkpoint with deferral off, then on
        host = dict(base, experts="host")
        return [Phase("host", "int4", host, cases, 0.5),
                Phase(f"host-defer{mode.defer}", "int4", dict(host, defer_experts=mode.defer), cases, 1.0, "defer")]
    main = Phase("int4", "int4", base, cases, 0.6 if mode.budget else 1.0)
    if not mode.budget:
        return [main]
    longest, shortest = max(mode.contexts), min(mode.contexts)
    budgeted = (Case("int8", longest, (1,)), Case("bf16", longest, (1,)), Case("int8", shortest, mode.batches))
    if longest == shortest:  # one context (the smoke run): one case
        budgeted = (Case("int8", longest, mode.batches),)
    settings = dict(_preset(), dtype=mode.dtype, memory_budget=mode.budget, **extra)
    if mode.name == "cpu_smoke":
        settings["chunk_size"] = mode.chunk_size
    name = f"int8-{mode.budget // GIB}GiB" if mode.budget >= GIB else f"int8-{mode.budget // 2**20}MiB"
    return [main, Phase(name, "int8", settings, budgeted, 1.0, "budget", mem_fraction=-1.0)]  # -1: from the card


def _preset() -> dict:
    from ktjax.runtime.settings import load_yaml

    return load_yaml(PRESET_24GB)


# ---- output ----------------------------------------------------------------------------------------------

class Rows:
    """Writes each row as it comes (stdout, and --out appended), and counts them."""

    def __init__(self, mode: str, start: float, out: str | None):
        self.mode, self.start, self.out = mode, start, out
        self.counts = {"rows": 0, "errors": 0, "skipped": 0}

    def emit(self, row: dict):
        row = {"row": row.pop("row"), "mode": self.mode, "t": round(time.time() - self.start, 2), **row}
        line = json.dumps(row, default=_jsonable)
        print(line, flush=True)
        if self.out:
            with open(self.out, "a") as f:
                f.write(line + "\n")
        self.counts["rows"] += 1
        self.counts["errors"] += row["row"] == "error"
        self.counts["skipped"] += row["row"] == "skipped"


def _jsonable(x):
    try:
        return x.item()  # numpy / jax scalars
    except AttributeError:
        return str(x)


# ---- one phase: load, bandwidth, cases (runs in its own process, or in this one) ---------------------------

def run_phase(phase: Phase, mode: Mode, folder: str, deadline: float, emit):
    import ktjax

    tag = {"phase": phase.name, "weights": phase.weights}
    settings = dict(phase.settings, max_new_tokens=mode.new_tokens, ignore_eos=True)
    try:
        bandwidth, method, nbytes = measure_bandwidth(mode)
        emit({"row": "bandwidth", **tag, "bytes_per_s": bandwidth, "method": method, "bytes": nbytes})
        t0 = time.perf_counter()
        engine = ktjax.load(folder, **settings)
        load_s = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001  (an error row, not a traceback: the other phases go on)
        emit({"row": "error", **tag, "case": "load", "error": _one_line(e)})
        return
    roof = Roof.of(engine, bandwidth)
    hybrid = None if mode.defer is None else Hybrid.of(engine, folder, emit, tag)
    emit({"row": "load", **tag, "load_s": load_s, "weight_bytes": engine.weight_bytes,
          "expert_bytes": roof.weights.routed, "non_expert_bytes": roof.weights.shared,
          "device": str(_device()), "peak_memory_bytes": _peak_memory(), "settings": phase.settings})
    timer = CaseTimer()
    for case in phase.cases:
        for batch in case.batches:
            name = f"{case.cache} cache, {case.context} tokens, batch {batch}"
            kind = "generate" if batch == 1 and case.context <= mode.prefill_limit else "decode"
            estimate = timer.estimate(kind, case.context, batch)
            if estimate is not None and time.time() + estimate > deadline:
                emit({"row": "skipped", **tag, "case": name, "reason": f"would end past the deadline (estimate "
                      f"{estimate:.0f} s, {max(deadline - time.time(), 0):.0f} s left)"})
                continue
            t0 = time.perf_counter()
            try:
                row = measure(engine, case, batch, kind, mode, roof)
            except Exception as e:  # noqa: BLE001
                emit({"row": "error", **tag, "case": name, "error": _one_line(e)})
                continue
            timer.record(kind, case.context, batch, time.perf_counter() - t0, row.get("compile_s", 0.0))
            if hybrid is not None:
                row.update(hybrid.fields(row, batch))
            emit({"row": kind, **tag, "cache_dtype": case.cache, **row})


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:400] if text else ''}"


class CaseTimer:
    """How long the next case may take, from those done: the compile time seen, plus the time of the closest
    case done scaled by (context ratio)^1.5 x batch ratio (prefill between linear and quadratic in the
    context). None until a case of that kind has run: the first always runs."""

    def __init__(self):
        self.done: dict[str, list[tuple[int, int, float, float]]] = {}

    def record(self, kind, context, batch, seconds, compile_s):
        self.done.setdefault(kind, []).append((context, batch, seconds - compile_s, compile_s))

    def estimate(self, kind, context, batch) -> float | None:
        seen = self.done.get(kind)
        if not seen:
            return None
        c0, b0, run_s, _ = min(seen, key=lambda d: abs(d[0] - context) + abs(d[1] - batch))
        return max(d[3] for d in seen) + run_s * (context / c0) ** 1.5 * max(batch / b0, 1.0)


V3_LAYERS = 61  # the hybrid rows' extrapolation


@dataclasses.dataclass
class Hybrid:
    """--hybrid's figures for a row: per layer, extrapolated to V3's 61 layers (every layer at this run's mean
    cost, the head's share included: a floor for the full model's rate), and the routed experts' reads in host
    memory against the host's measured read bandwidth. The roof fields of a hybrid row count the device's
    weights only (the host's experts are not in the Engine's state)."""
    layers: int
    moe_layers: int
    n_experts: int
    top_k: int
    expert_bytes: int          # one routed expert as stored (its three weights and their scales)
    host_bandwidth: float

    @classmethod
    def of(cls, engine, folder: str, emit, tag: dict) -> "Hybrid":
        from bench_generate import read_bandwidth

        cfg = engine.cfg
        mb = 512 if _device().platform != "cpu" else 16
        host_bandwidth = read_bandwidth(mb, repeats=5)
        emit({"row": "host_bandwidth", **tag, "bytes_per_s": host_bandwidth, "bytes": mb * 2**20,
              "method": "host: numpy float32 matrix-vector product, bytes read"})
        moe = cfg.num_hidden_layers - cfg.num_dense_layers
        return cls(cfg.num_hidden_layers, moe, cfg.n_routed_experts, cfg.num_experts_per_tok,
                   routed_expert_bytes(folder) // max(moe * cfg.n_routed_experts, 1), host_bandwidth)

    def fields(self, row: dict, batch: int) -> dict:
        decode = row["decode_tokens_per_s"]
        steps = decode / batch  # decode steps per second
        # the distinct experts b rows select in a layer, in expectation under independent routing (WeightBytes)
        distinct = self.n_experts * (1 - (1 - self.top_k / self.n_experts) ** batch)
        per_step = self.moe_layers * distinct * self.expert_bytes
        out = {"layers": self.layers, "moe_layers": self.moe_layers,
               "decode_ms_per_layer": 1e3 / steps / self.layers if steps else None,
               "decode_tokens_per_s_61": decode * self.layers / V3_LAYERS,
               "host_expert_bytes_per_step": per_step, "host_expert_read_bytes_per_s": per_step * steps,
               "host_bandwidth_bytes_per_s": self.host_bandwidth,
               "host_expert_read_fraction": per_step * steps / self.host_bandwidth}
        if "prefill_tokens_per_s" in row:
            out["prefill_tokens_per_s_61"] = row["prefill_tokens_per_s"] * self.layers / V3_LAYERS
        return out


def routed_expert_bytes(folder: str) -> int:
    """The stored bytes of every routed expert weight (values and scales) of a converted checkpoint."""
    from ktjax.weights.checkpoint import read_manifest

    import numpy as np

    tensors = read_manifest(folder)["tensors"]
    return sum(int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize for key, t in tensors.items()
               if any(f"mlp.{w}" in key for w in ("w_gate", "w_up", "w_down")))


@dataclasses.dataclass
class Roof:
    """The bytes a decode step reads and the tokens/s that the measured bandwidth allows."""
    weights: object        # bench_step.WeightBytes
    bandwidth: float
    cfg: object

    @classmethod
    def of(cls, engine, bandwidth: float) -> "Roof":
        from bench_step import WeightBytes

        return cls(WeightBytes.of(engine), bandwidth, engine.cfg)

    def row(self, fmt, batch: int, context_tokens: int, tokens_per_s: float) -> dict:
        weight = self.weights.per_step(batch)
        per_token = fmt.bytes_per_token(self.cfg)
        cache = batch * context_tokens * per_token
        roof = batch * self.bandwidth / (weight + cache)
        return {"cache_bytes_per_token": per_token, "weight_bytes_per_step": weight, "cache_bytes_per_step": cache,
                "bytes_per_step": weight + cache, "bandwidth_bytes_per_s": self.bandwidth,
                "roof_tokens_per_s": roof, "fraction_of_roof": tokens_per_s / roof}


def measure(engine, case: Case, batch: int, kind: str, mode: Mode, roof: Roof) -> dict:
    from ktjax.runtime.settings import RuntimeConfig

    # cache_dtype is a load-time setting, but the Engine reads it only when it makes a cache, and keys its
    # programs by the cache's format: one load serves every cache format (loading 16 GB again would cost more
    # than the measurement).
    engine.runtime = RuntimeConfig.from_overrides(engine.runtime, cache_dtype=case.cache)
    fmt = engine.runtime.cache_dtype
    if kind == "generate":
        return generate_row(engine, case, mode, roof, fmt)
    return decode_row(engine, case, batch, mode, roof, fmt)


def prompt_ids(length: int, vocab: int, seed: int = 0) -> list[int]:
    import numpy as np

    return np.random.default_rng([seed, length]).integers(2, vocab, size=length).tolist()


def generate_row(engine, case: Case, mode: Mode, roof: Roof, fmt) -> dict:
    prompt = prompt_ids(case.context - mode.new_tokens, engine.cfg.vocab_size)
    gen = engine.generate([prompt])
    s = gen.stats
    row = {"batch": 1, "prompt_tokens": s["prompt_tokens"], "context": s["cache_lens"], "compile_s": s["compile_s"],
           "ttft_s": s["time_to_first_token_s"], "prefill_tokens_per_s": s["prefill_tokens_per_s"],
           "decode_tokens_per_s": s["decode_tokens_per_s"], "generated_tokens": s["generated_tokens"],
           "peak_memory_bytes": s["peak_memory_bytes"], "attention": s["attention"], "first_tokens": gen.tokens[0][:8]}
    # the decode steps read the cache from the prompt's length up: the roof at the prompt's length
    return {**row, **roof.row(fmt, 1, len(prompt), s["decode_tokens_per_s"])}


DECODE_REPEATS = 3  # timed dispatches of a decode row after the warm one: the best is reported


def decode_row(engine, case: Case, batch: int, mode: Mode, roof: Roof, fmt) -> dict:
    import jax
    import jax.numpy as jnp

    from ktjax.runtime import decode

    steps = max(1, (mode.new_tokens - 1) // 2)
    start = case.context - (1 + DECODE_REPEATS) * steps - 1  # the warm dispatch and the timed ones fit
    plan = engine.plan_cache(batch, case.context)
    cache = engine.new_cache(batch, plan)
    t0 = time.perf_counter()
    program = engine.decode_program(cache, batch)  # the loop generate runs
    compile_s = time.perf_counter() - t0
    seconds = []
    for i in range(1 + DECODE_REPEATS):  # the first dispatch warms up
        inputs = decode.free_running(batch, [start + i * steps] * batch)
        t0 = time.perf_counter()
        cache, out = program(engine.state, cache, *inputs, jnp.int32(steps))
        jax.block_until_ready(out)
        seconds.append(time.perf_counter() - t0)
    generated = int((jax.device_get(out.token) >= 0).sum())
    if generated != batch * steps:
        raise RuntimeError(f"the decode loop produced {generated} tokens, not {batch} x {steps}")
    rate = batch * steps / min(seconds[1:])
    row = {"batch": batch, "context": plan.cache_lens, "context_tokens": start + steps, "steps": steps,
           "repeats": DECODE_REPEATS,
           "compile_s": compile_s, "decode_tokens_per_s": rate, "peak_memory_bytes": _peak_memory()}
    return {**row, **roof.row(fmt, batch, start + steps, rate)}


def measure_bandwidth(mode: Mode) -> tuple[float, str, int]:
    """(bytes/s, how, bytes): a device copy on an accelerator, BLAS matvec reads on a CPU."""
    import jax

    if jax.default_backend() == "cpu":
        from bench_generate import read_bandwidth

        mb = mode.bandwidth_bytes // 2**20
        return read_bandwidth(mb, repeats=7), "cpu: numpy float32 matrix-vector product, bytes read", mb * 2**20
    import jax.numpy as jnp

    x = jnp.zeros(mode.bandwidth_bytes // 4, jnp.float32)
    copy = jax.jit(lambda a: a + 1)
    jax.block_until_ready(copy(x))
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(copy(x))
        best = min(best, time.perf_counter() - t0)
    del x
    return 2 * mode.bandwidth_bytes / best, "device: jitted x + 1 over float32, bytes read + written", \
        mode.bandwidth_bytes


def _device():
    import jax

    return jax.devices()[0]


def _peak_memory() -> int:
    from ktjax.runtime.memory import peak_memory_bytes

    return peak_memory_bytes()


# ---- the driver: checkpoints, then each phase (in a process of its own, or in this one) -----------------------

def build_checkpoints(mode: Mode, weights: list[str], out_dir: str, rows: Rows, made: list[str]) -> dict:
    """{weights: folder}; each folder this run writes is added to `made` (the ones it may remove). Every folder
    in the way is refused before anything is written."""
    layers = mode.config["num_hidden_layers"]
    specs = {w: random_checkpoint.spec_of(mode.config, w, lm_head=mode.lm_head) for w in weights}
    folders = {w: os.path.join(out_dir, f"{mode.name}-{layers}L-{w}") for w in weights}
    for w, folder in folders.items():
        if os.path.lexists(folder) and random_checkpoint.existing_spec(folder) != specs[w]:
            raise ValueError(f"{folder} exists and is not this benchmark's checkpoint of the same spec; remove it "
                             "or choose another --out-dir")
    for w, folder in folders.items():
        reused = os.path.lexists(folder)
        info = {"bytes": _stored_bytes(folder), "seconds": 0.0} if reused else \
            random_checkpoint.write_random_checkpoint(folder, mode.config, w, lm_head=mode.lm_head)
        if not reused:
            made.append(folder)
        rows.emit({"row": "build", "phase": "build", "weights": w, "path": folder, "layers": layers,
                   "reused": reused, "lm_head": mode.lm_head, **info})
    return folders


def _stored_bytes(folder: str) -> int:
    from ktjax.weights.checkpoint import read_manifest

    return read_manifest(folder)["bytes"]


def run_phases(mode: Mode, plan: list[Phase], folders: dict, deadline: float, rows: Rows, in_process: bool,
               env: dict) -> bool:
    """Each phase until its share of the time left; -> whether the deadline cut the run short."""
    cut = False
    for i, phase in enumerate(plan):
        left = deadline - time.time()
        if left <= 0:
            rows.emit({"row": "skipped", "phase": phase.name, "case": "phase", "reason": "deadline reached"})
            cut = True
            continue
        phase_deadline = time.time() + left * (1.0 if i == len(plan) - 1 else phase.share)
        if in_process:
            run_phase(phase, mode, folders[phase.weights], phase_deadline, rows.emit)
        else:
            cut |= _run_worker(phase, mode, folders[phase.weights], phase_deadline, rows, env)
    return cut


def _run_worker(phase: Phase, mode: Mode, folder: str, deadline: float, rows: Rows, env: dict) -> bool:
    """The phase in a fresh process (its own memory pool and peak) with the environment this one started
    with; its rows are passed on as they come. -> whether it was killed at the deadline."""
    env = dict(env)
    fraction = _mem_fraction(phase, mode, env)
    if fraction is not None:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:.4f}"
    job = json.dumps({"phase": dataclasses.asdict(phase), "mode": dataclasses.asdict(mode), "folder": folder,
                      "deadline": deadline})
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", job], stdout=subprocess.PIPE,
                                stderr=err, text=True, env=env)
        killed = _relay(proc, deadline + KILL_GRACE_S, rows)
        err.seek(0)
        tail = err.read()[-600:]
    if killed:
        rows.emit({"row": "error", "phase": phase.name, "case": "phase", "error": "killed at the deadline"})
    elif proc.returncode != 0:
        rows.emit({"row": "error", "phase": phase.name, "case": "phase",
                   "error": f"exit code {proc.returncode}: {' | '.join(tail.strip().splitlines()[-3:])}"})
    return killed


def _relay(proc, kill_at: float, rows: Rows) -> bool:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while True:
        if not sel.select(timeout=max(0.0, min(1.0, kill_at - time.time()))):
            if time.time() >= kill_at:
                proc.kill()
                proc.wait()
                return True
            continue
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            return False
        if line.startswith("ROW "):
            rows.emit(json.loads(line[4:]))


def _mem_fraction(phase: Phase, mode: Mode, env: dict) -> float | None:
    if phase.mem_fraction is None:
        return None if "XLA_PYTHON_CLIENT_MEM_FRACTION" in env else 0.92
    total = _gpu_memory_bytes()
    if total is None:
        return None
    return min(mode.budget / total, 0.95)


def _gpu_memory_bytes() -> int | None:
    """The first GPU's memory (nvidia-smi), or None where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
        return int(out.split()[0]) * 2**20
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def worker_main(job: str) -> int:
    spec = json.loads(job)
    p = spec["phase"]
    phase = Phase(**dict(p, cases=tuple(Case(c["cache"], c["context"], tuple(c["batches"])) for c in p["cases"])))
    mode = Mode(**dict(spec["mode"], contexts=tuple(spec["mode"]["contexts"]),
                       caches=tuple(spec["mode"]["caches"]), batches=tuple(spec["mode"]["batches"])))

    def emit(row):
        print("ROW " + json.dumps(row, default=_jsonable), flush=True)

    run_phase(phase, mode, spec["folder"], spec["deadline"], emit)
    return 0


# ---- command line --------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message} (run with --help for usage)", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv):
    p = _Parser(prog="gpu_e2e.py", description=" ".join(__doc__.split("\n\n")[0].split()))
    where = p.add_mutually_exclusive_group()
    where.add_argument("--cpu", action="store_true", help="full V2-Lite size on the CPU, contexts 1k-16k "
                       "(int4 weights, int8 lm_head and cache; ~10 GB of memory at 27 layers)")
    where.add_argument("--cpu-smoke", action="store_true", help="tiny dimensions on the CPU, in this process")
    p.add_argument("--hybrid", action="store_true", help="DeepSeek-V3's dimensions (default 3 layers, the first "
                   "dense), int4 weights with the routed experts in host memory (experts: host), int8 cache, prompts "
                   "of 8k and 32k tokens, deferral off then on; with --cpu-smoke: tiny V3 dimensions")
    p.add_argument("--defer", type=int, default=2, help="with --hybrid: defer_experts of the second phase (default 2)")
    p.add_argument("--layers", type=int, help="decoder layers (default 27; --cpu-smoke 2)")
    p.add_argument("--contexts", type=int, nargs="+", help="cache tokens per case (default: 32768 131072)")
    p.add_argument("--batches", type=int, nargs="+", help="sequences per decode row (default 1 8)")
    p.add_argument("--out", help="append the JSON rows to this file too")
    p.add_argument("--out-dir", help="where the checkpoints go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints this run wrote")
    p.add_argument("--deadline", type=float, default=460.0, help="seconds from the start, builds included "
                   "(default 460: with the kill grace and clean-up, under 8 minutes)")
    p.add_argument("--phases", nargs="+", choices=("main", "budget", "defer"), default=["main", "budget", "defer"],
                   help="main: int4 weights, every case; budget: int8 weights inside 24 GiB (not with --cpu); "
                   "defer: --hybrid's second phase")
    isolation = p.add_mutually_exclusive_group()
    isolation.add_argument("--in-process", action="store_true", help="run the phases in this process (the default "
                           "with --cpu-smoke)")
    isolation.add_argument("--workers", action="store_true", help="run each phase in a fresh process: its own "
                           "memory pool and peak (the default, but with --cpu-smoke)")
    p.add_argument("--settings", nargs="+", default=[], metavar="KEY=VALUE",
                   help="load-time settings for every phase, e.g. attention=xla moe_impl=ragged activation_quant=int8")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.settings = _parse_settings(p, args.settings)
    bad = [f"--{k} {v}" for k, v in (("layers", args.layers), ("deadline", args.deadline)) if v is not None and v <= 0]
    bad += [f"--defer {args.defer}"] if args.defer < 1 else []
    if args.hybrid and args.cpu:
        p.error("--hybrid runs on a GPU (or tiny, with --cpu-smoke), not with --cpu")
    bad += [f"--contexts {c}" for c in args.contexts or () if c < 16]
    bad += [f"--batches {b}" for b in args.batches or () if b < 1]
    if bad:
        p.error(f"{', '.join(bad)}: must be positive (contexts at least 16 tokens)")
    if args.out_dir and os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        p.error(f"--out-dir {args.out_dir} is not a folder")
    if args.out and (os.path.isdir(args.out) or not os.path.isdir(os.path.dirname(os.path.abspath(args.out)))):
        p.error(f"--out {args.out}: not a file in an existing folder")
    return args


def _parse_settings(p, pairs: list[str]) -> dict:
    from ktjax.errors import KtjaxError
    from ktjax.runtime.settings import RuntimeConfig

    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            p.error(f"--settings {pair}: write KEY=VALUE")
        out[key.strip()] = value.strip()
    try:
        RuntimeConfig.from_overrides(**out)  # checked now, not in a worker minutes later
    except KtjaxError as e:
        p.error(f"--settings: {e}")
    return out


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag already reported in one line
        return e.code
    if args.worker:
        return worker_main(args.worker)
    start = time.time()
    mode = make_mode(args)
    if min(mode.contexts) <= mode.new_tokens + 1:
        print(f"error: --contexts {min(mode.contexts)} leaves no room for the prompt: each context must exceed "
              f"the {mode.new_tokens} tokens decoded (run with --help for usage)", file=sys.stderr)
        return 2
    in_process = args.in_process or (args.cpu_smoke and not args.workers)
    worker_env = dict(os.environ)
    if args.hybrid:  # the point of the run: try the GPU bridge, which ktjax refuses until it has run on a GPU
        from ktjax.runtime.backend import GPU_BRIDGE_ENV
        worker_env.setdefault(GPU_BRIDGE_ENV, "1")
    if not in_process:  # the driver only writes files: the device is the workers' (a GPU pool is preallocated)
        os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        return _drive(args, mode, start, in_process, worker_env)
    finally:
        os.environ.pop("JAX_PLATFORMS", None)
        os.environ.update({k: v for k, v in worker_env.items() if k == "JAX_PLATFORMS"})


def _drive(args, mode: Mode, start: float, in_process: bool, worker_env: dict) -> int:
    rows = Rows(mode.name, start, args.out)
    plan = [ph for ph in phases(mode, args.settings) if ph.key in args.phases]
    cut, made = False, []
    with _checkpoint_dir(args.out_dir, args.keep) as out_dir:
        try:
            folders = build_checkpoints(mode, sorted({ph.weights for ph in plan}), out_dir, rows, made)
        except ValueError as e:  # a folder in the way
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # disk full, say
            rows.emit({"row": "error", "phase": "build", "case": "build", "error": _one_line(e)})
            folders, plan = {}, []
        try:
            cut = run_phases(mode, plan, folders, start + args.deadline, rows, in_process, worker_env)
        finally:
            if not args.keep:
                for folder in made:
                    shutil.rmtree(folder, ignore_errors=True)
    rows.emit({"row": "summary", **dict(rows.counts), "elapsed_s": time.time() - start, "deadline_s": args.deadline,
               "stopped_at_deadline": cut or time.time() > start + args.deadline})
    return 1 if rows.counts["errors"] else 0


@contextlib.contextmanager
def _checkpoint_dir(out_dir: str | None, keep: bool):
    """--out-dir, or a new temporary folder (removed at the end unless --keep)."""
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        yield out_dir
        return
    tmp = tempfile.mkdtemp(prefix="gpu_e2e-")
    try:
        yield tmp
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

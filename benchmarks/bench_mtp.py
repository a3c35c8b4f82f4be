"""Speculative decoding with the MTP module (speculative: mtp): draft acceptance, tokens per verifying pass and
decode tokens/s with and without it, side by side in one process (each configuration's runs interleaved with the
others', so that a loaded machine slows them alike). One JSON line per (model, context, batch, draft_tokens).

    python benchmarks/bench_mtp.py --quick          # the demo model, batch 1, 2k context (capped at its window)
    python benchmarks/bench_mtp.py                  # demo and the 2-layer V2-Lite-width model, 2k and 16k,
                                                    # batch 1 and 16, draft_tokens 1-3
    python benchmarks/bench_mtp.py --server --models demo --contexts 256 --drafts 1 2   # through the server's
                                                    # scheduler: 1 and 16 concurrent streams

Models: `demo` is ktjax/demo_model (its trained MTP module; its window is 1024 positions, so a longer context is
capped to the window less the tokens generated), prompted with text from ktjax/data/stdlib_docstrings.txt;
`v2lite` has DeepSeek-V2-Lite's widths (bench_generate.py's model, --layers decoder layers) and an MTP layer, with
random weights: its drafts are almost never accepted, so it measures what speculation costs when it does not
pay. Greedy decoding, ignore_eos. Speeds exclude compilation (each engine generates once before it is timed).

--server: the same engines behind the server's continuous-batching scheduler (ktjax/serve/scheduler.py, in this
process, without HTTP, whose cost is the same either way), `batch` requests submitted together; aggregate decode
tokens/s over the window in which every stream decodes (bench_serve.py's), acceptance and tokens per verifying
pass from the scheduler's counters.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.join(ROOT, "benchmarks")) if p not in sys.path]


def demo_engine(folder: str | None, **settings):
    import ktjax
    from ktjax.demo import DEMO_MODEL_DIR

    return ktjax.load(folder or DEMO_MODEL_DIR, **settings)


def v2lite_model(layers: int, vocab: int):
    """(cfg, model): bench_generate.py's V2-Lite-width model with an MTP layer, random bf16 weights."""
    import jax.numpy as jnp
    from flax import nnx

    from bench_generate import model_kwargs
    from ktjax.model.config import ModelConfig
    from ktjax.model.decoder import DeepseekModel

    a = argparse.Namespace(layers=layers, experts=64, vocab=vocab)
    cfg = ModelConfig.from_hf_dict(dict(model_kwargs(a), model_type="deepseek_v2", num_nextn_predict_layers=1))
    return cfg, DeepseekModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))


def demo_prompts(engine, length: int, batch: int) -> list[list[int]]:
    """batch prompts of `length` tokens of the docstring corpus, each from its own place in it."""
    with open(os.path.join(ROOT, "ktjax", "data", "stdlib_docstrings.txt"), encoding="utf-8") as f:
        text = f.read()
    step = len(text) // (batch + 1)
    out = []
    for i in range(batch):
        ids = engine.tokenizer.encode(text[i * step:i * step + 12 * length])
        out.append(ids[:length])
    return out


def random_prompts(vocab: int, length: int, batch: int) -> list[list[int]]:
    import numpy as np

    return np.random.default_rng(0).integers(2, vocab, size=(batch, length)).tolist()


def measure(engines: dict, prompts, new_tokens: int, repeats: int) -> dict:
    """{name: (median decode tokens/s, stats of the last run)} with each engine's runs interleaved."""
    for engine in engines.values():  # compile, warm
        engine.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
    speeds = {name: [] for name in engines}
    last = {}
    for _ in range(repeats):
        for name, engine in engines.items():
            last[name] = engine.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True).stats
            speeds[name].append(last[name]["decode_tokens_per_s"])
    return {name: (statistics.median(v), last[name]) for name, v in speeds.items()}


def run_case(model: str, context: int, batch: int, drafts: list[int], a) -> list[dict]:
    common = dict(cache_dtype=a.cache_dtype, dtype=a.dtype)
    if model == "demo":
        make = lambda **s: demo_engine(a.demo_dir, **common, **s)  # noqa: E731
        window = 1024
    else:
        import ktjax

        cfg, m = v2lite_model(a.layers, a.vocab)
        make = lambda **s: ktjax.load_model(cfg, m, **common, **s)  # noqa: E731
        window = cfg.max_position_embeddings
    length = min(context, window - a.new_tokens - max(drafts))
    engines = {0: make()}
    for k in drafts:
        engines[k] = make(speculative="mtp", draft_tokens=k)
    prompts = (demo_prompts(engines[0], length, batch) if model == "demo" else
               random_prompts(engines[0].cfg.vocab_size, length, batch))
    results = measure(engines, prompts, a.new_tokens, a.repeats)
    base = results[0][0]
    rows = []
    for k in drafts:
        speed, s = results[k]
        rows.append({"model": model, "context": length, "batch": batch, "draft_tokens": k,
                     "decode_tokens_per_s": round(speed, 2), "plain_decode_tokens_per_s": round(base, 2),
                     "speedup": round(speed / base, 3), "draft_acceptance_rate": round(s["draft_acceptance_rate"], 4),
                     "accept_length": round(s["accept_length"], 3), "new_tokens": a.new_tokens,
                     "repeats": a.repeats, "cache_dtype": a.cache_dtype, "dtype": a.dtype,
                     "load_average": [round(x, 2) for x in os.getloadavg()]})
    return rows


def serve_streams(sched, prompts, new_tokens: int) -> dict:
    """The prompts submitted together to a running scheduler -> aggregate decode tokens/s (tokens after each
    stream's first, in the window from the last first token to the first stream's end) and the counters' moves."""
    import threading

    from ktjax.serve.scheduler import Finished, RequestParams

    stamps, done = [[] for _ in prompts], [threading.Event() for _ in prompts]

    def on_event(i):
        def record(event):
            if isinstance(event, Finished):
                done[i].set()
            else:
                stamps[i].append(time.perf_counter())
        return record

    before = sched.stats()
    for i, p in enumerate(prompts):
        sched.submit(p, RequestParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True), on_event(i))
    for d in done:
        d.wait()
    after = sched.stats()
    start, end = max(s[0] for s in stamps), min(s[-1] for s in stamps)
    decoded = sum(1 for s in stamps for t in s[1:] if start < t <= end)
    if len(prompts) == 1:
        decoded = len(stamps[0]) - 1
    moved = {key: after[key] - before[key] for key in after if key.endswith("_total")}
    return dict(moved, decode_tokens_per_s=decoded / (end - start) if end > start else 0.0)


def server_case(model: str, context: int, batch: int, drafts: list[int], a) -> list[dict]:
    """bench through the server's scheduler: the plain engine's and each draft_tokens' runs interleaved."""
    from ktjax.serve.scheduler import Scheduler

    if model != "demo":
        raise SystemExit("--server measures the demo model (its MTP module is trained)")
    common = dict(cache_dtype=a.cache_dtype, dtype=a.dtype)
    length = min(context, 1024 - a.new_tokens - max(drafts))
    engines = {0: demo_engine(a.demo_dir, **common)}
    for k in drafts:
        engines[k] = demo_engine(a.demo_dir, speculative="mtp", draft_tokens=k, **common)
    page = 64
    pages = batch * -(-(length + a.new_tokens + max(drafts)) // page)
    scheds = {k: Scheduler(e, max_batch=batch, page_size=page, n_pages=pages) for k, e in engines.items()}
    prompts = demo_prompts(engines[0], length, batch)
    try:
        for s in scheds.values():
            s.start()
            serve_streams(s, prompts, a.new_tokens)  # compile, warm (and fill the prefix cache: later runs
            # prefill only each prompt's last page, alike for every configuration)
        runs = {k: [] for k in scheds}
        for _ in range(a.repeats):
            for k, s in scheds.items():
                runs[k].append(serve_streams(s, prompts, a.new_tokens))
    finally:
        for s in scheds.values():
            s.shutdown(10)
    base = statistics.median(r["decode_tokens_per_s"] for r in runs[0])
    rows = []
    for k in drafts:
        speed = statistics.median(r["decode_tokens_per_s"] for r in runs[k])
        total = lambda key: sum(r[key] for r in runs[k])  # noqa: E731
        rows.append({"mode": "server", "model": model, "context": length, "streams": batch, "draft_tokens": k,
                     "decode_tokens_per_s": round(speed, 2), "plain_decode_tokens_per_s": round(base, 2),
                     "speedup": round(speed / base, 3) if base else None,
                     "draft_acceptance_rate": round(total("speculative_accepted_total") /
                                                    total("speculative_drafted_total"), 4),
                     "accept_length": round(total("decode_tokens_total") / total("speculative_verify_passes_total"),
                                            3),
                     "new_tokens": a.new_tokens, "repeats": a.repeats, "cache_dtype": a.cache_dtype,
                     "dtype": a.dtype, "load_average": [round(x, 2) for x in os.getloadavg()]})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the demo model, batch 1, 2k context, draft_tokens 1-3")
    p.add_argument("--models", nargs="+", default=["demo", "v2lite"], choices=["demo", "v2lite"])
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 16384])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--drafts", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-dtype", default="bf16")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--demo-dir", help="demo: another folder of the demo model (default ktjax/demo_model)")
    p.add_argument("--layers", type=int, default=2, help="v2lite: decoder layers")
    p.add_argument("--vocab", type=int, default=32000, help="v2lite: vocabulary")
    p.add_argument("--server", action="store_true", help="through the server's scheduler (demo model; --batches: "
                                                         "concurrent streams)")
    a = p.parse_args(argv)
    if a.quick:
        a.models, a.contexts, a.batches = ["demo"], [2048], [1]
    for model in a.models:
        for context in a.contexts:
            for batch in a.batches:
                t0 = time.perf_counter()
                for row in (server_case if a.server else run_case)(model, context, batch, a.drafts, a):
                    row["wall_s"] = round(time.perf_counter() - t0, 1)
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

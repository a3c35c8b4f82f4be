"""The continuous-batching Scheduler measured directly (no HTTP): aggregate decode tokens/s at 1, 4 and 16
concurrent streams, and the time to first token of a request whose long prefix is in the prefix cache
against the same request cold.

    python benchmarks/bench_scheduler.py                       # V2-Lite dimensions, 2 layers (a GPU)
    python benchmarks/bench_scheduler.py --experts 4 --vocab 1024 --streams 1 4 --prefix 512 --decode-tokens 8

Goals (issue 15): 16 streams >= 6x one stream's tokens/s; cached-prefix TTFT >= 5x faster with a 4k prefix.
The model is bench_generate.py's (DeepSeek-V2-Lite attention and MoE dimensions, random weights). Programs
are compiled by Scheduler.warmup() before anything is timed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))


def stream_rate(sched, n_streams: int, prompt_len: int, decode_tokens: int, vocab: int) -> dict:
    """Run n_streams requests at once; decode tokens/s over the window in which all of them are decoding."""
    import numpy as np
    from ktjax.serve.scheduler import Finished, RequestParams

    rng = np.random.default_rng(n_streams)
    stamps, firsts, done = [], {}, threading.Semaphore(0)
    lock = threading.Lock()

    def on_event(i):
        def f(ev):
            now = time.perf_counter()
            if isinstance(ev, Finished):
                done.release()
                return
            with lock:
                stamps.append(now)
                firsts.setdefault(i, now)
        return f

    params = RequestParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
    for i in range(n_streams):
        sched.submit(rng.integers(2, vocab, size=prompt_len).tolist(), params, on_event(i))
    for _ in range(n_streams):
        done.acquire()
    start, end = max(firsts.values()), max(stamps)
    in_window = sum(1 for t in stamps if t > start)
    return dict(streams=n_streams, tokens_per_s=in_window / (end - start) if end > start else 0.0,
                tokens=len(stamps))


def ttft(sched, prompt) -> float:
    from ktjax.serve.scheduler import Finished, RequestParams

    box, done = {}, threading.Event()

    def f(ev):
        if isinstance(ev, Finished):
            box["f"] = ev
            done.set()

    sched.submit(prompt, RequestParams(max_tokens=1, temperature=0.0, ignore_eos=True), f)
    done.wait()
    return box["f"].ttft_s, box["f"].cached_tokens


def main(argv=None):
    import bench_generate

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench_generate.add_model_args(p)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens of each stream")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--prefix", type=int, default=4096, help="tokens of the cached prefix for the TTFT test")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--cache-dtype", default="bf16")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", help="append the results to this JSON-lines file")
    a = p.parse_args(argv)

    import jax
    import numpy as np

    import ktjax
    from ktjax.serve.scheduler import Scheduler

    with tempfile.TemporaryDirectory() as folder:
        bench_generate.build(folder, a)
        engine = ktjax.load(folder, cache_dtype=a.cache_dtype, dtype=a.dtype, chunk_size=a.chunk_size)
    max_batch = max(a.streams)
    per_stream = a.prompt + a.decode_tokens
    n_pages = max_batch * -(-per_stream // a.page_size) + 2 * -(-(a.prefix + 8) // a.page_size) + 8
    sched = Scheduler(engine, max_batch=max_batch, page_size=a.page_size, n_pages=n_pages)
    t0 = time.perf_counter()
    sched.warmup()
    compile_s = time.perf_counter() - t0
    compiled = engine.compile_count
    sched.start()
    rates = [stream_rate(sched, n, a.prompt, a.decode_tokens, a.vocab) for n in a.streams]
    prefix = np.random.default_rng(7).integers(2, a.vocab, size=a.prefix).tolist()
    cold, _ = ttft(sched, prefix + [5, 6, 7])
    warm, hit = ttft(sched, prefix + [8, 9])
    sched.shutdown(30)
    base = rates[0]["tokens_per_s"]
    result = dict(args=vars(a), warmup_compile_s=compile_s, programs=compiled,
                  compiled_after_warmup=engine.compile_count - compiled, rates=rates,
                  speedup={r["streams"]: r["tokens_per_s"] / base for r in rates} if base else {},
                  ttft_cold_s=cold, ttft_cached_s=warm, cached_tokens=hit, ttft_speedup=cold / warm,
                  backend=jax.default_backend())
    print(json.dumps(result, indent=1))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

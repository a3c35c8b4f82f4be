"""Run by tests/test_paged_mesh.py in a subprocess with 8 forced CPU devices: the Scheduler over a paged pool
split by pages over 8 devices against one device: greedy tokens (a mixed batch, a prefix hit), and where the
pool's pages lie. int8 with naive prefill and absorbed decode: both attention paths, with scales. Writes one JSON file; the test makes the assertions.

usage: python tests/paged_mesh_check.py MODEL_FOLDER OUT.json
"""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402
import threading  # noqa: E402

import numpy as np  # noqa: E402

import ktjax  # noqa: E402
from ktjax.serve.scheduler import Finished, RequestParams, Scheduler  # noqa: E402

PAGE, N_PAGES = 16, 32


def run(folder, mesh, prompts, fmt):
    engine = ktjax.load(folder, mesh=mesh, chunk_size=16, cache_dtype=fmt, absorb_for_prefill=False)
    sched = Scheduler(engine, max_batch=2, page_size=PAGE, n_pages=N_PAGES)
    sched.start()
    results = [None] * len(prompts)
    done = [threading.Event() for _ in prompts]

    def collect(i):
        tokens = []

        def on_event(ev):
            if isinstance(ev, Finished):
                results[i] = dict(tokens=tokens, cached=ev.cached_tokens, reason=ev.reason)
                done[i].set()
            else:
                tokens.append(ev.token_id)
        return on_event

    params = RequestParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts[:-1]):
        sched.submit(p, params, collect(i))
    for e in done[:-1]:
        e.wait(300)
    sched.submit(prompts[-1], params, collect(len(prompts) - 1))  # shares the first prompt's full pages
    done[-1].wait(300)
    pool = sched.pool.c_kv
    shards = [dict(pages=[s.index[1].start or 0, s.index[1].stop or N_PAGES], nbytes=s.data.nbytes)
              for s in pool.addressable_shards]
    sched.shutdown(10)
    return dict(results=results, shards=shards, nbytes=pool.nbytes)


def main(folder, out):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 97, size=n).tolist() for n in (70, 9)]
    prompts.append(prompts[0][:64] + [3, 4])
    report = {}
    for fmt in ("int8",):
        report[fmt] = {mesh: run(folder, mesh, prompts, fmt) for mesh in ("1", "8")}
    with open(out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:])

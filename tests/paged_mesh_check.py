"""Run by tests/test_paged_mesh.py in a subprocess with 8 forced CPU devices: the Scheduler over a paged pool
split by pages over 8 devices against one device: greedy tokens (a mixed batch, a prefix hit), and where the
pool's pages lie. int8 with naive prefill and absorbed decode: both attention paths, with scales. And speculative
mtp over the split pool (the MTP module's slice in it, verifying passes of k + 1 positions), int8 likewise, on
tests/test_speculative.py's draft_model, against one device; and a V3.2 model (sparse attention) refused on the split
pool. Writes one JSON file; the test makes the assertions.

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
from test_speculative import draft_model  # noqa: E402

PAGE, N_PAGES = 16, 32


def run(engine, prompts, max_tokens=6, sampled=False):
    """The prompts but the last in one batch, then the last; sampled: then the second prompt again, sampled
    (temperature 1, seed 5), and every step in one batch bucket."""
    sched = Scheduler(engine, max_batch=2, page_size=PAGE, n_pages=N_PAGES)
    if sampled:  # one batch bucket, padded: half the programs to compile
        sched.programs.batches = [2]
    sched.start()
    results = [None] * (len(prompts) + sampled)
    done = [threading.Event() for _ in results]

    def collect(i):
        tokens = []

        def on_event(ev):
            if isinstance(ev, Finished):
                results[i] = dict(tokens=tokens, cached=ev.cached_tokens, reason=ev.reason, spec=ev.speculative)
                done[i].set()
            else:
                tokens.append(ev.token_id)
        return on_event

    params = RequestParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts[:-1]):
        sched.submit(p, params, collect(i))
    for e in done[:len(prompts) - 1]:
        e.wait(300)
    sched.submit(prompts[-1], params, collect(len(prompts) - 1))  # shares the first prompt's full pages
    done[len(prompts) - 1].wait(300)
    if sampled:
        sched.submit(prompts[1], RequestParams(max_tokens=max_tokens, temperature=1.0, seed=5, ignore_eos=True),
                     collect(len(prompts)))
        done[-1].wait(300)
    pool = sched.pool.c_kv
    shards = [dict(pages=[s.index[1].start or 0, s.index[1].stop or N_PAGES], nbytes=s.data.nbytes)
              for s in pool.addressable_shards]
    sched.shutdown(10)
    return dict(results=results, shards=shards, nbytes=pool.nbytes)


def v32_refusal() -> str | None:
    """The Scheduler's refusal of a (tiny, random) V3.2 model over the split pool, or None if it accepted it."""
    from flax import nnx

    from hf_models import CONFIGS
    from ktjax.errors import KtjaxError
    from ktjax.model.config import ModelConfig
    from ktjax.model.decoder import DeepseekModel

    cfg = ModelConfig.from_hf_dict(dict(CONFIGS["v32"][1], architectures=["DeepseekV32ForCausalLM"]))
    try:
        Scheduler(ktjax.load_model(cfg, DeepseekModel(cfg, rngs=nnx.Rngs(0)), mesh="8"), max_batch=2,
                  page_size=PAGE, n_pages=N_PAGES)
    except KtjaxError as e:
        return str(e)
    return None


def main(folder, out):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 97, size=n).tolist() for n in (70, 9)]
    prompts.append(prompts[0][:64] + [3, 4])
    report = {}
    for fmt in ("int8",):
        report[fmt] = {mesh: run(ktjax.load(folder, mesh=mesh, chunk_size=16, cache_dtype=fmt,
                                            absorb_for_prefill=False), prompts) for mesh in ("1", "8")}
    cfg, model = draft_model()
    report["speculative"] = {mesh: run(ktjax.load_model(cfg, model, mesh=mesh, chunk_size=16, cache_dtype="int8",
                                                        absorb_for_prefill=False, speculative="mtp", draft_tokens=2),
                                       prompts, max_tokens=12, sampled=True) for mesh in ("1", "8")}
    report["v32_refused"] = v32_refusal()
    with open(out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:])

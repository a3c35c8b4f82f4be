"""Speculative decoding with the MTP module (speculative: mtp): draft acceptance, tokens per verifying pass and
decode tokens/s with and without it, side by side in one process (each configuration's runs interleaved with the
others', so that a loaded machine slows them alike). One JSON line per (model, context, batch, draft_tokens).

    python benchmarks/bench_mtp.py --quick          # the demo model, batch 1, 2k context (capped at its window)
    python benchmarks/bench_mtp.py                  # demo and the 2-layer V2-Lite-width model, 2k and 16k,
                                                    # batch 1 and 16, draft_tokens 1-3

Models: `demo` is ktjax/demo_model (its trained MTP module; its window is 1024 positions, so a longer context is
capped to the window less the tokens generated), prompted with text from ktjax/data/stdlib_docstrings.txt;
`v2lite` has DeepSeek-V2-Lite's widths (bench_generate.py's model, --layers decoder layers) and an MTP layer, with
random weights: its drafts are almost never accepted, so it measures what speculation costs when it does not
pay. Greedy decoding, ignore_eos. Speeds exclude compilation (each engine generates once before it is timed).
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
    a = p.parse_args(argv)
    if a.quick:
        a.models, a.contexts, a.batches = ["demo"], [2048], [1]
    for model in a.models:
        for context in a.contexts:
            for batch in a.batches:
                t0 = time.perf_counter()
                for row in run_case(model, context, batch, a.drafts, a):
                    row["wall_s"] = round(time.perf_counter() - t0, 1)
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

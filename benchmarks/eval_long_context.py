"""Long-context quality per cache format: pass-key retrieval over context lengths and needle depths, and the
change in logits and perplexity against the bf16 cache.

    python benchmarks/eval_long_context.py                         # the built-in demo model
    python benchmarks/eval_long_context.py --lengths 128 256 --trials 8 --heatmap benchmarks/retrieval.png

A trial hides a random 5-digit key at a given depth of held-out text (ktjax/demo/passkey.py), asks for it at the
end, and greedy-decodes the answer: chance is 1 in 90,000. Prints markdown tables; --markdown FILE appends
them with the command.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

FORMATS = ["bf16", "fp8", "int8", "int4"]


def retrieval(model_dir, tok, filler, fmt, length, depths, trials, seed):
    import ktjax
    from ktjax.demo.passkey import passkey_prompts, retrieval_hits

    prompts, keys = passkey_prompts(np.random.default_rng(seed), tok.tok, filler, length, depths, trials)
    engine = ktjax.load(model_dir, cache_dtype=fmt, max_new_tokens=6, temperature=0.0)
    return retrieval_hits(engine, tok, prompts, keys).reshape(len(depths), trials).mean(1)


def logit_drift(model_dir, corpus_ids, length, windows, seed, formats):
    import jax

    import ktjax

    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(corpus_ids) - length - 1, size=windows)
    ids = np.stack([corpus_ids[s:s + length + 1] for s in starts])
    rows = {}
    base = None
    for fmt in ["bf16"] + [f for f in formats if f != "bf16"]:  # bf16 first: the baseline
        logits = ktjax.load(model_dir, cache_dtype=fmt, chunk_size=64).cached_logits(ids[:, :-1])
        logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        nll = -np.take_along_axis(logp, ids[:, 1:, None], -1).mean()
        if base is None:
            base = logits
        rel = float(np.abs(logits - base).max() / np.abs(base).max())
        rows[fmt] = (float(np.exp(nll)), rel, float((logits.argmax(-1) == base.argmax(-1)).mean()))
    return rows


def main(argv=None):
    from ktjax.demo import DEMO_MODEL_DIR
    from ktjax.demo.passkey import heldout_filler
    from ktjax.runtime.tokenizer import Tokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEMO_MODEL_DIR)
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 192, 256, 384])
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--formats", nargs="+", default=FORMATS)
    p.add_argument("--windows", type=int, default=8, help="text windows for the perplexity comparison")
    p.add_argument("--text-dir", help="a folder of .txt files as filler (default: ktjax/data/stdlib_docstrings.txt, "
                                      "text the demo model was not trained on)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--heatmap", help="write a retrieval heat-map PNG here")
    p.add_argument("--markdown", help="append the tables to this file")
    a = p.parse_args(argv)
    tok = Tokenizer.from_folder(a.model)
    if a.text_dir:
        from ktjax.demo.train import load_corpus
        filler = np.array(tok.tok.encode(load_corpus(a.text_dir)[:2_000_000]).ids, np.int32)
    else:
        filler = heldout_filler(tok.tok)
    acc = {fmt: np.stack([retrieval(a.model, tok, filler, fmt, n, a.depths, a.trials, a.seed)
                          for n in a.lengths]) for fmt in a.formats}
    lines = [f"Command: `python benchmarks/eval_long_context.py {' '.join(argv or sys.argv[1:])}`", "",
             "Retrieval accuracy (%), mean over depths " + ", ".join(f"{d:g}" for d in a.depths) +
             f"; {a.trials} trials each:", "",
             "| format | " + " | ".join(f"{n} tok" for n in a.lengths) + " |", "|---" * (len(a.lengths) + 1) + "|"]
    for fmt, m in acc.items():
        lines.append(f"| {fmt} | " + " | ".join(f"{100 * v:.0f}" for v in m.mean(1)) + " |")
    drift = logit_drift(a.model, filler, max(a.lengths), a.windows, a.seed, a.formats)
    lines += ["", f"Against the bf16 cache on {a.windows} text windows of {max(a.lengths)} tokens:", "",
              "| format | perplexity | max logit change (relative) | top-1 agreement |", "|---|---|---|---|"]
    for fmt, (ppl, rel, agree) in drift.items():
        lines.append(f"| {fmt} | {ppl:.2f} | {rel:.4f} | {100 * agree:.1f}% |")
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        with open(a.markdown, "a") as f:
            f.write("\n" + text + "\n")
    if a.heatmap:
        plot(acc, a.lengths, a.depths, a.heatmap)
    return acc, drift


def plot(acc, lengths, depths, path):
    # A Figure of its own, not pyplot's: it needs no display and leaves the caller's backend alone (switching
    # to Agg here blanked every later plt.show() of a notebook that called this).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(acc), 3))
    axes = fig.subplots(1, len(acc), sharey=True)
    for ax, (fmt, m) in zip(np.atleast_1d(axes), acc.items()):
        im = ax.imshow(100 * m.T, vmin=0, vmax=100, cmap="viridis", origin="lower", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_title(f"{fmt} cache")
        ax.set_xlabel("context (tokens)")
    np.atleast_1d(axes)[0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes, label="retrieval accuracy (%)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()

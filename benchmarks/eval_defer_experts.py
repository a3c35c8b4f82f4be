"""The accuracy cost of expert deferral (the setting defer_experts k): the demo model with each k against k = 0, on
held-out text it was not trained on (ktjax/data/stdlib_docstrings.txt).

    python benchmarks/eval_defer_experts.py                   # the built-in demo model, every possible k
    python benchmarks/eval_defer_experts.py --prompts 8 --new-tokens 64 --windows 8 --window-len 256

Prints one JSON object: per k, (a) greedy decoding from `--prompts` held-out prompts: the share of generated
tokens equal to k = 0's at the same position and the mean number of tokens before the first difference; (b) over
teacher-forced held-out windows (one full forward each): the mean KL(p_0 || p_k) of the next-token distributions
(nats), top-1 agreement with k = 0, and the largest change in a logit relative to k = 0's largest; (c) perplexity
on the same windows.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def _log_softmax(logits):
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def greedy_agreement(tokens, base) -> dict:
    """Position-wise equality with the baseline's tokens, and the tokens before the first difference."""
    same = np.array([np.mean(np.equal(t, b)) for t, b in zip(tokens, base)])
    prefix = [next((i for i, (x, y) in enumerate(zip(t, b)) if x != y), len(b)) for t, b in zip(tokens, base)]
    return {"greedy_token_agreement": float(same.mean()), "greedy_tokens_before_first_difference": float(np.mean(prefix))}


def teacher_forced(logits, base, targets) -> dict:
    logp, logq = _log_softmax(base), _log_softmax(logits)
    kl = (np.exp(logp) * (logp - logq)).sum(-1)
    nll = -np.take_along_axis(logq, targets[..., None], -1).mean()
    return {"mean_kl_nats": float(kl.mean()), "max_kl_nats": float(kl.max()),
            "top1_agreement": float((logits.argmax(-1) == base.argmax(-1)).mean()),
            "max_logit_change_relative": float(np.abs(logits - base).max() / np.abs(base).max()),
            "perplexity": float(np.exp(nll))}


def main(argv=None):
    import ktjax
    from ktjax.demo import DEMO_MODEL_DIR
    from ktjax.demo.passkey import heldout_filler
    from ktjax.model.config import ModelConfig
    from ktjax.runtime.tokenizer import Tokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEMO_MODEL_DIR)
    p.add_argument("--defer", type=int, nargs="+", help="values of k (default: 0 to the model's top_k - 1)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--windows", type=int, default=8, help="teacher-forced text windows")
    p.add_argument("--window-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    top_k = ModelConfig.from_file(f"{a.model}/config.json").num_experts_per_tok
    ks = sorted(set([0] + (a.defer or list(range(top_k)))))
    text = heldout_filler(Tokenizer.from_folder(a.model).tok)
    rng = np.random.default_rng(a.seed)
    starts = rng.integers(0, len(text) - max(a.prompt_len, a.window_len + 1), size=a.prompts + a.windows)
    prompts = [text[s:s + a.prompt_len].tolist() for s in starts[:a.prompts]]
    windows = np.stack([text[s:s + a.window_len + 1] for s in starts[a.prompts:]])

    runs = {}
    for k in ks:
        engine = ktjax.load(a.model, defer_experts=k)
        tokens = engine.generate(prompts, max_new_tokens=a.new_tokens, temperature=0, ignore_eos=True).tokens
        runs[k] = (tokens, engine.logits(windows[:, :-1]))
    base_tokens, base_logits = runs[0]
    command = " ".join(["python benchmarks/eval_defer_experts.py", *(argv if argv is not None else sys.argv[1:])])
    out = {"model": a.model, "top_k": top_k, "command": command, "prompts": a.prompts, "new_tokens": a.new_tokens,
        "windows": a.windows, "window_len": a.window_len, "defer_experts": {}}
    for k, (tokens, logits) in runs.items():
        out["defer_experts"][str(k)] = {**greedy_agreement(tokens, base_tokens),
                                        **teacher_forced(logits, base_logits, windows[:, 1:])}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()

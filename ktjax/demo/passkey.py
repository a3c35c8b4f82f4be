"""The pass-key task: a random 5-digit key hidden at some depth of filler text, asked for at the end. The demo
model is trained on it (ktjax/demo/train.py), and benchmarks/eval_long_context.py and the tests measure how well
each cache format keeps it retrievable.

Held-out filler: ktjax/data/stdlib_docstrings.txt, docstrings of Python 3.11 standard-library modules (PSF
licence), English text the demo model was not trained on (it saw the Python documentation's reST sources).
"""
from __future__ import annotations

import os

import numpy as np

from ktjax.demo.tokens import SPECIALS

KEY_INTRO = " The pass key is {key}. Remember it. {key} is the pass key."
KEY_QUESTION = " What is the pass key? The pass key is"
BOS = SPECIALS[0]
HELDOUT_TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                            "stdlib_docstrings.txt")


def passkey_example(rng, tok, filler: np.ndarray, length: int, depth: float | None = None):
    """BOS, filler, the key at `depth` of the filler (random if None), more filler, the question and the
    answer: `length` tokens (below ~45, the task's own tokens and two of filler). `tok` is a
    `tokenizers.Tokenizer`. Returns (ids, index where the answer starts, key)."""
    key = str(rng.integers(10000, 100000))
    intro = tok.encode(KEY_INTRO.format(key=key)).ids
    question = tok.encode(KEY_QUESTION).ids
    answer = tok.encode(" " + key + ".").ids
    n_fill = max(length - 1 - len(intro) - len(question) - len(answer), 2)
    start = rng.integers(0, len(filler) - n_fill)
    fill = filler[start:start + n_fill].tolist()
    at = int(round((rng.random() if depth is None else depth) * n_fill))
    ids = [tok.token_to_id(BOS)] + fill[:at] + intro + fill[at:] + question
    return ids + answer, len(ids), key


def heldout_filler(tok) -> np.ndarray:
    with open(HELDOUT_TEXT, encoding="utf-8") as f:
        return np.array(tok.encode(f.read()).ids, np.int32)


def passkey_prompts(rng, tok, filler: np.ndarray, length: int, depths, trials: int):
    """`trials` prompts (without their answers) per depth, depth-major, and their keys."""
    examples = [passkey_example(rng, tok, filler, length, d) for d in depths for _ in range(trials)]
    return [ids[:at] for ids, at, _ in examples], [key for _, _, key in examples]


def retrieval_hits(engine, tok, prompts, keys) -> np.ndarray:
    """Greedy-decode an answer to each prompt with `engine` (a ktjax.Engine, max_new_tokens >= 6); True where
    it starts with the key. `tok` is a ktjax Tokenizer."""
    out = engine.generate(prompts).tokens
    return np.array([tok.decode(o).strip().startswith(k) for o, k in zip(out, keys)])


def teacher_forced_accuracy(predict, rng, tok, filler: np.ndarray, length: int, n: int = 48) -> float:
    """Share of `n` fresh examples whose five digits are each the argmax of the logits before them (one
    forward pass, no decoding). `predict(tokens[n, width]) -> argmax ids[n, width]`."""
    examples = [passkey_example(rng, tok, filler, length) for _ in range(n)]
    width = max(len(ids) for ids, _, _ in examples)  # longer than `length` where the task alone is
    tokens = np.array([ids + [0] * (width - len(ids)) for ids, _, _ in examples], np.int32)
    guess = np.asarray(predict(tokens))
    hits = [all(guess[i, j - 1] == ids[j] for j in range(at, len(ids) - 1))  # the digits, not the last "."
            for i, (ids, at, _) in enumerate(examples)]
    return float(np.mean(hits))

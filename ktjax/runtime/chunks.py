"""Prompts cut into fixed-size chunks for the prefill programs: one place for the padding, the positions and the
per-row bookkeeping that Engine.cached_logits and the speculative prefill (runtime/engine.py,
runtime/speculative.py) share.

A batch of prompts of different lengths is prefilled chunk by chunk, every row in every chunk (the programs have
one shape). Positions past a prompt's end point at `pad_position` (the cache's length: the write is dropped), a
row's last logits come from the chunk where its prompt ends, and `next_tokens` holds the token after each
position (the MTP module's input).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import numpy as np

from ktjax.runtime.progress import Progress


@dataclasses.dataclass
class Chunk:
    index: int
    tokens: np.ndarray        # [b, chunk] int32
    positions: np.ndarray     # [b, chunk] int32: start + position, or pad_position past the prompt
    lengths: np.ndarray       # [b] int32: tokens in the cache after this chunk
    logits_index: np.ndarray  # [b] int32: the prompt's last position within this chunk (clipped into it)
    ends_here: np.ndarray     # [b] bool: the prompt's last token is in this chunk
    next_tokens: np.ndarray   # [b, chunk] int32: the token after each position (0 past the prompt)
    next_positions: np.ndarray  # [b, chunk] int32: positions that have a next prompt token, else pad_position
    next_lengths: np.ndarray  # [b] int32: cache lengths counting only those positions
    done: int                 # prompt tokens of all rows through this chunk


def chunks(prompts, chunk: int, pad_position: int, start=None) -> Iterator[Chunk]:
    """The chunks of `prompts` (lists of ids). `start` [b]: tokens each row already holds in the cache (a
    continuation: the prompt goes at positions start..); default 0."""
    b = len(prompts)
    lens = np.array([len(p) for p in prompts])
    start = np.zeros(b, np.int64) if start is None else np.asarray(start, np.int64)
    n_chunks = -(-int(lens.max()) // chunk)
    ids = np.zeros((b, n_chunks * chunk + 1), np.int32)  # + 1: the token after the last chunk
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
    for c in range(n_chunks):
        pos = c * chunk + np.arange(chunk)[None, :]
        valid, has_next = pos < lens[:, None], pos + 1 < lens[:, None]
        i32 = lambda x: np.asarray(x, np.int32)  # noqa: E731
        yield Chunk(
            index=c, tokens=ids[:, c * chunk:(c + 1) * chunk],
            positions=i32(np.where(valid, start[:, None] + pos, pad_position)),
            lengths=i32(start + np.minimum(lens, (c + 1) * chunk)),
            logits_index=i32(np.clip(lens - 1 - c * chunk, 0, chunk - 1)),
            ends_here=(lens - 1) // chunk == c,
            next_tokens=ids[:, c * chunk + 1:(c + 1) * chunk + 1],
            next_positions=i32(np.where(has_next, start[:, None] + pos, pad_position)),
            next_lengths=i32(start + np.minimum(lens - 1, (c + 1) * chunk)),
            done=int(np.minimum(lens, (c + 1) * chunk).sum()))


def keep_last(last, new, ends_here: np.ndarray):
    """Per row, `new` where the row's prompt ends in this chunk, else `last` (None before the first chunk)."""
    if last is None:
        return new
    return jax.numpy.where(jax.numpy.asarray(ends_here)[:, None], new, last)


def report(progress: Progress, c: Chunk, computed, held_before: int, capacity: int) -> None:
    """Tell `progress` of a chunk's tokens once it is computed (blocking on `computed` only when someone
    watches), and of the cache's fill: held_before tokens were there before the prompts."""
    if progress.live:
        jax.block_until_ready(computed)
    progress.cache(held_before + c.done, capacity)
    progress.update(c.done)

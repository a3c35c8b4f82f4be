"""The one decode loop of Engine.generate (over the dense cache) and the server's scheduler (over the page pool),
and the per-row sampling both use.

`decode_steps` runs up to n_steps decode steps of every row in one dispatch, inside a jax.lax.while_loop (no
Python and no dispatch between steps, which matters where a step is short: about 1 ms on the demo model). Each
step feeds each row's pending token and samples the next from that row's own settings and random stream,
key = fold_in(key(seed), tokens the row has generated): the same seed draws the same tokens whatever else is in
the batch and however the steps are grouped into dispatches. A row stops on the device at one of its stop ids,
at its token budget, or at non-finite logits; a stopped row's writes go past the cache, where they are dropped.
Each token comes with its log-probability and the top TOP_LOGPROBS alternatives where a row asked for them
(computed only when one did), so the host reads a few numbers per row and step.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ktjax.runtime.sampling import Sampling, sample

TOP_LOGPROBS = 20   # the most top-logprobs a request may ask for
MAX_STEPS = 32      # the most decode steps one dispatch runs (the output buffers' length)
MIN_STOPS = 4       # stop ids per row in a decode program: the smallest width (powers of two above it)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowSampling:
    """Per-row sampling settings [b] and the row's random stream: key = fold_in(key(seed), n_generated)."""
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array     # uint32
    step: jax.Array     # int32: tokens the row has generated so far
    logprobs: jax.Array  # bool: the row wants log-probabilities (any row's costs a top-k over the vocabulary)

    @classmethod
    def of(cls, b: int, temperature, top_k, top_p, seed, step, logprobs) -> "RowSampling":
        """From per-row host values (sequences of at most b), the rest padded as greedy rows: numpy arrays, which a
        compiled program takes as they are (jnp.asarray would compile a conversion per dtype on first use)."""
        def col(values, pad, dtype):
            values = list(values)
            return np.array(values + [pad] * (b - len(values)), dtype)

        return cls(col(temperature, 0.0, np.float32), col(top_k, 0, np.int32), col(top_p, 1.0, np.float32),
                   col(seed, 0, np.uint32), col(step, 0, np.int32), col(logprobs, False, np.bool_))

    @classmethod
    def spec(cls, b: int, input_spec: Callable) -> "RowSampling":
        """Its abstract shapes, for lowering a program (input_spec: Engine.input_spec)."""
        f32, i32 = input_spec((b,), jnp.float32), input_spec((b,), jnp.int32)
        return cls(f32, i32, f32, input_spec((b,), jnp.uint32), i32, input_spec((b,), jnp.bool_))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepOutput:
    token: jax.Array       # [b] int32
    logprob: jax.Array     # [b] float32, of the chosen token
    top_ids: jax.Array     # [b, k] int32
    top_logprobs: jax.Array  # [b, k] float32
    finite: jax.Array      # [b] bool: the logits were all finite (else the token is meaningless)


def stops_width(n: int) -> int:
    """The stop-id width of a decode program whose rows have at most n stop ids: a power of two >= MIN_STOPS."""
    return max(MIN_STOPS, 1 << max(n - 1, 0).bit_length())


def stop_matrix(stops: list, b: int) -> np.ndarray:
    """Each row's stop ids (a list per row, up to b rows) as [b, stops_width] int32, padded with -1."""
    out = np.full((b, stops_width(max(map(len, stops), default=0))), -1, np.int32)
    for i, ids in enumerate(stops):
        out[i, :len(ids)] = sorted(ids)
    return out


def decode_steps(graphdef, opts, state, cache, token, lengths, remaining, stop_ids, rows: RowSampling, n_steps):
    """Up to n_steps (<= MAX_STEPS) decode steps of every row, fewer once every row is done: feed the row's
    pending token (at position lengths), sample the next, and stop the row at one of its stop_ids [b, S] (-1
    pads), after `remaining` more tokens, or at non-finite logits; remaining 0 marks a row done already (padding,
    or finished). Over a LatentCache, dense (Engine.generate) or a page pool (the server) -> (cache, StepOutput
    [MAX_STEPS, b], token -1 where a row emitted nothing)."""
    model = nnx.merge(graphdef, state)
    b = token.shape[0]
    zeros = jnp.zeros((b,), jnp.int32)

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < n_steps) & ~jnp.all(done)

    def body(carry):
        i, cache, token, lengths, done, out = carry
        logits, cache = model.forward_cached(token[:, None], jnp.where(done, cache.cache_lens, lengths)[:, None],
                                             cache, lengths + 1, zeros, opts)
        new = sampled(logits, dataclasses.replace(rows, step=rows.step + i))
        emit = ~done
        out = jax.tree.map(lambda buf, x: buf.at[i].set(x), out,
                           dataclasses.replace(new, token=jnp.where(emit, new.token, -1)))
        stop = jnp.any(new.token[:, None] == stop_ids, axis=1) | ~new.finite | (i + 1 >= remaining)
        return (i + 1, cache, jnp.where(emit, new.token, token), jnp.where(emit, lengths + 1, lengths),
                done | stop, out)

    k = min(TOP_LOGPROBS, model.cfg.vocab_size)
    out = StepOutput(jnp.full((MAX_STEPS, b), -1, jnp.int32), jnp.zeros((MAX_STEPS, b), jnp.float32),
                     jnp.zeros((MAX_STEPS, b, k), jnp.int32), jnp.zeros((MAX_STEPS, b, k), jnp.float32),
                     jnp.ones((MAX_STEPS, b), bool))
    carry = (jnp.int32(0), cache, token, lengths, remaining <= 0, out)
    _, cache, _, _, _, out = jax.lax.while_loop(cond, body, carry)
    return cache, out


def row_keys(rows: RowSampling):
    """Each row's key [b]: fold_in(key(seed), tokens it has generated)."""
    return jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.key(seed), n))(rows.seed, rows.step)


def row_sampling(rows: RowSampling) -> Sampling:
    return Sampling(rows.temperature, rows.top_k, rows.top_p)


def sampled(logits, rows: RowSampling) -> StepOutput:
    """Each row's next token from logits [b, vocab], drawn from its own stream, with its log-probabilities."""
    return step_output(logits, sample(logits, row_keys(rows), row_sampling(rows)), rows.logprobs)


def step_output(logits, token, want) -> StepOutput:
    """token [...] (chosen from logits [..., vocab]) with its log-probability, the top alternatives', and whether
    the logits were finite. The log-probabilities are computed only when a row wants them (`want` [b]: a top-k over
    the vocabulary per row costs as much as a small matmul); zeros otherwise."""
    k = min(TOP_LOGPROBS, logits.shape[-1])

    def logprobs():
        logp = jax.nn.log_softmax(logits, axis=-1)
        top_logprobs, top_ids = jax.lax.top_k(logp, k)
        return jnp.take_along_axis(logp, token[..., None], axis=-1)[..., 0], top_ids.astype(jnp.int32), top_logprobs

    def none():
        return (jnp.zeros(token.shape, jnp.float32), jnp.zeros(token.shape + (k,), jnp.int32),
                jnp.zeros(token.shape + (k,), jnp.float32))

    chosen, top_ids, top_logprobs = jax.lax.cond(jnp.any(want), logprobs, none)
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    return StepOutput(token, chosen, top_ids, top_logprobs, finite)



def free_running(b: int, lengths) -> tuple:
    """decode_steps' inputs after the cache for b greedy rows that run every step asked (no stop id, no token
    budget) from cache lengths [b], without the steps: what the benchmarks time (with a program of MIN_STOPS)."""
    return (np.zeros((b,), np.int32), np.asarray(lengths, np.int32), np.full((b,), 2**30, np.int32),
            np.full((b, MIN_STOPS), -1, np.int32), RowSampling.of(b, [], [], [], [], [], []))

"""The compiled step programs of runtime/batch.py's Batch (Engine.generate's and the server's scheduler's): one
forward step over the cache followed by per-row sampling. Over a page pool they come at bucketed shapes, so that any
batch composition reuses a few programs; over a dense cache (one page per row) at its one batch and chunk.

A step is either prefill chunks of a few sequences ([rows, chunk] tokens; over a pool rows x chunk <= chunk_size,
over a dense cache every row), ending by sampling each row's next token with that row's own settings
(runtime/decode.py's `sampled`), or decode steps of every running sequence in one dispatch: runtime/decode.py's
`decode_steps` (the scheduler asks for one step while a request waits to be admitted). Each sampled token comes
with its log-probability and the top TOP_LOGPROBS alternatives where a row asked for them, so the host only
reads a few numbers per row.

With speculative mtp (draft_tokens = k > 0) the cache holds the MTP module's slice, a prefill chunk also runs the
MTP module over it (runtime/speculative.py's prefill_chunk) and returns the hidden state at the chunk's logits
position, and the decode step is up to MAX_STEPS draft-verify-accept passes (speculative.verify) of every running
sequence in one dispatch, each at one fixed shape whatever is accepted, each row stopping on the device as in
decode_steps; each pass gives the k + 1 tokens it may (the host emits the accepted ones and the token after them),
each with its log-probabilities, and the drafts accepted; the rows' state after their last pass says where the
next step's MTP extends its slice from. Each row draws from its own stream, key = fold_in(key(seed), tokens
generated so far), split into the draft's and the acceptance's keys: the same seed gives the same tokens whatever
else is in the batch.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax.kv.cache import LatentCache
from ktjax.runtime import speculative
from ktjax.runtime.decode import (MAX_STEPS, MIN_STOPS, TOP_LOGPROBS, RowSampling, StepOutput, decode_steps, row_keys,
                                  row_sampling, sampled, step_output)

log = logging.getLogger(__name__)

BUCKET_GROWTH = 4   # page-table widths grow by this factor: attention's loop stops at the longest sequence
                    # anyway, so a wider table costs little and fewer widths mean fewer programs
MIN_CHUNK = 16


def step(graphdef, opts, state, cache: LatentCache, tokens, positions, lengths, logits_index,
         rows: RowSampling):
    """forward_cached over the cache, then sample each row. -> (cache, StepOutput)."""
    model = nnx.merge(graphdef, state)
    logits, cache = model.forward_cached(tokens, positions, cache, lengths, logits_index, opts)
    return cache, sampled(logits, rows)


def prefill_step(graphdef, opts, state, cache: LatentCache, tokens, positions, lengths, logits_index,
                 next_tokens, mtp_positions, mtp_lengths, rows: RowSampling):
    """speculative mtp: a prefill chunk through the model and the MTP module (speculative.prefill_chunk), then
    sample each row -> (cache, StepOutput, hidden state at logits_index [b, H])."""
    logits, last, cache = speculative.prefill_chunk(graphdef, opts, state, cache, tokens, positions, lengths,
                                                    logits_index, next_tokens, mtp_positions, mtp_lengths)
    return cache, sampled(logits, rows), last


def verify_steps(graphdef, opts, state, cache: LatentCache, token, lengths, base, hidden, after, remaining,
                 stop_ids, rows: RowSampling, n_passes, *, k: int):
    """speculative mtp: up to n_passes draft-verify-accept passes of every row (speculative.verify) in one
    dispatch, fewer once every row is done; token: the pending one at position lengths; base, hidden [b, k+1, H],
    after [b, k+1]: the positions the last pass accepted, from which the MTP extends its slice; a row stops at
    one of its stop_ids [b, S], after `remaining` more tokens (0: done already, or padding) or at non-finite
    logits, as decode.decode_steps' rows do. Each pass's row key: fold_in(key(seed), tokens generated before it),
    split into the draft's and the acceptance's. -> (cache, StepOutput [n, b, k+1] of the tokens each pass gives
    (d_1..d_n, then the token after them; token -1 past them), drafts accepted [n, b], the rows' SpecState after
    their last pass), n = MAX_STEPS."""
    model = nnx.merge(graphdef, state)
    b = token.shape[0]
    j = jnp.arange(k + 1)[None]

    def cond(carry):
        i, _, _, done, _, _, _ = carry
        return (i < n_passes) & ~jnp.all(done)

    def body(carry):
        i, cache, st, done, n_gen, out, accepted = carry
        keys = jax.vmap(jax.random.split)(row_keys(dataclasses.replace(rows, step=rows.step + n_gen)))
        active = ~done
        new, n, logits, h, cache = speculative.verify(model, opts, cache, st, active, row_sampling(rows),
                                                      keys[:, 0], keys[:, 1], k)
        pass_out = step_output(logits, new, rows.logprobs)
        # the tokens this pass gives: d_1..d_n and the token after them, cut after a stop id, after a token from
        # non-finite logits (which the host reports, never emits) and at the row's budget
        given = j <= n[:, None]
        first = lambda hit: jnp.where(hit.any(1), jnp.argmax(hit, 1), k + 1)  # noqa: E731
        stop = first(jnp.any(new[..., None] == stop_ids[:, None, :], axis=-1) & given)
        bad = first(~pass_out.finite & given)
        m = jnp.minimum(jnp.minimum(n + 1, jnp.minimum(stop, bad) + 1), remaining - n_gen)
        m = jnp.where(active, m, 0)
        emit = j < m[:, None]
        out = jax.tree.map(lambda buf, x: buf.at[i].set(x), out,
                           dataclasses.replace(pass_out, token=jnp.where(emit, new, -1)))
        accepted = accepted.at[i].set(n)
        moved = m > 0

        def keep(now, before):  # the row's new value where it moved, else its old one
            return jnp.where(moved.reshape((-1,) + (1,) * (now.ndim - 1)), now, before)

        last = jnp.take_along_axis(new, jnp.maximum(m - 1, 0)[:, None], axis=1)[:, 0]
        st = speculative.SpecState(st.lengths + m, keep(last, st.token), keep(st.lengths, st.base),
                                   keep(h.astype(st.hidden.dtype), st.hidden), keep(jnp.maximum(new, 0), st.after))
        done = done | (stop < m) | (bad < m) | (n_gen + m >= remaining)
        return i + 1, cache, st, done, n_gen + m, out, accepted

    vocab_k = min(TOP_LOGPROBS, model.cfg.vocab_size)
    shape = (MAX_STEPS, b, k + 1)
    out = StepOutput(jnp.full(shape, -1, jnp.int32), jnp.zeros(shape, jnp.float32),
                     jnp.zeros(shape + (vocab_k,), jnp.int32), jnp.zeros(shape + (vocab_k,), jnp.float32),
                     jnp.ones(shape, bool))
    st = speculative.SpecState(lengths, token, base, hidden, after)
    zeros = jnp.zeros((b,), jnp.int32)
    carry = (jnp.int32(0), cache, st, remaining <= 0, zeros, out, jnp.zeros((MAX_STEPS, b), jnp.int32))
    _, cache, st, _, _, out, accepted = jax.lax.while_loop(cond, body, carry)
    return cache, out, accepted, st


def pow2_at_least(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(n - 1, 0).bit_length())


def buckets(lo: int, hi: int, growth: int) -> list[int]:
    """lo, lo*growth, ... and finally hi (lo <= hi): the shapes a dimension of at most hi is padded to."""
    out = [lo]
    while out[-1] < hi:
        out.append(min(out[-1] * growth, hi))
    return out


def bucket_of(n: int, choices: list[int]) -> int:
    """The smallest bucket holding n."""
    for c in choices:
        if c >= n:
            return c
    raise ValueError(f"{n} exceeds the largest bucket {choices[-1]}")


class Programs:
    """Compiled step programs of an Engine over one cache, keyed by (batch, chunk, table width), compiled through
    engine.compiled_program so engine.compile_count counts them. Over a page pool: batches, chunks and table widths
    in buckets (up to max_batch rows and max_width pages a row). Over a dense cache (`cache.dense`: no table): its
    batch, every row in every step, and the one prefill `chunk`. `cache` may be abstract (jax.eval_shape's)."""

    def __init__(self, engine, cache: LatentCache, max_batch: int, max_width: int | None = None,
                 draft_tokens: int = 0, stops: int = MIN_STOPS, chunk: int | None = None):
        self.engine = engine
        self.stops = stops  # the stop-id bucket of a request with the default stops (what warmup compiles)
        self.draft_tokens = draft_tokens  # k > 0: speculative mtp (prefill with the MTP module, verifying decode)
        self.dense = cache.dense
        self.cache_key = (cache.fmt, cache.n_pages, cache.page_size, cache.block, cache.attention, cache.layout,
                          cache.c_kv.shape[0], draft_tokens)
        chunk_size = engine.runtime.chunk_size
        if self.dense:
            self.chunks, self.widths, self.batches = [chunk or chunk_size], [None], [cache.n_pages]
        else:
            self.chunks = buckets(min(MIN_CHUNK, chunk_size), chunk_size, BUCKET_GROWTH)
            min_width = min(max(1, 512 // cache.page_size), max_width)
            self.widths = buckets(min_width, max_width, BUCKET_GROWTH)
            self.batches = buckets(1, max_batch, 2)
        self._cache_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                          cache)

    def prefill_rows(self, chunk: int) -> int:
        """Most prefill rows of `chunk` tokens in one step: a batch bucket within chunk_size tokens in all (a dense
        cache: all its rows)."""
        if self.dense:
            return self.batches[0]
        return max([b for b in self.batches if b * chunk <= self.chunks[-1]] or [1])

    def prefill_shapes(self):
        return [(b, c, w) for c in self.chunks for b in self.batches if b <= self.prefill_rows(c)
                for w in self.widths]

    def decode_shapes(self):
        return [(b, 1, w, self.stops) for b in self.batches for w in self.widths]

    def shapes(self):
        """Every program's get() arguments (a dense cache: its prefill step and its decode or verifying step): what
        a warmup compiles, so that steps with the default stop ids compile nothing."""
        return self.prefill_shapes() + self.decode_shapes()

    def get(self, b: int, s: int, width: int, stops: int = MIN_STOPS, *, log_compile: bool = False):
        """The program of a step of b rows: prefill chunks of s tokens, or (s = 1) decode steps (verifying passes),
        whose rows stop at up to `stops` stop ids each (a stops_bucket); table width (None: a dense cache).
        log_compile: say so when it compiles (a step that waits for it: a shape the warmup did not compile)."""
        engine = self.engine
        opts = engine.run_options(engine.runtime.absorb(engine.cfg, s))
        k = self.draft_tokens
        i32 = lambda *shape: engine.input_spec(shape, jnp.int32)  # noqa: E731
        if not k and s == 1:
            name, fn, n_out = "decode", functools.partial(decode_steps, engine.graphdef, opts), 1
            args = (i32(b), i32(b), i32(b), i32(b, stops))
        elif not k:
            name, fn, n_out = "step", functools.partial(step, engine.graphdef, opts), 1
            args = (i32(b, s), i32(b, s), i32(b), i32(b))
        elif s == 1:
            name, fn, n_out = "verify", functools.partial(verify_steps, engine.graphdef, opts, k=k), 3
            hidden = engine.input_spec((b, k + 1, engine.cfg.hidden_size), engine.runtime.jnp_dtype)
            args = (i32(b), i32(b), i32(b), hidden, i32(b, k + 1), i32(b), i32(b, stops))
        else:
            name, fn, n_out = "mtp-prefill", functools.partial(prefill_step, engine.graphdef, opts), 2
            args = (i32(b, s), i32(b, s), i32(b), i32(b), i32(b, s), i32(b, s), i32(b))

        def build():
            cache = (self._cache_shapes if width is None
                     else dataclasses.replace(self._cache_shapes, page_table=i32(b, width)))
            rows = RowSampling.spec(b, engine.input_spec)
            tail = (rows, i32()) if s == 1 else (rows,)  # decode and verify: the steps (passes) to run
            out = None
            if engine.mesh is not None:  # the cache keeps its layout; the outputs are replicated
                rep = jax.sharding.NamedSharding(engine.mesh, jax.sharding.PartitionSpec())
                out = (jax.tree.map(lambda x: x.sharding, cache),) + (rep,) * n_out
            jitted = jax.jit(fn, donate_argnums=(1,), out_shardings=out)
            start = time.perf_counter()
            if log_compile:
                log.info("compiling the %s program (rows %d, tokens %d, table width %s): its first use", name, b, s,
                         width)
            compiled = jitted.lower(engine.state, cache, *args, *tail).compile()
            if log_compile:
                log.info("compiled it in %.1f s", time.perf_counter() - start)
            return compiled

        return engine.compiled_program((name, opts, self.cache_key, b, s, width, stops), build)

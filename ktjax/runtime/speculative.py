"""Speculative decoding with the model's multi-token-prediction (MTP) module as the draft (speculative: mtp).

Each iteration of one compiled while-loop (many per dispatch, the cache donated, fixed shapes whatever is
accepted) drafts k = draft_tokens tokens and verifies them in one pass of the model:

1. draft: the MTP module first extends its cache slice over the positions the last pass accepted (from the main
   model's hidden states there: its slice then holds what the accepted tokens alone give), which predicts d_1;
   k-1 chained MTP steps (each on the previous step's hidden state) give d_2..d_k. Each d_j is drawn from the
   MTP's distribution q_j, after the same temperature / top-k / top-p transform as the model's.
2. verify: one cached forward pass over [t, d_1..d_k] at positions L..L+k (t: the pending token, already
   emitted, not yet in the cache) gives the model's distributions p_0..p_k and its hidden states.
3. accept: d_j with probability min(1, p_{j-1}(d_j) / q_j(d_j)) while all before it were accepted; then one more
   token from normalize(max(0, p_n - q_{n+1})) after a rejection, or from p_k when all k were accepted: the
   standard rule, whose output is distributed as the model's own. A greedy row's distributions are one-hot at
   the argmax, so the same rule accepts exactly the drafts that equal the model's argmax and adds the argmax
   after them: the tokens of plain greedy decoding.
4. advance: lengths by the tokens emitted (stops and max_new_tokens cut them exactly as plain decoding does).
   Rejected positions leave no trace: entries past a sequence's length are never read, and the next pass
   overwrites them.

The cache holds the MTP module's slice as its layer cfg.num_hidden_layers (LatentCache.create's extra_layers),
and needs k positions past the last token for the rejected drafts (`reserve`). The server (serve/programs.py)
runs `verify` once per scheduler step over its page pool, with a random stream per row ([b] keys).
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ktjax.errors import KtjaxError
from ktjax.model.decoder import RunOptions
from ktjax.runtime import chunks
from ktjax.runtime.sampling import Sampling, distribution, draw_from, repeat_rows, sample

STEPS_PER_DISPATCH = 16  # verify passes per call into the compiled loop (up to draft_tokens + 1 tokens each)


def check_model(cfg, model_or_graph) -> None:
    """One clear error where speculative mtp cannot run: the model has no MTP module."""
    layers = getattr(cfg, "num_nextn_predict_layers", 0) or 0
    if layers < 1 or getattr(model_or_graph, "mtp", None) is None:
        raise KtjaxError("this model has no MTP module: speculative mtp drafts with DeepSeek's multi-token-"
                         f"prediction layer (num_nextn_predict_layers {layers} in config.json"
                         + (", or its weights were dropped at conversion" if layers else "") +
                         "); use --speculative off")


# -- random numbers: one key for the batch (Engine.generate), or [b] keys (the server: a stream per row) ----

def _split(key, n: int):
    """n keys, each one key or [b] row keys as `key` is."""
    if jnp.ndim(key) == 0:
        return jax.random.split(key, n)
    rows = jax.vmap(lambda k: jax.random.split(k, n))(key)  # [b, n]
    return [rows[:, i] for i in range(n)]


def _uniform(key, shape):
    """Uniform [0, 1) numbers of shape [b, ...]; with [b] keys, row i's from key i."""
    if jnp.ndim(key) == 0:
        return jax.random.uniform(key, shape)
    return jax.vmap(lambda k: jax.random.uniform(k, shape[1:]))(key)


def _draw(probs, key, sampling: Sampling):
    """draw_from; with [b] keys, each row drawn as a batch of one from its own key (the same draw whatever else
    is in the batch)."""
    if jnp.ndim(key) == 0:
        return draw_from(probs, key, sampling)
    rows = jax.tree.map(lambda v: jnp.broadcast_to(jnp.asarray(v), probs.shape[:1]), sampling)

    def drawn(probs):
        return jax.vmap(lambda p, k, s: draw_from(p[None], k, s)[0])(probs, key, rows)
    # an all-greedy batch skips the random numbers (as draw_from does)
    return jax.lax.cond((rows.temperature > 0).any(), drawn, lambda p: jnp.argmax(p, -1).astype(jnp.int32), probs)


# -- the model's two passes, as this loop uses them --------------------------------------------------------

def main_pass(model, tokens, positions, cache, lengths, logits_index, opts: RunOptions):
    """The model through the cache -> (logits at logits_index (all positions with None), cache, final-normed
    hidden states at all s positions [b, s, H]). The logits at one position are projected here from its hidden
    state: forward_cached's logits at all positions go unused, and XLA drops their computation."""
    logits, cache, hidden = model.forward_cached(tokens, positions, cache, lengths, None, opts, return_hidden=True)
    if logits_index is not None:
        last = jnp.take_along_axis(hidden, logits_index[:, None, None], axis=1)[:, 0]
        logits = model.project(last).astype(jnp.float32)
    return logits, cache, hidden


def mtp_pass(model, hidden, tokens, positions, cache, lengths, logits_index, opts: RunOptions):
    """The MTP module at positions [b, s] (hidden [b, s, H]: the hidden state at each position; tokens: the
    token after each) -> (logits [b, vocab] and its hidden state [b, H] at logits_index, cache)."""
    logits, out, cache = model.mtp_forward_cached(hidden, tokens, positions, cache, lengths, logits_index, opts)
    if out.ndim == 3:
        out = jnp.take_along_axis(out, logits_index[:, None, None], axis=1)[:, 0]
    return logits, out, cache


# -- the compiled programs ---------------------------------------------------------------------------------

def prefill_chunk(graphdef, opts: RunOptions, state, cache, tokens, positions, lengths, logits_index,
                  next_tokens, mtp_positions, mtp_lengths):
    """A prompt chunk through the model, then through the MTP module (its slice: position p from the model's
    hidden state at p and the prompt's token p + 1; mtp_positions drop the prompt's last position, whose next
    token is not sampled yet) -> (logits [b, vocab] and hidden [b, H] at logits_index, cache)."""
    model = nnx.merge(graphdef, state)
    logits, cache, hidden = main_pass(model, tokens, positions, cache, lengths, logits_index, opts)
    _, _, cache = mtp_pass(model, hidden, next_tokens, mtp_positions, cache, mtp_lengths, logits_index, opts)
    last = jnp.take_along_axis(hidden, logits_index[:, None, None], axis=1)[:, 0]
    return logits, last, cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpecState:
    lengths: jax.Array   # [b] tokens in the model's cache (L)
    token: jax.Array     # [b] the pending token t at position L: emitted, not yet fed
    base: jax.Array      # [b] the first position of `hidden` (the MTP extends over base .. L-1)
    hidden: jax.Array    # [b, k+1, H] the model's hidden states at base, base+1, ...
    after: jax.Array     # [b, k+1] the token after each of those positions
    done: jax.Array      # [b]
    n_gen: jax.Array     # [b] tokens generated so far
    bad_step: jax.Array  # [b] the generation step whose logits were not finite, -1 while all were
    passes: jax.Array    # [b] verifying passes run for the row
    accepted: jax.Array  # [b] drafts accepted
    key: jax.Array


def start(logits, last_hidden, lengths, key, max_new, stop_ids, sampling: Sampling, k: int, dtype):
    """The first token, from the prefill's logits, and the loop's state -> (SpecState, first tokens [b] (-1 =
    none: non-finite logits))."""
    b, h = last_hidden.shape
    key, sub = jax.random.split(key)
    broken = ~jnp.all(jnp.isfinite(logits), axis=-1)
    tok = sample(logits, sub, sampling)
    n_gen = (~broken).astype(jnp.int32)
    done = broken | jnp.isin(tok, stop_ids) | (n_gen >= max_new)
    hidden = jnp.zeros((b, k + 1, h), dtype).at[:, 0].set(last_hidden.astype(dtype))
    after = jnp.zeros((b, k + 1), jnp.int32).at[:, 0].set(tok)
    zeros = jnp.zeros((b,), jnp.int32)
    state = SpecState(lengths, tok, lengths - 1, hidden, after, done, n_gen, jnp.where(broken, 0, -1), zeros,
                      zeros, key)
    return state, jnp.where(broken, -1, tok)


def _draft(model, opts, cache, st: SpecState, active, sampling: Sampling, key, k: int):
    """The MTP's k drafts [b, k] and their distributions [b, k, vocab], the MTP slice updated."""
    b = st.lengths.shape[0]
    cache_lens = cache.cache_lens
    j = jnp.arange(k + 1)[None]
    n_valid = st.lengths - st.base  # positions the last pass accepted (1 .. k+1)
    pos = jnp.where(active[:, None] & (j < n_valid[:, None]), st.base[:, None] + j, cache_lens)
    logits, h, cache = mtp_pass(model, st.hidden, st.after, pos, cache, st.lengths, n_valid - 1, opts)
    drafts, dists = [], []
    for i, sub in enumerate(_split(key, k)):
        q = distribution(logits, sampling)
        d = _draw(q, sub, sampling)
        drafts.append(d)
        dists.append(q)
        if i + 1 < k:  # chain: the MTP at position L + i on its own hidden state and the draft it made
            pos = jnp.where(active, st.lengths + i, cache_lens)[:, None]
            logits, h, cache = mtp_pass(model, h[:, None], d[:, None], pos, cache, st.lengths + i + 1,
                                        jnp.zeros((b,), jnp.int32), opts)
    return jnp.stack(drafts, 1), jnp.stack(dists, 1), cache


def _accept(p, q, drafts, key, sampling: Sampling):
    """The rejection rule. p [b, k+1, vocab]: the model's distributions after t, d_1, ..; q [b, k, vocab]: the
    drafts' -> (drafts accepted n [b], the token after them [b])."""
    b, k = drafts.shape
    k_u, k_bonus = _split(key, 2)
    p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    u = _uniform(k_u, (b, k))
    ok = u * q_d < p_d  # u < p/q without dividing; a greedy row: d == argmax (p_d 1, q_d 1)
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]
    q_n = jnp.take_along_axis(jnp.concatenate([q, jnp.zeros_like(q[:, :1])], 1), n[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_n - q_n, 0.0)
    # p_n == q_n (rounding aside) cannot reject; where rounding left nothing, p_n itself
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_n)
    return n, _draw(residual, k_bonus, sampling)


def verify(model, opts, cache, st: SpecState, active, sampling: Sampling, k_draft, k_accept, k: int):
    """One draft-verify-accept of the rows `active` (the others write nothing): the MTP drafts d_1..d_k, one pass
    of the model over [t, d_1..d_k] at L..L+k, the rejection rule -> (new [b, k+1]: d_1..d_n, then the token after
    them, then rejected drafts (never emitted); n [b]: drafts accepted; the model's logits [b, k+1, vocab] and
    hidden states [b, k+1, H] at L..L+k; cache). Keys: one for the batch, or [b] (a random stream per row)."""
    b = st.lengths.shape[0]
    j = jnp.arange(k + 1)[None]
    drafts, q, cache = _draft(model, opts, cache, st, active, sampling, k_draft, k)
    tokens = jnp.concatenate([st.token[:, None], drafts], 1)
    pos = jnp.where(active[:, None], st.lengths[:, None] + j, cache.cache_lens)
    lengths = jnp.where(active, st.lengths + k + 1, st.lengths)
    logits, cache, hidden = main_pass(model, tokens, pos, cache, lengths, None, opts)
    p = distribution(logits.reshape(b * (k + 1), -1), repeat_rows(sampling, b, k + 1)).reshape(b, k + 1, -1)
    n, bonus = _accept(p, q, drafts, k_accept, sampling)
    new = jnp.where(j < n[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), bonus[:, None])
    return new, n, logits, hidden, cache


def decode_steps(graphdef, opts: RunOptions, state, cache, st: SpecState, n_steps, max_new, stop_ids,
                 sampling: Sampling, k: int):
    """Up to n_steps draft-verify-accept iterations (fewer once every sequence is done) -> (cache, state,
    tokens [b, STEPS_PER_DISPATCH, k+1] (-1 = none))."""
    model = nnx.merge(graphdef, state)
    b = st.lengths.shape[0]
    j = jnp.arange(k + 1)[None]

    def cond(carry):
        i, _, st, _ = carry
        return (i < n_steps) & ~jnp.all(st.done)

    def body(carry):
        i, cache, st, out = carry
        key, k_draft, k_accept = jax.random.split(st.key, 3)
        active = ~st.done
        new, n, logits, hidden, cache = verify(model, opts, cache, st, active, sampling, k_draft, k_accept, k)

        # the tokens this pass gives: d_1..d_n, then the bonus; cut after a stop and at max_new_tokens
        stop = jnp.isin(new, stop_ids) & (j <= n[:, None])
        first_stop = jnp.where(stop.any(1), jnp.argmax(stop, 1), k + 1)
        finite = jnp.all(jnp.isfinite(logits), axis=-1) | (j > n[:, None])
        broken = active & ~jnp.all(finite, axis=1)  # stop, never emit from NaN
        m = jnp.minimum(jnp.minimum(n + 1, first_stop + 1), max_new - st.n_gen)
        m = jnp.where(active & ~broken, m, 0)
        out = out.at[:, i].set(jnp.where(j < m[:, None], new, -1))
        n_gen = st.n_gen + m
        done = st.done | broken | (first_stop < m) | (n_gen >= max_new)

        moved = m > 0

        def keep(now, before):  # the row's new value where it moved, else its old one
            return jnp.where(moved.reshape((-1,) + (1,) * (now.ndim - 1)), now, before)

        last = jnp.take_along_axis(new, jnp.maximum(m - 1, 0)[:, None], axis=1)[:, 0]
        st = SpecState(
            lengths=st.lengths + m, token=keep(last, st.token), base=keep(st.lengths, st.base),
            hidden=keep(hidden.astype(st.hidden.dtype), st.hidden), after=keep(jnp.maximum(new, 0), st.after),
            done=done, n_gen=n_gen, bad_step=jnp.where(broken & (st.bad_step < 0), st.n_gen, st.bad_step),
            passes=st.passes + active, accepted=st.accepted + jnp.where(active & ~broken, jnp.minimum(n, m), 0),
            key=key)
        return i + 1, cache, st, out

    out = jnp.full((b, STEPS_PER_DISPATCH, k + 1), -1, jnp.int32)
    _, cache, st, out = jax.lax.while_loop(cond, body, (jnp.int32(0), cache, st, out))
    return cache, st, out


# -- the engine's side: compile, prefill, decode ----------------------------------------------------------

class Speculation:
    """speculative mtp for one Engine: its programs (compiled through the engine, counted in compile_count) and
    the host loops that run them."""

    def __init__(self, engine, k: int, raise_if_broken):
        self.engine = engine
        self.k = k
        self.raise_if_broken = raise_if_broken  # bad_step [b] -> the engine's error for non-finite logits

    @property
    def reserve(self) -> int:
        """Cache positions needed past a sequence's last token: the verified drafts that may be rejected."""
        return self.k

    def prefill_program(self, cache, b: int, chunk: int):
        e = self.engine
        opts = e.run_options(e.runtime.absorb(e.cfg, chunk))

        def build():
            i32, tok = e.input_spec((b,), jnp.int32), e.input_spec((b, chunk), jnp.int32)
            out = None if e.mesh is None else (tok.sharding, tok.sharding, jax.tree.map(lambda x: x.sharding, cache))
            fn = jax.jit(functools.partial(prefill_chunk, e.graphdef, opts), donate_argnums=(1,), out_shardings=out)
            return fn.lower(e.state, cache, tok, tok, i32, i32, tok, tok, i32).compile()

        return e.compiled_program(("mtp-prefill", opts, e._cache_key(cache), b, chunk), build)

    def start_program(self, b: int, stops_shape):
        e = self.engine
        fn = functools.partial(start, k=self.k, dtype=e.runtime.jnp_dtype)

        def build():
            i32, scalar = e.input_spec((b,), jnp.int32), e.input_spec((), jnp.int32)
            return jax.jit(fn).lower(e.input_spec((b, e.cfg.vocab_size), jnp.float32),
                                     e.input_spec((b, e.cfg.hidden_size), e.runtime.jnp_dtype), i32,
                                     jax.random.key(0), scalar, e.input_spec(stops_shape, jnp.int32),
                                     Sampling.make()).compile()

        return e.compiled_program(("mtp-start", b, stops_shape, self.k), build)

    def decode_program(self, cache, b: int, stops_shape):
        e = self.engine
        opts = e.run_options(True)
        k = self.k

        def build():
            i32, flag = e.input_spec((b,), jnp.int32), e.input_spec((b,), jnp.bool_)
            st = SpecState(i32, i32, i32, e.input_spec((b, k + 1, e.cfg.hidden_size), e.runtime.jnp_dtype),
                           e.input_spec((b, k + 1), jnp.int32), flag, i32, i32, i32, i32, jax.random.key(0))
            scalar = e.input_spec((), jnp.int32)
            rep = None if e.mesh is None else scalar.sharding
            out = None if e.mesh is None else (jax.tree.map(lambda x: x.sharding, cache), rep, rep)
            fn = jax.jit(functools.partial(decode_steps, e.graphdef, opts, k=k), donate_argnums=(1,),
                         out_shardings=out)
            return fn.lower(e.state, cache, st, scalar, scalar, e.input_spec(stops_shape, jnp.int32),
                            Sampling.make()).compile()

        return e.compiled_program(("mtp-decode", opts, e._cache_key(cache), b, stops_shape, k), build)

    # -- the way Engine._run takes: programs, prefill, decode ----------------------------------------------------
    def programs(self, cache, b: int, chunk: int, stops_shape) -> list:
        return [lambda: self.prefill_program(cache, b, chunk), lambda: self.start_program(b, stops_shape),
                lambda: self.decode_program(cache, b, stops_shape)]

    def prefill(self, programs, cache, prompts, chunk: int, progress):
        """Prompts chunk by chunk through the model and the MTP module -> ((logits [b, vocab], hidden [b, H]) at
        each prompt's last token, cache)."""
        logits, hidden, cache = self.prefill_chunks(programs[0], cache, prompts, chunk, progress)
        return (logits, hidden), cache

    def decode(self, programs, cache, prefilled, prompts, call, stop_ids, sampling, on_tokens, progress):
        """-> (tokens per sequence, time to first token, decode seconds, the acceptance stats)."""
        logits, hidden = prefilled
        lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
        tokens, ttft, decode_s, st, _ = self.decode_loop(programs[1], programs[2], cache, logits, hidden, lengths,
                                                         jax.random.key(call.seed), call.max_new_tokens, stop_ids,
                                                         sampling, on_tokens, progress)
        return tokens, ttft, decode_s, self.stats(st, tokens)

    def prefill_chunks(self, prefill, cache, prompts, chunk: int, progress):
        """The prefill program over the prompts' chunks -> (logits [b, vocab] and hidden [b, H] at each prompt's
        last token, cache)."""
        capacity = len(prompts) * cache.cache_lens
        logits = hidden = None
        for c in chunks.chunks(prompts, chunk, cache.cache_lens):
            chunk_logits, chunk_hidden, cache = prefill(
                self.engine.state, cache, *map(jnp.asarray, (c.tokens, c.positions, c.lengths, c.logits_index,
                                                              c.next_tokens, c.next_positions, c.next_lengths)))
            logits = chunks.keep_last(logits, chunk_logits, c.ends_here)
            hidden = chunks.keep_last(hidden, chunk_hidden, c.ends_here)
            chunks.report(progress, c, chunk_logits, 0, capacity)
        return jax.block_until_ready(logits), hidden, cache

    def decode_loop(self, begin, decode, cache, logits, hidden, lengths, key, max_new: int, stop_ids, sampling,
                    on_tokens=None, progress=None):
        """The first token (from the prefill's logits), then dispatches of the loop until every sequence is done
        -> (tokens per sequence, time to first token after the prefill, decode seconds, the final SpecState, the
        cache)."""
        t0 = time.perf_counter()
        st, first = begin(logits, hidden, lengths, key, jnp.int32(max_new), stop_ids, sampling)
        tokens = [[int(t)] if t >= 0 else [] for t in np.asarray(first)]
        ttft = time.perf_counter() - t0
        if on_tokens is not None and any(tokens):
            on_tokens([list(t) for t in tokens])
        capacity = len(tokens) * cache.cache_lens
        while True:
            if progress is not None:
                progress.cache(int(np.asarray(st.lengths).sum()), capacity)
                progress.update(sum(map(len, tokens)))
            self.raise_if_broken(np.asarray(st.bad_step))
            if bool(np.all(np.asarray(st.done))):
                break
            cache, st, out = decode(self.engine.state, cache, st, jnp.int32(STEPS_PER_DISPATCH), jnp.int32(max_new),
                                    stop_ids, sampling)
            new = [[int(t) for t in row.reshape(-1) if t >= 0] for row in np.asarray(out)]
            for acc, n in zip(tokens, new):
                acc.extend(n)
            if on_tokens is not None and any(new):
                on_tokens(new)
        return tokens, ttft, time.perf_counter() - t0, st, cache

    def stats(self, st: SpecState, tokens) -> dict:
        """Acceptance of this generation: per sequence and in all."""
        passes, accepted = np.asarray(st.passes), np.asarray(st.accepted)
        total = int(passes.sum())
        # tokens the passes gave: all but each sequence's first (sampled from the prefill's logits)
        from_passes = sum(max(len(t) - 1, 0) for t in tokens)
        return {"speculative": "mtp", "draft_tokens": self.k, "verify_passes": total,
                "draft_acceptance_rate": float(accepted.sum()) / (self.k * total) if total else 0.0,
                "accept_length": from_passes / total if total else 0.0,
                "accepted_drafts": accepted.tolist(), "verify_passes_per_sequence": passes.tolist()}

"""Speculative decoding with the model's multi-token-prediction (MTP) module as the draft (speculative: mtp).

Each verifying pass (`verify`: one compiled step of runtime/batch.py, Engine.generate's and the server's, the
cache donated, fixed shapes whatever is accepted) drafts k = draft_tokens tokens and verifies them in one pass of
the model:

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
4. advance (runtime/batch.py, on the host): the tokens are emitted one by one, and stops and max_new_tokens cut
   them exactly as plain decoding does. Rejected positions leave no trace: entries past a sequence's length are
   never read, and the next pass overwrites them.

The cache holds the MTP module's slice as its layer cfg.num_hidden_layers (LatentCache.create's extra_layers),
and needs k positions past the last token for the rejected drafts. Every row draws from its own random stream
([b] keys: fold_in(key(seed), tokens generated), split into the draft's and the acceptance's), so a row's tokens
are the same whatever else is in the batch, in Engine.generate and in the server alike.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax.errors import KtjaxError
from ktjax.model.decoder import RunOptions
from ktjax.runtime.sampling import Sampling, distribution, draw_from, repeat_rows


def check_model(cfg, model_or_graph) -> None:
    """One clear error where speculative mtp cannot run: the model has no MTP module."""
    layers = getattr(cfg, "num_nextn_predict_layers", 0) or 0
    if layers < 1 or getattr(model_or_graph, "mtp", None) is None:
        raise KtjaxError("this model has no MTP module: speculative mtp drafts with DeepSeek's multi-token-"
                         f"prediction layer (num_nextn_predict_layers {layers} in config.json"
                         + (", or its weights were dropped at conversion" if layers else "") +
                         "); use --speculative off")


# -- random numbers: a stream per row ([b] keys), so a row draws the same whatever else is in the batch --------

def _split(key, n: int):
    """n lists of [b] row keys, each row's split from its own key."""
    rows = jax.vmap(lambda k: jax.random.split(k, n))(key)  # [b, n]
    return [rows[:, i] for i in range(n)]


def _uniform(key, shape):
    """Uniform [0, 1) numbers of shape [b, ...], row i's from key i."""
    return jax.vmap(lambda k: jax.random.uniform(k, shape[1:]))(key)


def _draw(probs, key, sampling: Sampling):
    """draw_from each row as a batch of one from its own key (the same draw whatever else is in the batch)."""
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
    """Where each row stands before a verifying pass."""
    lengths: jax.Array   # [b] tokens in the model's cache (L)
    token: jax.Array     # [b] the pending token t at position L: emitted, not yet fed
    base: jax.Array      # [b] the first position of `hidden` (the MTP extends over base .. L-1)
    hidden: jax.Array    # [b, k+1, H] the model's hidden states at base, base+1, ...
    after: jax.Array     # [b, k+1] the token after each of those positions


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
    hidden states [b, k+1, H] at L..L+k; cache). Keys: [b], a random stream per row."""
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

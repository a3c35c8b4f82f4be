"""The scheduler's compiled programs: one forward step over the paged cache followed by per-row sampling, at
bucketed shapes so that any batch composition reuses a few programs.

A step is either prefill chunks of a few sequences ([rows, chunk] tokens, rows x chunk <= chunk_size) or one
decode step of every running sequence ([batch, 1]); both end by sampling each row's next token with that row's own settings and returning
its log-probability and the top TOP_LOGPROBS alternatives, so the host only reads a few numbers per row.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax.kv.paged import PagedLatentCache
from ktjax.runtime.sampling import Sampling, sample

TOP_LOGPROBS = 20   # the most top-logprobs a request may ask for
BUCKET_GROWTH = 4   # page-table widths grow by this factor: attention's loop stops at the longest sequence
                    # anyway, so a wider table costs little and fewer widths mean fewer programs
MIN_CHUNK = 16


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowSampling:
    """Per-row sampling settings [b] and the row's random stream: key = fold_in(key(seed), n_generated)."""
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array     # uint32
    step: jax.Array     # int32: tokens the row has generated so far


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepOutput:
    token: jax.Array       # [b] int32
    logprob: jax.Array     # [b] float32, of the chosen token
    top_ids: jax.Array     # [b, k] int32
    top_logprobs: jax.Array  # [b, k] float32
    finite: jax.Array      # [b] bool: the logits were all finite (else the token is meaningless)


def step(graphdef, opts, state, cache: PagedLatentCache, tokens, positions, lengths, logits_index,
         rows: RowSampling):
    """forward_cached over the paged cache, then sample each row. -> (cache, StepOutput)."""
    model = nnx.merge(graphdef, state)
    logits, cache = model.forward_cached(tokens, positions, cache, lengths, logits_index, opts)

    keys = jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.key(seed), n))(rows.seed, rows.step)
    token = sample(logits, keys, Sampling(rows.temperature, rows.top_k, rows.top_p))
    logp = jax.nn.log_softmax(logits, axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(logp, min(TOP_LOGPROBS, logits.shape[-1]))
    chosen = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    return cache, StepOutput(token, chosen, top_ids.astype(jnp.int32), top_logprobs, finite)


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
    """Compiled step programs of an Engine over one page pool, keyed by (batch, chunk, table width), compiled
    through engine.compiled_program so engine.compile_count counts them."""

    def __init__(self, engine, pool: PagedLatentCache, max_batch: int, max_width: int):
        self.engine = engine
        self.pool_key = (pool.fmt, pool.n_pages, pool.page_size, pool.attention)
        chunk_size = engine.runtime.chunk_size
        self.chunks = buckets(min(MIN_CHUNK, chunk_size), chunk_size, BUCKET_GROWTH)
        min_width = min(max(1, 512 // pool.page_size), max_width)
        self.widths = buckets(min_width, max_width, BUCKET_GROWTH)
        self.batches = buckets(1, max_batch, 2)
        self._pool_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), pool)

    def prefill_rows(self, chunk: int) -> int:
        """Most prefill rows of `chunk` tokens in one step: a batch bucket within chunk_size tokens in all."""
        return max([b for b in self.batches if b * chunk <= self.chunks[-1]] or [1])

    def prefill_shapes(self):
        return [(b, c, w) for c in self.chunks for b in self.batches if b <= self.prefill_rows(c)
                for w in self.widths]

    def decode_shapes(self):
        return [(b, 1, w) for b in self.batches for w in self.widths]

    def get(self, b: int, s: int, width: int):
        engine = self.engine
        absorb = True if s == 1 else engine.runtime.absorb(engine.cfg, s)
        opts = engine.run_options(absorb)

        def build():
            i32 = lambda *shape: engine.input_spec(shape, jnp.int32)  # noqa: E731
            f32 = lambda *shape: engine.input_spec(shape, jnp.float32)  # noqa: E731
            cache = dataclasses.replace(self._pool_shapes, page_table=i32(b, width))
            rows = RowSampling(f32(b), i32(b), f32(b), engine.input_spec((b,), jnp.uint32), i32(b))
            out = None
            if engine.mesh is not None:  # the pool keeps its layout; the outputs are replicated
                rep = jax.sharding.NamedSharding(engine.mesh, jax.sharding.PartitionSpec())
                out = (jax.tree.map(lambda x: x.sharding, cache), rep)
            fn = jax.jit(functools.partial(step, engine.graphdef, opts), donate_argnums=(1,), out_shardings=out)
            return fn.lower(engine.state, cache, i32(b, s), i32(b, s), i32(b), i32(b), rows).compile()

        return engine.compiled_program(("serve-step", opts, self.pool_key, b, s, width), build)

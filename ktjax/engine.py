"""The Engine: a loaded model plus its runtime settings, with jitted entry points.

`logits` runs the full causal forward (no cache). `generate` prefills prompts chunk by chunk into the latent
cache and then decodes many steps per dispatch inside a jax.lax.while_loop, the cache donated throughout.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import memory, sharding
from .attention import resolve_impl
from .cache import LatentCache, cache_bytes, plan_cache_lens
from .cache_format import bytes_per_token, get_format
from .config import ModelConfig
from .errors import KtjaxError
from .model import DeepseekModel
from .runtime import RuntimeConfig
from .sampling import Sampling, sample

MIN_BUCKET = 16
STEPS_PER_DISPATCH = 32  # decode steps per call into the compiled loop; text streams between calls


def seq_bucket(n: int) -> int:
    """Pad lengths to powers of two (at least 16), so that many lengths share a few compiled programs."""
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("graphdef", "absorb", "moe_impl", "dtype"))
def _forward(graphdef, state, tokens, *, absorb, moe_impl, dtype):
    return nnx.merge(graphdef, state)(tokens, absorb=absorb, moe_impl=moe_impl, dtype=dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    logits: jax.Array    # [b, vocab] for the next token
    lengths: jax.Array   # [b] tokens in the cache
    done: jax.Array      # [b]
    n_gen: jax.Array     # [b] tokens generated so far
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything the compiled programs are specialised on."""
    graphdef: object
    absorb: bool
    attention: str
    moe_impl: str
    dtype: object
    block: int


def _prefill_chunk(static: Static, state, cache, tokens, positions, lengths, logits_index):
    model = nnx.merge(static.graphdef, state)
    return model.forward_cached(tokens, positions, cache, lengths, logits_index, absorb=static.absorb,
                                attention=static.attention, moe_impl=static.moe_impl, dtype=static.dtype,
                                block=static.block)


def _decode_steps(static: Static, state, cache, ds: DecodeState, n_steps, max_new, stop_ids, sampling: Sampling):
    """Up to n_steps decode steps (stopping early when every sequence is done): sample from ds.logits, record
    the token, and feed it through the model. Returns (cache, ds, tokens [b, STEPS_PER_DISPATCH] (-1 = none))."""
    model = nnx.merge(static.graphdef, state)
    b = ds.lengths.shape[0]
    cache_lens = cache.cache_lens

    def cond(carry):
        i, _, ds, _ = carry
        return (i < n_steps) & ~jnp.all(ds.done)

    def body(carry):
        i, cache, ds, out = carry
        key, sub = jax.random.split(ds.key)
        tok = sample(ds.logits, sub, sampling)
        emit = ~ds.done
        out = out.at[:, i].set(jnp.where(emit, tok, -1))
        n_gen = ds.n_gen + emit
        done = ds.done | (emit & jnp.isin(tok, stop_ids)) | (n_gen >= max_new)

        def feed(cache):
            pos = jnp.where(done, cache_lens, ds.lengths)[:, None]  # finished sequences write nothing
            return model.forward_cached(tok[:, None], pos, cache, ds.lengths + 1, jnp.zeros((b,), jnp.int32),
                                        absorb=True, attention=static.attention, moe_impl=static.moe_impl,
                                        dtype=static.dtype, block=static.block)

        logits, cache = jax.lax.cond(jnp.all(done), lambda c: (ds.logits, c), feed, cache)
        lengths = jnp.where(done, ds.lengths, ds.lengths + 1)
        return i + 1, cache, DecodeState(logits, lengths, done, n_gen, key), out

    out = jnp.full((b, STEPS_PER_DISPATCH), -1, jnp.int32)
    _, cache, ds, out = jax.lax.while_loop(cond, body, (jnp.int32(0), cache, ds, out))
    return cache, ds, out


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]
    stats: dict


class Engine:
    def __init__(self, cfg: ModelConfig, model: DeepseekModel, runtime: RuntimeConfig,
                 generation_defaults: dict | None = None):
        self.cfg = cfg
        self.runtime = runtime
        self.generation_defaults = generation_defaults or {}
        self.graphdef, self.state = nnx.split(model)  # split once; the jitted functions take the pure state
        self._compiled: dict = {}
        self.mesh, self.sharding_notes = self._place_on_mesh(runtime.mesh)

    def _place_on_mesh(self, spec):
        """Shard the weights over the mesh by the partition rules; (None, []) on one device (the plain path)."""
        mesh = sharding.make_mesh(spec)
        if mesh.size == 1:
            return None, []
        self.state, notes = sharding.place_state(self.cfg, self.state, mesh)
        return mesh, notes

    @property
    def n_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    def new_cache(self, batch: int, cache_lens: int, notes: list | None = None) -> LatentCache:
        """An empty cache, sharded along the sequence (and batch on a 2-D mesh) when the engine has a mesh."""
        layout = sharding.cache_layout(self.mesh, batch, notes)
        return LatentCache.create(self.cfg, get_format(self.runtime.cache_dtype), batch, cache_lens, layout)

    def seq_shards(self) -> int:
        """Devices that the cache's sequence is split over."""
        return 1 if self.mesh is None else sharding.mesh_size(self.mesh, sharding.MODEL)

    def _on_mesh(self):
        """The context to trace under: the model's MoE reads the mesh from it for expert parallelism."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _input(self, shape, dtype):
        """An abstract replicated input of a compiled program (on the mesh when there is one)."""
        spec = None if self.mesh is None else jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return jax.ShapeDtypeStruct(shape, dtype, sharding=spec)

    @property
    def model(self) -> DeepseekModel:
        return nnx.merge(self.graphdef, self.state)

    @property
    def weight_bytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self.state))

    @property
    def weight_bytes_per_device(self) -> int:
        return sharding.per_device_bytes(self.state)

    # -- full forward -------------------------------------------------------------------------------------
    def logits(self, token_ids) -> np.ndarray:
        """Full-forward logits [batch, seq, vocab] (float32) for token ids [batch, seq] (or one sequence [seq])."""
        tokens, single = self._token_batch(token_ids, allow_single=True)
        b, s = tokens.shape
        padded = np.zeros((b, seq_bucket(s)), np.int32)
        padded[:, :s] = tokens  # causal: padding after the sequence cannot change its logits
        with self._on_mesh():
            out = _forward(self.graphdef, self.state, jnp.asarray(padded),
                           absorb=self.runtime.absorb(self.cfg, padded.shape[1]),
                           moe_impl=self.runtime.moe_impl, dtype=self.runtime.jnp_dtype)
        return np.asarray(out[0, :s] if single else out[:, :s])

    def _token_batch(self, token_ids, allow_single: bool = False):
        """(token_ids as an integer array [batch, seq >= 1] of valid ids, whether it was one sequence [seq]
        taken as a batch of one: only with allow_single), or one clear error."""
        try:
            tokens = np.asarray(token_ids)
        except ValueError:
            raise KtjaxError("token_ids must be rectangular: every sequence of the batch the same length") from None
        single = allow_single and tokens.ndim == 1
        tokens = tokens[None] if single else tokens
        if tokens.ndim != 2 or tokens.shape[1] == 0 or not np.issubdtype(tokens.dtype, np.integer):
            raise KtjaxError(f"token_ids must be integers of shape [batch, seq] with seq >= 1, got "
                             f"{np.shape(token_ids)} {tokens.dtype}")
        self._check_ids(tokens)
        return tokens, single

    def _check_ids(self, tokens):
        lo, hi = min(int(np.min(t)) for t in tokens), max(int(np.max(t)) for t in tokens)
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise KtjaxError(f"token ids must lie in [0, {self.cfg.vocab_size}); got {lo}..{hi}")

    def cached_logits(self, token_ids) -> np.ndarray:
        """Logits at every position [batch, seq, vocab], computed through the latent cache chunk by chunk
        (chunk_size, cache_dtype and absorb_for_prefill as set): what decoding sees, for checking it against
        the full forward and for teacher-forced comparisons of cache formats."""
        tokens, _ = self._token_batch(token_ids)
        b, s = tokens.shape
        rt = self.runtime
        cache_lens, block = plan_cache_lens(s if rt.cache_lens in (None, "auto") else rt.cache_lens,
                                            self.seq_shards())
        if s > cache_lens:
            raise KtjaxError(f"{s} tokens exceed the cache of {cache_lens}")
        chunk = min(rt.chunk_size, seq_bucket(s))
        static = Static(self.graphdef, rt.absorb(self.cfg, chunk), rt.attention, rt.moe_impl, rt.jnp_dtype, block)
        fn = jax.jit(functools.partial(_prefill_chunk, static), donate_argnums=(1,))
        cache = self.new_cache(b, cache_lens)
        out = []
        for c in range(0, s, chunk):
            ids = np.zeros((b, chunk), np.int32)
            ids[:, :min(chunk, s - c)] = tokens[:, c:c + chunk]
            pos = c + np.arange(chunk)
            positions = np.broadcast_to(np.where(pos < s, pos, cache_lens), (b, chunk)).astype(np.int32)
            with self._on_mesh():
                logits, cache = fn(self.state, cache, jnp.asarray(ids), jnp.asarray(positions),
                                   jnp.full((b,), min(s, c + chunk), jnp.int32), None)
            out.append(np.asarray(logits))
        return np.concatenate(out, axis=1)[:, :s]

    # -- planning -----------------------------------------------------------------------------------------
    def plan_cache(self, batch: int, needed: int) -> tuple[int, int]:
        """(cache_lens, kv_block) for `batch` sequences that need `needed` positions each."""
        rt = self.runtime
        fmt = get_format(rt.cache_dtype)
        if rt.cache_lens == "auto":
            budget = rt.memory_budget or memory.available_bytes()
            shards = self.seq_shards()
            block = plan_cache_lens(rt.chunk_size)[1]
            act = memory.activation_bytes(self.cfg, batch, rt.chunk_size, block,
                                          jnp.dtype(rt.jnp_dtype).itemsize)
            # The budget is per device: each holds its share of the weights and 1/shards of every sequence.
            fits = memory.max_cache_lens(self.cfg, fmt, batch, budget, self.weight_bytes_per_device, act) * shards
            if fits < needed:
                raise KtjaxError(
                    f"memory budget {memory.format_bytes(budget)} holds weights "
                    f"({memory.format_bytes(self.weight_bytes)}) and activations ({memory.format_bytes(act)}) but "
                    f"only {fits} cached tokens per sequence in {fmt.name} ({bytes_per_token(fmt, self.cfg)} "
                    f"bytes/token), fewer than the {needed} needed; use a narrower --cache-dtype, a shorter "
                    "prompt or fewer --max-new-tokens")
            requested = fits
            cache_lens, block = plan_cache_lens(requested, shards)
            if cache_lens > requested:  # rounding up must not leave the budget
                cache_lens = max(needed, requested // (block * shards) * block * shards)
                cache_lens, block = plan_cache_lens(cache_lens, shards)
            return cache_lens, block
        # Unset: a power-of-two bucket of what is needed, so that new prompts rarely compile new programs.
        requested = seq_bucket(needed) if rt.cache_lens is None else rt.cache_lens
        return plan_cache_lens(requested, self.seq_shards())

    # -- generation ---------------------------------------------------------------------------------------
    def generate(self, prompts, *, on_tokens: Callable | None = None, progress: bool = False,
                 **overrides) -> Generation:
        """Generate from token-id prompts (a list of lists). `overrides` are runtime settings for this call
        (max_new_tokens, temperature, top_k, top_p, seed, ignore_eos, ...). on_tokens(list of new-token lists)
        is called after each dispatch, for streaming."""
        rt = RuntimeConfig.from_overrides(self.runtime, **overrides) if overrides else self.runtime
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise KtjaxError("every prompt needs at least one token")
        self._check_ids(prompts)
        engine = self if rt == self.runtime else Engine(self.cfg, self.model, rt, self.generation_defaults)
        engine._compiled = self._compiled
        return engine._generate(prompts, on_tokens, progress)

    def _sampling_and_stops(self):
        rt, gd = self.runtime, self.generation_defaults
        temperature = rt.temperature if rt.temperature is not None else (
            gd.get("temperature", 0.0) if gd.get("do_sample", False) else 0.0)
        top_k = rt.top_k if rt.top_k is not None else gd.get("top_k", 0)
        top_p = rt.top_p if rt.top_p is not None else gd.get("top_p", 1.0)
        stops = [] if rt.ignore_eos else sorted(set(gd.get("eos_token_ids", [])) | set(self.cfg.eos_token_ids))
        return Sampling.make(float(temperature), int(top_k or 0), float(top_p or 1.0)), stops

    def _generate(self, prompts, on_tokens, progress) -> Generation:
        rt, cfg = self.runtime, self.cfg
        b = len(prompts)
        max_new = rt.max_new_tokens
        cache_lens, block = self.plan_cache(b, max(map(len, prompts)) + max_new)
        room = cache_lens - max_new
        if max(map(len, prompts)) > room:
            if not rt.truncate_left:
                raise KtjaxError(
                    f"prompt of {max(map(len, prompts))} tokens + max_new_tokens {max_new} = "
                    f"{max(map(len, prompts)) + max_new} exceeds the cache of {cache_lens} tokens; raise "
                    "--cache-lens, lower --max-new-tokens, or pass --truncate-left to drop the oldest tokens")
            prompts = [p[-room:] for p in prompts]
        fmt = get_format(rt.cache_dtype)
        chunk = min(rt.chunk_size, seq_bucket(max(map(len, prompts))))
        static = Static(self.graphdef, rt.absorb(cfg, chunk), rt.attention, rt.moe_impl, rt.jnp_dtype, block)
        sampling, stops = self._sampling_and_stops()
        stop_ids = jnp.asarray(stops or [-1], jnp.int32)
        notes = list(self.sharding_notes)
        try:
            cache = self.new_cache(b, cache_lens, notes)
            cache_bytes_per_device = cache.nbytes_per_device  # measured on the shards, before donation
            if cache.layout is not None and resolve_impl(rt.attention) == "pallas":
                notes.append("attention over the sequence-sharded cache runs on the XLA path: the merge needs "
                             "each device's log-sum-exp, which the Pallas kernels do not return")
            prefill, decode, compile_s = self._programs(static, cache, b, chunk, stop_ids)
            t0 = time.perf_counter()
            logits, cache = self._prefill(prefill, cache, prompts, chunk, cache_lens, progress)
            prefill_s = time.perf_counter() - t0
            ds = DecodeState(logits, jnp.asarray([len(p) for p in prompts], jnp.int32), jnp.zeros((b,), bool),
                             jnp.zeros((b,), jnp.int32), jax.random.key(rt.seed))
            tokens, ttft, decode_s = self._decode(decode, cache, ds, max_new, stop_ids, sampling, on_tokens)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
                raise KtjaxError(f"out of memory with a {fmt.name} cache of {cache_lens} tokens x {b} sequences "
                                 f"({memory.format_bytes(cache_bytes(cfg, fmt, b, cache_lens))}); use a smaller "
                                 "--cache-lens or a narrower --cache-dtype (int8, int4)") from None
            raise
        n_prompt, n_gen = sum(map(len, prompts)), sum(map(len, tokens))
        stats = {
            "prompt_tokens": n_prompt, "generated_tokens": n_gen,
            "prefill_tokens_per_s": n_prompt / prefill_s if prefill_s > 0 else 0.0,
            "decode_tokens_per_s": n_gen / decode_s if decode_s > 0 else 0.0,
            "time_to_first_token_s": prefill_s + ttft, "compile_s": compile_s,
            "cache_dtype": fmt.name, "cache_lens": cache_lens, "cache_bytes": cache.nbytes,
            "cache_bytes_per_token": bytes_per_token(fmt, cfg), "cache_bytes_per_device": cache_bytes_per_device,
            "weight_bytes": self.weight_bytes, "weight_bytes_per_device": self.weight_bytes_per_device,
            "peak_memory_bytes": memory.peak_memory_bytes(), "devices": self.n_devices,
            "mesh": "1" if self.mesh is None else "x".join(str(n) for n in self.mesh.devices.shape),
            "sharding_notes": notes, "backend": jax.default_backend(),
            "absorb_for_prefill": static.absorb, "chunk_size": chunk, "attention": rt.attention,
        }
        return Generation(tokens, stats)

    def _programs(self, static: Static, cache, b, chunk, stop_ids):
        """Compile (or fetch) the prefill-chunk and decode programs, timing compilation on its own."""
        key = (static, b, chunk, cache.cache_lens, cache.fmt.name, cache.layout, stop_ids.shape)
        if key in self._compiled:
            return (*self._compiled[key], 0.0)
        t0 = time.perf_counter()
        i32 = self._input((b,), jnp.int32)
        tok = self._input((b, chunk), jnp.int32)
        ds = DecodeState(self._input((b, self.cfg.vocab_size), jnp.float32), i32,
                         self._input((b,), jnp.bool_), i32, jax.random.key(0))
        scalar = self._input((), jnp.int32)
        # On a mesh, outputs keep the shardings that the next call's inputs were compiled for.
        rep = None if self.mesh is None else tok.sharding
        cache_sh = None if self.mesh is None else jax.tree.map(lambda x: x.sharding, cache)
        with self._on_mesh():
            prefill = jax.jit(functools.partial(_prefill_chunk, static), donate_argnums=(1,),
                              out_shardings=None if rep is None else (rep, cache_sh)).lower(
                self.state, cache, tok, tok, i32, i32).compile()
            decode = jax.jit(functools.partial(_decode_steps, static), donate_argnums=(1,),
                             out_shardings=None if rep is None else (cache_sh, rep, rep)).lower(
                self.state, cache, ds, scalar, scalar, stop_ids, Sampling.make()).compile()
        self._compiled[key] = (prefill, decode)
        return prefill, decode, time.perf_counter() - t0

    def _prefill(self, prefill, cache, prompts, chunk, cache_lens, progress):
        b = len(prompts)
        lens = np.array([len(p) for p in prompts])
        ids = np.zeros((b, -(-lens.max() // chunk) * chunk), np.int32)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = p
        n_chunks = ids.shape[1] // chunk
        bar = None
        if progress and n_chunks > 1:
            from tqdm import tqdm
            bar = tqdm(total=int(lens.sum()), unit="tok", desc="prefill", leave=False)
        last = None
        for c in range(n_chunks):
            pos = c * chunk + np.arange(chunk)[None, :]
            valid = pos < lens[:, None]
            logits, cache = prefill(self.state, cache, jnp.asarray(ids[:, c * chunk:(c + 1) * chunk]),
                                    jnp.asarray(np.where(valid, pos, cache_lens), jnp.int32),
                                    jnp.asarray(np.minimum(lens, (c + 1) * chunk), jnp.int32),
                                    jnp.asarray(np.clip(lens - 1 - c * chunk, 0, chunk - 1), jnp.int32))
            ends_here = jnp.asarray((lens - 1) // chunk == c)[:, None]
            last = logits if last is None else jnp.where(ends_here, logits, last)
            if bar is not None:
                jax.block_until_ready(logits)
                bar.update(int(valid.sum()))
        if bar is not None:
            bar.close()
        return jax.block_until_ready(last), cache

    def _decode(self, decode, cache, ds, max_new, stop_ids, sampling, on_tokens):
        tokens = [[] for _ in range(ds.lengths.shape[0])]
        t0 = time.perf_counter()
        ttft = None
        steps = 1  # the first dispatch emits one token, so the time to first token is honest
        while True:
            cache, ds, out = decode(self.state, cache, ds, jnp.int32(steps), jnp.int32(max_new), stop_ids, sampling)
            out = np.asarray(out)
            if ttft is None:
                ttft = time.perf_counter() - t0
            new = [[int(t) for t in row if t >= 0] for row in out]
            for acc, n in zip(tokens, new):
                acc.extend(n)
            if on_tokens is not None and any(new):
                on_tokens(new)
            if bool(np.all(np.asarray(ds.done))):
                break
            steps = STEPS_PER_DISPATCH
        return tokens, ttft, time.perf_counter() - t0

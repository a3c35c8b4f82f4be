"""The Engine: a loaded model, its load-time settings and its mesh, with compiled entry points.

`logits` runs the full causal forward (no cache). `generate` runs the prompts through runtime/batch.py's steps
(the one runtime, the server's scheduler's too) over a dense latent cache, prompt i in row i: prefill chunks,
each sequence's first token sampled with the chunk where its prompt ends, then up to decode.MAX_STEPS decode
steps per dispatch, the cache donated throughout. Row i of a call samples from the random stream of seed + i.
Programs are compiled per shape (batch, chunk, cache) and reused by every call: per-call settings
(sampling, max_new_tokens, seed, stop handling) are traced values, never static ones.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ktjax.runtime import backend, memory
from ktjax.weights import sharding
from ktjax.model.config import ModelConfig
from ktjax.errors import KtjaxError
from ktjax.kv.cache import LatentCache, cache_bytes, plan_cache_lens
from ktjax.kv.sparse import is_sparse, selected_fraction
from ktjax.model.decoder import DeepseekModel, RunOptions, stack_layers, unstack_layers
from ktjax.runtime.progress import NO_PROGRESS, LiveStatus, Progress
from ktjax.runtime import chunks, decode, speculative
from ktjax.runtime.batch import Batch, Sequence
from ktjax.runtime.programs import Programs
from ktjax.runtime.settings import CallSettings, RuntimeConfig, describe
from ktjax.runtime.sampling import Sampling
from ktjax.util.heap import huge_pages_active, release_freed_memory
from ktjax.util.units import format_bytes

seq_bucket = memory.seq_bucket  # defined with the planner, which --dry-run runs without an Engine


def _forward(graphdef, opts: RunOptions, state, tokens):
    return nnx.merge(graphdef, state)(tokens, opts)


def _prefill_chunk(graphdef, opts: RunOptions, state, cache, tokens, positions, lengths, logits_index):
    return nnx.merge(graphdef, state).forward_cached(tokens, positions, cache, lengths, logits_index, opts)


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]
    stats: dict
    texts: list[str] | None = None  # decoded completions, when the engine has a tokenizer


@dataclasses.dataclass(frozen=True)
class CachePlan:
    cache_lens: int
    block: int
    note: str | None = None  # what capped it (the model's window, the memory budget), for the stats' notes
    memory: memory.MemoryPlan | None = None  # what it takes on the device and on the host (runtime/memory.py)


class Engine:
    """Build one with ktjax.load (a folder) or ktjax.load_model (an in-memory model): they build the mesh and
    place the weights; the Engine takes both as they are. It keeps the layer stacks as per-layer arrays: with
    own_weights (ktjax.load, whose model nobody else holds) the stacked originals are freed as they are split,
    otherwise the caller's model keeps them."""

    def __init__(self, cfg: ModelConfig, model: DeepseekModel, runtime: RuntimeConfig, *,
                 defaults: CallSettings | None = None, generation_config: dict | None = None, mesh=None,
                 notes: list[str] | None = None, tokenizer=None, own_weights: bool = False):
        self.cfg = cfg
        runtime.check_for_model(cfg)  # defer_experts against the model's experts per token
        self.runtime = runtime
        self.defaults = defaults or CallSettings()
        self.generation_config = generation_config or {}
        self.mesh = mesh
        self.notes = list(notes or [])
        self.tokenizer = tokenizer
        # Split once; the compiled programs take the pure state, its layer stacks as separate per-layer arrays
        # (model/decoder.py: read in place, where a scanned stack's slices are copied at every step).
        self.graphdef, state = nnx.split(model)
        in_place = backend.reads_experts_in_place(self._expert_axis, runtime.moe_impl) or runtime.experts == "host"
        self.state = unstack_layers(state, consume=own_weights, split_experts=in_place)
        # What runs the matmuls and the attention, chosen once (runtime/backend.py); the weights held for it.
        self.backend = backend.choose(runtime, self.state, self.n_devices)
        # experts host: the routed experts moved into the CPU's host expert store (gpu_experts of them kept here)
        self.host_experts = backend.place_experts(self, own_weights) if runtime.experts == "host" else None
        self.state = self.backend.hold(self.state, consume=own_weights)
        self.notes += self.backend.notes
        self._compiled: dict = {}
        # speculative mtp: the MTP module drafts, one pass verifies (runtime/speculative.py); checked once, here
        if runtime.speculative == "mtp":
            speculative.check_model(cfg, model)
        self.draft_tokens = runtime.draft_tokens if runtime.speculative == "mtp" else 0
        self.compile_count = 0  # programs compiled by this engine (tests check that calls reuse them)

    @property
    def n_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    @property
    def model(self) -> DeepseekModel:
        """The model with its layer stacks stacked again, as the loaders build it: a copy of the layer weights
        (the engine runs on its per-layer arrays)."""
        return nnx.merge(self.graphdef, stack_layers(self.state))

    @property
    def weight_bytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self.state))

    @property
    def weight_bytes_per_device(self) -> int:
        return sharding.per_device_bytes(self.state)

    @property
    def _expert_axis(self) -> str | None:
        return sharding.expert_axis(self.mesh, self.cfg.n_routed_experts)

    def run_options(self, absorb: bool) -> RunOptions:
        return RunOptions(absorb, self.runtime.moe_impl, self.runtime.jnp_dtype, self.mesh, self._expert_axis,
                          self.index_topk, self.backend.grouped_impl, self.runtime.defer_experts)

    @property
    def attention(self) -> str:
        """The attention over a cache on one device, resolved (a value of the setting attention)."""
        return self.backend.attention

    @property
    def index_topk(self) -> int:
        """Keys per query of sparse attention (DSA): the index_topk setting, else the config's; 0 = no indexer."""
        if not self.cfg.has_indexer:
            return 0
        return self.runtime.index_topk or self.cfg.index_topk

    def new_cache(self, batch: int, plan: CachePlan, notes: list | None = None, extra_layers: int = 0) -> LatentCache:
        """An empty cache, sharded along the sequence (and batch on a 2-D mesh) when the engine has a mesh.
        extra_layers=1: with the MTP module's slice (speculative mtp)."""
        return self.cache_factory(batch, plan, notes, extra_layers)()

    def cache_factory(self, batch: int, plan: CachePlan, notes: list | None = None,
                      extra_layers: int = 0) -> Callable[[], LatentCache]:
        """new_cache as a function that allocates it (its layout and kernel chosen, and their notes said, here):
        jax.eval_shape of it gives the shapes the programs compile for before the cache takes memory."""
        layout = sharding.cache_layout(self.mesh, batch, notes)
        kernel = self.backend.attention_kernel(layout=layout, notes=notes)
        return functools.partial(LatentCache.create, self.cfg, self.runtime.cache_dtype, batch, plan.cache_lens,
                                 block=plan.block, attention=kernel, layout=layout, extra_layers=extra_layers)

    def input_spec(self, shape, dtype):
        """An abstract replicated input of a compiled program (on the mesh when there is one). Public, with
        compiled_program, for the programs built outside the Engine (the server's step, speculation's loop)."""
        spec = None if self.mesh is None else jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return jax.ShapeDtypeStruct(shape, dtype, sharding=spec)

    def compiled_program(self, key, build: Callable):
        """The compiled program for `key`, built (and counted) on first use."""
        if key not in self._compiled:
            self._compiled[key] = build()
            self.compile_count += 1
            release_freed_memory()  # XLA's compile leaves ~1.4 GB of freed heap at V2-Lite's size (util/heap.py)
        return self._compiled[key]

    # -- token checks -------------------------------------------------------------------------------------
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

    def _check_ids(self, tokens) -> list[list[int]]:
        """Sequences of token ids as lists of ints in [0, vocab_size), each of at least one id, or one clear
        error. An id must be an integer: int() would quietly make 1.5 or True into 1 (and "7" into 7)."""
        from ktjax.util.text import short_repr

        out = []
        for seq in tokens:
            if isinstance(seq, np.ndarray) and seq.ndim == 1 and np.issubdtype(seq.dtype, np.integer):
                out.append(seq.tolist())
                continue
            if not isinstance(seq, (list, tuple, np.ndarray)):
                raise KtjaxError(f"each prompt must be a list of token ids or a string, got {short_repr(seq)}")
            bad = [x for x in seq if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer))]
            if bad:
                raise KtjaxError(f"token ids must be integers, got {short_repr(bad[0])} ({type(bad[0]).__name__})")
            out.append([int(x) for x in seq])
        if not out or not all(out):
            raise KtjaxError("every prompt needs at least one token")
        lo, hi = min(map(min, out)), max(map(max, out))
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise KtjaxError(f"token ids must lie in [0, {self.cfg.vocab_size}); got "
                             f"{short_repr(lo)}..{short_repr(hi)}")
        return out

    # -- full forward -------------------------------------------------------------------------------------
    def logits(self, token_ids) -> np.ndarray:
        """Full-forward logits [batch, seq, vocab] (float32) for token ids [batch, seq] (or one sequence [seq])."""
        tokens, single = self._token_batch(token_ids, allow_single=True)
        b, s = tokens.shape
        padded = np.zeros((b, seq_bucket(s)), np.int32)
        padded[:, :s] = tokens  # causal: padding after the sequence cannot change its logits
        opts = self.run_options(self.runtime.absorb(self.cfg, padded.shape[1]))
        forward = self.compiled_program(("forward", opts), lambda: jax.jit(functools.partial(_forward, self.graphdef, opts)))
        out = forward(self.state, jnp.asarray(padded))
        return np.asarray(out[0, :s] if single else out[:, :s])

    def cached_logits(self, token_ids) -> np.ndarray:
        """Logits at every position [batch, seq, vocab], computed through the latent cache chunk by chunk
        (chunk_size, cache_dtype and absorb_for_prefill as set): what decoding sees, for checking it against
        the full forward and for teacher-forced comparisons of cache formats."""
        tokens, _ = self._token_batch(token_ids)
        b, s = tokens.shape
        plan = self.plan_cache(b, s)
        chunk = self._chunk(s)
        cache = self.new_cache(b, plan)
        prefill = self._prefill_program(cache, b, chunk)
        logits, _ = self._prefill(prefill, cache, [list(t) for t in tokens], chunk)
        return np.asarray(logits)[:, :s]

    # -- planning -----------------------------------------------------------------------------------------
    @property
    def host_bytes(self) -> int:
        """Bytes of the routed experts in host RAM (the setting experts: host), else 0."""
        store = getattr(self, "host_experts", None)
        return 0 if store is None else int(store.nbytes)

    def memory_plan(self, batch: int, cache_lens: int, chunk: int, budget: int | None = None) -> memory.MemoryPlan:
        """Device and host memory of a cache of cache_lens positions for `batch` sequences (runtime/memory.py)."""
        act = memory.activation_bytes(self.cfg, batch, chunk, plan_cache_lens(chunk)[1],
                                      jnp.dtype(self.runtime.jnp_dtype).itemsize)
        cache = cache_bytes(self.cfg, self.runtime.cache_dtype, batch, cache_lens) // sharding.seq_shards(self.mesh)
        return memory.MemoryPlan(self.weight_bytes_per_device, cache, act, self.host_bytes, memory.one_memory(),
                                 budget if budget is not None else self.runtime.memory_budget)

    def plan_cache(self, batch: int, needed: int) -> CachePlan:
        """The cache for `batch` sequences that need `needed` positions each, with its memory plan."""
        plan = self._plan_cache(batch, needed)
        mem = self.memory_plan(batch, plan.cache_lens, self._chunk(needed))
        notes = [n for n in (plan.note, mem.note()) if n]
        return dataclasses.replace(plan, memory=mem, note="; ".join(notes) or None)

    def _plan_cache(self, batch: int, needed: int) -> CachePlan:
        rt, window = self.runtime, self.cfg.max_position_embeddings
        shards = sharding.seq_shards(self.mesh)
        if rt.cache_lens is None:  # a power-of-two bucket of what is needed: new prompts rarely compile new programs
            return CachePlan(*plan_cache_lens(seq_bucket(needed), shards))
        if rt.cache_lens != "auto":
            if rt.cache_lens <= window:
                return CachePlan(*plan_cache_lens(rt.cache_lens, shards))
            return CachePlan(*plan_cache_lens(max(needed, window), shards),  # positions past it are never used
                             note=f"cache_lens {rt.cache_lens} capped at the model's window of {window} positions "
                                  "(max_position_embeddings): no position past it is ever used")
        fmt = rt.cache_dtype
        budget = rt.memory_budget or memory.available_bytes()
        chunk = self._chunk(needed)  # the longest chunk a prompt of at most `needed` tokens runs
        act = memory.activation_bytes(self.cfg, batch, chunk, plan_cache_lens(chunk)[1],
                                      jnp.dtype(rt.jnp_dtype).itemsize)
        # The budget is per device: each holds its share of the weights and 1/shards of every sequence. Experts in
        # host RAM (experts host) count where the host's memory is the device's (a CPU-only machine).
        weights = self.weight_bytes_per_device
        host = self.host_bytes if memory.one_memory() else 0
        held = f"the weights ({format_bytes(weights)}{' per device' if self.n_devices > 1 else ''}" \
               f"{f', and {format_bytes(host)} of experts in host RAM, the same memory' if host else ''}) and " \
               f"activations ({format_bytes(act)}: {batch} x a {chunk}-token prefill chunk)"
        weights += host
        if memory.cache_room(budget, weights, act) <= 0:
            raise KtjaxError(f"memory budget {format_bytes(budget)} is too small for {held}, with "
                             f"{round((1 - memory.HEADROOM) * 100)}% headroom, before any cache; raise "
                             f"--memory-budget{', lower --chunk-size' if chunk == rt.chunk_size else ''}, or use "
                             "narrower weights (--dtype bfloat16, or a checkpoint converted with --weights int8 or "
                             "int4)")
        cache_lens, block, fits = memory.auto_cache_lens(self.cfg, fmt, batch, budget, weights, act, needed, shards)
        if fits < needed:
            raise KtjaxError(
                f"memory budget {format_bytes(budget)} holds {held} but only {fits} cached tokens per sequence in "
                f"{fmt.name} ({fmt.bytes_per_token(self.cfg)} bytes/token), fewer than the {needed} needed; raise "
                "--memory-budget, or use a narrower --cache-dtype, a shorter prompt or fewer --max-new-tokens")
        why = (f"capped at the model's window of {window} positions (max_position_embeddings); the memory budget "
               f"{format_bytes(budget)} holds {fits} tokens" if fits >= window else
               f"what the memory budget {format_bytes(budget)} holds after {held}")
        return CachePlan(cache_lens, block, note=f"cache_lens auto: {cache_lens} tokens, {why}")

    def _chunk(self, longest_prompt: int) -> int:
        """The prefill chunk: chunk_size, or one power-of-two chunk for a shorter prompt."""
        return min(self.runtime.chunk_size, seq_bucket(longest_prompt))

    def _fit_prompts(self, prompts, call: CallSettings, cache_lens: int):
        """Prompts that leave room for max_new_tokens in the cache and the model's window, cut from the left
        with truncate_left, else one error with the numbers."""
        longest, max_new = max(map(len, prompts)), call.max_new_tokens
        window = self.cfg.max_position_embeddings
        room = min(cache_lens, window) - max_new
        if longest <= room:
            return prompts
        limit = (f"the model's window of {window} positions (max_position_embeddings)" if window <= cache_lens
                 else f"the cache of {cache_lens} tokens")
        if not call.truncate_left or room < 1:
            raise KtjaxError(
                f"prompt of {longest} tokens + max_new_tokens {max_new} = {longest + max_new} exceeds {limit}; "
                "use a shorter prompt, lower --max-new-tokens" + (", raise --cache-lens" if window > cache_lens
                                                                  else "") +
                (", or pass --truncate-left to drop the oldest tokens" if room >= 1 else ""))
        return [p[-room:] for p in prompts]

    # -- generation ---------------------------------------------------------------------------------------
    def generate(self, prompts, *, on_tokens: Callable | None = None, on_start: Callable | None = None,
                 progress: bool | Progress = False, **settings) -> Generation:
        """Generate from prompts: token-id lists, or strings when the engine has a tokenizer. `settings` are
        per-call settings (max_new_tokens, temperature, top_k, top_p, seed, ignore_eos, truncate_left) over
        the engine's defaults; they reuse the compiled programs. on_start() is called once the prompts have
        passed every check, before the prefill; on_tokens(list of new-token lists) after each dispatch, for
        streaming. `progress`: a runtime/progress.py Progress told of the compile, prefill and decode phases
        (a Timeline records them, a LiveStatus shows them), or True for a LiveStatus on stderr."""
        if progress is True:
            with LiveStatus() as live:
                return self.generate(prompts, on_tokens=on_tokens, on_start=on_start, progress=live, **settings)
        progress = progress or NO_PROGRESS
        call = CallSettings.from_overrides(self.defaults, **settings)
        prompts = [self._encode(p) for p in ([prompts] if isinstance(prompts, str) else list(prompts))]
        prompts = self._check_ids(prompts)
        result = self._generate(prompts, call, on_tokens, on_start, progress)
        if self.tokenizer is not None:
            result.texts = [self.tokenizer.decode(ids) for ids in result.tokens]
        return result

    def generate_text(self, prompts: list[str], *, chat: bool = False, **settings) -> list[str]:
        """Text in, text out: each prompt (wrapped as a user message in the model's chat template with
        chat=True) -> its completion."""
        if self.tokenizer is None:
            raise KtjaxError("this engine has no tokenizer (the model folder has no tokenizer.json); pass token ids "
                             "to generate")
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = [self.encode_chat(p) if chat else self._encode(p) for p in prompts]
        return self.generate(ids, **settings).texts

    def session(self, max_len: int | None = None):
        """A conversation that keeps its latent cache across turns, so that a turn prefills only its new tokens
        (runtime/session.py). max_len: the most tokens it may hold (its cache is planned for them at once);
        None: the cache grows as the conversation does, up to the model's window."""
        from ktjax.runtime.session import Session

        return Session(self, max_len)

    def _turn(self, cache, new: list[int], start: int, call: CallSettings, on_tokens) -> tuple:
        """A Session's turn: prefill one sequence's `new` tokens after the `start` positions its cache holds, then
        decode -> (Generation, the cache, the positions it holds now: all but the last generated token)."""
        b = 1
        chunk = self._chunk(len(new))
        _, stops = self.sampling_and_stops(call)
        t0 = time.perf_counter()
        steps = self.step_programs(cache, b, chunk, len(stops))
        for shape in steps.shapes():  # compiled (or found) here, so that compile_s says what it took
            steps.get(*shape)
        compile_s = time.perf_counter() - t0
        batch = GenerateBatch(self, cache, steps, [new], call, starts=[start])
        prefill_s = batch.run(on_tokens, prefill=True)
        decode_s = batch.run(on_tokens)
        tokens = batch.tokens
        n_gen = len(tokens[0])
        stats = {
            "prompt_tokens": start + len(new), "prefill_tokens": len(new), "generated_tokens": n_gen,
            "prefill_tokens_per_s": len(new) / prefill_s if prefill_s > 0 else 0.0,
            "decode_tokens_per_s": max(n_gen - 1, 0) / decode_s if decode_s > 0 else 0.0,
            "time_to_first_token_s": prefill_s, "compile_s": compile_s, "prefill_chunk": chunk,
        }
        result = Generation(tokens, stats)
        if self.tokenizer is not None:
            result.texts = [self.tokenizer.decode(tokens[0])]
        return result, batch.pool, batch.seqs[0].length

    def encode_chat(self, text: str) -> list[int]:
        return self.tokenizer.encode_chat([{"role": "user", "content": text}])

    def _encode(self, prompt):
        if not isinstance(prompt, str):
            return prompt
        if self.tokenizer is None:
            raise KtjaxError("text prompts need a tokenizer (the model folder has no tokenizer.json); pass token "
                             "ids")
        return self.tokenizer.encode(prompt)

    def sampling_and_stops(self, call: CallSettings) -> tuple[Sampling, list[int]]:
        """Sampling values and stop ids: per-call settings over generation_config.json's defaults."""
        gd = self.generation_config
        temperature = call.temperature if call.temperature is not None else (
            gd.get("temperature", 0.0) if gd.get("do_sample", False) else 0.0)
        top_k = call.top_k if call.top_k is not None else gd.get("top_k", 0)
        top_p = call.top_p if call.top_p is not None else gd.get("top_p", 1.0)
        eos = set(gd.get("eos_token_ids", [])) | set(self.cfg.eos_token_ids)
        if self.tokenizer is not None:
            eos |= set(self.tokenizer.eos_ids)
        stops = [] if call.ignore_eos else sorted(eos)
        return Sampling.make(float(temperature), int(top_k or 0), float(top_p or 1.0)), stops

    def _generate(self, prompts, call: CallSettings, on_tokens, on_start, progress) -> Generation:
        b = len(prompts)
        reserve = self.draft_tokens  # positions for drafts that may be rejected
        # Never plan past the model's window: a longer request is cut or refused by _fit_prompts.
        plan = self.plan_cache(b, min(max(map(len, prompts)) + call.max_new_tokens, self.cfg.max_position_embeddings)
                               + reserve)
        prompts = self._fit_prompts(prompts, call, plan.cache_lens - reserve)
        chunk = self._chunk(max(map(len, prompts)))
        notes = list(self.notes) + ([plan.note] if plan.note else [])
        try:
            allocate = self.cache_factory(b, plan, notes, extra_layers=int(self.draft_tokens > 0))
            tokens, times, run_stats, attention, per_device = self._run(allocate, prompts, chunk, call, on_tokens,
                                                                        on_start, progress)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
                fmt = self.runtime.cache_dtype
                raise KtjaxError(f"out of memory with a {fmt.name} cache of {plan.cache_lens} tokens x {b} sequences "
                                 f"({format_bytes(cache_bytes(self.cfg, fmt, b, plan.cache_lens))}); use a smaller "
                                 "--cache-lens or a narrower --cache-dtype (int8, int4)") from None
            raise
        stats = self._stats(prompts, tokens, times, plan, chunk, notes, attention, per_device)
        return Generation(tokens, {**stats, **run_stats})

    def _run(self, allocate, prompts, chunk: int, call: CallSettings, on_tokens, on_start, progress):
        """Engine.generate's phases, timed and reported: compile the step programs, allocate the cache
        (`allocate()`), prefill, decode (a GenerateBatch) -> (tokens per sequence, (compile_s, prefill_s, decode_s),
        the speculation's stats, the cache's attention kernel, its bytes on the most loaded device)."""
        b = len(prompts)
        t0 = time.perf_counter()
        # The programs compile for the cache's shapes before it is allocated: compiling (or loading a program
        # from JAX's cache) takes 1-2 GB of heap for a while at V2-Lite's size, which then never meets the cache's
        # memory at its peak (docs/results.md, "Memory at real size").
        shapes = jax.eval_shape(allocate)
        k = self.draft_tokens
        steps = self.step_programs(shapes, b, chunk, len(self.sampling_and_stops(call)[1]), draft_tokens=k)
        progress.phase("compile", len(steps.shapes()), "programs")
        for done, shape in enumerate(steps.shapes(), 1):
            steps.get(*shape)
            progress.update(done)
        compile_s = time.perf_counter() - t0
        cache = allocate()
        per_device = sharding.per_device_bytes(cache)  # measured on the shards, before donation
        if on_start is not None:
            on_start()
        batch = GenerateBatch(self, cache, steps, prompts, call, draft_tokens=k)
        progress.phase("prefill", sum(map(len, prompts)))
        progress.cache(0, b * cache.cache_lens)
        prefill_s = batch.run(on_tokens, progress, prefill=True)
        progress.phase("decode", b * call.max_new_tokens)
        decode_s = batch.run(on_tokens, progress)
        progress.end()
        return batch.tokens, (compile_s, prefill_s, decode_s), batch.speculation_stats(), cache.attention, per_device

    def _stats(self, prompts, tokens, times, plan: CachePlan, chunk: int, notes, attention, cache_per_device) -> dict:
        """A generation's statistics (README, "Generate"; docs/running.md)."""
        rt, cfg, b, fmt = self.runtime, self.cfg, len(prompts), self.runtime.cache_dtype
        compile_s, prefill_s, decode_s = times
        n_prompt, n_gen = sum(map(len, prompts)), sum(map(len, tokens))
        return {
            "prompt_tokens": n_prompt, "generated_tokens": n_gen,
            "prefill_tokens_per_s": n_prompt / prefill_s if prefill_s > 0 else 0.0,
            # Tokens per decode pass: a sequence's first token comes from the prefill's logits, each later one
            # from a forward pass inside the timed decode loop.
            "decode_tokens_per_s": sum(max(len(t) - 1, 0) for t in tokens) / decode_s if decode_s > 0 else 0.0,
            "time_to_first_token_s": prefill_s, "compile_s": compile_s,
            "cache_dtype": fmt.name, "cache_lens": plan.cache_lens,
            "cache_bytes": cache_bytes(cfg, fmt, b, plan.cache_lens, extra_layers=int(self.draft_tokens > 0)),
            "cache_bytes_per_token": fmt.bytes_per_token(cfg), "cache_bytes_per_device": cache_per_device,
            "weight_bytes": self.weight_bytes, "weight_bytes_per_device": self.weight_bytes_per_device,
            "peak_memory_bytes": memory.peak_memory_bytes(), **plan.memory.stats(), "devices": self.n_devices,
            "mesh": "1" if self.mesh is None else describe(tuple(self.mesh.devices.shape)),
            "sharding_notes": notes, "backend": jax.default_backend(),
            "absorb_for_prefill": rt.absorb(cfg, chunk), "chunk_size": rt.chunk_size, "prefill_chunk": chunk,
            **self.backend.stats(attention), "index_topk": self.index_topk,
            "activation_quant": rt.activation_quant,
            "sparse_selected_fraction": self._selected_fraction(prompts, tokens, plan.cache_lens),
            "huge_pages": huge_pages_active(),
        }

    def _selected_fraction(self, prompts, tokens, cache_lens: int) -> float:
        """Of the (query, visible key) pairs of this generation, the fraction sparse attention attended to
        (1.0 when dense: no indexer, or index_topk >= cache_lens)."""
        if not is_sparse(self.index_topk, cache_lens):
            return 1.0
        seen = np.concatenate([np.arange(1, len(p) + len(t) + 1) for p, t in zip(prompts, tokens)])
        return selected_fraction(seen, self.index_topk)

    # -- compiled programs ----------------------------------------------------------------------------------
    def _cache_key(self, cache: LatentCache):
        return (cache.fmt, cache.cache_lens, cache.block, cache.attention, cache.layout, cache.c_kv.shape[:2])

    def _prefill_program(self, cache: LatentCache, b: int, chunk: int):
        """cached_logits' program: a prefill chunk's logits at every position."""
        opts = self.run_options(self.runtime.absorb(self.cfg, chunk))

        def build():
            tok = self.input_spec((b, chunk), jnp.int32)
            rep = None if self.mesh is None else tok.sharding
            out = None if self.mesh is None else (rep, jax.tree.map(lambda x: x.sharding, cache))
            fn = jax.jit(functools.partial(_prefill_chunk, self.graphdef, opts), donate_argnums=(1,),
                         out_shardings=out)
            return fn.lower(self.state, cache, tok, tok, self.input_spec((b,), jnp.int32), None).compile()

        return self.compiled_program(("prefill", opts, self._cache_key(cache), b, chunk), build)

    def decode_program(self, cache: LatentCache, b: int, stops: int = decode.MIN_STOPS):
        """The compiled decode loop (runtime/decode.py decode_steps) over a dense cache of b rows whose rows stop
        at up to `stops` stop ids: what generate runs, and what the benchmarks time (with decode.free_running)."""
        return self.step_programs(cache, b, self.runtime.chunk_size, stops).get(b, 1, None, decode.stops_width(stops))

    def step_programs(self, cache, b: int, chunk: int, stops: int, draft_tokens: int = 0) -> Programs:
        """The step programs of runtime/batch.py over `cache` (dense: Engine.generate's, b rows, prefill chunks of
        `chunk` tokens, rows of up to `stops` stop ids; draft_tokens k > 0: speculative mtp's, the prefill with the
        MTP module and a verifying pass of k drafts for a decode step)."""
        return Programs(self, cache, b, chunk=chunk, stops=decode.stops_width(stops), draft_tokens=draft_tokens)

    # -- running them -------------------------------------------------------------------------------------
    def _prefill(self, prefill, cache, prompts, chunk, start=None):
        """Prefill prompts chunk by chunk -> (every position's logits [b, chunks * chunk, vocab], the cache).
        `start` [b]: tokens each sequence already holds in the cache (a continuation, runtime/session.py): its
        prompt goes at positions start.. and attends over them; default 0."""
        outputs = []
        for c in chunks.chunks(prompts, chunk, cache.cache_lens, start):
            logits, cache = prefill(self.state, cache, jnp.asarray(c.tokens), jnp.asarray(c.positions),
                                    jnp.asarray(c.lengths), None)
            outputs.append(np.asarray(logits))
        return np.concatenate(outputs, axis=1), cache


class GenerateBatch(Batch):
    """Engine.generate's run of runtime/batch.py's steps: prompt i in row i of the dense cache, every row in every
    step. `starts` [b]: positions each row's cache holds already (a Session's turn; default 0). draft_tokens k > 0:
    speculative mtp (the cache holds the MTP module's slice and k positions past each row's last token)."""

    def __init__(self, engine: Engine, cache: LatentCache, programs: Programs, prompts, call: CallSettings,
                 starts=None, draft_tokens: int = 0):
        super().__init__(engine, cache, programs, draft_tokens)
        sampling, stops = engine.sampling_and_stops(call)
        values = (float(sampling.temperature), int(sampling.top_k), float(sampling.top_p))
        for i, (prompt, start) in enumerate(zip(prompts, starts or [0] * len(prompts))):
            # positions before `start` are in the cache already: the batch never reads their tokens
            self._running.append(Sequence(prompt=[0] * start + list(prompt), length=start, row=i,
                                          max_tokens=call.max_new_tokens, sampling=values,
                                          seed=(call.seed + i) % 2**32, stops=frozenset(stops)))
        self.seqs = list(self._running)
        self.starts = [s.length for s in self.seqs]
        self.bad_step = np.full(len(self.seqs), -1)  # the generation step whose logits were not finite

    @property
    def tokens(self) -> list[list[int]]:
        return [s.generated for s in self.seqs]

    def _finish(self, req: Sequence, reason: str, error: str | None = None) -> None:
        super()._finish(req, reason, error)
        if reason == "error":
            self.bad_step[req.row] = req.n_gen

    def speculation_stats(self) -> dict:
        """Acceptance of this generation (speculative mtp): per sequence and in all."""
        k = self.draft_tokens
        if not k:
            return {"speculative": "off"}
        passes, accepted = [s.passes for s in self.seqs], [s.accepted for s in self.seqs]
        total = sum(passes)
        # tokens the passes gave: all but each sequence's first (sampled from the prefill's logits)
        from_passes = sum(max(s.n_gen - 1, 0) for s in self.seqs)
        return {"speculative": "mtp", "draft_tokens": k, "verify_passes": total,
                "draft_acceptance_rate": sum(accepted) / (k * total) if total else 0.0,
                "accept_length": from_passes / total if total else 0.0,
                "accepted_drafts": accepted, "verify_passes_per_sequence": passes}

    def run(self, on_tokens=None, progress: Progress = NO_PROGRESS, prefill: bool = False) -> float:
        """Steps until every row is done (prefill: until every prompt is in the cache), each step's new tokens
        to on_tokens (a list per row) and its progress to `progress` -> seconds taken."""
        t0, capacity = time.perf_counter(), len(self.seqs) * self.pool.cache_lens
        while self._running and (not prefill or any(s.prefilling for s in self._running)):
            before = [s.n_gen for s in self.seqs]
            self._step()
            new = [s.generated[n:] for s, n in zip(self.seqs, before)]
            if on_tokens is not None and any(new):
                on_tokens(new)
            progress.cache(sum(s.length for s in self.seqs), capacity)
            progress.update(sum(min(s.length, len(s.prompt)) - start for s, start in zip(self.seqs, self.starts))
                            if prefill else sum(s.n_gen for s in self.seqs))
            _raise_if_broken(self.bad_step)
        return time.perf_counter() - t0


def _raise_if_broken(bad_step: np.ndarray):
    for i, step in enumerate(bad_step):
        if step >= 0:
            raise KtjaxError(f"the model produced non-finite logits (NaN or Inf) at generation step {int(step)} of "
                             f"sequence {i}: the weights or the computation are broken; check the checkpoint "
                             "(re-convert it) or try --dtype float32")

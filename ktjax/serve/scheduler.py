"""Continuous batching over the paged latent cache: requests join and leave the running batch between steps.

The steps are runtime/batch.py's (the one runtime, which Engine.generate runs over its dense cache too): each
runs at most one prefill chunk (of the oldest request still prefilling, with chunks of the next ones while the
step's budget of chunk_size tokens lasts) and one decode step of every request that has a token to feed, so a
long prompt delays the running streams by one chunk per step, never by its whole prefill. When no request is
prefilling or waiting, a step runs a burst of decode steps in one dispatch (decode_steps, as many as fit in
BURST_SECONDS), each request stopping on the device, its tokens then emitted in order. What the Scheduler adds:
a queue and admission, which reserves the pages of prompt + max_tokens up front (nothing is ever preempted);
the prefix cache, to which full prompt pages are published as they are written (ktjax/serve/pages.py), so that a
request whose prompt starts with cached pages prefills only the rest; cancellation; and a thread of its own.
Shapes are bucketed (ktjax/runtime/programs.py), so steady traffic compiles nothing after warmup().

With speculative mtp (the engine's setting; runtime/speculative.py) every decode pass drafts draft_tokens = k tokens
per request with the MTP module and verifies them in one pass of the model (a step runs a burst of passes as it runs
decode steps): a request gets 1 to k + 1 tokens per pass, emitted one by one as without speculation (a stop,
max_tokens or a cancellation inside the run ends it there, and nothing after it is emitted). The pool holds the MTP
module's slice, pages are reserved for k positions past the last token (the drafts that may be rejected), and each
request keeps the model's hidden states at the positions its last pass accepted, from which the next step's MTP
extends its slice. A page is published to the prefix cache once its MTP entries are written too; the last of them
depends on the token after the page, so a cached page is reused only by a prompt with the same token there (else the
prompt prefills that page itself).

Every callback (on_event) runs on the scheduler's thread: once per generated token, then once Finished.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import random
import threading
import time
from typing import Callable

import jax
import numpy as np

from ktjax.weights import sharding
from ktjax.errors import KtjaxError
from ktjax.kv.layout import CacheLayout
from ktjax.kv.cache import LatentCache
from ktjax.kv.paged import DEFAULT_PAGE_SIZE
from ktjax.runtime.settings import CallSettings
from ktjax.serve.pages import ROOT, PageAllocator
from ktjax.runtime.batch import Batch, Sequence
from ktjax.runtime.decode import MAX_STEPS, TOP_LOGPROBS, stops_width
from ktjax.runtime.programs import Programs, pow2_at_least

log = logging.getLogger(__name__)

BURST_SECONDS = 0.05  # a burst of decode steps in one dispatch lasts about this long at most: what a request
                     # arriving meanwhile waits before it is admitted, and how far a cancel lags
DEFAULT_CONTEXT = 4096  # tokens per batch slot when cache_lens is unset (no prompt to size the pool from)


@dataclasses.dataclass(frozen=True)
class RequestParams:
    max_tokens: int
    temperature: float | None = None   # None: generation_config / greedy, as Engine.sampling_and_stops
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()   # in addition to EOS
    ignore_eos: bool = False
    logprobs: int = 0                  # 0: none; k: top-k logprobs per generated token (k <= 20)


# Log-probabilities are the model's: log_softmax of its logits, before temperature, top-k and top-p.
@dataclasses.dataclass
class TokenEvent:
    token_id: int
    logprob: float | None = None                      # of the chosen token, when params.logprobs > 0
    top_logprobs: list[tuple[int, float]] | None = None


@dataclasses.dataclass
class Finished:
    reason: str            # "stop" (EOS/stop id), "length", "cancelled", "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int     # prompt tokens served from the prefix cache
    ttft_s: float          # submit -> first token
    error: str | None = None
    queued_s: float = 0.0  # submit -> admitted to the batch (or out of the queue, cancelled)
    # speculative mtp only: {"drafted", "accepted", "verify_passes"}: the request's drafts, those accepted and
    # emitted, and the passes that verified them
    speculative: dict | None = None


class PromptTooLong(KtjaxError):
    """The request could never fit, even alone (HTTP 413)."""


class QueueFull(KtjaxError):
    """Busy, and the waiting queue is full (HTTP 429)."""


class ShuttingDown(KtjaxError):
    """The scheduler no longer accepts requests (HTTP 503)."""


@dataclasses.dataclass(eq=False)
class Handle:
    id: str
    prompt_tokens: int


@dataclasses.dataclass(eq=False, kw_only=True)
class _Request(Sequence):
    handle: Handle
    params: RequestParams
    on_event: Callable
    keys: list[int] = dataclasses.field(default_factory=list)   # prefix-cache keys of the leading full pages
    cached_tokens: int = 0
    admitted: float | None = None   # perf_counter when it left the queue for the batch


class Scheduler(Batch):
    log_compiles = True  # a step that waits for a compile says so: a shape the warmup did not compile

    def __init__(self, engine, *, max_batch: int = 8, page_size: int = DEFAULT_PAGE_SIZE, max_queue: int = 64,
                 n_pages: int | None = None):
        for name, value, lo in (("max_batch", max_batch, 1), ("page_size", page_size, 1),
                                ("max_queue", max_queue, 0), ("n_pages", n_pages, 1)):
            if value is not None and (not isinstance(value, int) or value < lo):
                raise KtjaxError(f"{name} must be an integer >= {lo}, got {value!r}")
        if engine.cfg.has_indexer and sharding.seq_shards(engine.mesh) > 1:
            raise KtjaxError("sparse attention (DeepSeek-V3.2) over a page pool split over devices is not "
                             "supported yet: serve the model on one device, or run it with python -m ktjax.generate")
        self.engine = engine
        self.max_batch, self.page_size, self.max_queue = max_batch, page_size, max_queue
        # speculative mtp: k drafts per step, and k positions past a sequence's last token for those rejected
        self.draft_tokens = engine.runtime.draft_tokens if engine.runtime.speculative == "mtp" else 0
        reserve = self.draft_tokens
        if n_pages is None:
            plan = engine.plan_cache(max_batch, min(DEFAULT_CONTEXT, engine.cfg.max_position_embeddings))
            n_pages = max_batch * -(-(plan.cache_lens + reserve) // page_size)
        shards = sharding.seq_shards(engine.mesh)
        n_pages = -(-n_pages // shards) * shards  # whole pages on every device
        if n_pages * page_size <= reserve:
            raise KtjaxError(f"a page pool of {n_pages} pages of {page_size} tokens leaves no room past the "
                             f"{reserve} positions speculative decoding keeps for drafts")
        self.max_context = min(engine.cfg.max_position_embeddings, n_pages * page_size - reserve)
        max_width = pow2_at_least(-(-(self.max_context + reserve) // page_size))
        self.pool = self._new_pool(n_pages)
        self.allocator = PageAllocator(n_pages, page_size, order=self._spread_order(n_pages, shards))
        self._page_next: dict[int, tuple[int, int]] = {}  # speculative: page -> (its prefix id, the token after it)
        default_stops = len(engine.sampling_and_stops(CallSettings.from_overrides(engine.defaults))[1])
        programs = Programs(engine, self.pool, max_batch, max_width, self.draft_tokens, stops_width(default_stops))
        super().__init__(engine, self.pool, programs, self.draft_tokens)
        self._waiting: collections.deque[_Request] = collections.deque()
        self._accepting = True
        self._deadline: float | None = None   # set by shutdown: cancel whatever still runs after it
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)

    def _new_pool(self, n_pages: int) -> LatentCache:
        """The page pool: on a mesh, its pages split over the cache's sequence axis (N devices, N times the
        pages), the page table replicated."""
        eng = self.engine
        layout = None
        if sharding.seq_shards(eng.mesh) > 1:
            layout = CacheLayout(eng.mesh, sharding.RULES["cache_seq"], None)
        kernel = eng.backend.attention_kernel(layout=layout, page_size=self.page_size)
        pool = LatentCache.pool(eng.cfg, eng.runtime.cache_dtype, n_pages, self.page_size,
                                attention=kernel, layout=layout, extra_layers=1 if self.draft_tokens else 0)
        if eng.mesh is not None:
            rep = jax.sharding.NamedSharding(eng.mesh, jax.sharding.PartitionSpec())
            pool = pool.with_table(jax.device_put(pool.page_table, rep))
            if layout is None:
                pool = jax.device_put(pool, rep)
        return pool

    @staticmethod
    def _spread_order(n_pages: int, shards: int) -> list[int]:
        """Free-list order that hands out pages round-robin over the devices holding the pool, so that a long
        sequence's pages (and its attention work) spread over all of them."""
        per = n_pages // shards
        return [d * per + i for i in range(per) for d in range(shards)]

    # -- public interface ---------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ktjax-scheduler", daemon=True)
            self._thread.start()

    def warmup(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Compile every bucketed program (prefill chunks x table widths, batch sizes x table widths);
        progress(done, total) after each."""
        shapes = self.programs.shapes()
        for done, shape in enumerate(shapes, 1):
            self.programs.get(*shape)
            if progress is not None:
                progress(done, len(shapes))

    def submit(self, prompt_ids, params: RequestParams, on_event: Callable) -> Handle:
        req = self._validate(prompt_ids, params, on_event)
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down and accepts no new requests")
            busy = self._waiting or len(self._running) >= self.max_batch
            if busy and len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._running)} requests running and {len(self._waiting)} waiting (the "
                                f"queue holds {self.max_queue}); retry later")
            self._waiting.append(req)
            self._lock.notify_all()
        return req.handle

    def cancel(self, handle: Handle) -> None:
        with self._lock:
            for req in itertools.chain(self._running, self._waiting):
                if req.handle is handle:
                    req.cancelled = True
            self._lock.notify_all()
        if self._thread is None:
            self._reap_cancelled()

    def shutdown(self, timeout: float) -> None:
        with self._lock:
            self._accepting = False
            self._deadline = time.monotonic() + max(0.0, timeout)
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        else:
            self._cancel_all()

    def stats(self) -> dict:
        with self._lock:
            s = self.allocator.stats()
            running, waiting = len(self._running), len(self._waiting)
        return dict(running=running, waiting=waiting, pages_total=s.total, pages_used=s.used, pages_free=s.free,
                    pages_cached=s.cached, prefix_hit_tokens=s.hit_tokens, prefix_lookup_tokens=s.lookup_tokens,
                    cache_bytes=self.pool.nbytes, page_size=self.page_size, max_batch=self.max_batch,
                    **self._counts)

    # -- validation ---------------------------------------------------------------------------------------------
    def _validate(self, prompt_ids, params: RequestParams, on_event) -> _Request:
        eng = self.engine
        if not isinstance(params, RequestParams):
            raise KtjaxError(f"params must be a RequestParams, got {type(params).__name__}")
        prompt = list(prompt_ids)
        if not prompt or not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            raise KtjaxError("the prompt must be a non-empty list of token ids")
        prompt = [int(t) for t in prompt]
        vocab = eng.cfg.vocab_size
        stop_ids = list(params.stop_token_ids)
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in stop_ids):
            raise KtjaxError(f"stop_token_ids must be token ids (integers), got {params.stop_token_ids!r}")
        bad = [t for t in prompt + stop_ids if not 0 <= int(t) < vocab]
        if bad:
            raise KtjaxError(f"token ids must lie in [0, {vocab}); got {bad[:5]}")
        if not isinstance(params.logprobs, int) or not 0 <= params.logprobs <= TOP_LOGPROBS:
            raise KtjaxError(f"logprobs must be an integer in [0, {TOP_LOGPROBS}], got {params.logprobs!r}")
        if params.seed is not None and (not isinstance(params.seed, int) or params.seed < 0):
            raise KtjaxError(f"seed must be a non-negative integer, got {params.seed!r}")
        call = CallSettings.from_overrides(eng.defaults, max_new_tokens=params.max_tokens,
                                           temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                           ignore_eos=params.ignore_eos)
        needed = len(prompt) + call.max_new_tokens
        if needed > self.max_context:
            window = eng.cfg.max_position_embeddings
            pool = self.allocator.n_pages * self.page_size
            kept = (f", less the {self.draft_tokens} positions speculative decoding keeps for drafts"
                    if self.draft_tokens else "")
            limit = (f"the model's window of {window} positions" if window <= pool - self.draft_tokens
                     else f"the page pool's {self.allocator.n_pages} pages of {self.page_size} tokens ({pool} "
                     f"tokens{kept})")
            raise PromptTooLong(f"prompt of {len(prompt)} tokens + max_tokens {call.max_new_tokens} = {needed} "
                                f"tokens exceeds {limit}; shorten the prompt or lower max_tokens")
        sampling, stops = eng.sampling_and_stops(call)
        seed = params.seed % 2**32 if params.seed is not None else random.getrandbits(32)
        handle = Handle(f"req-{next(self._ids)}", len(prompt))
        return _Request(handle=handle, prompt=prompt, params=params, on_event=on_event,
                        max_tokens=call.max_new_tokens, logprobs=params.logprobs,
                        sampling=(float(sampling.temperature), int(sampling.top_k), float(sampling.top_p)), seed=seed,
                        stops=frozenset(stops) | frozenset(map(int, stop_ids)))

    # -- the loop -----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._running or self._waiting or self._deadline is not None):
                    self._lock.wait()
                past = self._deadline is not None and time.monotonic() >= self._deadline
            if past:
                self._cancel_all()
            self._reap_cancelled()
            with self._lock:
                self._admit()
                if self._deadline is not None and not (self._running or self._waiting):
                    return
                idle = not self._running
                if idle and self._waiting and self._deadline is None:
                    self._lock.wait(0.05)  # the head of the queue waits for pages: nothing runs, so never
                    continue               # (a request that fits alone always fits an empty pool)
            if not idle:
                self._step_safely()

    def _admit(self) -> None:
        """Move waiting requests into the batch, first come first served, while slots and pages allow.
        Called with the lock held."""
        while self._waiting and len(self._running) < self.max_batch:
            req = self._waiting[0]
            alloc = self.allocator
            total = alloc.pages_for(len(req.prompt) + req.max_tokens + self.draft_tokens)
            # Leave at least the last prompt token to prefill: its logits give the first token.
            hits, keys = alloc.lookup(req.prompt, max_pages=(len(req.prompt) - 1) // self.page_size, count=False)
            hits, keys = self._usable_hits(req.prompt, hits, keys)
            if total - len(hits) > alloc.available:
                alloc.release(hits)
                return
            alloc.count_lookup(len(hits) * self.page_size, len(req.prompt))
            req.pages = hits + alloc.allocate(total - len(hits))
            req.keys = keys
            req.cached_tokens = req.length = req.mtp_length = len(hits) * self.page_size
            self._waiting.popleft()
            req.admitted = time.perf_counter()
            self._running.append(req)

    def _usable_hits(self, prompt: list[int], hits: list[int], keys: list[int]) -> tuple[list[int], list[int]]:
        """speculative: a cached page's last MTP entry was computed with the token after the page in its
        publisher's sequence; the hits end before the first page whose publisher had another token there (those
        pages are released, and the prompt prefills them itself)."""
        if not self.draft_tokens:
            return hits, keys
        ps, n = self.page_size, 0
        while n < len(hits) and self._page_next.get(hits[n]) == (keys[n], prompt[(n + 1) * ps]):
            n += 1
        self.allocator.release(hits[n:])
        return hits[:n], keys[:n]

    def _reap_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in itertools.chain(self._running, self._waiting) if r.cancelled]
        for req in gone:
            self._finish(req, "cancelled")

    def _cancel_all(self) -> None:
        with self._lock:
            everyone = list(self._running) + list(self._waiting)
        for req in everyone:
            self._finish(req, "cancelled")

    def _finish(self, req: _Request, reason: str, error: str | None = None) -> None:
        with self._lock:
            if req in self._running:
                self._running.remove(req)
                if reason != "error":  # a next turn (prompt + this completion + more) reuses the full pages
                    self._publish_full_pages(req)
                self.allocator.release(req.pages)
            elif req in self._waiting:
                self._waiting.remove(req)
            else:
                return
        queued = (req.admitted or time.perf_counter()) - req.submitted
        spec = (dict(drafted=req.passes * self.draft_tokens, accepted=req.accepted, verify_passes=req.passes)
                if self.draft_tokens else None)
        event = Finished(reason, len(req.prompt), req.n_gen, req.cached_tokens, req.ttft, error, queued, spec)
        self._call(req, event)

    def _call(self, req: _Request, event) -> bool:
        """Deliver an event; a callback that raises cancels its request (the HTTP client went away)."""
        try:
            req.on_event(event)
            return True
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the other streams
            log.exception("on_event of %s raised; cancelling it", req.handle.id)
            req.cancelled = True
            return False

    # -- steps --------------------------------------------------------------------------------------------------
    def _step_safely(self) -> None:
        try:
            self._step()
        except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
            log.exception("scheduler step failed")
            message = f"{type(e).__name__}: {e}"
            with self._lock:
                running = list(self._running)
            for req in running:
                self._finish(req, "error", message)
            # A failed step may have consumed the donated pool: start from an empty one.
            self.pool = self._new_pool(self.allocator.n_pages)
            n = self.allocator.n_pages
            self.allocator = PageAllocator(n, self.page_size,
                                           order=self._spread_order(n, sharding.seq_shards(self.engine.mesh)))
            self._page_next = {}

    def _burst(self) -> int:
        """Decode steps for the next dispatch: one while a request waits to be admitted, else as many as fit in
        BURST_SECONDS at the last dispatch's pace."""
        with self._lock:
            waiting = bool(self._waiting)
        if waiting or self._step_s is None:
            return 1
        return max(1, min(MAX_STEPS, int(BURST_SECONDS / max(self._step_s, 1e-6))))

    def _deliver(self, req: _Request, out, i: int) -> bool:
        k = req.logprobs
        event = TokenEvent(int(out.token[i]))
        if k:
            event.logprob = float(out.logprob[i])
            event.top_logprobs = [(int(t), float(lp)) for t, lp in zip(out.top_ids[i, :k], out.top_logprobs[i, :k])]
        return self._call(req, event)

    def _publish_full_pages(self, req: _Request) -> None:
        """Offer the request's pages that the cache now holds in full to the prefix cache."""
        ps = self.page_size
        # speculative: only pages whose MTP entries are written too (the MTP slice lags the model's)
        written = req.mtp_length if self.draft_tokens else req.length
        seq = req.prompt + req.generated
        with self._lock:
            while len(req.keys) < written // ps:
                i = len(req.keys)
                parent = req.keys[-1] if req.keys else ROOT
                req.keys.append(self.allocator.publish(req.pages[i], parent, seq[i * ps:(i + 1) * ps]))
                if self.draft_tokens:  # its last MTP entry was computed with this token after it
                    self._page_next[req.pages[i]] = (req.keys[-1], seq[(i + 1) * ps])

"""A stand-in for ktjax/serve/scheduler.py (the contract's types and a FakeScheduler that runs one request at a
time through engine.generate), used by the server tests until the real scheduler is on main."""
from __future__ import annotations

import dataclasses
import itertools
import queue
import sys
import threading
import time

import numpy as np

from ktjax.errors import KtjaxError


@dataclasses.dataclass(frozen=True)
class RequestParams:
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0


@dataclasses.dataclass
class TokenEvent:
    token_id: int
    logprob: float | None = None
    top_logprobs: list | None = None


@dataclasses.dataclass
class Finished:
    reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ttft_s: float
    error: str | None = None


class PromptTooLong(KtjaxError):
    pass


class QueueFull(KtjaxError):
    pass


class ShuttingDown(KtjaxError):
    pass


@dataclasses.dataclass
class Handle:
    id: str
    prompt_tokens: int
    prompt: list
    params: RequestParams
    on_event: object
    cancelled: bool = False


class _Cancelled(Exception):
    pass


class FakeScheduler:
    def __init__(self, engine, *, max_batch=8, page_size=64, max_queue=64, n_pages=None):
        self.engine, self.page_size, self.max_queue, self.max_batch = engine, page_size, max_queue, max_batch
        self.queue: queue.Queue = queue.Queue()
        self.ids = itertools.count()
        self.running = 0
        self.closing = False
        self.decode_total = self.prefill_total = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def start(self):
        self.thread.start()

    def warmup(self):
        pass

    def submit(self, prompt_ids, params, on_event):
        if self.closing:
            raise ShuttingDown("shutting down")
        if self.queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests waiting")
        if len(prompt_ids) + params.max_tokens > self.engine.cfg.max_position_embeddings:
            raise PromptTooLong("too long")
        h = Handle(f"req-{next(self.ids)}", len(prompt_ids), list(prompt_ids), params, on_event)
        self.queue.put(h)
        return h

    def cancel(self, handle):
        handle.cancelled = True

    def shutdown(self, timeout):
        self.closing = True
        self.queue.put(None)
        self.thread.join(timeout)

    def stats(self):
        return {"running": self.running, "waiting": self.queue.qsize(), "pages_total": 16, "pages_used": 0,
                "pages_free": 16, "pages_cached": 0, "prefix_hit_tokens": 0, "prefix_lookup_tokens": 0,
                "cache_bytes": 0, "prefill_tokens_total": self.prefill_total,
                "decode_tokens_total": self.decode_total, "steps_total": 0, "page_size": self.page_size,
                "max_batch": self.max_batch}

    def _loop(self):
        while (h := self.queue.get()) is not None:
            self.running = 1
            self._run(h)
            self.running = 0

    def _run(self, h: Handle):
        p, t0, sent = h.params, time.perf_counter(), []
        ttft = [0.0]

        def on_tokens(new):
            if h.cancelled:
                raise _Cancelled()
            if not p.logprobs:
                for t in new[0]:
                    ttft[0] = ttft[0] or time.perf_counter() - t0
                    h.on_event(TokenEvent(t))
                    sent.append(t)

        try:
            if h.cancelled:
                raise _Cancelled()
            stop_ids = set(p.stop_token_ids)
            out = self.engine.generate([h.prompt], max_new_tokens=p.max_tokens, temperature=p.temperature,
                                       top_p=p.top_p, top_k=p.top_k, seed=p.seed or 0, ignore_eos=p.ignore_eos,
                                       on_tokens=on_tokens).tokens[0]
            cut = next((i + 1 for i, t in enumerate(out) if t in stop_ids), len(out))
            if p.logprobs:
                logits = self.engine.logits(h.prompt + out[:cut])[len(h.prompt) - 1:]
                logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
                for i, t in enumerate(out[:cut]):
                    top = np.argsort(-logp[i])[:p.logprobs]
                    h.on_event(TokenEvent(t, float(logp[i, t]), [(int(j), float(logp[i, j])) for j in top]))
            self.prefill_total += len(h.prompt)
            self.decode_total += cut
            stopped = cut < len(out) or (out and out[-1] in self.engine.sampling_and_stops(
                dataclasses.replace(self.engine.defaults))[1])
            h.on_event(Finished("stop" if stopped else "length", len(h.prompt), cut, 0, ttft[0]))
        except _Cancelled:
            h.on_event(Finished("cancelled", len(h.prompt), len(sent), 0, ttft[0]))
        except Exception as e:  # noqa: BLE001
            h.on_event(Finished("error", len(h.prompt), len(sent), 0, ttft[0], str(e)))


def install():
    """Make `ktjax.serve.scheduler` this module when the real one is absent."""
    try:
        import ktjax.serve.scheduler  # noqa: F401
        return False
    except ImportError:
        sys.modules["ktjax.serve.scheduler"] = sys.modules[__name__]
        return True


class RefusingScheduler:
    """A scheduler whose submit always raises `error` (the HTTP status mapping of the scheduler's refusals)."""

    def __init__(self, error: Exception):
        self.error = error

    def submit(self, prompt_ids, params, on_event):
        raise self.error

    def cancel(self, handle):
        pass

    def stats(self):
        return {"page_size": 16, "running": 0, "waiting": 0}

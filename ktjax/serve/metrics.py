"""Prometheus metrics of one server, in a registry of its own (tests build many apps in one process).

Prometheus conventions: what accumulates is a counter (`_total`; rates are PromQL's rate()), what is a level is a
gauge (never named `_total`), and latencies are histograms. Latencies and HTTP responses are observed as they
happen; everything the scheduler counts (tokens, pages, the prefix cache, requests running and waiting) is read
from scheduler.stats() when /metrics is scraped.
"""
from __future__ import annotations

import threading

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class ServerMetrics:
    def __init__(self, scheduler):
        self.registry = CollectorRegistry(auto_describe=True)
        histogram = self._histogram
        self.ttft = histogram("ktjax_time_to_first_token_seconds", "request submitted -> its first token")
        self.inter_token = histogram("ktjax_inter_token_latency_seconds", "time between a request's tokens")
        self.queue_wait = histogram("ktjax_queue_wait_seconds", "request submitted -> admitted to the running "
                                                                "batch (or out of the queue, cancelled)",
                                    REQUEST_BUCKETS)
        self.duration = histogram("ktjax_request_duration_seconds", "request submitted -> finished, any reason",
                                  REQUEST_BUCKETS)
        self.requests = Counter("ktjax_requests", "finished requests by reason", ["reason"], registry=self.registry)
        self.responses = Counter("ktjax_http_responses", "HTTP responses by status code (4xx refusals included)",
                                 ["code"], registry=self.registry)
        self.registry.register(SchedulerCollector(scheduler))
        self.history = DashboardHistory(scheduler)  # what /dashboard plots

    def _histogram(self, name: str, text: str, buckets=LATENCY_BUCKETS) -> Histogram:
        return Histogram(name, text, buckets=buckets, registry=self.registry)

    def finished(self, reason: str, ttft_s: float | None, queued_s: float, duration_s: float):
        self.requests.labels(reason).inc()
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        self.queue_wait.observe(queued_s)
        self.duration.observe(duration_s)

    def responded(self, status: int):
        self.responses.labels(str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class SchedulerCollector:
    """scheduler.stats() as metrics, and device memory with a peak that never reads below its current value."""

    GAUGES = {"running": ("running", "requests in the running batch"), "waiting": ("waiting", "requests queued"),
              "pages_total": ("pages_capacity", "cache pages in the pool"),
              "pages_used": ("pages_used", "cache pages held by requests"),
              "pages_free": ("pages_free", "cache pages free"),
              "pages_cached": ("pages_cached", "free cache pages kept for the prefix cache"),
              "cache_bytes": ("cache_bytes", "bytes of the paged latent cache")}
    COUNTERS = {"prefill_tokens_total": ("prefill_tokens", "prompt tokens prefilled (prefix-cache hits excluded)"),
                "decode_tokens_total": ("decode_tokens", "tokens decode steps generated (one per request per step; "
                                                         "with speculative mtp 1 to draft_tokens + 1)"),
                "steps_total": ("steps", "model steps (a burst of n decode steps in one dispatch counts n)"),
                "prefix_hit_tokens": ("prefix_cache_hit_tokens", "prompt tokens found in the prefix cache"),
                "prefix_lookup_tokens": ("prefix_cache_lookup_tokens", "prompt tokens looked up in the prefix cache"),
                # speculative mtp only (absent otherwise)
                "speculative_drafted_total": ("speculative_drafted_tokens", "tokens drafted by the MTP module"),
                "speculative_accepted_total": ("speculative_accepted_tokens", "drafted tokens accepted (and emitted)"),
                "speculative_verify_passes_total": ("speculative_verify_passes", "verifying passes, one per request "
                                                    "per decode step (each gives 1 to draft_tokens + 1 tokens)")}

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.lock = threading.Lock()
        self.peak = 0  # the highest memory reading seen: a backend's peak and RSS are read apart and may lag

    def describe(self):
        return []

    def collect(self):
        s = self.scheduler.stats()
        for key, (name, text) in self.GAUGES.items():
            if key in s:
                yield GaugeMetricFamily(f"ktjax_{name}", text, value=s[key])
        for key, (name, text) in self.COUNTERS.items():
            if key in s:
                yield CounterMetricFamily(f"ktjax_{name}", text, value=s[key])
        lookups = s.get("prefix_lookup_tokens", 0)
        yield GaugeMetricFamily("ktjax_prefix_cache_hit_rate", "prompt tokens found in the prefix cache / looked "
                                "up, since the server started", value=s.get("prefix_hit_tokens", 0) / lookups
                                if lookups else 0.0)
        if "speculative_verify_passes_total" in s:
            yield from speculation_rates(s)
        in_use, peak = device_memory()
        with self.lock:
            self.peak = peak = max(self.peak, peak, in_use)
        yield GaugeMetricFamily("ktjax_device_memory_bytes", "device memory in use (host RSS on a CPU)", value=in_use)
        yield GaugeMetricFamily("ktjax_device_memory_peak_bytes", "peak device memory (peak RSS on a CPU)",
                                value=peak)
        yield from planned_memory(getattr(self.scheduler, "engine", None), s.get("cache_bytes", 0))


def speculation_rates(s: dict):
    """Since the server started: drafts accepted / drafted, and decode tokens per verifying pass."""
    drafted, passes = s["speculative_drafted_total"], s["speculative_verify_passes_total"]
    yield GaugeMetricFamily("ktjax_speculative_acceptance_rate", "drafted tokens accepted / drafted, since the "
                            "server started", value=s["speculative_accepted_total"] / drafted if drafted else 0.0)
    yield GaugeMetricFamily("ktjax_speculative_tokens_per_pass", "decode tokens / verifying passes, since the "
                            "server started", value=s["decode_tokens_total"] / passes if passes else 0.0)


def planned_memory(engine, cache_bytes: int):
    """The two memories the planner accounts (runtime/memory.py): the device side (each device's weights and the
    page pool's share) and the host side (routed experts in host RAM under experts host, else 0)."""
    if engine is None:
        return
    from ktjax.runtime.memory import one_memory
    from ktjax.weights.sharding import seq_shards

    device = engine.weight_bytes_per_device + cache_bytes // seq_shards(engine.mesh)
    yield GaugeMetricFamily("ktjax_planned_device_memory_bytes", "device side, per device: the weights held there "
                            "and the cache pages (with experts host, the experts are host memory)", value=device)
    yield GaugeMetricFamily("ktjax_host_memory_bytes", "routed experts in host RAM (experts host; else 0)" +
                            ("; on a CPU-only machine the same RAM as the device side" if one_memory() else ""),
                            value=engine.host_bytes)


def device_memory() -> tuple[int, int]:
    """(in use, peak) bytes on the default device; a CPU reports the process's resident set (the CLI's live
    status reads the same: runtime/progress.py)."""
    from ktjax.runtime.progress import memory_now

    return memory_now()


# the counters speculative mtp adds (SchedulerCollector.COUNTERS names them)
SPECULATION = tuple(key for key in SchedulerCollector.COUNTERS if key.startswith("speculative_"))


class DashboardHistory:
    """What /dashboard plots, from the scheduler's own counts: a sample (memory, cache pages, requests running and
    waiting, prefill and decode tokens) taken when the page polls /dashboard/data, at most one every
    `every_s` seconds, the last `keep` kept; rates are the counters' differences between samples. The server's
    start (the app's creation) is the first sample, so a page opened late still sees rates averaged since then."""

    def __init__(self, scheduler, every_s: float = 0.5, keep: int = 600):
        import collections
        import time

        self.scheduler, self.every_s = scheduler, every_s
        self.clock = time.monotonic
        self.t0 = self.clock()
        self.lock = threading.Lock()
        self.samples = collections.deque(maxlen=keep)
        self.peak = 0
        stats = scheduler.stats()
        self.last = {"t": 0.0, "prefill_tokens": stats.get("prefill_tokens_total", 0),
                     "decode_tokens": stats.get("decode_tokens_total", 0)}
        self.samples.append(self._sample(0.0, stats, device_memory()))

    def data(self) -> dict:
        """{now: the current sample, history: [samples, oldest first]}; each sample: t (seconds since the server
        started), memory_bytes, peak_memory_bytes, pages_used, pages_total, running, waiting, prefill_tokens,
        decode_tokens (counters), prefill_tokens_per_s, decode_tokens_per_s (since the sample before); with
        speculative mtp also the counters speculative_drafted_total, speculative_accepted_total and
        speculative_verify_passes_total."""
        stats, memory = self.scheduler.stats(), device_memory()
        with self.lock:
            t = self.clock() - self.t0
            now = self._sample(t, stats, memory)
            if t - self.samples[-1]["t"] >= self.every_s:
                self.samples.append(now)
                self.last = now
            return {"now": now, "history": list(self.samples)}

    def _sample(self, t: float, stats: dict, memory: tuple[int, int]) -> dict:
        in_use, peak = memory
        self.peak = max(self.peak, peak, in_use)
        prefill, decode = stats.get("prefill_tokens_total", 0), stats.get("decode_tokens_total", 0)
        dt = t - self.last["t"]
        return {"t": t, "memory_bytes": in_use, "peak_memory_bytes": self.peak,
                "pages_used": stats.get("pages_used", 0), "pages_total": stats.get("pages_total", 0),
                "running": stats.get("running", 0), "waiting": stats.get("waiting", 0),
                "prefill_tokens": prefill, "decode_tokens": decode,
                "prefill_tokens_per_s": (prefill - self.last["prefill_tokens"]) / dt if dt > 0 else 0.0,
                "decode_tokens_per_s": (decode - self.last["decode_tokens"]) / dt if dt > 0 else 0.0,
                **{key: stats[key] for key in SPECULATION if key in stats}}

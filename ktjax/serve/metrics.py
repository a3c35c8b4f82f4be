"""Prometheus metrics of one server, in a registry of its own (tests build many apps in one process).

Latencies are observed per request and token as events arrive; everything the scheduler counts (tokens, pages,
the prefix cache, requests running and waiting) is read from scheduler.stats() when /metrics is scraped.
"""
from __future__ import annotations

import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, scheduler):
        self.registry = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram("ktjax_time_to_first_token_seconds", "request submitted -> its first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token = Histogram("ktjax_inter_token_latency_seconds", "time between a request's tokens",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("ktjax_requests", "finished requests by reason", ["reason"], registry=self.registry)
        self.registry.register(SchedulerCollector(scheduler))

    def finished(self, reason: str, ttft_s: float | None):
        self.requests.labels(reason).inc()
        if ttft_s is not None:
            self.ttft.observe(ttft_s)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class SchedulerCollector:
    """scheduler.stats() as metrics; token rates over the time since the previous scrape."""

    GAUGES = {"running": "requests in the running batch", "waiting": "requests queued",
              "pages_total": "cache pages", "pages_used": "cache pages held by requests",
              "pages_free": "cache pages free", "pages_cached": "cache pages kept for the prefix cache",
              "cache_bytes": "bytes of the paged latent cache"}

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.lock = threading.Lock()
        self.previous = None  # (time, prefill tokens, decode tokens)

    def describe(self):
        return []

    def collect(self):
        s = self.scheduler.stats()
        for key, text in self.GAUGES.items():
            if key in s:
                yield GaugeMetricFamily(f"ktjax_{key}", text, value=s[key])
        lookups = s.get("prefix_lookup_tokens", 0)
        yield GaugeMetricFamily("ktjax_prefix_cache_hit_rate", "prompt tokens found in the prefix cache / looked up",
                                value=s.get("prefix_hit_tokens", 0) / lookups if lookups else 0.0)
        for kind in ("prefill", "decode"):
            yield CounterMetricFamily(f"ktjax_{kind}_tokens", f"{kind} tokens processed",
                                      value=s.get(f"{kind}_tokens_total", 0))
        yield CounterMetricFamily("ktjax_steps", "scheduler steps", value=s.get("steps_total", 0))
        prefill_rate, decode_rate = self._rates(s)
        yield GaugeMetricFamily("ktjax_prefill_tokens_per_second", "since the previous scrape", value=prefill_rate)
        yield GaugeMetricFamily("ktjax_decode_tokens_per_second", "since the previous scrape", value=decode_rate)
        in_use, peak = device_memory()
        yield GaugeMetricFamily("ktjax_device_memory_bytes", "device memory in use (host RSS on a CPU)", value=in_use)
        yield GaugeMetricFamily("ktjax_device_memory_peak_bytes", "peak device memory (peak RSS on a CPU)",
                                value=peak)

    def _rates(self, s: dict) -> tuple[float, float]:
        now = (time.monotonic(), s.get("prefill_tokens_total", 0), s.get("decode_tokens_total", 0))
        with self.lock:
            before, self.previous = self.previous, now
        if before is None or now[0] <= before[0]:
            return 0.0, 0.0
        dt = now[0] - before[0]
        return (now[1] - before[1]) / dt, (now[2] - before[2]) / dt


def device_memory() -> tuple[int, int]:
    """(in use, peak) bytes on the default device; a CPU reports the process's resident set."""
    from ktjax.runtime.memory import device_memory_stats, peak_memory_bytes

    stats = device_memory_stats()
    if stats and "bytes_in_use" in stats:
        return int(stats["bytes_in_use"]), peak_memory_bytes()
    try:
        with open("/proc/self/statm") as f:
            import os
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"), peak_memory_bytes()
    except OSError:
        return 0, peak_memory_bytes()

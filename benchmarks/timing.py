"""Timing shared by the benchmark scripts: the median (or best) wall time of a jitted call, compilation excluded."""
import statistics
import time

import jax


def call_times(fn, *args, repeats: int) -> list[float]:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def time_median(fn, *args, repeats: int) -> float:
    return statistics.median(call_times(fn, *args, repeats=repeats))


def time_best(fn, *args, repeats: int) -> float:
    return min(call_times(fn, *args, repeats=repeats))

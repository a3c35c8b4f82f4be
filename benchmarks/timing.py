"""Timing shared by the benchmark scripts: median wall time of a jitted call, compilation excluded."""
import statistics
import time

import jax


def time_median(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)

"""Tiling sweep of the Pallas MLA decode kernel on a GPU: which KernelConfig is fastest per shape, against both
roofs of the same run (the copy bandwidth, and the bf16 matrix rate of a large XLA product).

    python benchmarks/sweep_mla_kernels.py --jsonl sweep.jsonl [--deadline 300]

At DeepSeek-V3 dims the kernel is bound by the matrix rate as much as by the bandwidth (bench_mla_kernels.
decode_flops). Each point: median kernel time, achieved TFLOP/s and GB/s, the larger of the two
roof times over the kernel time (`of_roof`), and max |kernel - XLA reference|. Points are written as measured;
the sweep stops at --deadline seconds.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
import warnings

import jax
import jax.numpy as jnp

from bench_mla_kernels import copy_bandwidth, decode_flops, decode_inputs
from timing import time_median
from ktjax.kv import attention
from ktjax.kv import formats as cf
from ktjax import pallas
from ktjax.pallas import platform

# (block_m, block_k, num_warps, num_stages, num_splits or None for the default): the default tiling first.
CONFIGS = [(None, None, None, None, None),
           (32, 32, 4, 2, None), (32, 64, 8, 2, None), (32, 32, 8, 3, None), (32, 16, 4, 2, None),
           (64, 32, 8, 2, None), (64, 64, 8, 2, None), (64, 32, 4, 2, None), (64, 32, 8, 3, None),
           (64, 64, 8, 3, None), (64, 16, 8, 2, None), (64, 16, 4, 2, None),
           (128, 32, 8, 2, None), (128, 16, 8, 2, None), (128, 16, 4, 2, None),
           (64, 32, 8, 2, 132), (64, 32, 8, 2, 264)]


def matmul_tflops(n: int, repeats: int) -> float:
    """bf16 FLOP/s of an n x n x n XLA product on random data, best of `repeats`."""
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in jax.random.split(jax.random.key(1)))
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    best = min(_timed(dot, a, b) for _ in range(repeats))
    return 2 * n ** 3 / best


def _timed(fn, *args):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["bf16:131072:1", "bf16:131072:8", "int8:131072:1",
                                                   "int4:131072:1", "bf16:32768:8"], help="format:context:batch")
    p.add_argument("--heads", type=int, default=128)
    p.add_argument("--rank", type=int, default=512)
    p.add_argument("--rope", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--deadline", type=float, default=300.0, help="seconds; the sweep stops after this")
    p.add_argument("--jsonl", required=True)
    p.add_argument("--copy-mb", type=int, default=2048, help="array size for the copy bandwidth")
    p.add_argument("--matmul-n", type=int, default=8192, help="size of the product for the matrix rate")
    a = p.parse_args(argv)
    warnings.simplefilter("ignore", platform.InterpretModeWarning)
    t_start = time.monotonic()
    copy_bw = copy_bandwidth(a.copy_mb, 5)
    peak = matmul_tflops(a.matmul_n, 5)
    with open(a.jsonl, "w") as out:
        def write(obj):
            out.write(json.dumps(obj) + "\n")
            out.flush()
            print(json.dumps(obj), flush=True)

        write(dict(kind="header", device=jax.devices()[0].device_kind, jax=jax.__version__,
                   copy_gbps=copy_bw / 1e9, matmul_bf16_tflops=peak / 1e12))
        for shape, cfg in itertools.product(a.shapes, CONFIGS):
            if time.monotonic() - t_start > a.deadline:
                write(dict(kind="stopped", reason="deadline"))
                break
            name, context, batch = shape.split(":")
            fmt, context, batch = cf.resolve_format(name), int(context), int(batch)
            write(dict(kind="point", shape=shape, config=cfg, **measure(a, fmt, context, batch, cfg, copy_bw, peak)))


_SHAPE = {}  # the current shape's inputs and reference output, made once for all its tilings (one shape held)


def shape_inputs(a, fmt, context, batch):
    """(args, scale, the XLA reference's output) for one shape, reused while the sweep stays on it."""
    key = (fmt.name, context, batch, a.heads, a.rank, a.rope)
    if key not in _SHAPE:
        _SHAPE.clear()  # free the previous shape's cache (GBs on a GPU) first
        args, scale = decode_inputs(jax.random.key(context * 131 + batch), fmt, batch, context, a.heads, a.rank,
                                    a.rope, jnp.bfloat16)
        reference = jax.jit(lambda *x: attention.mla_decode_xla(*x, fmt=fmt, scale=scale, block=min(512, context)))
        _SHAPE[key] = (args, scale, reference(*args))
    return _SHAPE[key]


def measure(a, fmt, context, batch, cfg, copy_bw, peak) -> dict:
    args, scale, want = shape_inputs(a, fmt, context, batch)
    block_m, block_k, num_warps, num_stages, num_splits = cfg
    config = pallas.KernelConfig(block_m=block_m, block_k=block_k, num_splits=num_splits, num_warps=num_warps,
                                 num_stages=num_stages)
    kernel = jax.jit(lambda *x: pallas.mla_decode(*x, fmt=fmt, scale=scale, block=512, config=config,
                                                  interpret=not platform.on_gpu()))
    try:
        t0 = time.perf_counter()
        jax.block_until_ready(kernel(*args))
        compile_s = time.perf_counter() - t0
        t = time_median(kernel, *args, repeats=a.repeats)
    except Exception as e:  # noqa: BLE001 -- a tiling that does not compile is a finding
        return dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    flops = decode_flops(batch, context, a.heads, a.rank, a.rope)
    nbytes = batch * context * fmt.bytes_per_token_per_layer(a.rank, a.rope)
    err = float(jnp.max(jnp.abs(kernel(*args) - want)))
    return dict(ms=1e3 * t, tflops=flops / t / 1e12, gbps=nbytes / t / 1e9,
                of_roof=max(flops / peak, nbytes / copy_bw) / t, max_err=err, compile_s=round(compile_s, 2))


if __name__ == "__main__":
    main()

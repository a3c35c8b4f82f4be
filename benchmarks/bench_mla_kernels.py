"""Absorbed MLA decode: the Pallas kernel against the XLA reference, per cache format, context and batch.

    python benchmarks/bench_mla_kernels.py                          # GPU: contexts 4k..128k, batch 1..64
    python benchmarks/bench_mla_kernels.py --contexts 32768 --batches 1 8 --formats bf16 fp8
    python benchmarks/bench_mla_kernels.py --markdown benchmarks/log/2026.md   # append the table to the log
    python benchmarks/bench_mla_kernels.py --smoke                  # CPU: interpret mode, tiny sizes
    python benchmarks/bench_mla_kernels.py --jsonl rows.jsonl       # also one JSON object per line (gpu_check.py)
    python benchmarks/bench_mla_kernels.py --kernel mosaic --formats bf16   # the Mosaic GPU decode kernel (Hopper)

One decode step of one layer with DeepSeek-V3 attention dims (128 heads, kv_lora_rank 512, rope 64), every
sequence at the full context. Columns: median kernel and reference times (ms, compilation excluded), the
cache bytes the step must read (c_kv + scales + k_pe, from CacheFormat.bytes_per_token_per_layer), the
kernel's achieved bandwidth (those bytes / kernel time) and its share of this device's copy bandwidth,
measured first with a large array copy ((read + write) / time, best of `--repeats`), and its FLOP rate
(`decode_flops`; benchmarks/sweep_mla_kernels.py measures the matrix rate to set it against). `max err` is
|pallas - xla| on the output. `--jsonl` also writes each point as it is measured (the XLA path's bandwidth too),
so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings

import jax
import jax.numpy as jnp

from timing import time_median  # benchmarks/timing.py
from ktjax.kv import attention
from ktjax.kv import formats as cf
from ktjax import pallas
from ktjax.pallas import platform

FORMATS = ["bf16", "fp8", "int8", "int4", "float32"]


def copy_bandwidth(megabytes: int, repeats: int) -> float:
    """Bytes/s of a large elementwise copy (each byte read once and written once), best of `repeats`."""
    x = jnp.zeros((megabytes * 2**20 // 4,), jnp.float32)
    copy = jax.jit(lambda x: x + 1.0)
    jax.block_until_ready(copy(x))  # compile and warm up
    best = float("inf")
    for _ in range(max(repeats, 3)):
        t0 = time.perf_counter()
        jax.block_until_ready(copy(x))
        best = min(best, time.perf_counter() - t0)
    return 2 * x.nbytes / best


def random_cache(key, fmt, batch, context, rank, rope):
    """A cache of the stored dtype without building a float32 copy first (sizes reach tens of GB)."""
    k_c, k_s, k_r = jax.random.split(key, 3)
    shape = (batch, context, fmt.stored_width(rank))
    if fmt.name in ("float32", "bf16"):
        c_kv = jax.random.normal(k_c, shape, fmt.store_dtype)
    else:
        bits = jax.random.bits(k_c, shape, jnp.uint8)
        if fmt.name == "fp8":
            bits = bits & 0x77  # exponent <= 14: finite e4m3 values only
        c_kv = jax.lax.bitcast_convert_type(bits, fmt.store_dtype) if fmt.name != "int4" else bits
    scales = None
    if fmt.quantized:
        scales = jax.random.uniform(k_s, (batch, context, fmt.n_groups(rank)), jnp.float32, 0.001, 0.01)
    k_pe = jax.random.normal(k_r, (batch, context, rope), fmt.k_pe_dtype)
    return c_kv, scales, k_pe


def decode_flops(batch: int, context: int, heads: int, rank: int, rope: int) -> int:
    """FLOPs of one absorbed decode step: per key and head, scores over rank + rope channels and p @ c_kv over
    rank. At V3 dims that is ~250 FLOP per bf16 cache byte, above a Hopper GPU's balance point: the matrix rate,
    not only the bandwidth, bounds the kernel."""
    return 2 * batch * heads * context * (2 * rank + rope)


def decode_inputs(key, fmt, batch, context, heads, rank, rope, dtype):
    """One decode step's arguments (q_lat, q_pe, c_kv, scales, k_pe, lengths), every sequence at the full context,
    and the softmax scale."""
    cache = random_cache(key, fmt, batch, context, rank, rope)
    k_q, k_p = jax.random.split(jax.random.fold_in(key, 1))
    q_lat = jax.random.normal(k_q, (batch, heads, rank), dtype)
    q_pe = jax.random.normal(k_p, (batch, heads, rope), dtype)
    return (q_lat, q_pe, *cache, jnp.full((batch,), context, jnp.int32)), (rank + rope) ** -0.5


def bench_one(a, fmt, batch, context, copy_bw, key):
    cache_bytes = batch * context * fmt.bytes_per_token_per_layer(a.rank, a.rope)
    if cache_bytes > a.max_cache_gb * 1e9:
        return None
    args, scale = decode_inputs(key, fmt, batch, context, a.heads, a.rank, a.rope, jnp.dtype(a.dtype))
    block = min(512, context)
    config = pallas.KernelConfig(block_m=a.block_m, block_k=a.block_k, num_splits=a.num_splits,
                                 num_warps=a.num_warps, num_stages=a.num_stages)
    if a.kernel == "mosaic":  # bf16 values only: (q_lat, q_pe, c_kv, scales None, k_pe, lengths)
        from ktjax.pallas import mosaic  # Mosaic GPU imported only when asked for
        kernel = jax.jit(lambda q_lat, q_pe, c_kv, _, k_pe, lengths: mosaic.mla_decode_mosaic(
            q_lat, q_pe, c_kv, k_pe, lengths, scale=scale, num_splits=a.num_splits, interpret=a.interpret))
    else:
        kernel = jax.jit(lambda *x: pallas.mla_decode(*x, fmt=fmt, scale=scale, block=block, config=config,
                                                      interpret=a.interpret))
    reference = jax.jit(lambda *x: attention.mla_decode_xla(*x, fmt=fmt, scale=scale, block=block))
    t_kernel = time_median(kernel, *args, repeats=a.repeats)
    t_ref = time_median(reference, *args, repeats=a.repeats)
    err = float(jnp.max(jnp.abs(kernel(*args) - reference(*args))))
    flops = decode_flops(batch, context, a.heads, a.rank, a.rope)
    return dict(kernel=a.kernel, format=fmt.name, context=context, batch=batch, pallas_ms=1e3 * t_kernel, xla_ms=1e3 * t_ref,
                speedup=t_ref / t_kernel, cache_bytes=cache_bytes, pallas_tflops=flops / t_kernel / 1e12,
                pallas_gbps=cache_bytes / t_kernel / 1e9, xla_gbps=cache_bytes / t_ref / 1e9,
                pallas_of_copy=cache_bytes / t_kernel / copy_bw, xla_of_copy=cache_bytes / t_ref / copy_bw, max_err=err)


def markdown_row(r) -> str:
    return (f"| {r['format']} | {r['context']} | {r['batch']} | {r['pallas_ms']:.3f} | {r['xla_ms']:.3f} | "
            f"{r['speedup']:.2f}x | {r['cache_bytes'] / 1e6:.4g} | {r['pallas_gbps']:.3g} | "
            f"{100 * r['pallas_of_copy']:.0f}% | {r['pallas_tflops']:.3g} | {r['max_err']:.1e} |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", help="default: 4096 8192 16384 32768 65536 131072")
    p.add_argument("--batches", type=int, nargs="+", help="default: 1 4 16 64")
    p.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    p.add_argument("--kernel", default="triton", choices=["triton", "mosaic"],
                   help="the Pallas Triton kernel, or the Mosaic GPU one (bf16 caches, Hopper and later)")
    p.add_argument("--heads", type=int, default=128, help="128 for V3/R1, 16 for V2-Lite")
    p.add_argument("--rank", type=int, default=512, help="kv_lora_rank")
    p.add_argument("--rope", type=int, default=64, help="qk_rope_head_dim")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="query dtype (dot operands)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--max-cache-gb", type=float, default=24.0, help="skip points whose cache is larger")
    p.add_argument("--copy-mb", type=int, default=2048, help="array size for the copy-bandwidth measurement")
    p.add_argument("--block-m", type=int, help="rows ((query, head) pairs) per program")
    p.add_argument("--block-k", type=int, help="keys per tile")
    p.add_argument("--num-splits", type=int, help="splits of the key range (default: chosen per shape)")
    p.add_argument("--num-warps", type=int)
    p.add_argument("--num-stages", type=int)
    p.add_argument("--markdown", help="append the table, with the device name, to this file")
    p.add_argument("--jsonl", help="write a header and then each point as one JSON object per line")
    p.add_argument("--keep-going", action="store_true",
                   help="a point that fails (compile error, out of memory) is reported and the sweep goes on")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sweep (interpret mode on a CPU): context 128, batches 1 2, 4 heads, rank 64")
    a = p.parse_args(argv)
    if a.smoke:  # explicit --contexts / --batches still win
        a.contexts, a.batches = a.contexts or [128], a.batches or [1, 2]
        a.heads, a.rank, a.rope, a.dtype, a.repeats, a.copy_mb = 4, 64, 16, "float32", 2, 64
    a.contexts = a.contexts or [4096, 8192, 16384, 32768, 65536, 131072]
    a.batches = a.batches or [1, 4, 16, 64]
    a.interpret = not platform.on_gpu()
    return a


def main(argv=None):
    a = parse_args(argv)
    warnings.simplefilter("ignore", platform.InterpretModeWarning)
    device = jax.devices()[0]
    copy_bw = copy_bandwidth(a.copy_mb, a.repeats)
    if a.kernel == "mosaic" and set(a.formats) - {"bf16"}:
        p_formats = ", ".join(sorted(set(a.formats) - {"bf16"}))
        print(f"--kernel mosaic reads bf16 caches only: {p_formats} skipped", flush=True)
        a.formats = [f for f in a.formats if f == "bf16"]
    mode = ("interpret mode (no GPU: times say nothing about GPU speed)" if a.interpret else
            "Mosaic GPU" if a.kernel == "mosaic" else "Triton")
    header = [f"device: {device.device_kind} ({jax.default_backend()}, {mode}); jax {jax.__version__}; "
              f"heads={a.heads} rank={a.rank} rope={a.rope} queries={a.dtype}; copy bandwidth {copy_bw / 1e9:.1f} GB/s",
              "",
              "| format | context | batch | pallas ms | xla ms | speedup | cache MB | GB/s | of copy | TFLOP/s | max err |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    if a.jsonl:
        write_jsonl(a.jsonl, dict(kind="header", device=device.device_kind, backend=jax.default_backend(),
                                  interpret=a.interpret, jax=jax.__version__, heads=a.heads, rank=a.rank,
                                  rope=a.rope, query_dtype=a.dtype, repeats=a.repeats, kernel=a.kernel,
                                  copy_bandwidth_gbps=copy_bw / 1e9), mode="w")
    rows = []
    key = jax.random.key(0)
    for name in a.formats:
        for context in a.contexts:
            for batch in a.batches:
                try:
                    point = bench_one(a, cf.resolve_format(name), batch, context, copy_bw,
                                      jax.random.fold_in(key, len(rows)))
                except Exception as e:  # noqa: BLE001 -- only with --keep-going
                    if not a.keep_going:
                        raise
                    print(f"| {name} | {context} | {batch} | failed: {type(e).__name__}: {str(e)[:200]} |", flush=True)
                    if a.jsonl:
                        write_jsonl(a.jsonl, dict(kind="error", format=name, context=context, batch=batch,
                                                  error=f"{type(e).__name__}: {str(e)[:2000]}"))
                    continue
                if point is None:
                    continue
                rows.append(markdown_row(point))
                print(rows[-1], flush=True)
                if a.jsonl:
                    write_jsonl(a.jsonl, dict(kind="point", **point))
    if a.markdown:
        with open(a.markdown, "a") as f:
            f.write("\n## MLA decode kernels\n\n" + "\n".join(header + rows) + "\n")


def write_jsonl(path, obj, mode="a"):
    with open(path, mode) as f:
        f.write(json.dumps(obj) + "\n")


if __name__ == "__main__":
    main()

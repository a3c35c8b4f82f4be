"""experts: host on a CPU: the cost of the host-expert bridge per MoE layer, side by side with the in-program path.

Per MoE layer at DeepSeek-V2-Lite's expert dimensions (64 routed experts, top-6, hidden 2048, moe_intermediate
1408; random int4 / int8 weights, random routing): the routed-expert sum as the Engine runs it with experts device
(model.moe.routed_experts over the CPU kernels' held experts, in the compiled program) against experts host (one
KtjaxHostExperts FFI call that reads the host expert store, ktjax/cpu/host_experts.py), for a decode step of 1 and
16 rows and a 512-row prefill chunk; `bridge` is the host call with every assignment marked as kept on the device
(sorting, staging and zeroing, no expert work): the fixed cost of the bridge. Each layer has its own weights (the
layers together are several times the last-level cache), so the experts are read from memory, and the bytes of
the distinct experts a call touches over its time is the read bandwidth, set against the machine's copy bandwidth
(bench_mla_kernels.copy_bandwidth) and a BLAS matrix-vector product's read rate (bench_generate.read_bandwidth).

    python benchmarks/bench_hybrid.py                         # int4, 3 layers, 1 / 16 / 512 rows
    python benchmarks/bench_hybrid.py --formats int4 int8 --layers 2 --out hybrid.jsonl

One JSON line per (format, rows) on stdout (and appended to --out): milliseconds per layer, best of --repeats,
the two paths' ratio, GB/s, and the load average (a loaded machine: compare the ratios, measured side by side).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_generate, bench_mla_kernels
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ktjax, from a checkout

V2_LITE = dict(experts=64, top_k=6, d=2048, f=1408)
GROUP = 128  # int4 inputs per scale (model.quantized.INT4_GROUP)


def best_ms(fn, *args, repeats: int) -> float:
    from timing import time_best  # benchmarks/timing.py

    return time_best(fn, *args, repeats=repeats) * 1e3


def random_layer(rng, fmt: str, experts: int, d: int, f: int):
    """One layer's experts in the kernels' layout [out, in]: (gate_up values, scales, down values, scales), each
    [E, ...]: random bytes are valid int8 / int4 weights."""
    def weight(n_out, n_in):
        if fmt == "int4":
            values = rng.integers(0, 256, (experts, n_out, n_in // 2), dtype=np.uint8)
            scales = rng.uniform(0.001, 0.01, (experts, n_out, n_in // GROUP)).astype(np.float32)
        else:
            values = rng.integers(-127, 128, (experts, n_out, n_in), dtype=np.int8)
            scales = rng.uniform(0.001, 0.01, (experts, n_out, 1)).astype(np.float32)
        return values, scales
    return (*weight(2 * f, d), *weight(d, f))


def host_layer(store, index: int, fmt: str, arrays, d: int, f: int):
    """The layer's arrays into the store (its own buffers, as the loader fills them) and registered."""
    store.begin_layer(index, fmt, arrays[0].shape[0], d, f, GROUP if fmt == "int4" else 0)
    s = store.layers[index]
    s.up_values[...], s.up_scales[...], s.down_values[...], s.down_scales[...] = arrays
    store.finish_layer(index)


def device_layer(arrays, f: int):
    """The same experts as the Engine holds them with experts device on a CPU: KernelQuantized weights of
    PerExpert arrays (w_gate, w_up, w_down), on the device."""
    import jax.numpy as jnp

    from ktjax.cpu.weights import KernelQuantized
    from ktjax.model.moe import PerExpert

    up_v, up_s, down_v, down_s = arrays

    def held(values, scales):
        return KernelQuantized(PerExpert(tuple(jnp.asarray(v) for v in values)),
                               PerExpert(tuple(jnp.asarray(s) for s in scales)))

    return (held(up_v[:, :f], up_s[:, :f]), held(up_v[:, f:], up_s[:, f:]), held(down_v, down_s))


def routing(rng, rows: int, experts: int, top_k: int):
    ids = np.stack([rng.permutation(experts)[:top_k] for _ in range(rows)]).astype(np.int32)
    weights = rng.random((rows, top_k)).astype(np.float32)
    return ids, weights / weights.sum(1, keepdims=True)


def expert_bytes(arrays) -> int:
    """One expert's stored bytes (gate, up and down, values and scales)."""
    return sum(a[0].nbytes for a in arrays)


def run(a, fmt: str, copy_bw: float, read_bw: float):
    import jax
    import jax.numpy as jnp

    from ktjax.cpu.host_experts import HostExpertStore
    from ktjax.model.moe import pick_impl, routed_experts

    dims = V2_LITE
    rng = np.random.default_rng(0)
    store = HostExpertStore()
    device = []
    per_expert = 0
    for layer in range(a.layers):
        arrays = random_layer(rng, fmt, dims["experts"], dims["d"], dims["f"])
        host_layer(store, layer, fmt, arrays, dims["d"], dims["f"])
        device.append(device_layer(arrays, dims["f"]))
        per_expert = expert_bytes(arrays)
        del arrays
    sums = [store.host_sum(layer) for layer in range(a.layers)]

    for rows in a.rows:
        ids, weights = routing(rng, rows, dims["experts"], dims["top_k"])
        x = jnp.asarray(rng.standard_normal((rows, dims["d"])), jnp.float32)
        impl = pick_impl("auto", rows, dims["top_k"], dims["experts"], "blocked")

        # each layer's output feeds the next (as in the model), so that no call can run before the last ends
        def on_device(x, ids, w, experts):
            for layer in experts:
                x = x + routed_experts(x, w, ids, layer, impl)
            return x

        def on_host(x, ids, w):
            for host in sums:
                x = x + host(x, ids, w)
            return x

        kept = -1 - ids  # every assignment kept on the device: the bridge without expert work
        t_dev = best_ms(jax.jit(on_device), x, jnp.asarray(ids), jnp.asarray(weights), device,
                        repeats=a.repeats) / a.layers
        t_host = best_ms(jax.jit(on_host), x, jnp.asarray(ids), jnp.asarray(weights), repeats=a.repeats) / a.layers
        t_bridge = best_ms(jax.jit(on_host), x, jnp.asarray(kept), jnp.asarray(weights),
                           repeats=a.repeats) / a.layers
        read = len(np.unique(ids)) * per_expert
        record = dict(bench="hybrid", format=fmt, rows=rows, layers=a.layers, impl_device=impl, **dims,
                      device_ms_per_layer=round(t_dev, 3), host_ms_per_layer=round(t_host, 3),
                      host_over_device=round(t_host / t_dev, 3), bridge_ms_per_layer=round(t_bridge, 3),
                      experts_read_bytes=read, host_read_gbps=round(read / t_host / 1e6, 2),
                      device_read_gbps=round(read / t_dev / 1e6, 2), copy_bandwidth_gbps=round(copy_bw / 1e9, 2),
                      blas_read_gbps=round(read_bw / 1e9, 2),
                      host_fraction_of_copy=round(read / t_host / 1e6 / (copy_bw / 1e9), 3),
                      pages=a.pages, loadavg=os.getloadavg()[0], cpus=os.cpu_count())
        line = json.dumps(record)
        print(line, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--formats", nargs="+", default=["int4"], choices=["int4", "int8"])
    p.add_argument("--layers", type=int, default=3, help="MoE layers, each with its own weights")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 512], help="rows per call (decode, prefill)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--copy-mb", type=int, default=512, help="size of the copy that measures the bandwidth")
    p.add_argument("--out", help="append the JSON lines to this file too")
    p.add_argument("--pages", choices=["huge", "small"], default="small",
                   help="the store's buffers on transparent huge pages (host_experts.HUGE_PAGES) or numpy's own")
    a = p.parse_args(argv)

    from ktjax.cpu import build, host_experts
    build.require()
    host_experts.HUGE_PAGES = a.pages == "huge"
    from bench_generate import read_bandwidth
    from bench_mla_kernels import copy_bandwidth
    copy_bw, read_bw = copy_bandwidth(a.copy_mb, 5), read_bandwidth(a.copy_mb)
    for fmt in a.formats:
        run(a, fmt, copy_bw, read_bw)


if __name__ == "__main__":
    main()

"""Routed-expert implementations side by side: gather, ragged (jax.lax.ragged_dot) and blocked.

    python benchmarks/bench_moe.py                      # DeepSeek-V2-Lite MoE dims, float32
    python benchmarks/bench_moe.py --tokens 1 8 64 --impls gather blocked

Prints one row per token count with each implementation's median time (ms) and the selection `auto`
makes on this backend. Times exclude compilation.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from timing import time_median  # benchmarks/timing.py
from ktjax.model.moe import pick_impl, routed_experts
from ktjax.runtime.backend import grouped_moe_impl


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=1408, help="moe_intermediate_size")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024])
    p.add_argument("--impls", nargs="+", default=["gather", "ragged", "blocked"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gather-limit-gb", type=float, default=4.0,
                   help="skip gather where the gathered weights would exceed this")
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    dt = jnp.dtype(a.dtype)
    experts = tuple(jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.02, dt)
                    for s in ((a.experts, a.hidden, a.ffn), (a.experts, a.hidden, a.ffn), (a.experts, a.ffn, a.hidden)))
    print(f"backend={jax.default_backend()} devices={jax.devices()[0].device_kind} hidden={a.hidden} ffn={a.ffn} "
          f"experts={a.experts} top_k={a.top_k} dtype={a.dtype}")
    print("| tokens | " + " | ".join(f"{i} ms" for i in a.impls) + " | auto picks |")
    print("|---" * (len(a.impls) + 2) + "|")
    for t in a.tokens:
        x = jnp.asarray(rng.normal(size=(t, a.hidden)).astype(np.float32), dt)
        idx = jnp.asarray(np.stack([rng.choice(a.experts, a.top_k, replace=False) for _ in range(t)]), jnp.int32)
        w = jnp.asarray(rng.random((t, a.top_k)).astype(np.float32))
        row = []
        for impl in a.impls:
            gathered = 3 * t * a.top_k * a.hidden * a.ffn * dt.itemsize / 1e9
            if impl == "gather" and gathered > a.gather_limit_gb:
                row.append("skip")
                continue
            fn = jax.jit(lambda x, w, idx, experts, impl=impl: routed_experts(x, w, idx, experts, impl))
            row.append(f"{1e3 * time_median(fn, x, w, idx, experts, repeats=a.repeats):.1f}")
        print(f"| {t} | " + " | ".join(row) + f" | {pick_impl('auto', t, a.top_k, a.experts, grouped_moe_impl())} |", flush=True)


if __name__ == "__main__":
    main()

"""Matmuls over a float32 weight held [in, out] against [out, in], as the routed experts' and the dense layers'
shapes need them: the figures behind the weight_layout setting (docs/results.md, "Decode step").

    python benchmarks/bench_layout.py                 # six [2048, 1408] weights, 1 to 512 rows
    python benchmarks/bench_layout.py --d-in 10944 --d-out 2048 --weights 1 --rows 1

Best of --repeats calls of one jitted function; run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-in", type=int, default=2048)
    p.add_argument("--d-out", type=int, default=1408)
    p.add_argument("--weights", type=int, default=6, help="separate weights multiplied per call")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 16, 128, 512])
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0), a.weights + 1)
    in_out = [jax.random.normal(k, (a.d_in, a.d_out)) for k in keys[1:]]
    out_in = [jnp.asarray(w.T) + 0 for w in in_out]
    programs = {"[in, out]": jax.jit(lambda x, ws: [x @ w for w in ws]),
                "[out, in]": jax.jit(lambda x, ws: [jnp.einsum("ti,oi->to", x, w) for w in ws])}

    def best(f, *args):
        jax.block_until_ready(f(*args))
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            times.append(time.perf_counter() - t)
        return min(times) * 1e3

    gb = a.weights * a.d_in * a.d_out * 4 / 1e9
    print(f"{a.weights} weights [{a.d_in}, {a.d_out}] float32 ({gb * 1e3:.0f} MB); ms per call, best of {a.repeats}")
    for rows in a.rows:
        x = jax.random.normal(keys[0], (rows, a.d_in))
        t = {name: best(f, x, in_out if name == "[in, out]" else out_in) for name, f in programs.items()}
        print(f"{rows:5d} rows: " + "  ".join(f"{name} {ms:8.2f} ms ({gb / ms * 1e3:5.1f} GB/s)"
                                               for name, ms in t.items()))


if __name__ == "__main__":
    main()

"""ktjax's C++ CPU kernels against XLA on the same work: decode attention over one layer of the latent cache,
int8 / int4 matmuls by row count (the figures behind cpu.kernels.MAX_ROWS; docs/results.md), and float32
matmuls and the absorbed attention's per-head products.

    python benchmarks/bench_cpu_kernels.py attention                 # 2k and 16k keys, bf16 / int8 / int4
    python benchmarks/bench_cpu_kernels.py attention --context 2048 16384 65536 --formats int4
    python benchmarks/bench_cpu_kernels.py matmul                    # V2-Lite shapes, 16 to 512 rows
    python benchmarks/bench_cpu_kernels.py float32                   # float32 weights and w_uk / w_uv, 1 to 64 rows
    python benchmarks/bench_cpu_kernels.py experts                   # routed experts of one decode row, GB/s vs copy

Best of --repeats calls of one jitted function, with the kernels built first; run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import time



def best_ms(fn, *args, repeats: int) -> float:
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def attention(a):
    """One decode query per sequence (16 heads, DeepSeek's 512 + 64 latent widths) over a full layer."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ktjax.cpu import kernels as cpu_kernels
    from ktjax.kv.attention import mla_decode_xla
    from ktjax.kv.formats import FORMATS
    from ktjax.kv.quant import quantize, to_bits

    rng = np.random.default_rng(0)
    rank, rope, heads = 512, 64, a.heads
    # absorbed MLA reads each key once for all heads: 2 (R + r) + 2 R flops per head and key, compute-bound on a CPU
    print(f"{'format':>7} {'keys':>7} {'bytes':>9} {'kernel ms':>10} {'xla ms':>8} {'speedup':>8} "
          f"{'kernel GFLOP/s':>15}")
    for name in a.formats:
        fmt = FORMATS[name]
        for keys in a.context:
            c = jnp.asarray(rng.standard_normal((1, a.rows, keys, rank)), jnp.float32)
            k_pe = jnp.asarray(rng.standard_normal((1, a.rows, keys, rope)), jnp.float32)
            q, scales = quantize(fmt, c)
            c_kv, k_pe = to_bits(q), to_bits(k_pe.astype(fmt.k_pe_dtype))
            q_lat = jnp.asarray(rng.standard_normal((a.rows, heads, rank)), jnp.float32) * 0.05
            q_pe = jnp.asarray(rng.standard_normal((a.rows, heads, rope)), jnp.float32) * 0.05
            lengths = jnp.full((a.rows,), keys, jnp.int32)
            table = jnp.arange(a.rows, dtype=jnp.int32)[:, None]
            kernel = jax.jit(lambda ql, qp, c, s, k, lens: cpu_kernels.decode_attention(
                ql, qp, c, s, k, table, jnp.int32(0), lens, fmt=fmt, scale=0.07))
            block = min(512, keys)
            xla = jax.jit(lambda ql, qp, c, s, k, lens: mla_decode_xla(
                ql, qp, c[0], None if s is None else s[0], k[0], lens, fmt=fmt, scale=0.07, block=block))
            args = (q_lat, q_pe, c_kv, scales, k_pe, lengths)
            tk, tx = best_ms(kernel, *args, repeats=a.repeats), best_ms(xla, *args, repeats=a.repeats)
            nbytes = sum(x.nbytes for x in (c_kv, scales, k_pe) if x is not None)
            flops = a.rows * keys * heads * (2 * (rank + rope) + 2 * rank)
            print(f"{name:>7} {keys:>7} {nbytes / 1e6:>7.1f}MB {tk:>10.3f} {tx:>8.3f} {tx / tk:>7.2f}x "
                  f"{flops / tk / 1e6:>15.1f}", flush=True)


def matmul(a):
    """x [rows, in] @ an int8 / int4 weight held [out, in]: the kernel (float32 activations, then int8 ones:
    activation_quant int8) against XLA's dequantize-then-dot."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ktjax.cpu import kernels as cpu_kernels
    from ktjax.cpu import weights as cw
    from ktjax.model import quantized as wq

    rng = np.random.default_rng(0)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes]
    print("GFLOP/s (2 x rows x in x out / time), kernel / kernel with int8 activations / XLA, by rows")
    for d_in, d_out in shapes:
        w = rng.standard_normal((d_in, d_out)).astype(np.float32)
        for fmt in a.formats:
            values, scales = wq.quantize_weight(w, fmt)
            held = cw.kernel_layout(wq.QuantizedArray(jnp.asarray(values), jnp.asarray(scales)))
            padded = held.values.shape[1] * (2 if fmt == "int4" else 1)
            cells = []
            for rows in a.rows:
                x = jnp.asarray(rng.standard_normal((rows, d_in)), jnp.float32)
                xp = jnp.pad(x, ((0, 0), (0, padded - d_in)))
                tk = best_ms(jax.jit(cpu_kernels.matmul), xp, held.values, held.scale, repeats=a.repeats)
                q8 = jax.jit(lambda x, v, s: cpu_kernels.matmul(x, v, s, int8_activations=True))
                tq = best_ms(q8, xp, held.values, held.scale, repeats=a.repeats)
                tx = best_ms(jax.jit(cw._held_out_in_matmul), x, held, repeats=a.repeats)
                flops = 2 * rows * d_in * d_out / 1e6
                cells.append(f"{rows:>4}: {flops / tk:4.0f} / {flops / tq:4.0f} / {flops / tx:4.0f}")
            print(f"[{d_in}, {d_out}] {fmt:>4}  " + " | ".join(cells), flush=True)


def float32(a):
    """Float32 weights cold from memory (enough distinct copies to pass the L3): XLA's dot over [in, out] (the
    layout as stored), XLA's over [out, in], and the kernel over [out, in] (cpu_kernels on); then the absorbed
    attention's per-head products (16 heads, 128 x 512: w_uk [in, out] and w_uv [out, in] per head), XLA's
    einsum against the kernel. Cells: GB/s of weights read, then GFLOP/s."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ktjax.cpu import kernels as cpu_kernels
    from ktjax.cpu import weights as cw
    from ktjax.model import quantized as wq

    rng = np.random.default_rng(0)

    def copies(shape):
        count = max(2, (256 << 20) // (4 * int(np.prod(shape))))
        return [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(count)]

    def cell(fn, x, ws, flops):
        ms = best_ms(jax.jit(lambda x, *ws: sum(fn(x, w) for w in ws)), x, *ws, repeats=a.repeats) / len(ws)
        return f"{4 * int(np.prod(ws[0].shape)) / ms / 1e6:5.1f} {flops / ms / 1e6:6.1f}"

    print("float32 [in, out]: GB/s GFLOP/s of XLA [in, out] | XLA [out, in] | kernel [out, in]")
    for d_in, d_out in [tuple(int(v) for v in s.split("x")) for s in a.shapes]:
        in_out = copies((d_in, d_out))
        out_in = [jnp.asarray(w.T) + 0 for w in in_out]
        for rows in a.rows:
            x, flops = jnp.asarray(rng.standard_normal((rows, d_in)), jnp.float32), 2 * rows * d_in * d_out
            print(f"[{d_in}, {d_out}] {rows:>3} rows: " + " | ".join((
                cell(lambda x, w: x @ w, x, in_out, flops),
                cell(lambda x, w: jnp.einsum("ti,oi->to", x, w), x, out_in, flops),
                cell(cpu_kernels.matmul, x, out_in, flops))), flush=True)
        del in_out, out_in
    print("per head (16 x 128 x 512): GB/s GFLOP/s of XLA's einsum | kernel")
    for name, in_out, d_in in (("w_uk", True, 128), ("w_uv", False, 512)):
        ws = copies((16, 128, 512))
        held = [cw.KernelHeads(w) for w in ws]
        for rows in a.rows:
            x, flops = jnp.asarray(rng.standard_normal((rows, 1, 16, d_in)), jnp.float32), 2 * rows * 16 * 128 * 512
            if not cpu_kernels.fits(rows):
                continue
            print(f"{name} {rows:>3} rows: " + " | ".join((
                cell(lambda x, w: wq.per_head(x, w, in_out), x, ws, flops),
                cell(lambda x, w: wq.per_head(x, w, in_out), x, held, flops))), flush=True)


def experts(a):
    """The routed experts of a decode step: --rows rows (one token: 1) through --selected of --experts experts in
    one grouped call, gate/up ([2f, d], as the host expert store holds them) and down ([d, f]), float32 and int8
    activations. Each call takes the next experts in turn, so that its weights come cold from memory. Cells: GB/s of
    weights read (best call), and that over the copy bandwidth measured in the same run."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ktjax.cpu import kernels as cpu_kernels
    from ktjax.cpu import weights as cw
    from ktjax.model import quantized as wq

    rng = np.random.default_rng(0)
    src = np.ones(128 << 20, np.float32)  # a copy between buffers already touched (no page faults): 2 x bytes
    dst, best = np.empty_like(src), float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    copy = 2 * src.nbytes / best / 1e9
    del src, dst
    print(f"copy bandwidth {copy:.1f} GB/s; {a.selected} of {a.experts} experts, {a.rows} row(s)")
    for fmt in a.formats:
        for name, d_in, d_out in (("gate/up", a.d, 2 * a.f), ("down", a.f, a.d)):
            w = rng.standard_normal((d_in, d_out)).astype(np.float32)
            values, scales = wq.quantize_weight(w, fmt)
            held = cw.kernel_layout(wq.QuantizedArray(jnp.asarray(values), jnp.asarray(scales)))
            # distinct copies (the same numbers): the selected ones are read cold
            weights = [(held.values + 0, held.scale + 0) for _ in range(a.experts)]
            per = held.values.nbytes + held.scale.nbytes
            x = jnp.asarray(rng.standard_normal((a.rows, 2 * held.values.shape[1] if fmt == "int4" else d_in)),
                            jnp.float32)
            cells = []
            for q8 in (False, True):
                fn = jax.jit(lambda x, sizes, *flat: cpu_kernels.grouped_matmul(
                    x, sizes, list(zip(flat[::2], flat[1::2])), int8_activations=q8))
                flat = [t for pair in weights for t in pair]
                calls = []
                for c in range(a.experts):
                    sizes = np.zeros(a.experts, np.int32)
                    chosen = [(c * a.selected + i) % a.experts for i in range(a.selected)]
                    sizes[chosen] = a.rows  # each of --rows tokens through every selected expert
                    x_rows = int(sizes.sum())
                    calls.append((jnp.asarray(sizes), jnp.asarray(rng.standard_normal((x_rows, x.shape[1])),
                                                                   jnp.float32)))
                fn(calls[0][1], calls[0][0], *flat).block_until_ready()
                times = []
                for r in range(a.repeats):
                    for sizes, xr in calls:
                        t = time.perf_counter()
                        fn(xr, sizes, *flat).block_until_ready()
                        times.append(time.perf_counter() - t)
                ms = min(times) * 1e3
                gbps = a.selected * per / ms / 1e6
                cells.append(f"{'int8 act' if q8 else 'f32 act'}: {ms:6.3f} ms {gbps:5.1f} GB/s {gbps / copy:4.2f}x copy")
            print(f"{fmt:>4} {name:>7} [{d_out}, {d_in}] x{a.selected}: " + " | ".join(cells), flush=True)
            del weights, flat


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    att = sub.add_parser("attention", help="decode attention over one layer of the cache")
    att.add_argument("--context", type=int, nargs="+", default=[2048, 16384], help="keys in the cache")
    att.add_argument("--formats", nargs="+", default=["bf16", "int8", "int4"])
    att.add_argument("--rows", type=int, default=1, help="sequences (one query each)")
    att.add_argument("--heads", type=int, default=16)
    att.add_argument("--repeats", type=int, default=20)
    mm = sub.add_parser("matmul", help="int8 / int4 matmuls by row count")
    mm.add_argument("--shapes", nargs="+", default=["2048x1408", "1408x2048", "2048x10944"], help="IN x OUT")
    mm.add_argument("--formats", nargs="+", default=["int8", "int4"])
    mm.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 512])
    mm.add_argument("--repeats", type=int, default=20)
    f32 = sub.add_parser("float32", help="float32 matmuls and per-head products by row count")
    f32.add_argument("--shapes", nargs="+", default=["2048x1408", "1408x2048", "2048x10944"], help="IN x OUT")
    f32.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    f32.add_argument("--repeats", type=int, default=10)
    ex = sub.add_parser("experts", help="one decode row through the routed experts, GB/s against copy")
    ex.add_argument("--formats", nargs="+", default=["int4", "int8"])
    ex.add_argument("--d", type=int, default=2048)
    ex.add_argument("--f", type=int, default=1408)
    ex.add_argument("--experts", type=int, default=64)
    ex.add_argument("--selected", type=int, default=6)
    ex.add_argument("--rows", type=int, default=1, help="tokens: each selected expert gets this many rows")
    ex.add_argument("--repeats", type=int, default=5, help="passes over the experts")
    a = p.parse_args(argv)

    from ktjax.cpu import build as cpu_build
    cpu_build.require()
    {"attention": attention, "matmul": matmul, "float32": float32, "experts": experts}[a.what](a)


if __name__ == "__main__":
    main()

"""Decode speed per weight format on this machine, and the matvec formulations behind it.

    python benchmarks/bench_weights.py decode      # 2 layers at DeepSeek-V2-Lite dims: float32/bf16/int8/int4
    python benchmarks/bench_weights.py matvec      # one 2048 x 8192 weight: convert-whole vs tiles
    python benchmarks/bench_weights.py folder DIR --layers 4 [--sparse]
        # a Hugging Face folder of DeepSeek-V2-Lite's dims with random bf16 weights, written shard by shard
        # (--sparse: headers and holes only, for a --dry-run of the full 27 layers without 31 GB of disk)

Speeds exclude compilation. The formats apply to the tensors int8/int4 quantize (attention projections,
dense MLPs, experts); the rest stays float32 in every row.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from synthetic_folders import V2_LITE, write_synthetic_folder  # noqa: E402  (tests/synthetic_folders.py)
from timing import time_median  # noqa: E402  (benchmarks/timing.py)

# ---- decode tokens/s per format ----------------------------------------------------------------------

def _as_format(model, fmt):
    import jax.numpy as jnp
    from flax import nnx

    from ktjax.model import quantized as wq
    from ktjax.weights import quantize as surgery

    if fmt in wq.WEIGHT_FORMATS:
        return surgery.quantize_model(model, fmt)
    if fmt == "bf16":
        for path, var in list(nnx.state(model).flat_state()):
            if surgery.quantized_paths(tuple(map(str, path))):
                surgery.set_param(model, tuple(map(str, path)), var[...].astype(jnp.bfloat16))
    return model


def decode(args):
    import jax
    from flax import nnx

    import ktjax
    from ktjax.model import quantized as wq
    from ktjax.weights import quantize as surgery
    from ktjax.model.config import ModelConfig
    from ktjax.model.decoder import DeepseekModel
    from ktjax.runtime.settings import resolve

    cfg = ModelConfig.from_hf_dict(dict(V2_LITE, num_hidden_layers=args.layers, vocab_size=args.vocab))
    settings = resolve(cache_lens=256, max_new_tokens=args.steps, temperature=0, ignore_eos=True, chunk_size=64)
    prompt = [list(range(3, 3 + args.prompt))]
    print("| weights | quantized-tensor bytes | all weight bytes | decode tokens/s | prefill tokens/s |")
    print("|---|---|---|---|---|")
    for fmt in args.formats:
        model = _as_format(DeepseekModel(cfg, rngs=nnx.Rngs(0)), fmt)
        engine = ktjax.engine_for(cfg, model, *settings)
        engine.generate(prompt)  # compile
        runs = [engine.generate(prompt).stats for _ in range(args.repeats)]
        quantized = sum(a.nbytes for p, v in nnx.state(model).flat_state()
                        if surgery.quantized_paths(tuple(map(str, p))) for a in jax.tree.leaves(v[...]))
        print(f"| {fmt} | {quantized / 1e6:.0f} MB | {engine.weight_bytes / 1e6:.0f} MB | "
              f"{statistics.median(r['decode_tokens_per_s'] for r in runs):.2f} | "
              f"{statistics.median(r['prefill_tokens_per_s'] for r in runs):.1f} |", flush=True)
        del engine, model


# ---- matvec formulations -------------------------------------------------------------------------------

def _bf16_tiles(x, w):
    import jax
    import jax.numpy as jnp

    n = 8
    ws, xs = w.reshape(n, -1, w.shape[-1]), x.reshape(x.shape[0], n, -1)
    return jax.lax.fori_loop(0, n, lambda i, acc: acc + xs[:, i] @ ws[i].astype(jnp.float32),
                             jnp.zeros((x.shape[0], w.shape[-1]), jnp.float32))


def matvec(args):
    import jax
    import jax.numpy as jnp

    from ktjax.model import quantized as wq
    from ktjax.weights import quantize as surgery

    d, f = args.d_in, args.d_out
    rng = np.random.default_rng(0)
    w = rng.standard_normal((d, f)).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((1, d)), jnp.float32)
    q8 = wq.QuantizedArray(*map(jnp.asarray, wq.quantize_weight(w, "int8")))
    q4 = wq.QuantizedArray(*map(jnp.asarray, wq.quantize_weight(w, "int4")))
    q4_128 = wq.QuantizedArray(*map(jnp.asarray, wq.quantize_weight(w, "int4", 128)))
    cases = {
        "float32 x @ w": (lambda x, w: x @ w, (jnp.asarray(w),)),
        # The same weight kept [out, in] (Hugging Face's layout): the contraction runs along contiguous memory.
        "float32 [out, in] layout, w_t @ x": (lambda x, w_t: (w_t @ x[0])[None], (jnp.asarray(w.T.copy()),)),
        "bf16 x @ w.astype(f32)": (lambda x, w: x @ w.astype(jnp.float32), (jnp.asarray(w, jnp.bfloat16),)),
        "bf16 in 8 tiles": (_bf16_tiles, (jnp.asarray(w, jnp.bfloat16),)),
        "int8 (x @ q.astype(f32)) * s, whole": (lambda x, q: (x @ q.values.astype(jnp.float32)) * q.scale, (q8,)),
        "int8 weight_quant.matmul (tiles)": (wq.matmul, (q8,)),
        "int4 x @ dequantize(whole)": (lambda x, q: x @ wq.dequantize_weight(q, jnp.float32), (q4,)),
        "int4 weight_quant.matmul (tiles), g=64": (wq.matmul, (q4,)),
        "int4 weight_quant.matmul (tiles), g=128": (wq.matmul, (q4_128,)),
    }
    print(f"| formulation ({d} x {f}, one token) | ms | stored GB/s |")
    print("|---|---|---|")
    for name, (fn, weights) in cases.items():
        t = time_median(jax.jit(fn), x, *weights, repeats=args.repeats)
        stored = sum(a.nbytes for a in jax.tree.leaves(weights))
        print(f"| {name} | {t * 1e3:.2f} | {stored / t / 1e9:.1f} |", flush=True)
    x_np = np.asarray(x)
    t = min(_seconds(lambda: x_np @ w) for _ in range(args.repeats))
    print(f"| numpy BLAS x @ w (all threads, best) | {t * 1e3:.2f} | {w.nbytes / t / 1e9:.1f} |", flush=True)


def _seconds(fn) -> float:
    import time
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---- a DeepSeek-V2-Lite-shaped folder, shard by shard ---------------------------------------------------

def write_folder(args):
    """Random bf16 weights (or, with --sparse, holes) for every tensor of the config, a tensor at a time."""
    total = write_synthetic_folder(args.dir, dict(V2_LITE, num_hidden_layers=args.layers), args.shard_bytes,
                                   "bfloat16", sparse=args.sparse)
    from ktjax.util.units import format_bytes

    print(f"wrote {args.dir}: {args.layers} layers, {format_bytes(total)} of bf16 weights"
          + (" (sparse: no data written)" if args.sparse else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("decode")
    d.add_argument("--layers", type=int, default=2, help="layer 0 dense (intermediate 10944), then MoE layers")
    d.add_argument("--vocab", type=int, default=4096, help="small: the lm_head stays float32 in every format")
    d.add_argument("--formats", nargs="+", default=["float32", "bf16", "int8", "int4"])
    d.add_argument("--prompt", type=int, default=16)
    d.add_argument("--steps", type=int, default=32)
    d.add_argument("--repeats", type=int, default=3)
    m = sub.add_parser("matvec")
    m.add_argument("--d-in", type=int, default=2048)
    m.add_argument("--d-out", type=int, default=8192)
    m.add_argument("--repeats", type=int, default=20)
    w = sub.add_parser("folder")
    w.add_argument("dir")
    w.add_argument("--layers", type=int, default=4)
    w.add_argument("--sparse", action="store_true")
    w.add_argument("--shard-bytes", type=int, default=2 * 10**9)
    args = p.parse_args(argv)
    {"decode": decode, "matvec": matvec, "folder": write_folder}[args.what](args)


if __name__ == "__main__":
    main()

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
import json
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timing import time_median  # noqa: E402  (benchmarks/timing.py)

V2_LITE = dict(architectures=["DeepseekV2ForCausalLM"], vocab_size=102400, hidden_size=2048,
               intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
               num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512,
               qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
               n_shared_experts=2, num_experts_per_tok=6, topk_method="greedy", n_group=1, topk_group=1,
               routed_scaling_factor=1.0, first_k_dense_replace=1, norm_topk_prob=False, rms_norm_eps=1e-6,
               max_position_embeddings=163840, bos_token_id=100000, eos_token_id=100001,
               tie_word_embeddings=False, torch_dtype="bfloat16",
               rope_theta=10000, rope_scaling={"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                                               "mscale": 0.707, "mscale_all_dim": 0.707,
                                               "original_max_position_embeddings": 4096})


# ---- decode tokens/s per format ----------------------------------------------------------------------

def _as_format(model, fmt):
    import jax.numpy as jnp
    from flax import nnx

    from ktjax import weight_quant as wq

    if fmt in wq.FORMATS:
        return wq.quantize_model(model, fmt)
    if fmt == "bf16":
        for path, var in list(nnx.state(model).flat_state()):
            if wq.quantized_paths(tuple(map(str, path))):
                wq.set_param(model, tuple(map(str, path)), var[...].astype(jnp.bfloat16))
    return model


def decode(args):
    import jax
    from flax import nnx

    import ktjax
    from ktjax import weight_quant as wq
    from ktjax.config import ModelConfig
    from ktjax.model import DeepseekModel
    from ktjax.runtime import resolve

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
                        if wq.quantized_paths(tuple(map(str, p))) for a in jax.tree.leaves(v[...]))
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

    from ktjax import weight_quant as wq

    d, f = args.d_in, args.d_out
    rng = np.random.default_rng(0)
    w = rng.standard_normal((d, f)).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((1, d)), jnp.float32)
    q8 = wq.QuantizedArray(*map(jnp.asarray, wq.quantize(w, "int8")))
    q4 = wq.QuantizedArray(*map(jnp.asarray, wq.quantize(w, "int4")))
    q4_128 = wq.QuantizedArray(*map(jnp.asarray, wq.quantize(w, "int4", 128)))
    cases = {
        "float32 x @ w": (lambda x, w: x @ w, (jnp.asarray(w),)),
        "bf16 x @ w.astype(f32)": (lambda x, w: x @ w.astype(jnp.float32), (jnp.asarray(w, jnp.bfloat16),)),
        "bf16 in 8 tiles": (_bf16_tiles, (jnp.asarray(w, jnp.bfloat16),)),
        "int8 (x @ q.astype(f32)) * s, whole": (lambda x, q: (x @ q.values.astype(jnp.float32)) * q.scale, (q8,)),
        "int8 weight_quant.matmul (tiles)": (wq.matmul, (q8,)),
        "int4 x @ dequantize(whole)": (lambda x, q: x @ wq.dequantize(q, jnp.float32), (q4,)),
        "int4 weight_quant.matmul (tiles), g=64": (wq.matmul, (q4,)),
        "int4 weight_quant.matmul (tiles), g=128": (wq.matmul, (q4_128,)),
    }
    print(f"| formulation ({d} x {f}, one token) | ms | stored GB/s |")
    print("|---|---|---|")
    for name, (fn, weights) in cases.items():
        t = time_median(jax.jit(fn), x, *weights, repeats=args.repeats)
        stored = sum(a.nbytes for a in jax.tree.leaves(weights))
        print(f"| {name} | {t * 1e3:.2f} | {stored / t / 1e9:.1f} |", flush=True)


# ---- a DeepSeek-V2-Lite-shaped folder, shard by shard ---------------------------------------------------

def write_folder(args):
    """Random bf16 weights (or, with --sparse, holes) for every tensor of the config, a shard at a time."""
    import ml_dtypes

    from ktjax.config import ModelConfig
    from ktjax.loader import layer_entries, top_entries

    config = dict(V2_LITE, num_hidden_layers=args.layers)
    os.makedirs(args.dir, exist_ok=True)
    with open(os.path.join(args.dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    cfg = ModelConfig.from_hf_dict(config)
    specs = [(n, s) for e in top_entries(cfg) for n, s in zip(e.sources, e.shapes)]
    for i in range(cfg.num_hidden_layers):
        entries = layer_entries(cfg, i, i >= cfg.num_dense_layers, set())
        specs += list(dict.fromkeys((n, s) for e in entries for n, s in zip(e.sources, e.shapes)))
    rng = np.random.default_rng(0)
    weight_map, shard, size, total = {}, [], 0, 0
    for name, shape in specs + [(None, None)]:
        nbytes = 0 if name is None else int(np.prod(shape)) * 2
        if shard and (name is None or size + nbytes > args.shard_bytes):
            file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            _write_shard(os.path.join(args.dir, file), shard, rng, args.sparse, ml_dtypes.bfloat16)
            weight_map.update({n: file for n, _ in shard})
            shard, size = [], 0
        if name is not None:
            shard.append((name, shape))
            size += nbytes
            total += nbytes
    with open(os.path.join(args.dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    print(f"wrote {args.dir}: {args.layers} layers, {total / 1e9:.2f} GB of bf16 weights"
          + (" (sparse: no data written)" if args.sparse else ""))


def _write_shard(path, tensors, rng, sparse, dtype):
    """safetensors by hand: an 8-byte header length, the JSON header, then each tensor's bytes in order."""
    header, offset = {}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        if sparse:
            f.truncate(8 + len(raw) + offset)  # a hole: the dry run reads headers only
            return
        for name, shape in tensors:
            scale = 1.0 if name.endswith("norm.weight") else 0.02  # norms near one, weights like an init
            values = rng.standard_normal(shape, dtype=np.float32) * scale
            if name.endswith("norm.weight"):
                values = 1.0 + values * 0.1
            f.write(values.astype(dtype).tobytes())


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

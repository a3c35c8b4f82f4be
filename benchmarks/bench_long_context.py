"""Sparse (DSA) against dense attention as the context grows: decode tokens/s and the time of one prefill chunk
at each context, per cache format.

The model: V2-Lite's attention dimensions (hidden 2048, 16 heads, kv_lora_rank 512, rope 64), 2 dense
layers, with an indexer of V3.2's shape scaled to it (16 index heads of 128, q_lora_rank 512, index_topk
2048) and random weights. The cache is filled with random latents and index keys up to the context (a
decode step's cost depends on the lengths, not on the values), then:
  prefill: one chunk of `--chunk` tokens appended at the context (ms per chunk);
  decode:  `--steps` greedy steps after it (tokens/s).
Dense is the same model with index_topk past the cache (the dense code). Compilation is excluded.

    PYTHONPATH=. python benchmarks/bench_long_context.py --quick           # contexts 1k, 2k, 4k; bf16 and fp8
    PYTHONPATH=. python benchmarks/bench_long_context.py                   # contexts 2k .. 64k (long on a CPU)
    PYTHONPATH=. python benchmarks/bench_long_context.py --contexts 4096 65536 --formats fp8 --modes sparse
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ktjax
from ktjax.model.config import ModelConfig
from ktjax.runtime import decode
from ktjax.model.decoder import DeepseekModel

CONFIG = dict(architectures=["DeepseekV32ForCausalLM"], vocab_size=8192, hidden_size=2048, intermediate_size=10944,
              num_hidden_layers=2, num_attention_heads=16, q_lora_rank=512, kv_lora_rank=512, qk_rope_head_dim=64,
              qk_nope_head_dim=128, v_head_dim=128, n_routed_experts=0, max_position_embeddings=2**18,
              index_topk=2048, index_head_dim=128, index_n_heads=16)
DENSE_TOPK = 2**30


def fill(cache, context: int, seed: int = 0):
    """Random latents and index keys in every layer's rows [0, context) of a cache."""
    cfg_rows = jnp.arange(context)[None]
    key = jax.random.key(seed)
    for layer in range(cache.c_kv.shape[0]):
        k1, k2, k3, key = jax.random.split(key, 4)
        c_kv = jax.random.normal(k1, (1, context, cache.rank))
        k_pe = jax.random.normal(k2, (1, context, cache.k_pe.shape[-1]))
        k_idx = None if cache.k_idx is None else jax.random.normal(k3, (1, context, cache.k_idx.shape[-1]))
        cache = cache.write(layer, cfg_rows, c_kv, k_pe, k_idx)
    return cache


def measure(engine, context: int, chunk: int, steps: int, decode_only: bool) -> tuple[float | None, float]:
    """(ms for one prefill chunk at `context` (None with decode_only), decode tokens/s after it)."""
    plan = engine.plan_cache(1, context + chunk + steps + 1)
    cache = jax.jit(fill, static_argnums=(1,), donate_argnums=(0,))(engine.new_cache(1, plan), context)
    if decode_only:
        return None, decode_rate(engine, cache, jnp.asarray([context], jnp.int32), steps)
    prefill = engine.step_programs(cache, 1, chunk, decode.MIN_STOPS).get(1, chunk, None)  # generate's prefill step
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (1, chunk)), jnp.int32)
    positions = (context + jnp.arange(chunk))[None].astype(jnp.int32)
    lengths = jnp.asarray([context + chunk], jnp.int32)
    last = jnp.asarray([chunk - 1], jnp.int32)
    times = []
    rows = decode.RowSampling.of(1, [], [], [], [], [], [])  # greedy
    for _ in range(2):  # the first run warms up
        t0 = time.perf_counter()
        cache, out = prefill(engine.state, cache, tokens, positions, lengths, last, rows)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return times[-1] * 1e3, decode_rate(engine, cache, lengths, steps)


def decode_rate(engine, cache, lengths, steps: int) -> float:
    """Greedy decode tokens/s over `steps` steps from a filled cache (second of two runs)."""
    program = engine.decode_program(cache, 1)  # the loop generate runs
    rates = []
    for _ in range(2):
        t0 = time.perf_counter()
        cache, out = program(engine.state, cache, *decode.free_running(1, lengths), jnp.int32(steps))
        jax.block_until_ready(out)
        rates.append(steps / (time.perf_counter() - t0))
    return rates[-1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--formats", nargs="+", default=["bf16", "fp8"])
    p.add_argument("--modes", nargs="+", default=["dense", "sparse"], choices=["dense", "sparse"])
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk appended at each context")
    p.add_argument("--steps", type=int, default=16, choices=range(1, decode.MAX_STEPS + 1), metavar="1-32",
                   help="decode steps timed (one dispatch)")
    p.add_argument("--quick", action="store_true", help="contexts 1k, 2k, 4k only")
    p.add_argument("--decode-only", action="store_true", help="skip the prefill chunk (dense prefill at 64k takes "
                                                              "minutes per chunk on a CPU)")
    a = p.parse_args(argv)
    contexts = [1024, 2048, 4096] if a.quick else a.contexts
    cfg = ModelConfig.from_hf_dict(CONFIG)
    model = DeepseekModel(cfg, rngs=nnx.Rngs(0))
    print(f"backend {jax.default_backend()}; index_topk {cfg.index_topk}; chunk {a.chunk}; {a.steps} decode steps")
    print("| context | cache | attention | prefill ms/chunk | decode tok/s | decode vs first context |")
    print("|---|---|---|---|---|---|")
    for fmt in a.formats:
        for mode in a.modes:
            engine = ktjax.load_model(cfg, model, cache_dtype=fmt, chunk_size=a.chunk,
                                      index_topk=DENSE_TOPK if mode == "dense" else None)
            first = None
            for context in contexts:
                ms, rate = measure(engine, context, a.chunk, a.steps, a.decode_only)
                first = first or rate
                prefill = "-" if ms is None else f"{ms:.0f}"
                print(f"| {context} | {fmt} | {mode} | {prefill} | {rate:.2f} | {rate / first:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

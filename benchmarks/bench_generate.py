"""Prefill and decode speed, cache bytes and peak memory: ktjax (each cache format) against Hugging Face
transformers (sdpa attention) on the same random weights.

    python benchmarks/bench_generate.py                                  # 1k, 4k, 16k prompts
    python benchmarks/bench_generate.py --lengths 1024 --formats bf16 int4 --decode-tokens 16
    python benchmarks/bench_generate.py --sweep --plot benchmarks/context_sweep.png   # 2k-32k, ktjax only

The model has DeepSeek-V2-Lite's attention dimensions (hidden 2048, 16 heads, kv_lora_rank 512, rope 64,
nope 128, v 128, no q_lora) and MoE shape (64 experts, top-6, 2 shared, moe_intermediate 1408), with
--layers layers (the first dense) and a --vocab vocabulary. Each measurement runs in its own subprocess so
that peak memory (the process's peak RSS) belongs to it alone. Speeds exclude compilation.

"% of roof" is decode tokens/s against the bandwidth roof: the bytes one decode step must read (the weights it
uses: everything but the routed experts, plus the selected experts of each MoE layer, and the cache up to the
context) at the best read bandwidth measured in the same run (a multi-threaded BLAS matrix-vector product
over a weight-sized float32 matrix, best of several).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# The workers import this checkout's ktjax, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_model_args(p):
    """The model's size flags (read by model_kwargs), shared by the benchmarks that build this model."""
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32000)


def model_kwargs(a):
    return dict(vocab_size=a.vocab, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                num_hidden_layers=a.layers, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
                kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                n_routed_experts=a.experts, n_shared_experts=2, num_experts_per_tok=6, topk_method="greedy",
                n_group=1, topk_group=1, first_k_dense_replace=1, max_position_embeddings=65536,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=0, eos_token_id=1)


def build(folder, a):
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(DeepseekV2Config(**model_kwargs(a)))
    model.save_pretrained(folder)


def convert_checkpoint(hf_dir: str, out: str, weights: str, lm_head: str | None = None) -> str:
    """hf_dir converted by ktjax's converter into `out` (--weights, and --lm-head when given) -> out."""
    from ktjax.weights.convert import main as convert_main

    extra = ["--lm-head", lm_head] if lm_head else []
    if convert_main(["--hf-dir", hf_dir, "--out", out, "--weights", weights, "--quiet", *extra]) != 0:
        raise SystemExit(f"converting {hf_dir} to {weights} failed")
    return out


def prompt_ids(length, vocab):
    import numpy as np
    return np.random.default_rng(length).integers(2, vocab, size=length).tolist()


def worker_ktjax(folder, fmt, length, a):
    import ktjax

    settings = {"activation_quant": a.activation_quant} if getattr(a, "activation_quant", None) else {}
    engine = ktjax.load(folder, cache_dtype=fmt, dtype="float32", chunk_size=a.chunk_size,
                        max_new_tokens=a.decode_tokens, ignore_eos=True, **settings)
    s = engine.generate([prompt_ids(length, a.vocab)]).stats
    return {k: s[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "compile_s", "cache_bytes_per_token",
                              "cache_bytes", "absorb_for_prefill", "time_to_first_token_s")}


def worker_hf(folder, length, a):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32).eval()
    ids = torch.as_tensor([prompt_ids(length, a.vocab)])
    t0 = time.perf_counter()
    out = model(ids, use_cache=True)
    prefill_s = time.perf_counter() - t0
    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(a.decode_tokens):
        out = model(tok, past_key_values=cache, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    decode_s = time.perf_counter() - t0
    cache_bytes = sum(t.numel() * 2 for layer in cache.layers for t in (layer.keys, layer.values))  # as bf16
    total = length + a.decode_tokens
    return {"prefill_tokens_per_s": length / prefill_s, "decode_tokens_per_s": a.decode_tokens / decode_s,
            "cache_bytes_per_token": cache_bytes / total, "cache_bytes": cache_bytes}


def read_bandwidth(megabytes: int = 512, repeats: int = 7) -> float:
    """Bytes/s that a BLAS matrix-vector product reads (numpy, all threads): best of `repeats`."""
    import numpy as np

    rows = megabytes * 2**20 // (4 * 4096)
    w, x = np.random.default_rng(0).standard_normal((rows, 4096), np.float32), np.ones(4096, np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        w @ x
        best = min(best, time.perf_counter() - t0)
    return w.nbytes / best


# stored bytes per weight of a quantized matrix [in, out]: values, plus float32 scales (int8 one per output,
# int4 one per 128 inputs and output)
BYTES_PER_WEIGHT = {"float32": lambda d_in: 4.0, "int8": lambda d_in: 1.0 + 4.0 / d_in, "int4": lambda d_in: 0.5 + 4.0 / 128}


def decode_bytes(a, context: int, cache_bytes_per_token: float, weights: str = "float32",
                 lm_head: str = "float32") -> float:
    """Bytes one decode step reads: weights used by one token (selected experts only, one embedding row) and the
    cache. `weights`: how the converter stored the attention projections, dense MLPs and experts (w_uk / w_uv,
    the router and norms stay float32); `lm_head`: float32 or int8 (--lm-head int8)."""
    k = model_kwargs(a)
    d, v, layers, experts = k["hidden_size"], k["vocab_size"], k["num_hidden_layers"], k["n_routed_experts"]
    h, r, rope, nope, dv = (k["num_attention_heads"], k["kv_lora_rank"], k["qk_rope_head_dim"],
                            k["qk_nope_head_dim"], k["v_head_dim"])
    per, f, fm = BYTES_PER_WEIGHT[weights], k["intermediate_size"], k["moe_intermediate_size"]
    # q [d, h (nope + rope)], kv_a [d, r + rope], o [h dv, d]: quantized; w_uk / w_uv [h, r, nope + dv]: float32
    attention = (d * h * (nope + rope) + d * (r + rope)) * per(d) + h * dv * d * per(h * dv) + 4 * h * r * (nope + dv)
    expert = 2 * d * fm * per(d) + fm * d * per(fm)
    moe_layer = 4 * d * experts + (k["num_experts_per_tok"] + k["n_shared_experts"]) * expert
    dense_layer = 2 * d * f * per(d) + f * d * per(f)
    first_dense = k["first_k_dense_replace"]
    # lm_head reads all of its weights; the embedding only the token's row
    head = v * d * BYTES_PER_WEIGHT[lm_head](d)
    read = layers * attention + first_dense * dense_layer + (layers - first_dense) * moe_layer + head + 4 * d
    return read + context * cache_bytes_per_token


def run_worker(argv):
    import resource
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True)
    p.add_argument("--folder")
    p.add_argument("--fmt")
    p.add_argument("--length", type=int)
    p.add_argument("--args")
    w = p.parse_args(argv)
    a = argparse.Namespace(**json.loads(w.args))
    if w.worker == "hf":
        torch_threads = os.cpu_count()
        import torch
        torch.set_num_threads(torch_threads)
        res = worker_hf(w.folder, w.length, a)
    else:
        res = worker_ktjax(w.folder, w.fmt, w.length, a)
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(res))


def measure(kind, folder, length, a, fmt=None):
    cmd = [sys.executable, __file__, "--worker", kind, "--folder", folder, "--length", str(length),
           "--args", json.dumps(vars(a))] + (["--fmt", fmt] if fmt else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    # A run that dies (the kernel's OOM killer leaves no traceback) is a result too: report it, go on.
    print(f"<!-- {kind} {fmt or ''} {length} failed with exit code {proc.returncode}: {proc.stderr[-300:]!r} -->",
          flush=True)
    return {"failed": proc.returncode}


def sweep(a):
    """Context sweep, ktjax only: decode and prefill tokens/s, time to first token, peak memory and % of roof
    per context and cache format; a table, and a plot with --plot."""
    bandwidth = read_bandwidth()
    print(f"read bandwidth (BLAS matvec, best of 7): {bandwidth / 1e9:.1f} GB/s")
    print("| context | cache | prefill tok/s | decode tok/s | first token s | peak RSS GiB | decode bytes/token MB "
          "| roof tok/s | % of roof |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        build(folder, a)
        for length in a.lengths:
            for fmt in a.formats:
                r = measure("ktjax", folder, length, a, fmt)
                if "failed" in r:
                    print(f"| {length} | {fmt} | failed (exit code {r['failed']}) | | | | | | |", flush=True)
                    continue
                per_token = decode_bytes(a, length, r["cache_bytes_per_token"])
                roof = bandwidth / per_token
                results.setdefault(fmt, []).append((length, r, roof))
                print(f"| {length} | {fmt} | {r['prefill_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.2f} | "
                      f"{r['time_to_first_token_s']:.2f} | {r['peak_rss_bytes'] / 2**30:.2f} | {per_token / 1e6:.0f} | "
                      f"{roof:.1f} | {100 * r['decode_tokens_per_s'] / roof:.0f}% |", flush=True)
    if a.plot:
        plot_sweep(results, a.plot)


def plot_sweep(results: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")  # a script writing a file: no display needed
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for (fmt, rows), marker in zip(results.items(), "os^vD"):
        contexts = [c for c, _, _ in rows]
        left.plot(contexts, [r["decode_tokens_per_s"] for _, r, _ in rows], marker=marker, label=f"ktjax {fmt}")
        right.plot(contexts, [r["prefill_tokens_per_s"] for _, r, _ in rows], marker=marker, label=fmt)
    first = next(iter(results.values()), [])
    left.plot([c for c, _, _ in first], [roof for _, _, roof in first], "k--", label="bandwidth roof")
    for ax, title in ((left, "decode tokens/s"), (right, "prefill tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", help="prompt lengths (default 1024 4096 16384; --sweep: 2048 "
                                                         "8192 16384 32768)")
    p.add_argument("--formats", nargs="+", help="cache formats (default all five; --sweep: bf16 int8 int4)")
    p.add_argument("--decode-tokens", type=int, default=32)
    add_model_args(p)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--sweep", action="store_true", help="context sweep (ktjax only; default lengths 2k 8k 16k 32k, "
                                                        "formats bf16 int8 int4) with %% of the bandwidth roof")
    p.add_argument("--plot", help="with --sweep: write a PNG of decode and prefill speed against context")
    a = p.parse_args(argv)
    a.lengths = a.lengths or ([2048, 8192, 16384, 32768] if a.sweep else [1024, 4096, 16384])
    a.formats = a.formats or (["bf16", "int8", "int4"] if a.sweep else ["float32", "bf16", "fp8", "int8", "int4"])
    if a.sweep:
        return sweep(a)
    import platform
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; layers={a.layers} "
          f"experts={a.experts} vocab={a.vocab} decode_tokens={a.decode_tokens} chunk={a.chunk_size}")
    print("| prompt | engine | cache | prefill tok/s | decode tok/s | cache B/token | peak RSS GiB | decode vs HF |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        build(folder, a)
        for length in a.lengths:
            hf = None if a.no_hf else measure("hf", folder, length, a)
            rows = ([("transformers (sdpa)", "bf16 latents*", hf)] if hf else []) + [
                ("ktjax", fmt, measure("ktjax", folder, length, a, fmt)) for fmt in a.formats]
            if hf and "failed" in hf:
                print(f"| {length} | transformers (sdpa) | bf16 latents* | failed (exit code {hf['failed']}: killed, "
                      "out of memory) | | | | |", flush=True)
                rows, hf = rows[1:], None
            for engine, fmt, r in rows:
                if "failed" in r:
                    print(f"| {length} | {engine} | {fmt} | failed (exit code {r['failed']}) | | | | |", flush=True)
                    continue
                ratio = f"{r['decode_tokens_per_s'] / hf['decode_tokens_per_s']:.1f}x" if hf else "-"
                print(f"| {length} | {engine} | {fmt} | {r['prefill_tokens_per_s']:.1f} | "
                      f"{r['decode_tokens_per_s']:.2f} | {r['cache_bytes_per_token']:.0f} | "
                      f"{r['peak_rss_bytes'] / 2**30:.2f} | {ratio} |", flush=True)
    print("* transformers 5.x caches DeepSeek's compressed latents (c_kv, k_pe) and re-expands them at every "
          "step; its bytes are counted as bf16.")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        run_worker(sys.argv[1:])
    else:
        main()

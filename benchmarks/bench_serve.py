"""Serving throughput through HTTP: aggregate decode tokens/s at 1, 4 and 16 concurrent streams, and the time to
first token of a request whose 4k-token prefix is cached against one whose prefix is not.

    python benchmarks/bench_serve.py                                    # V2-Lite dimensions, 2 layers
    python benchmarks/bench_serve.py --streams 1 4 --decode-tokens 16 --prefix 1024 --experts 8   # a small run
    python benchmarks/bench_serve.py --weights int8                     # int8 weights (lm_head too)
    python benchmarks/bench_serve.py --weights int8 --activation-quant int8   # and int8 activations

The model is bench_generate.py's (DeepSeek-V2-Lite's attention and MoE dimensions, --layers layers, random
weights; its window just holds the longest request) with the demo model's tokenizer; it is served by `python -m ktjax.serve` in a subprocess, and the
clients send token-id prompts over HTTP (streaming completions, ignore_eos). Every shape is run once first so
that compilation is not measured. Aggregate decode tokens/s: all streams' tokens after their first, over the
time from the first stream's first token to the last stream's last token. Goals: 16 streams >= 6x one stream;
TTFT with the prefix cached >= 5x faster.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, HERE)
import bench_generate  # noqa: E402  (the model)


def stream_once(url: str, prompt: list[int], max_tokens: int) -> dict:
    """One streaming completion -> {first, last (perf_counter times of the first and last token), tokens}."""
    import httpx

    # logprobs: a chunk that carries tokens carries their logprobs (the first chunk, sent at once, carries none)
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "logprobs": 1}
    t_start, first, last, usage, stamps = time.perf_counter(), None, None, None, []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["logprobs"]:
                now = time.perf_counter()
                first = first or now
                last = now
                stamps.extend([now] * len(chunk["choices"][0]["logprobs"]["tokens"]))
    return {"start": t_start, "first": first, "last": last, "tokens": usage["completion_tokens"],
            "cached": usage["prompt_tokens_details"]["cached_tokens"], "stamps": stamps}


def build(folder: str, a):
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(0)
    window = max(a.prefix + 64, a.prompt_tokens + a.decode_tokens)
    config = DeepseekV2Config(**{**bench_generate.model_kwargs(a), "max_position_embeddings": window})
    DeepseekV2ForCausalLM(config).save_pretrained(folder)


def concurrent(url: str, prompts: list[list[int]], max_tokens: int) -> dict:
    results = [None] * len(prompts)

    def run(i):
        results[i] = stream_once(url, prompts[i], max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # The window in which every stream is decoding: from the last first token (before it, some streams are
    # still prefilling) to the first stream's end (after it, fewer streams run).
    start, end = max(r["first"] for r in results), min(r["last"] for r in results)
    if len(results) == 1:
        start, end = results[0]["first"], results[0]["last"]
    decoded = sum(1 for r in results for t in r["stamps"] if start < t <= end)
    return {"streams": len(prompts), "decode_tokens_per_s": decoded / (end - start) if end > start else 0.0,
            "tokens": sum(r["tokens"] for r in results), "window_s": end - start}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length of the throughput streams")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--prefix", type=int, default=4096, help="cached-prefix length for the TTFT measurement")
    bench_generate.add_model_args(p)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--cache-dtype", default="bf16")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--memory-budget", help="passed to the server (the page pool is sized from it)")
    p.add_argument("--weights", default="float32", choices=("float32", "int8", "int4"),
                   help="int8 / int4: converted with --lm-head int8 (the server then runs ktjax's CPU kernels)")
    p.add_argument("--activation-quant", choices=("off", "int8"), help="passed to the server (int8 / int4 weights)")
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args(argv)

    import httpx
    import numpy as np


    rng = np.random.default_rng(0)
    results = {"args": vars(a)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "hf")
        build(folder, a)  # the window: the longest request, so that the server compiles no wider page tables
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(ROOT, "ktjax", "demo_model", name), folder)
        if a.weights != "float32":
            folder = bench_generate.convert_checkpoint(folder, os.path.join(tmp, a.weights), a.weights, "int8")
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "ktjax.serve", "--model", folder, "--served-model-name", "bench", "--port",
               str(port), "--max-batch", str(max(a.streams)), "--page-size", str(a.page_size), "--cache-dtype",
               a.cache_dtype, "--dtype", a.dtype, "--chunk-size", str(a.chunk_size), "--log-level", "warning",
               "--max-queue", str(4 * max(a.streams))] + (["--memory-budget", a.memory_budget] if a.memory_budget
                                                          else []) + (
            ["--activation-quant", a.activation_quant] if a.activation_quant else [])
        server = subprocess.Popen(cmd, cwd=ROOT)
        try:
            _wait_healthy(url, server)
            ids = lambda n: rng.integers(2, min(a.vocab, 2048), size=n).tolist()  # noqa: E731
            for n in a.streams:
                concurrent(url, [ids(a.prompt_tokens) for _ in range(n)], a.decode_tokens)  # compile
                r = concurrent(url, [ids(a.prompt_tokens) for _ in range(n)], a.decode_tokens)
                results[f"streams_{n}"] = r
                print(f"{n:3d} streams: {r['decode_tokens_per_s']:.1f} decode tokens/s aggregate", flush=True)
            one = results.get("streams_1", {}).get("decode_tokens_per_s")
            for n in a.streams:
                if one and n > 1:
                    results[f"speedup_{n}"] = results[f"streams_{n}"]["decode_tokens_per_s"] / one
                    print(f"{n:3d} streams / 1 stream: {results[f'speedup_{n}']:.2f}x")
            warm, prefix = ids(a.prefix), ids(a.prefix)
            stream_once(url, warm + ids(16), 2)                      # compile the long prefill
            cold = stream_once(url, prefix + ids(16), 2)             # prefix not cached
            hot = stream_once(url, prefix + ids(16), 2)              # the same prefix, a new suffix
            results["ttft_uncached_s"] = cold["first"] - cold["start"]
            results["ttft_cached_s"] = hot["first"] - hot["start"]
            results["cached_tokens"] = hot["cached"]
            results["ttft_speedup"] = results["ttft_uncached_s"] / results["ttft_cached_s"]
            print(f"TTFT {a.prefix}-token prefix: {results['ttft_uncached_s']:.3f} s uncached, "
                  f"{results['ttft_cached_s']:.3f} s cached ({hot['cached']} tokens from the prefix cache): "
                  f"{results['ttft_speedup']:.1f}x")
            results["metrics_sample"] = [line for line in httpx.get(url + "/metrics").text.splitlines()
                                         if line.startswith(("ktjax_pages", "ktjax_prefix", "ktjax_cache_bytes"))]
        finally:
            server.terminate()
            server.wait(120)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, timeout: float = 900):
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become healthy")


if __name__ == "__main__":
    main()

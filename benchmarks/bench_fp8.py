"""FP8 weights multiplied as FP8 operands (fp8_matmul fp8) against dequantizing them first (fp8_matmul dequantize).

    python benchmarks/bench_fp8.py speed [--rows 1 4 8] [--repeats 20] [--smoke]
        # DeepSeek-V3's matmul shapes (one layer's projections and one routed expert) with 128 x 128 block-scaled
        # e4m3 weights: median ms of each formulation, the weight's bytes over that time, JSON lines.
        # --smoke: small shapes, 2 repeats (checked in CI).
    python benchmarks/bench_fp8.py quality [--windows 8] [--window-len 128]
        # The built-in demo model with its matmul weights in DeepSeek's FP8 format (converted with --weights fp8):
        # teacher-forced held-out windows (ktjax/data/stdlib_docstrings.txt), the logits of FP8 products against
        # those of the dequantized weights: mean KL, top-1 agreement, largest logit change, perplexity of each.

The quality run lets every product take FP8 operands (the row limit FP8_PRODUCT_ROWS lifted for the run), so it
measures the products' rounding, not the rule that picks them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]
from eval_defer_experts import teacher_forced  # noqa: E402  (benchmarks/eval_defer_experts.py)
from numpy_references import FP8_QUANTIZATION_CONFIG, FP8_SHIPPED, fp8_quantize_blocks  # noqa: E402  (tests/)
from timing import time_median  # noqa: E402  (benchmarks/timing.py)

# [in, out] of DeepSeek-V3's matmuls (hidden 7168, q_lora 1536, 128 heads, kv_lora 512 + rope 64, expert 2048)
V3_SHAPES = {"q_a_proj": (7168, 1536), "q_b_proj": (1536, 24576), "kv_a_proj": (7168, 576),
             "o_proj": (16384, 7168), "expert gate/up": (7168, 2048), "expert down": (2048, 7168)}
SMOKE_SHAPES = {"q_a_proj": (256, 128), "expert down": (384, 256)}


def speed(a) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from ktjax.model.fp8 import block_scaled_matmul, dequantize

    rng = np.random.default_rng(0)
    shapes, repeats = (SMOKE_SHAPES, 2) if a.smoke else (V3_SHAPES, a.repeats)
    forms = {"dequantize": jax.jit(lambda x, q, s: x @ dequantize(q, s, x.dtype)),
             "fp8": jax.jit(lambda x, q, s: block_scaled_matmul(x, q, s).astype(x.dtype))}
    rows_out = []
    for name, (k, n) in shapes.items():
        q, scale = fp8_quantize_blocks(rng.normal(0, 0.02, (k, n)).astype(np.float32))
        q, scale = jax.device_put(q), jax.device_put(scale)
        for rows in a.rows:
            x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
            row = {"device": jax.devices()[0].device_kind, "matmul": name, "in": k, "out": n, "rows": rows,
                   "weight_mb": k * n / 1e6}
            for form, fn in forms.items():
                ms = round(1e3 * time_median(lambda: jax.block_until_ready(fn(x, q, scale)), repeats=repeats), 4)
                row[f"{form}_ms"] = ms
                row[f"{form}_weight_gb_per_s"] = round(k * n / ms / 1e6, 1)
            row["fp8_speedup"] = round(row["dequantize_ms"] / row["fp8_ms"], 3)
            print(json.dumps(row), flush=True)
            rows_out.append(row)
    return rows_out


def fp8_demo_folder(out: str) -> str:
    """The demo model as a Hugging Face folder in DeepSeek-V3's FP8 format, converted with --weights fp8."""
    from safetensors.numpy import save_file

    from ktjax.demo import DEMO_MODEL_DIR
    from ktjax.weights.convert import main as convert
    from ktjax.weights.safetensors_io import SafetensorsFile

    hf = os.path.join(out, "hf")
    shutil.copytree(DEMO_MODEL_DIR, hf)
    tensors = {}
    with SafetensorsFile(os.path.join(hf, "model.safetensors")) as f:
        for name in f.keys():
            w = np.array(f.get(name))
            if FP8_SHIPPED.search(name):
                tensors[name], tensors[name + "_scale_inv"] = fp8_quantize_blocks(w.astype(np.float32))
            else:
                tensors[name] = w
    save_file(tensors, os.path.join(hf, "model.safetensors"))
    with open(os.path.join(hf, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = FP8_QUANTIZATION_CONFIG
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump(config, f)
    converted = os.path.join(out, "fp8")
    if convert(["--hf-dir", hf, "--out", converted, "--weights", "fp8", "--quiet"]) != 0:
        raise SystemExit("conversion failed")
    return converted


def quality(a) -> dict:
    import ktjax
    from ktjax.demo.passkey import heldout_filler
    from ktjax.model import quantized
    from ktjax.runtime.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = fp8_demo_folder(tmp)
        text = heldout_filler(Tokenizer.from_folder(folder).tok)
        starts = np.random.default_rng(a.seed).integers(0, len(text) - a.window_len - 1, size=a.windows)
        windows = np.stack([text[s:s + a.window_len + 1] for s in starts])
        base = ktjax.load(folder, fp8_matmul="dequantize").logits(windows[:, :-1])
        quantized.FP8_PRODUCT_ROWS = 1 << 30  # every product as FP8 operands: the rounding, not the row rule
        engine = ktjax.load(folder, fp8_matmul="fp8")
        fp8 = engine.logits(windows[:, :-1])
    out = {"model": "demo (FP8 blocks of its weights)", "windows": a.windows, "window_len": a.window_len,
           "fp8_matmul": engine.backend.fp8_matmul, **teacher_forced(fp8, base, windows[:, 1:]),
           "perplexity_dequantized": teacher_forced(base, base, windows[:, 1:])["perplexity"]}
    print(json.dumps(out, indent=1))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    s.add_argument("--repeats", type=int, default=20)
    s.add_argument("--smoke", action="store_true")
    q = sub.add_parser("quality")
    q.add_argument("--windows", type=int, default=8)
    q.add_argument("--window-len", type=int, default=128)
    q.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    return speed(a) if a.what == "speed" else quality(a)


if __name__ == "__main__":
    main()

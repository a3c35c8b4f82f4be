"""ktjax against llama.cpp (and transformers) on the same random DeepSeek-V2-Lite-width model, side by side in
one run: prefill and decode tokens/s at one context, at equal weight precision.

    python benchmarks/bench_llamacpp.py --llama-cpp PATH/TO/llama.cpp [--length 2048] [--runs 3]

PATH/TO/llama.cpp is a llama.cpp source tree built with CMake (build/bin/llama-bench and llama-quantize; for
example the one vendored in the `llama-cpp-python` source distribution:
`pip download --no-binary :all: --no-deps llama-cpp-python`, unpack it, then in vendor/llama.cpp
`cmake -B build -DLLAMA_CURL=OFF && cmake --build build -j --target llama-bench llama-quantize`).

The model is benchmarks/bench_generate.py's (hidden 2048, 16 heads, kv_lora_rank 512, 64 experts top-6, first
layer dense), saved by transformers with a synthetic byte-level BPE tokenizer so that llama.cpp's converter
(convert_hf_to_gguf.py) accepts it; the tokenizer plays no part in the timing. Pairs compared:
  llama.cpp F32  / ktjax float32 weights       llama.cpp Q8_0 / ktjax int8 weights
  llama.cpp Q4_0 / ktjax int4 weights
ktjax's int8 and int4 checkpoints also store lm_head as int8 (--lm-head int8), as llama.cpp's Q8_0 and Q4_0 files
store it quantized (Q8_0 and Q6_K); ktjax runs with its default settings (cpu_kernels auto), and its int8 / int4
models once more with activation_quant int8 (rows "int8 +q8 act."): llama.cpp's Q8_0 / Q4_0 dot products quantize
the activations to 8 bits too (--activation-quant off skips these runs).
llama.cpp decodes with its default f16 KV cache at depth = --length (`llama-bench -d`); ktjax with a bf16
latent cache. Each engine runs in its own process, the engines alternate, and the best of --runs is kept.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_generate  # noqa: E402  (the model, the transformers worker and the bandwidth probe)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = (("F32", "float32"), ("Q8_0", "int8"), ("Q4_0", "int4"))
# ktjax's lm_head per weight format: quantized as llama.cpp's files store it (Q8_0 -> Q8_0, Q4_0 -> Q6_K)
LM_HEAD = {"float32": "kept", "int8": "int8", "int4": "int8"}
Q8 = " +q8 act."  # ktjax's rows run with activation_quant int8


def write_tokenizer(folder: str, vocab_size: int):
    """A byte-level BPE tokenizer with exactly vocab_size tokens: the 256 byte symbols, then two-symbol merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet.sort()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = []
    for a in alphabet:
        for b in alphabet:
            if len(vocab) >= vocab_size:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=alphabet[0], eos_token=alphabet[1]).save_pretrained(folder)


# Run llama.cpp's converter with its pre-tokenizer check answered (our synthetic tokenizer is not a known model's)
# and q_lora_rank written as 0 where the config has none (DeepSeek-V2-Lite's layout).
CONVERT = """
import runpy, sys
sys.path.insert(1, sys.argv[1])
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
from conversion import deepseek
set_params = deepseek.DeepseekV2Model.set_gguf_parameters
def with_q_lora_rank(self):  # this llama.cpp reads the key even when q_lora_rank is none (0: no q LoRA)
    set_params(self)
    if self.hparams.get("q_lora_rank") is None:
        self.gguf_writer.add_q_lora_rank(0)
deepseek.DeepseekV2Model.set_gguf_parameters = with_q_lora_rank
sys.argv = [sys.argv[1] + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def make_ggufs(llama_cpp: str, hf_dir: str, out_dir: str) -> dict:
    f32 = os.path.join(out_dir, "model-F32.gguf")
    subprocess.run([sys.executable, "-c", CONVERT, llama_cpp, hf_dir, "--outtype", "f32", "--outfile", f32],
                   check=True, capture_output=True)
    paths = {"F32": f32}
    for q in ("Q8_0", "Q4_0"):
        paths[q] = os.path.join(out_dir, f"model-{q}.gguf")
        subprocess.run([os.path.join(llama_cpp, "build", "bin", "llama-quantize"), f32, paths[q], q], check=True,
                       capture_output=True)
    return paths


def make_ktjax(hf_dir: str, out_dir: str) -> dict:
    paths = {}
    for w in ("float32", "int8", "int4"):
        paths[w] = os.path.join(out_dir, f"ktjax-{w}")
        subprocess.run([sys.executable, os.path.join(REPO, "convert", "hf_to_ktjax.py"), "--hf-dir", hf_dir, "--out",
                        paths[w], "--weights", w, "--quiet", "--lm-head", LM_HEAD[w]], check=True)
    return paths


def llama_bench(llama_cpp: str, gguf: str, length: int, decode_tokens: int, threads: int) -> dict:
    """(prefill tok/s of a `length` prompt, decode tok/s at depth `length`) from llama-bench's JSON."""
    exe = os.path.join(llama_cpp, "build", "bin", "llama-bench")
    out = {}
    for key, args in (("prefill_tokens_per_s", ["-p", str(length), "-n", "0"]),
                      ("decode_tokens_per_s", ["-p", "0", "-n", str(decode_tokens), "-d", str(length)])):
        proc = subprocess.run([exe, "-m", gguf, "-t", str(threads), "-r", "1", "-o", "json", *args],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            return {"failed": proc.returncode, "stderr": proc.stderr[-300:]}
        out[key] = json.loads(proc.stdout)[0]["avg_ts"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-cpp", required=True, help="llama.cpp source tree with build/bin/llama-bench")
    p.add_argument("--length", type=int, default=2048, help="prompt length and decode depth (default 2048)")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3, help="alternating runs per engine; the best is kept")
    bench_generate.add_model_args(p)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--activation-quant", dest="q8_runs", choices=("int8", "off"), default="int8",
                   help="int8 (default): also run ktjax's int8 / int4 models with activation_quant int8")
    a = p.parse_args(argv)
    q8 = argparse.Namespace(**{**vars(a), "activation_quant": "int8"})  # the worker reads activation_quant
    for tool in ("llama-bench", "llama-quantize"):
        if not os.path.isfile(os.path.join(a.llama_cpp, "build", "bin", tool)):
            p.exit(2, f"{p.prog}: error: {a.llama_cpp}/build/bin/{tool} not found: build llama.cpp first (see --help)\n")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; "
          f"layers={a.layers} experts={a.experts} vocab={a.vocab} length={a.length} decode_tokens={a.decode_tokens} "
          f"threads={a.threads} runs={a.runs}", flush=True)
    best: dict = {}

    def keep(name, r):
        if "failed" in r:
            print(f"<!-- {name} failed: {r} -->", flush=True)
            return
        old = best.setdefault(name, dict(r))
        for k in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            old[k] = max(old[k], r[k])

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        bench_generate.build(hf_dir, a)
        write_tokenizer(hf_dir, a.vocab)
        ggufs, ktjax_dirs = make_ggufs(a.llama_cpp, hf_dir, tmp), make_ktjax(hf_dir, tmp)
        bandwidth = bench_generate.read_bandwidth()
        for run in range(a.runs):
            for q, w in PAIRS:
                keep(("llama.cpp", q), llama_bench(a.llama_cpp, ggufs[q], a.length, a.decode_tokens, a.threads))
                keep(("ktjax", w), bench_generate.measure("ktjax", ktjax_dirs[w], a.length, a, "bf16"))
                if w != "float32" and a.q8_runs == "int8":
                    keep(("ktjax", w + Q8), bench_generate.measure("ktjax", ktjax_dirs[w], a.length, q8, "bf16"))
            if not a.no_hf:
                keep(("transformers", "float32"), bench_generate.measure("hf", hf_dir, a.length, a))
            print(f"run {run + 1}/{a.runs} done", flush=True)
    roof = bandwidth / bench_generate.decode_bytes(a, a.length, 0)
    print(f"read bandwidth (BLAS matvec, best of 7): {bandwidth / 1e9:.1f} GB/s; float32 decode roof {roof:.1f} tok/s "
          "(weights only)")
    print("| engine | weights | prefill tok/s | decode tok/s | ktjax decode / this | ktjax prefill / this "
          "| ktjax +q8 act. decode / this | ktjax +q8 act. prefill / this |")
    print("|---|---|---|---|---|---|---|---|")
    ref = {name: best.get(("ktjax", name)) for _, w in PAIRS for name in (w, w + Q8)}

    def ratios(k, r):
        if not k:
            return "- | -"
        return (f"{k['decode_tokens_per_s'] / r['decode_tokens_per_s']:.2f}x | "
                f"{k['prefill_tokens_per_s'] / r['prefill_tokens_per_s']:.2f}x")

    for (engine, weights), r in best.items():
        w = {"F32": "float32", "Q8_0": "int8", "Q4_0": "int4"}.get(weights, weights)
        cells = "- | - | - | -" if engine == "ktjax" else f"{ratios(ref.get(w), r)} | {ratios(ref.get(w + Q8), r)}"
        print(f"| {engine} | {weights} | {r['prefill_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.2f} | {cells} |")
    for w in [w for _, w in PAIRS] + [w + Q8 for _, w in PAIRS[1:]]:
        if ref.get(w):
            weights = w.removesuffix(Q8)
            per_token = bench_generate.decode_bytes(a, a.length, a.layers * 576 * 2, weights,  # bf16 c_kv + k_pe
                                                    "int8" if LM_HEAD[weights] == "int8" else "float32")
            rate = ref[w]["decode_tokens_per_s"]
            print(f"ktjax {w}: {per_token / 1e6:.0f} MB read per decode step (weights + bf16 cache); "
                  f"{rate:.2f} tok/s = {100 * rate * per_token / bandwidth:.0f}% of the roof at {bandwidth / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()

"""benchmarks/gpu_e2e.py --cpu-smoke: its rows hold real figures, its roofs are bytes over bandwidth by the
formula, and the random checkpoint it writes is the model it claims to be: transformers, running the
checkpoint's weights dequantized by numpy, gives the same logits and the same greedy tokens."""
import json
import os
import sys

import numpy as np
import pytest

from hf_models import hf_logits, load_oracle, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_e2e  # noqa: E402

PARITY = 1e-4  # the README's bound against transformers: max|ktjax - hf| <= 1e-4 * max|hf|
NEW_TOKENS = 9  # the smoke mode's tokens per generate call


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_e2e")
    out = tmp / "rows.jsonl"
    rc = gpu_e2e.main(["--cpu-smoke", "--out", str(out), "--out-dir", str(tmp / "ckpt"), "--keep"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return rc, rows, tmp / "ckpt"


def _rows(rows, kind):
    return [r for r in rows if r["row"] == kind]


def test_every_measurement_ran_with_positive_figures(smoke):
    rc, rows, _ = smoke
    assert rc == 0 and not _rows(rows, "error") and not _rows(rows, "skipped"), rows
    assert {r["weights"] for r in _rows(rows, "build")} == {"int4", "int8"}
    assert all(r["bytes"] > 0 and os.path.isdir(r["path"]) for r in _rows(rows, "build"))
    assert [r["phase"] for r in _rows(rows, "load")] == ["int4", "int8-64MiB"]
    assert all(r["load_s"] > 0 and r["weight_bytes"] > r["expert_bytes"] > 0 for r in _rows(rows, "load"))
    generate = _rows(rows, "generate")
    # int4 weights: a bf16 cache; the budget phase (int8 weights, cache_lens auto): an int8 cache
    assert [(r["weights"], r["cache_dtype"]) for r in generate] == [("int4", "bf16"), ("int8", "int8")]
    for r in generate:
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["ttft_s"] > 0, r
        assert r["compile_s"] > 0 and r["peak_memory_bytes"] > 0 and r["generated_tokens"] == NEW_TOKENS
        assert r["prompt_tokens"] == 64 - NEW_TOKENS
    assert generate[-1]["context"] > 64  # cache_lens auto under the budget planned past the prompt
    decode = _rows(rows, "decode")
    assert len(decode) == 2 and all(r["batch"] == 8 and r["decode_tokens_per_s"] > 0 for r in decode)
    summary = rows[-1]
    assert summary["row"] == "summary" and summary["rows"] == len(rows) - 1 and summary["errors"] == 0


def _bytes_per_token(cfg, fmt):
    """Cache bytes (docs/long-context.md): per layer, c_kv (kv_lora_rank) and k_pe (rope, bf16); int8 stores c_kv in
    bytes with a float32 scale per 128 of it."""
    r, rope = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    per_layer = {"bf16": 2 * (r + rope), "int8": r + 2 * rope + 4 * -(-r // 128)}[fmt]
    return cfg["num_hidden_layers"] * per_layer


def _stored_expert_bytes(folder):
    from ktjax.weights.checkpoint import read_manifest

    tensors = read_manifest(folder)["tensors"]
    return sum(int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize for key, t in tensors.items()
               if any(f"mlp.{w}" in key for w in ("w_gate", "w_up", "w_down")))


def test_roof_is_the_bytes_a_step_reads_over_the_bandwidth(smoke):
    _, rows, _ = smoke
    cfg = json.load(open(os.path.join(_rows(rows, "build")[0]["path"], "config.json")))
    e, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    folders = {r["weights"]: r["path"] for r in _rows(rows, "build")}
    loads = {r["phase"]: r for r in _rows(rows, "load")}
    bandwidth = {r["phase"]: r["bytes_per_s"] for r in _rows(rows, "bandwidth")}
    for load in loads.values():
        assert load["expert_bytes"] == _stored_expert_bytes(folders[load["weights"]])  # held as stored
    for r in _rows(rows, "generate") + _rows(rows, "decode"):
        load, b = loads[r["phase"]], r["batch"]
        context = r.get("context_tokens", r.get("prompt_tokens"))
        experts = e * (1 - (1 - k / e) ** b)  # distinct experts b tokens select, expected (k at b = 1)
        want = load["non_expert_bytes"] + load["expert_bytes"] * experts / e
        assert r["weight_bytes_per_step"] == pytest.approx(want)
        assert r["cache_bytes_per_token"] == _bytes_per_token(cfg, r["cache_dtype"])
        assert r["cache_bytes_per_step"] == b * context * r["cache_bytes_per_token"]
        assert r["bytes_per_step"] == pytest.approx(r["weight_bytes_per_step"] + r["cache_bytes_per_step"])
        assert r["bandwidth_bytes_per_s"] == bandwidth[r["phase"]] > 0
        assert r["roof_tokens_per_s"] == pytest.approx(b * r["bandwidth_bytes_per_s"] / r["bytes_per_step"])
        assert r["fraction_of_roof"] == pytest.approx(r["decode_tokens_per_s"] / r["roof_tokens_per_s"])


# ---- the checkpoint against transformers ---------------------------------------------------------------

def _dequantize(values, scales, d_in):
    """quantized.py's stored layout, transcribed: int8 values x per-output scales; int4 packed two per byte,
    group k's rows k g + j in the low nibble and k g + g/2 + j in the high one of packed row k g/2 + j, each
    nibble minus 8 times its group's scale."""
    if values.dtype == np.int8:
        return values.astype(np.float32) * scales
    *lead, half, d_out = values.shape
    groups = scales.shape[-2]
    g = 2 * half // groups
    packed = values.reshape(*lead, groups, g // 2, d_out)
    nibbles = np.concatenate([packed & 15, packed >> 4], axis=-2).astype(np.float32) - 8  # [.., groups, g, out]
    return (nibbles * scales[..., :, None, :]).reshape(*lead, groups * g, d_out)[..., :d_in, :]


def _dequantized_state(folder, cfg):
    """The checkpoint's parameters as the model's pure state dict (layer stacks stacked), float32."""
    from ktjax.weights import params
    from ktjax.weights.checkpoint import read_manifest, read_tensor, scale_key, tensor_key

    tensors = read_manifest(folder)["tensors"]
    state = {}

    def read(key, shape):
        values = read_tensor(folder, key)
        if tensors[key]["dtype"] in ("int8", "uint8"):
            return _dequantize(values, read_tensor(folder, scale_key(key)), shape[-2])
        return np.asarray(values, np.float32)

    for row, stack, shape in params.model_params(cfg):
        if stack is None:
            value = read(tensor_key(row.path), shape)
        else:
            value = np.stack([read(tensor_key(row.path, i), shape) for i in stack.layers(cfg)])
        node = state if stack is None else state.setdefault(stack.name, {})
        for name in row.path[:-1]:
            node = node.setdefault(name, {})
        node[row.path[-1]] = value
    return state


def _oracle(folder, tmp_path):
    """transformers' DeepseekV2 (or V3) with the checkpoint's weights, dequantized by numpy."""
    from safetensors.numpy import save_file

    from ktjax.model.config import ModelConfig
    from ktjax.weights import params

    raw = json.load(open(os.path.join(folder, "config.json")))
    cfg = ModelConfig.from_hf_dict(raw)
    hf = params.hf_tensors(cfg, _dequantized_state(folder, cfg))
    save_file({n: np.ascontiguousarray(t, np.float32) for n, t in hf.items()}, str(tmp_path / "model.safetensors"))
    json.dump(dict(raw, model_type=raw.get("model_type", "deepseek_v2"), torch_dtype="float32"),
              open(tmp_path / "config.json", "w"))
    return load_oracle(str(tmp_path))


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_checkpoint_is_the_model_transformers_runs(smoke, tmp_path, weights):
    import ktjax

    _, rows, _ = smoke
    folder = next(r["path"] for r in _rows(rows, "build") if r["weights"] == weights)
    oracle = _oracle(folder, tmp_path)
    engine = ktjax.load(folder)  # float32, as the smoke run
    vocab = engine.cfg.vocab_size
    prompt = gpu_e2e.prompt_ids(64 - NEW_TOKENS, vocab)
    assert rel_err(engine.logits(np.asarray([prompt])), hf_logits(oracle, np.asarray([prompt]))) <= PARITY
    # the benchmark's own generate calls (each cache format) decoded what transformers decodes, greedily
    ids = list(prompt)
    for _ in range(8):
        ids.append(int(np.argmax(hf_logits(oracle, np.asarray([ids]))[0, -1])))
    for r in _rows(rows, "generate"):
        if r["weights"] == weights:
            assert r["first_tokens"] == ids[len(prompt):], r["cache_dtype"]


# ---- --hybrid: V3 dimensions, the routed experts in host memory (issue 28) ---------------------------------

@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_e2e_hybrid")
    out = tmp / "rows.jsonl"
    rc = gpu_e2e.main(["--hybrid", "--cpu-smoke", "--out", str(out), "--out-dir", str(tmp / "ckpt"), "--keep"])
    return rc, [json.loads(line) for line in out.read_text().splitlines()]


def test_hybrid_rows_per_layer_extrapolated_and_against_host_bandwidth(hybrid):
    rc, rows = hybrid
    assert rc == 0 and not _rows(rows, "error") and not _rows(rows, "skipped"), rows
    folder = _rows(rows, "build")[0]["path"]
    cfg = json.load(open(os.path.join(folder, "config.json")))
    assert cfg["model_type"] == "deepseek_v3" and cfg["n_routed_experts"] == 16
    loads = _rows(rows, "load")
    assert [(r["phase"], r["settings"].get("experts"), r["settings"].get("defer_experts")) for r in loads] == [
        ("host", "host", None), ("host-defer2", "host", 2)]
    host_bw = {r["phase"]: r["bytes_per_s"] for r in _rows(rows, "host_bandwidth")}
    layers, moe = cfg["num_hidden_layers"], cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    one_expert = _stored_expert_bytes(folder) / (moe * cfg["n_routed_experts"])
    generate = _rows(rows, "generate")
    assert [r["phase"] for r in generate] == ["host", "host-defer2"]
    for r in generate:
        steps = r["decode_tokens_per_s"]  # one sequence: a token per step
        assert (r["layers"], r["moe_layers"]) == (layers, moe)
        assert r["decode_ms_per_layer"] == pytest.approx(1e3 / steps / layers)
        assert r["decode_tokens_per_s_61"] == pytest.approx(steps * layers / 61)
        assert r["prefill_tokens_per_s_61"] == pytest.approx(r["prefill_tokens_per_s"] * layers / 61)
        assert r["host_expert_bytes_per_step"] == pytest.approx(moe * cfg["num_experts_per_tok"] * one_expert)
        assert r["host_expert_read_bytes_per_s"] == pytest.approx(r["host_expert_bytes_per_step"] * steps)
        assert r["host_bandwidth_bytes_per_s"] == host_bw[r["phase"]] > 0
        assert r["host_expert_read_fraction"] == pytest.approx(r["host_expert_read_bytes_per_s"] / host_bw[r["phase"]])


def test_hybrid_checkpoint_with_host_experts_decodes_what_transformers_does(hybrid, tmp_path):
    _, rows = hybrid
    folder = _rows(rows, "build")[0]["path"]
    oracle = _oracle(folder, tmp_path)  # DeepseekV3: sigmoid routing with its bias and groups
    prompt = gpu_e2e.prompt_ids(64 - NEW_TOKENS, json.load(open(os.path.join(folder, "config.json")))["vocab_size"])
    ids = list(prompt)
    for _ in range(8):
        ids.append(int(np.argmax(hf_logits(oracle, np.asarray([ids]))[0, -1])))
    host = next(r for r in _rows(rows, "generate") if r["phase"] == "host")
    assert host["prompt_tokens"] == len(prompt) and host["first_tokens"] == ids[len(prompt):]


# ---- bad input: one line, exit code 2, nothing of the user's touched ----------------------------------------

SMOKE = ["--cpu-smoke"]


def _file_as_out_dir(tmp_path):
    (tmp_path / "f").write_text("mine")
    return SMOKE + ["--out-dir", str(tmp_path / "f")], "is not a folder"


def _user_folder_in_the_way(tmp_path):
    (tmp_path / "cpu_smoke-2L-int8").mkdir()
    (tmp_path / "cpu_smoke-2L-int8" / "notes.txt").write_text("mine")
    return SMOKE + ["--out-dir", str(tmp_path)], "exists and is not this benchmark's checkpoint"


BAD_INPUT = {  # case -> tmp_path -> (argv, what the one-line message says)
    "zero layers": lambda tmp: (SMOKE + ["--layers", "0"], "must be positive"),
    "negative deadline": lambda tmp: (SMOKE + ["--deadline", "-1"], "must be positive"),
    "tiny context": lambda tmp: (SMOKE + ["--contexts", "8"], "at least 16 tokens"),
    "context shorter than the decode": lambda tmp: (["--cpu", "--contexts", "16"], "leaves no room for the prompt"),
    "both modes": lambda tmp: (SMOKE + ["--cpu"], "not allowed with argument"),
    "hybrid on the CPU at full size": lambda tmp: (["--hybrid", "--cpu"], "--hybrid runs on a GPU"),
    "no deferral to compare": lambda tmp: (["--hybrid", "--cpu-smoke", "--defer", "0"], "must be positive"),
    "unknown setting": lambda tmp: (SMOKE + ["--settings", "colour=red"], "unknown setting"),
    "bad setting value": lambda tmp: (SMOKE + ["--settings", "cache_dtype=int3"], "cache_dtype"),
    "setting without a value": lambda tmp: (SMOKE + ["--settings", "dtype"], "KEY=VALUE"),
    "out-dir is a file": _file_as_out_dir,
    "out in a missing folder": lambda tmp: (SMOKE + ["--out", str(tmp / "no" / "rows.jsonl")],
                                            "not a file in an existing"),
    "a folder in the way": _user_folder_in_the_way,
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    argv, pattern = BAD_INPUT[case](tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert gpu_e2e.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert pattern in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written, nothing removed

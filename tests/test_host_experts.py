"""experts: host (ktjax/cpu/host_experts.py): the routed experts in the host expert store, summed by one XLA FFI
call per MoE layer. The call against numpy written from the definition (SwiGLU experts, routing-weighted sum) in
every store format (float32, bf16, int8, int4); the Engine's logits and greedy tokens with experts host equal
experts device (same numbers up to float rounding, the same tokens) for float32, int8 and int4 weights with
gpu_experts none, some (a list, and the most-routed over a calibration prompt) and all, through the API, the
loader's streaming fill, a converted checkpoint, bf16 compute, the CLI and the server's scheduler; the GPU bridge
compiled against the CUDA headers where they are; and where it cannot run, one KtjaxError."""
from __future__ import annotations

import json
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ktjax
from ktjax.errors import KtjaxError
from ktjax.model.config import ModelConfig
from ktjax.model.decoder import DeepseekModel
from ktjax.model.quantized import dequantize_weight_np, quantize_weight
from ktjax.weights.quantize import quantize_model
from hf_models import CONFIGS

pytestmark = pytest.mark.usefixtures("cpu_kernels_built")

CFG = ModelConfig.from_hf_dict(dict(CONFIGS["v2_lite"][1], architectures=["DeepseekV2ForCausalLM"]))
E = CFG.n_routed_experts


# ---- the FFI call against numpy ------------------------------------------------------------------------

def _silu(x):
    return x / (1.0 + np.exp(-x))


def _reference(x, ids, w, gate, up, down):
    """numpy from the definition: y[t] = sum over slots j with ids >= 0 of w[t, j] * down(silu(gate x) * up x),
    float64, with each expert's float weights [in, out]."""
    y = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            if e < 0:
                continue
            xt = x[t].astype(np.float64)
            h = _silu(xt @ gate[e]) * (xt @ up[e])
            y[t] += w[t, j] * (h @ down[e])
    return y


def _weights(rng, fmt, d_in, d_out):
    """E experts' weight [in, out]: -> (what the store is given, (values, scale) each; their float values)."""
    pairs, floats = [], []
    for _ in range(E):
        w = rng.standard_normal((d_in, d_out)).astype(np.float32) / np.sqrt(d_in)
        if fmt in ("int8", "int4"):
            values, scale = quantize_weight(w, fmt, 32 if fmt == "int4" else 128)
            pairs.append((values, scale))
            floats.append(dequantize_weight_np(values, scale, d_in))
        elif fmt == "bfloat16":
            b = w.astype(jnp.bfloat16)
            pairs.append((b, None))
            floats.append(b.astype(np.float32))
        else:
            pairs.append((w, None))
            floats.append(w)
    return pairs, floats


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8", "int4"])
@pytest.mark.parametrize("rows", [1, 5, 70])
def test_the_host_call_is_the_swiglu_sum(rng, fmt, rows):
    """One call (a decode row, a batch, a prefill chunk) equals numpy's sum over the routed experts; assignments
    to experts kept on the device (-1 - e) are left out of the sum and still counted."""
    from ktjax.cpu.host_experts import HostExpertStore

    d, f, k = 64, 96, 3
    gate, gate_f = _weights(rng, fmt, d, f)
    up, up_f = _weights(rng, fmt, d, f)
    down, down_f = _weights(rng, fmt, f, d)
    store = HostExpertStore()
    store.fill_layer(7, gate, up, down)
    x = rng.standard_normal((rows, d)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:k] for _ in range(rows)]).astype(np.int32)
    w = rng.random((rows, k)).astype(np.float32)
    kept = np.isin(ids, [2, 5])
    sent = np.where(kept, -1 - ids, ids).astype(np.int32)
    y = jax.jit(store.host_sum(7))(x, sent, w)
    want = _reference(x, np.where(kept, -1, ids), w, gate_f, up_f, down_f)
    np.testing.assert_allclose(np.asarray(y), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    np.testing.assert_array_equal(store.counts()[7], np.bincount(ids.ravel(), minlength=E))


def test_expert_ids_out_of_range_are_refused(rng):
    from ktjax.cpu.host_experts import HostExpertStore

    pairs, _ = _weights(rng, "float32", 32, 32)
    store = HostExpertStore()
    store.fill_layer(0, pairs, pairs, pairs)
    x = np.zeros((1, 32), np.float32)
    with pytest.raises(Exception, match="expert id out of range"):
        jax.block_until_ready(store.host_sum(0)(x, np.array([[E]], np.int32), np.ones((1, 1), np.float32)))


# ---- the Engine: experts host equals experts device -----------------------------------------------------

def _model(fmt: str):
    model = DeepseekModel(CFG, rngs=nnx.Rngs(0))
    return quantize_model(model, fmt) if fmt != "float32" else model


PROMPTS = np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 40))


@pytest.fixture(scope="module")
def device_runs():
    """Per weight format: (full-forward logits, greedy tokens) with experts device, computed once."""
    runs = {}

    def get(fmt):
        if fmt not in runs:
            engine = ktjax.load_model(CFG, _model(fmt))
            runs[fmt] = (engine.logits(PROMPTS), engine.generate(PROMPTS.tolist(), max_new_tokens=6,
                                                                  temperature=0).tokens)
        return runs[fmt]

    return get


# (weight format, gpu_experts): none, a list, the most-routed N (calibration), all
CASES = [("float32", 0), ("int4", 2), pytest.param("int8", "0,3", marks=pytest.mark.slow),
         pytest.param("float32", E, marks=pytest.mark.slow), pytest.param("int4", 0, marks=pytest.mark.slow)]


@pytest.mark.parametrize("fmt, gpu_experts", CASES)
def test_host_experts_equal_device_experts(device_runs, fmt, gpu_experts):
    logits, tokens = device_runs(fmt)
    engine = ktjax.load_model(CFG, _model(fmt), experts="host", gpu_experts=gpu_experts)
    kept = _kept(engine)
    n_kept = {0: 0, 2: 2, "0,3": 2, E: E}[gpu_experts]
    assert all(len(k) == n_kept for k in kept), kept
    if gpu_experts == "0,3":
        assert all(k == (0, 3) for k in kept)
    np.testing.assert_allclose(engine.logits(PROMPTS), logits, rtol=0, atol=1e-5 * np.abs(logits).max())
    assert engine.generate(PROMPTS.tolist(), max_new_tokens=6, temperature=0).tokens == tokens
    # the store holds every routed expert; the device state only the kept ones
    assert engine.host_experts.nbytes > 0 and len(engine.host_experts.layers) == CFG.num_moe_layers


def _kept(engine) -> list[tuple]:
    """Each MoE layer's experts kept on the device (the ids its HostedExperts hold)."""
    from ktjax.model.moe import HostedExperts
    gate = engine.state["moe_layers"]["mlp"]["w_gate"]
    leaves = jax.tree.leaves(gate, is_leaf=lambda x: isinstance(x, HostedExperts))
    return [h.kept for h in leaves[:CFG.num_moe_layers]]


def test_calibration_keeps_the_most_routed_experts():
    """gpu_experts N keeps, per layer, the N experts the calibration prompt routed to most: the routing counts
    of a host engine over the same prompt pick the same ones."""
    from ktjax.runtime.backend import CALIBRATION_TOKENS, routing_counts

    engine = ktjax.load_model(CFG, _model("float32"), experts="host")
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, CALIBRATION_TOKENS)
    counts = routing_counts(engine, ids[None])
    assert counts.shape == (CFG.num_moe_layers, E)
    assert counts.sum() == CFG.num_moe_layers * ids.size * CFG.num_experts_per_tok
    kept = ktjax.load_model(CFG, _model("float32"), experts="host", gpu_experts=3)
    want = [tuple(sorted(np.argsort(-c, kind="stable")[:3].tolist())) for c in counts]
    assert _kept(kept) == want


def test_a_folder_loads_its_experts_straight_into_the_store(hf_folder, monkeypatch):
    """ktjax.load of a Hugging Face folder with experts host: the loader puts each expert's tensor into the store
    as it reads it (the Engine never moves experts out of a state), the model state holds no routed expert, the
    store holds exactly their bytes, and the logits equal experts device's."""
    from ktjax.cpu import backend as cpu_backend

    folder, _ = hf_folder("v2_lite")
    device = ktjax.load(folder)
    want = device.logits(PROMPTS)

    def moved(*args, **kwargs):
        raise AssertionError("the loader should have filled the store")

    monkeypatch.setattr(cpu_backend, "store_experts", moved)
    host = ktjax.load(folder, experts="host")
    cfg = host.cfg
    expert_bytes = cfg.num_moe_layers * cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
    assert host.host_experts.nbytes == expert_bytes
    assert host.weight_bytes == device.weight_bytes - expert_bytes
    np.testing.assert_allclose(host.logits(PROMPTS), want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.slow
def test_bf16_experts_from_a_folder(hf_folder):
    """dtype bf16: the loader streams bf16 experts into the store (its bf16 format, widened in registers); the
    greedy tokens equal experts device's, and the logits are as close to the float32 model's as the device path's
    (which rounds each expert product to bf16 where the store sums in float32): within 1.25x its error."""
    folder, _ = hf_folder("v2_lite")
    reference = ktjax.load(folder).logits(PROMPTS)
    device, host = ktjax.load(folder, dtype="bf16"), ktjax.load(folder, dtype="bf16", experts="host")
    assert {s.fmt for s in host.host_experts.layers.values()} == {"bfloat16"}
    errors = [np.abs(engine.logits(PROMPTS) - reference).max() for engine in (device, host)]
    assert errors[1] <= 1.25 * errors[0], errors
    tokens = [engine.generate(PROMPTS.tolist(), max_new_tokens=6, temperature=0).tokens for engine in (device, host)]
    assert tokens[1] == tokens[0]


@pytest.mark.slow
def test_a_converted_int4_checkpoint_with_int8_activations(hf_folder, tmp_path):
    """A converted int4 checkpoint (lm_head int8) under activation_quant int8: the store runs the same
    int8-activation products as the device path, and the greedy tokens agree."""
    from ktjax.weights.convert import main as convert_main

    folder = str(tmp_path / "int4")
    assert convert_main(["--hf-dir", hf_folder("v2_lite")[0], "--out", folder, "--weights", "int4", "--lm-head",
                         "int8", "--quiet"]) == 0
    runs = [ktjax.load(folder, activation_quant="int8", experts=place) for place in ("device", "host")]
    logits = [engine.logits(PROMPTS) for engine in runs]
    np.testing.assert_allclose(logits[1], logits[0], rtol=0, atol=1e-5 * np.abs(logits[0]).max())
    tokens = [engine.generate(PROMPTS.tolist(), max_new_tokens=6, temperature=0).tokens for engine in runs]
    assert tokens[1] == tokens[0]


def test_the_cli_runs_experts_on_the_host(hf_folder, tmp_path, capsys):
    """python -m ktjax.generate --experts host --gpu-experts 1: the same greedy tokens as experts device."""
    from ktjax.cli.generate import main
    from tokenizer_fixture import write_tokenizer

    folder = str(tmp_path / "model")
    shutil.copytree(hf_folder("v2_lite")[0], folder)
    write_tokenizer(folder)
    out = {}
    for place in ("device", "host"):
        rc = main(["--model", folder, "--prompt", "the quick brown fox", "--max-new-tokens", "5", "--ignore-eos",
                   "--json", "--experts", place, "--gpu-experts", "1"])
        text, err = capsys.readouterr()
        assert rc == 0, err
        out[place] = json.loads(text.strip().splitlines()[-1])["completion_ids"]
    assert out["host"] == out["device"] and len(out["host"]) == 5


@pytest.mark.slow
def test_the_server_scheduler_runs_experts_on_the_host(hf_folder):
    """The server's continuous-batching scheduler over an experts host engine (its own compiled programs, the
    paged cache): two concurrent requests get experts device's greedy tokens."""
    from ktjax.serve.scheduler import Finished, RequestParams, Scheduler

    folder, _ = hf_folder("v2_lite")
    prompts = [PROMPTS[0, :12].tolist(), PROMPTS[1, :7].tolist()]
    want = ktjax.load(folder).generate(prompts, max_new_tokens=5, temperature=0, ignore_eos=True).tokens
    engine = ktjax.load(folder, experts="host", gpu_experts=2)
    scheduler = Scheduler(engine, max_batch=2, page_size=8, n_pages=16, max_queue=4)
    scheduler.start()
    got, done = [[], []], []
    try:
        for i, prompt in enumerate(prompts):
            def on_event(event, i=i):
                done.append(i) if isinstance(event, Finished) else got[i].append(event.token_id)
            scheduler.submit(prompt, RequestParams(max_tokens=5, temperature=0.0, ignore_eos=True), on_event)
        deadline = time.monotonic() + 300
        while len(done) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        scheduler.shutdown(5)
    assert got == want


# ---- where it cannot run: one KtjaxError ----------------------------------------------------------------

def test_experts_host_without_the_kernels_is_one_clear_error(monkeypatch):
    from ktjax.cpu import build

    def no_compiler():
        raise KtjaxError("cpu_kernels: no C++ compiler found (g++, c++, clang++; set CXX or install g++)")

    monkeypatch.setattr(build, "registered", no_compiler)
    with pytest.raises(KtjaxError, match=r"experts host runs the routed experts in ktjax's C\+\+ kernels, which "
                                         r"cannot run here \(cpu_kernels: no C\+\+ compiler found.*use experts device"):
        ktjax.load_model(CFG, _model("float32"), experts="host")


def test_several_devices_are_refused(monkeypatch):
    """experts host runs on one device: a mesh of several is one KtjaxError that says so."""
    from ktjax.runtime.backend import _check_host_experts

    with pytest.raises(KtjaxError, match=r"on one device; here are 2 cpu device\(s\): use one device"):
        _check_host_experts(2)


def test_the_gpu_bridge_compiles_against_the_cuda_headers():
    """matmul.cc with KTJAX_CUDA (the CUDA FFI handler that stages rows into pinned host buffers and starts the
    CPU's expert work with cudaLaunchHostFunc) compiles against the CUDA runtime's headers where they are here.
    It cannot run without a GPU: a GPU machine runs it (KTJAX_GPU_BRIDGE=1)."""
    import subprocess

    from ktjax.cpu import build

    flags, compiler = build.bridge_flags(compile_only=True), build._compiler()
    if not flags or compiler is None:
        pytest.skip("no CUDA runtime headers (JAX's CUDA wheels, $CUDA_HOME or /usr/local/cuda*) or no C++ "
                    "compiler here: the GPU bridge is not compiled")
    cmd = [compiler, "-std=c++17", "-fsyntax-only", "-w", f"-march={build.march()}", *flags,
           f"-I{jax.ffi.include_dir()}", str(build.SOURCES[0])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


# (what is wrong, settings, the message)
REFUSALS = [
    ("an expert id past the model's", {"experts": "host", "gpu_experts": [1, E]}, r"gpu_experts lists expert 8, but "
                                                                                   r"the model has 8 routed experts"),
    ("an unknown place", {"experts": "gpu"}, r"experts='gpu': one of device, host"),
]


@pytest.mark.parametrize("case, settings, message", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_bad_expert_settings_are_refused(case, settings, message):
    with pytest.raises(KtjaxError, match=message):
        ktjax.load_model(CFG, _model("float32"), **settings)

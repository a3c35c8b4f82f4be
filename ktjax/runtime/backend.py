"""The backend door: which code runs the model's matmuls and its attention over the cache, chosen once per
Engine from the settings (cpu_kernels, attention, weight_layout, activation_quant, fp8_matmul) and the devices.

XLA runs everything unless a backend takes over (its references: ktjax/model, ktjax/kv/attention.py). A backend
is a package with a module registered in BACKENDS (one line) that answers the door's questions:

    attention_kernel(page_size)  the caches' AttentionKernel (kv/cache.py) for a dense cache (page_size None)
                                 or pages of page_size, or None where it cannot run there
    and, where it holds the matmul weights (ktjax/cpu):
    unavailable(), require()     why it cannot run here (None where it can); the same as a KtjaxError
    reads(state)                 whether any matmul weight is of a format it reads
    hold(state, consume, int8_activations), held_counts(state), integer_products_fast()

Model and cache code reach a backend only through the objects it hands them (model.quantized.HeldWeight,
kv.cache.AttentionKernel); the Engine and the server ask the Backend made here, and name none.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os

import jax
import numpy as np

from ktjax.errors import KtjaxError
from ktjax.model.decoder import hold_out_in, map_matmul_weights, matmul_weight_dtypes
from ktjax.model.fp8 import FP8_DTYPES
from ktjax.model.quantized import hold_fp8_products

BACKENDS = {"cpu": "ktjax.cpu.backend", "pallas": "ktjax.pallas.backend"}
XLA = "xla"  # no backend: the XLA references


def implementation(name: str):
    """The module that implements backend `name` (imported on first use: a backend costs nothing unless chosen)."""
    return importlib.import_module(BACKENDS[name])


@dataclasses.dataclass
class Backend:
    """What runs where for one Engine: `name` holds and multiplies the matmul weights ("cpu": ktjax's C++
    kernels, or "xla"), `attention` attends over a cache on one device ("xla", "pallas" or "cpu": values of the
    setting attention). why_not: why the CPU kernels do not run (None where they do)."""
    name: str
    attention: str
    setting: str                 # the attention setting it resolves
    out_in: bool                 # weight_layout out-in
    int8_activations: bool       # activation_quant int8
    why_not: str | None = None
    notes: list = dataclasses.field(default_factory=list)
    fp8_matmul: str = "dequantize"  # the setting fp8_matmul resolved: "fp8" or "dequantize"

    @property
    def cpu_kernels(self) -> bool:
        return self.name == "cpu"

    def hold(self, state, consume: bool = False):
        """The model state with its weights in the layouts that run them (consume=True deletes each original
        once copied); activation_quant int8 is refused, with why, where no matmul would run it."""
        if self.out_in:
            state = hold_out_in(state, consume=consume)
        if self.name != XLA:
            state = implementation(self.name).hold(state, consume, int8_activations=self.int8_activations)
        if self.int8_activations:
            self._check_activation_quant(state)
        if self.fp8_matmul == "fp8" and matmul_weight_dtypes(state) & set(FP8_DTYPES):
            state = map_matmul_weights(state, hold_fp8_products)  # the same arrays, multiplied as FP8 operands
        elif self.fp8_matmul == "fp8":
            self.fp8_matmul = "dequantize"
            self.notes.append("fp8_matmul fp8: the model has no FP8 weights (python -m ktjax.convert --weights fp8 "
                              "keeps those of a DeepSeek-V3 folder); nothing to multiply as FP8")
        return state

    def _check_activation_quant(self, state):
        """activation_quant int8 runs in the CPU kernels' matmuls: refused, with why, where none would; a note
        where some quantized weights stay outside them or where the CPU runs the integer products slowly."""
        held, rest = implementation(self.name).held_counts(state) if self.name != XLA else (0, 0)
        if not held:
            if not matmul_weight_dtypes(state) & {np.dtype(np.int8), np.dtype(np.uint8)}:
                why = "the model's weights are not int8 / int4 (python -m ktjax.convert --weights int8|int4)"
            else:
                why = self.why_not or "no 2-D int8 / int4 matmul weight the kernels read (int4 groups must be a " \
                                      "multiple of 32)"
            raise KtjaxError(f"activation_quant int8 runs in ktjax's CPU kernels, and none runs here ({why}); use "
                             "activation_quant off")
        if rest:
            self.notes.append(f"activation_quant int8: {rest} quantized weight(s) the kernels do not read (stacked "
                              "experts under moe_impl ragged, 3-D or odd-group weights) keep float32 activations")
        if not implementation(self.name).integer_products_fast():
            self.notes.append("activation_quant int8: this CPU has no AVX-512 VNNI; the integer products run in "
                              "plain C++, correct but slower than activation_quant off")

    def attention_kernel(self, *, layout=None, page_size: int | None = None, notes: list | None = None):
        """The AttentionKernel for a cache (None: the XLA path): a dense one (page_size None) or pages of
        page_size, on one device (layout None) or sequence-sharded (layout: always XLA, because the merge across
        devices needs each device's log-sum-exp, which the kernels do not return; noted in `notes` where the
        setting asked for a kernel)."""
        if layout is not None:
            if notes is not None and self.setting not in ("auto", XLA):
                notes.append(f"attention runs on the {XLA} path, not {self.setting}: over a sequence-sharded cache "
                             "the merge needs each device's log-sum-exp, which only the XLA path returns")
            return None
        if self.attention == XLA:
            return None
        return implementation(self.attention).attention_kernel(page_size)

    @property
    def grouped_impl(self) -> str:
        return grouped_moe_impl()

    def stats(self, kernel) -> dict:
        """The values a generation reports: the attention that ran over its cache, and whether the CPU kernels
        ran."""
        return {"attention": XLA if kernel is None else kernel.name, "cpu_kernels": self.cpu_kernels,
                "fp8_matmul": self.fp8_matmul}


def grouped_moe_impl() -> str:
    """What moe_impl auto runs for many routed selections (model/moe.py pick_impl): blocks of one expert's rows on
    a CPU (a dense matmul per block, or the CPU kernels' grouped call), ragged_dot elsewhere (docs/results.md)."""
    return "blocked" if jax.default_backend() == "cpu" else "ragged"


def reads_experts_in_place(expert_axis: str | None, moe_impl: str) -> bool:
    """Whether the Engine splits expert stacks into PerExpert arrays (model/moe.py): on the CPU, unless the stacks
    are split over a mesh axis (expert parallelism slices its local stack) or ragged_dot, which takes whole
    stacks, is asked for. On a GPU a switch would wait on the host for its branch index."""
    return jax.default_backend() == "cpu" and expert_axis is None and moe_impl != "ragged"


def choose(runtime, state, n_devices: int) -> Backend:
    """The Backend for an Engine's settings (a RuntimeConfig), its model state (the weights' formats) and its
    devices; KtjaxError where a setting asks for what cannot run here."""
    platform = jax.default_backend()
    elsewhere = (None if platform == "cpu" and n_devices == 1 else
                 f"{n_devices} {platform} device(s); the kernels run on one CPU device")
    notes = []
    why_not = _why_no_cpu_kernels(runtime, state, elsewhere, notes)
    name = "cpu" if why_not is None else XLA
    attention = runtime.attention
    if attention == "auto":
        attention = "pallas" if platform == "gpu" else name
    elif attention == "cpu" and why_not is not None:
        raise KtjaxError(f"attention cpu runs in ktjax's C++ kernels, and they do not run here ({why_not}); use "
                         "attention auto or xla")
    return Backend(name, attention, runtime.attention, runtime.out_in, runtime.activation_quant == "int8",
                   why_not, notes, _fp8_matmul(runtime.fp8_matmul, platform))


def _fp8_matmul(setting: str, platform: str) -> str:
    """fp8_matmul resolved: auto = FP8 operands where the GPU multiplies them natively (Ada, Hopper and later)."""
    if setting != "auto":
        return setting
    if platform != "gpu":
        return "dequantize"
    from ktjax.pallas import platform as gpu
    cap = gpu.compute_capability()
    return "fp8" if cap is not None and cap >= gpu.FP8_NATIVE_MIN_CAPABILITY else "dequantize"


def _why_no_cpu_kernels(runtime, state, elsewhere: str | None, notes: list) -> str | None:
    """The setting cpu_kernels resolved: None where the CPU kernels run (the matmuls over the int8/int4 and
    float32 weights they hold and, under attention auto or cpu, decode attention), else why not. They run on one
    CPU device; auto falls back to XLA, with a note, where they cannot be built, and does not build them when
    nothing would use them; on refuses to run without them."""
    setting = runtime.cpu_kernels
    if elsewhere and setting == "on":
        raise KtjaxError(f"cpu_kernels on: {elsewhere} (use cpu_kernels auto or off)")
    if elsewhere:
        return elsewhere
    if setting == "off":
        return "cpu_kernels off"
    cpu = implementation("cpu")
    if setting == "on":
        cpu.require()
        return None
    if not (cpu.reads(state) or runtime.attention in ("auto", "cpu")):
        return "cpu_kernels auto: nothing here would use them"
    why = cpu.unavailable()
    if why:
        notes.append(f"cpu_kernels auto: XLA instead ({why})")
        return f"cpu_kernels auto: {why}"
    return None


# ---- experts: host (the CPU backend's host expert store, ktjax/cpu/host_experts.py) ------------------------

# What gpu_experts N counts routing over when no list is given: a fixed text (through the model's tokenizer), or
# fixed token ids for a model without one.
CALIBRATION_TEXT = ("The history of science is the study of how people came to understand the natural world: "
                    "numbers and measurement, the motion of planets, the structure of matter, living things, "
                    "medicine, machines and the languages in which all of it was written down and argued over.")
CALIBRATION_TOKENS = 128


def place_experts(engine, consume: bool):
    """experts host: the Engine's routed experts (engine.state, held per layer and expert) moved into the CPU's
    host expert store, one XLA FFI call per MoE layer summing them inside the compiled step; gpu_experts of
    them kept on the device (a list, or each layer's N most-routed over a calibration prompt). Sets engine.state;
    -> the store (None for a model without MoE layers). KtjaxError where it cannot run here."""
    _check_host_experts(engine.n_devices)
    if "moe_layers" not in engine.state:
        return None
    cpu = implementation("cpu")
    store = cpu.store_of(engine.state)  # filled by the loader (loader_fill), else moved here from the state
    if store is None:
        with _why_host_experts_cannot_run():
            engine.state, store = cpu.store_experts(engine.state, engine.cfg.num_dense_layers, consume=consume,
                                                    int8_activations=engine.runtime.activation_quant == "int8")
    kept = _kept_experts(engine, store)
    if kept:
        engine.state = cpu.keep_on_device(engine.state, store, kept)
    return store


def loader_fill(cfg, runtime, mesh=None):
    """experts host: where a loader puts the routed experts as it reads them (the CPU backend's LoaderFill over a
    new host expert store), or None with experts device."""
    if runtime.experts != "host":
        return None
    _check_host_experts(1 if mesh is None else mesh.size)
    cpu = implementation("cpu")
    with _why_host_experts_cannot_run():
        store = cpu.HostExpertStore(runtime.activation_quant == "int8")
    return cpu.LoaderFill(store, cfg)


GPU_BRIDGE_ENV = "KTJAX_GPU_BRIDGE"  # 1: try the GPU bridge (compile-checked, not yet run on a GPU)


def _check_host_experts(n_devices: int):
    """experts host runs on one device: a CPU, or a GPU through the bridge where it is built and asked for."""
    platform = jax.default_backend()
    if n_devices == 1 and platform == "cpu":
        return
    bridge = platform == "gpu" and bool(implementation("cpu").bridge_flags())
    if n_devices == 1 and bridge and os.environ.get(GPU_BRIDGE_ENV) == "1":
        return
    why = ("the GPU bridge (a CUDA FFI call that starts the CPU's expert work from the GPU's stream) compiles but "
           f"has not run on a GPU yet: set {GPU_BRIDGE_ENV}=1 to try it" if n_devices == 1 and bridge else
           "the GPU bridge needs the CUDA runtime's headers and library (JAX's CUDA wheels, or $CUDA_HOME)"
           if n_devices == 1 and platform == "gpu" else "use one device (--mesh 1)")
    raise KtjaxError(f"experts host runs the routed experts in the CPU's program, on one device; here are "
                     f"{n_devices} {platform} device(s): {why}; or use experts device")


@contextlib.contextmanager
def _why_host_experts_cannot_run():
    """A KtjaxError from building the kernels, said as why experts host cannot run."""
    try:
        yield
    except KtjaxError as e:
        raise KtjaxError(f"experts host runs the routed experts in ktjax's C++ kernels, which cannot run here "
                         f"({str(e).splitlines()[0]}); use experts device") from None


def _kept_experts(engine, store) -> dict:
    """gpu_experts resolved per MoE layer: {layer: expert ids kept on the device}."""
    setting, n_total = engine.runtime.gpu_experts, engine.cfg.n_routed_experts
    if isinstance(setting, tuple):
        if max(setting) >= n_total:
            raise KtjaxError(f"gpu_experts lists expert {max(setting)}, but the model has {n_total} routed experts "
                             f"(ids 0 to {n_total - 1})")
        return {layer: tuple(setting) for layer in store.layers}
    if setting == 0:
        return {}
    if setting >= n_total:
        return {layer: tuple(range(n_total)) for layer in store.layers}
    store.counts(reset=True)
    _calibration_forward(engine)
    return implementation("cpu").most_routed(store.counts(reset=True), setting)


def _calibration_forward(engine):
    """One full forward over the calibration prompt, every expert on the host (the store counts the routing)."""
    from flax import nnx
    import jax.numpy as jnp

    if engine.tokenizer is not None:
        ids = engine.tokenizer.encode(CALIBRATION_TEXT)[:CALIBRATION_TOKENS]
    else:
        ids = np.random.default_rng(0).integers(0, engine.cfg.vocab_size, CALIBRATION_TOKENS).tolist()
    opts = engine.run_options(engine.runtime.absorb(engine.cfg, len(ids)))
    forward = jax.jit(lambda state, tokens: nnx.merge(engine.graphdef, state)(tokens, opts))
    jax.block_until_ready(forward(engine.state, jnp.asarray([ids], jnp.int32)))


def routing_counts(engine, token_ids) -> np.ndarray:
    """How often each routed expert of each MoE layer is chosen over a prompt -> [MoE layers, experts] (an
    Engine loaded with experts host: its store counts the routing; the ids with the most make a gpu_experts
    list)."""
    store = getattr(engine, "host_experts", None)
    if store is None:
        raise KtjaxError("routing counts come from the host expert store: load the model with experts host")
    store.counts(reset=True)
    engine.logits(token_ids)
    counts = store.counts(reset=True)
    return np.stack([counts[layer] for layer in sorted(counts)])

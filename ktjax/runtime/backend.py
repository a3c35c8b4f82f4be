"""The backend door: which code runs the model's matmuls and its attention over the cache, chosen once per
Engine from the settings (cpu_kernels, attention, weight_layout, activation_quant) and the devices.

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

import dataclasses
import importlib

import jax
import numpy as np

from ktjax.errors import KtjaxError
from ktjax.model.decoder import hold_out_in, matmul_weight_dtypes

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
        return {"attention": XLA if kernel is None else kernel.name, "cpu_kernels": self.cpu_kernels}


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
                   why_not, notes)


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

"""The host expert store: every MoE layer's routed experts in host memory the store owns, summed by the CPU from
inside the compiled step (the setting experts: host; ktransformers' layout).

The store holds each layer's experts as numpy buffers in the CPU kernels' layouts (matmul.cc: float32, bf16, int8
or int4, [out, in]): gate and up as one [E, 2f, d] matrix (one pass over a row makes both), down as [E, d, f]. Each
layer is registered with the C++ library under a handle, so that the compiled program names the handle (an
attribute of one XLA FFI call per layer, KtjaxHostExperts) and never takes the experts as arguments: they are not
part of the model state, and no device holds them. The call sorts the layer's assignments by expert, runs gate/up,
SwiGLU and down as grouped products on XLA's CPU thread pool, and returns the routing-weighted sum [t, d].

Experts kept on the device (the setting gpu_experts) stay in the model state as model.moe.HostedExperts, which
holds only those; the model sums them as it sums any experts, and the host call skips them (their ids come as
-1 - e: counted, not run). The store counts every layer's routing (counts()), which picks the experts worth
keeping (runtime/backend.py place_experts).

Filling: begin_layer, then put() one expert's weight at a time (as the model stores it, [in, out]), then
finish_layer: the peak is one expert's weight above the store. ktjax.load of a Hugging Face folder streams each
expert's tensor in as it is read (LoaderFill, weights/loader.py); a model already in memory or a converted
checkpoint has its experts moved over layer by layer (store_experts).
On a GPU the same call is the GPU bridge (matmul.cc, KTJAX_CUDA: rows staged into pinned host buffers on XLA's
stream, this routine started by cudaLaunchHostFunc); it compiles, and has not yet run on a GPU.
"""
from __future__ import annotations

import ctypes
import dataclasses
import itertools
import mmap
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.cpu import build
from ktjax.errors import KtjaxError
from ktjax.model.decoder import PerLayer
from ktjax.model.moe import HostedExperts, PerExpert
from ktjax.model.quantized import QuantizedArray, int4_group, padded_inputs
from ktjax.util.heap import freed

TARGET = "KtjaxHostExperts"
# matmul.cc's GroupedFormat (+2: int8 activations, the setting activation_quant int8)
FORMATS = {"float32": 0, "int8": 1, "int4": 2, "bfloat16": 5}
_handles = itertools.count(1)  # one per registered layer, process-wide: several engines may hold stores


def _c_int64(*values):
    return [ctypes.c_int64(int(v)) for v in values]


def _pointer(a: np.ndarray | None):
    return ctypes.c_void_p(None if a is None else a.ctypes.data)


@dataclasses.dataclass(frozen=True)
class HostSum:
    """The host half of one layer's routed experts, as model.moe.HostedExperts calls it (hashable: a static of
    the compiled program): x [T, d], ids [T, k] int32 (-1 - e: expert e kept on the device), weights [T, k] ->
    the weighted sum of the host experts' outputs [T, d] float32. It holds its store (not compared): the store lives
    as long as a model state that names it."""
    handle: int
    store: object = dataclasses.field(default=None, compare=False, repr=False)

    def __call__(self, x, ids, weights):
        build.registered()  # a program traced here may be compiled or loaded from JAX's persistent cache
        out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
        return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(
            x.astype(jnp.float32), ids.astype(jnp.int32), weights.astype(jnp.float32), handle=np.int64(self.handle))


@dataclasses.dataclass
class StoredLayer:
    """One layer's experts: values [E, 2f, ...] (gate rows, then up rows) and [E, d, ...], scales alike (None for
    float formats)."""
    handle: int
    fmt: str
    group: int                        # int4: inputs per scale; else 0
    up_values: np.ndarray
    up_scales: np.ndarray | None
    down_values: np.ndarray
    down_scales: np.ndarray | None

    @property
    def experts(self) -> int:
        return self.up_values.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.up_values, self.up_scales, self.down_values, self.down_scales)
                   if a is not None)


def layer_format(values_dtype, scale_shape=None, values_shape=None) -> tuple[str, int]:
    """(the store's format, int4 group) for experts stored as values of this dtype (with these scale / value
    shapes for int4); float8 and int4 groups the kernels do not read (not a multiple of 32) are held float32."""
    dtype = np.dtype(values_dtype)
    if dtype == np.int8:
        return "int8", 0
    if dtype == np.uint8:
        group = int4_group(values_shape, scale_shape)
        return ("int4", group) if group % 32 == 0 else ("float32", 0)
    if dtype == jnp.bfloat16:
        return "bfloat16", 0
    return "float32", 0


class HostExpertStore:
    """The routed experts of every MoE layer (by the layer's index in the model), registered with the library.
    int8_activations: int8 / int4 experts run the kernels' int8-activation products (activation_quant int8)."""

    def __init__(self, int8_activations: bool = False):
        build.registered()  # KtjaxError (why the kernels do not build) before any weight is copied
        self.lib = build.library()
        self.lib.KtjaxHostExpertsCounts.restype = ctypes.c_int64
        self.lib.KtjaxHostExpertsRegister.restype = ctypes.c_int64
        self.int8_activations = int8_activations
        self.layers: dict[int, StoredLayer] = {}
        self._handles: list[int] = []  # released when the store is collected
        weakref.finalize(self, _release, self.lib, self._handles)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values())

    # -- filling ----------------------------------------------------------------------------------------
    def begin_layer(self, layer: int, fmt: str, experts: int, d: int, f: int, group: int = 0):
        """Room for one layer's experts (d: hidden size, f: moe_intermediate_size) in format fmt."""
        if fmt == "int4":
            pd, pf = padded_inputs(d, group), padded_inputs(f, group)
            shapes = ((experts, 2 * f, pd // 2), (experts, 2 * f, pd // group), (experts, d, pf // 2),
                      (experts, d, pf // group))
            dtype = np.uint8
        else:
            shapes = ((experts, 2 * f, d), (experts, 2 * f, 1), (experts, d, f), (experts, d, 1))
            dtype = {"float32": np.float32, "int8": np.int8, "bfloat16": jnp.bfloat16}[fmt]
        scaled = fmt in ("int8", "int4")
        # put() writes every row whole (int4 values come padded to P inputs, as the model stores them); padded
        # inputs meet zeros in the rows the call gathers, so they add nothing
        up_scales = np.ones(shapes[1], np.float32) if scaled else None
        down_scales = np.ones(shapes[3], np.float32) if scaled else None
        self.layers[layer] = StoredLayer(next(_handles), fmt, group, host_buffer(shapes[0], dtype), up_scales,
                                         host_buffer(shapes[2], dtype), down_scales)

    def put(self, layer: int, part: str, expert: int, values, scale=None):
        """One expert's weight as the model stores it ([in, out]; int8 values with scales [1, out]; int4 packed
        [P/2, out] with scales [P/g, out]) into the store's layout, transposed."""
        s = self.layers[layer]
        f = s.up_values.shape[1] // 2
        rows = {"gate": slice(0, f), "up": slice(f, 2 * f), "down": slice(None)}[part]
        values_to = (s.down_values if part == "down" else s.up_values)[expert, rows]
        v = np.asarray(values)
        if s.fmt == "float32" and (v.dtype != np.float32 or scale is not None):
            v = _float32(v, scale, values_to.shape[1])  # float8 / odd-group int4 / bf16 held as float32
            scale = None
        values_to[:, :v.shape[0]] = v.T
        if scale is not None:
            scales_to = (s.down_scales if part == "down" else s.up_scales)[expert, rows]
            sc = np.asarray(scale)
            scales_to[:, :sc.shape[0]] = sc.T

    def finish_layer(self, layer: int):
        """Register the filled layer with the library: the compiled programs can now name it."""
        s = self.layers[layer]
        handle = s.handle
        experts, two_f, _ = s.up_values.shape
        d, f = s.down_values.shape[1], two_f // 2
        k_up = d if s.fmt != "int4" else padded_inputs(d, s.group)
        k_down = f if s.fmt != "int4" else padded_inputs(f, s.group)
        fmt = FORMATS[s.fmt] + (2 if self.int8_activations and s.fmt in ("int8", "int4") else 0)
        g_up = 0 if s.up_scales is None else s.up_scales.shape[2]
        g_down = 0 if s.down_scales is None else s.down_scales.shape[2]
        code = self.lib.KtjaxHostExpertsRegister(
            *_c_int64(handle, fmt, experts, d, f, k_up, k_down, g_up, g_down), _pointer(s.up_values),
            _pointer(s.up_scales), _pointer(s.down_values), _pointer(s.down_scales))
        if code != 0:
            raise KtjaxError(f"experts host: the library refused layer {layer}'s experts (code {code})")
        self._handles.append(handle)

    def fill_layer(self, layer: int, gate, up, down, consume: bool = False):
        """A whole layer from its three expert weights (each a list of E (values, scale or None) pairs, as the
        model stores them); consume=True deletes each jax array once copied."""
        v0, s0 = gate[0]
        fmt, group = layer_format(v0.dtype, None if s0 is None else s0.shape, v0.shape)
        d = down[0][0].shape[-1]
        f = gate[0][0].shape[-1]
        self.begin_layer(layer, fmt, len(gate), d, f, group)
        for part, pairs in (("gate", gate), ("up", up), ("down", down)):
            for e, (values, scale) in enumerate(pairs):
                self.put(layer, part, e, values, scale)
                if consume:
                    for a in (values, scale):
                        if isinstance(a, jax.Array):
                            a.delete()
                            freed(a.nbytes)  # its pages back to the OS every few hundred MB (util/heap.py)
        self.finish_layer(layer)

    # -- reading ----------------------------------------------------------------------------------------
    def host_sum(self, layer: int) -> HostSum:
        return HostSum(self.layers[layer].handle, self)

    def counts(self, reset: bool = False) -> dict[int, np.ndarray]:
        """Each layer's routing counts [E] (every assignment, host or device) since registered or last reset."""
        out = {}
        for layer, s in self.layers.items():
            c = np.zeros(s.experts, np.int64)
            self.lib.KtjaxHostExpertsCounts(*_c_int64(s.handle), c.ctypes.data_as(ctypes.c_void_p),
                                            *_c_int64(s.experts, reset))
            out[layer] = c
        return out

    def expert(self, layer: int, part: str, e: int):
        """Expert e's weight back in the model's layout ([in, out]; a QuantizedArray for int8 / int4): the device
        copy of a kept expert."""
        s = self.layers[layer]
        f = s.up_values.shape[1] // 2
        rows = {"gate": slice(0, f), "up": slice(f, 2 * f), "down": slice(None)}[part]
        values = (s.down_values if part == "down" else s.up_values)[e, rows]
        if s.fmt not in ("int8", "int4"):
            return jnp.asarray(values.T)
        scales = (s.down_scales if part == "down" else s.up_scales)[e, rows]
        return QuantizedArray(jnp.asarray(values.T), jnp.asarray(scales.T))


# The experts' buffers on transparent huge pages where the kernel allows: off, because bench_hybrid.py --pages
# measured no difference on the loaded development box (docs/results.md, "Experts in host memory").
HUGE_PAGES = False


def host_buffer(shape: tuple, dtype) -> np.ndarray:
    """A zeroed array for one layer's expert values: an anonymous mapping advised onto transparent huge pages
    (HUGE_PAGES; the kernels read an expert's few MiB front to back, and 4 KiB pages cost a TLB miss each), else
    numpy's own."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if not HUGE_PAGES or not hasattr(mmap, "MADV_HUGEPAGE") or nbytes < (2 << 20):
        return np.zeros(shape, dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # not allowed here: ordinary pages
        pass
    return np.frombuffer(region, dtype=dtype).reshape(shape)


def _float32(v: np.ndarray, scale, d_in_padded: int) -> np.ndarray:
    """A weight the store holds as float32: bf16 widened, float8 (block scales) or int4 dequantized, [in, out]."""
    if scale is None:
        return v.astype(np.float32)
    from ktjax.model.fp8 import FP8_DTYPES, dequantize_blocks
    from ktjax.model.quantized import dequantize_weight_np
    if v.dtype in FP8_DTYPES:
        return np.asarray(dequantize_blocks(v, np.asarray(scale)), np.float32)
    return dequantize_weight_np(v, np.asarray(scale), min(d_in_padded, 2 * v.shape[0]))


def _release(lib, handles: list[int]):
    for handle in handles:
        lib.KtjaxHostExpertsRelease(ctypes.c_int64(handle))


# ---- the model state's side: experts moved out, HostedExperts left in their place ----------------------

EXPERT_PARTS = {"w_gate": "gate", "w_up": "up", "w_down": "down"}


def _is_value(x) -> bool:
    return isinstance(x, (PerLayer, QuantizedArray))


def _value(variable):
    """A parameter's value in a model state: a PerLayer, or a QuantizedArray of PerLayer values and scales."""
    return jax.tree.leaves(variable, is_leaf=_is_value)[0]


def _pick(per_layer, j: int, e: int):
    layer = per_layer.arrays[j]
    return layer.arrays[e] if isinstance(layer, PerExpert) else layer[e]


def _expert_pair(value, j: int, e: int):
    """(values, scale or None) of expert e of MoE layer j of a parameter's value."""
    if isinstance(value, QuantizedArray):
        return _pick(value.values, j, e), _pick(value.scale, j, e)
    return _pick(value, j, e), None


def store_experts(state, first_layer: int, *, consume: bool = False, int8_activations: bool = False):
    """The routed experts of a model state's MoE stack (held per layer by decoder.unstack_layers) moved into a new
    HostExpertStore, layer by layer (consume=True deletes each array once copied: the peak stays one layer
    above the weights) -> (the state with HostedExperts that keep none on the device, the store)."""
    store = HostExpertStore(int8_activations)
    mlp = state["moe_layers"]["mlp"]
    values = {p: _value(mlp[p]) for p in EXPERT_PARTS}
    per_layer = values["w_gate"].values if isinstance(values["w_gate"], QuantizedArray) else values["w_gate"]
    for j in range(len(per_layer.arrays)):
        n = n_experts_of(per_layer.arrays[j])
        pairs = [[_expert_pair(values[p], j, e) for e in range(n)] for p in EXPERT_PARTS]
        store.fill_layer(first_layer + j, *pairs, consume=consume)
    return keep_on_device(state, store, {}), store


def n_experts_of(layer) -> int:
    return len(layer.arrays) if isinstance(layer, PerExpert) else layer.shape[0]


def keep_on_device(state, store: HostExpertStore, kept: dict[int, tuple]):
    """The state's routed experts as HostedExperts: layer L keeps kept[L] (expert ids; none where absent) as
    device copies of the store's, in the model's layout; the store sums the rest."""
    mlp = state["moe_layers"]["mlp"]
    layers = sorted(store.layers)
    for p, part in EXPERT_PARTS.items():
        def hosted(arrays, layer):
            return HostedExperts(tuple(arrays), kept=tuple(kept.get(layer, ())),
                                 n_total=store.layers[layer].experts, host=store.host_sum(layer))

        weights = {layer: [store.expert(layer, part, e) for e in kept.get(layer, ())] for layer in layers}
        if store.layers[layers[0]].fmt in ("int8", "int4"):
            value = QuantizedArray(PerLayer(tuple(hosted([w.values for w in weights[L]], L) for L in layers)),
                                   PerLayer(tuple(hosted([w.scale for w in weights[L]], L) for L in layers)))
        else:
            value = PerLayer(tuple(hosted(weights[L], L) for L in layers))
        mlp[p] = jax.tree.map(lambda _, v=value: v, mlp[p], is_leaf=_is_value)
    return state


def most_routed(counts: dict[int, np.ndarray], n: int) -> dict[int, tuple]:
    """Each layer's n most-routed experts (ties: the lower id), in id order."""
    return {layer: tuple(sorted(int(e) for e in np.argsort(-c, kind="stable")[:n])) for layer, c in counts.items()}


class LoaderFill:
    """The loader's side of a store (weights/loader.py load_hf_model experts_to): each routed expert's tensor put
    as it is read (one tensor at a time: no layer stack and no device copy of the experts is ever made), and in
    the model state, per layer, HostedExperts that keep none (the Engine keeps gpu_experts of them later)."""

    def __init__(self, store: HostExpertStore, cfg):
        self.store, self.cfg = store, cfg

    def put(self, layer: int, name: str, expert: int, values: np.ndarray):
        """Expert `expert` of parameter `name` (w_gate, w_up, w_down) of layer `layer`, [in, out], float."""
        if layer not in self.store.layers:
            fmt = "bfloat16" if np.dtype(values.dtype) == jnp.bfloat16 else "float32"
            self.store.begin_layer(layer, fmt, self.cfg.n_routed_experts, self.cfg.hidden_size,
                                   self.cfg.moe_intermediate_size)
        self.store.put(layer, EXPERT_PARTS[name], expert, values)

    def hosted(self, layers) -> PerLayer:
        """The model state's value of one expert parameter for these layers (their indices in the model)."""
        return PerLayer(tuple(HostedExperts((), kept=(), n_total=self.cfg.n_routed_experts,
                                            host=self.store.host_sum(layer)) for layer in layers))

    def finish(self):
        for layer in sorted(self.store.layers):
            self.store.finish_layer(layer)


def store_of(state) -> HostExpertStore | None:
    """The store a model state's MoE stack already names (a state the loader filled through LoaderFill)."""
    gate = state["moe_layers"]["mlp"]["w_gate"]
    leaves = jax.tree.leaves(gate, is_leaf=lambda x: isinstance(x, HostedExperts))
    return leaves[0].host.store if leaves and isinstance(leaves[0], HostedExperts) else None

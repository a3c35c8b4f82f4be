"""Matmul weights held for ktjax's CPU kernels, and the model surgery that holds them.

The kernels read a weight held [out, in] (each output one contiguous dot product): int8 / int4 weights as
KernelQuantized, float32 ones as KernelOutIn, and the absorbed attention's per-head w_uk / w_uv as KernelHeads
(read as stored). Each is a model.quantized.HeldWeight: the model multiplies by it through that protocol and
never names this backend. Matmuls of more rows than the kernels take (prefill chunks) run XLA's dot over the
held layout, except a routed expert's, which the grouped call takes at any row count.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ktjax.cpu import kernels
from ktjax.model.decoder import PerLayer, map_matmul_weights, out_in_copy
from ktjax.model import quantized
from ktjax.model.quantized import HeldWeight, OutIn, QuantizedArray, int4_group, matmul, swap_last, tile_size
from ktjax.util.heap import freed, release_freed_memory


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KernelQuantized(HeldWeight):
    """An int8 or int4 weight held transposed, [..., out, in] (values and scales both: int8 values [out, in] with
    scales [out, 1]; int4 packed [out, P/2] with scales [out, P/g]). int8_activations (the setting
    activation_quant int8): every matmul over it, of any row count, runs the kernels' int8-activation path."""
    values: jax.Array
    scale: jax.Array
    int8_activations: bool = dataclasses.field(default=False, metadata={"static": True})

    def in_out(self) -> QuantizedArray:
        return QuantizedArray(swap_last(self.values), swap_last(self.scale))

    def matmul(self, x):
        if self.int8_activations or kernels.fits(x.size // x.shape[-1]):
            return kernel_matmul(x, self)
        return _held_out_in_matmul(x, self)

    def grouped(self, weights) -> bool:
        return (all(isinstance(w, KernelQuantized) for w in weights)
                and len({(w.values.dtype, w.values.shape, w.scale.shape, w.int8_activations) for w in weights}) == 1)

    def grouped_matmul(self, x, group_sizes, weights):
        return _grouped_matmul(_kernel_rows(x, self), x.dtype, group_sizes, weights, self.int8_activations)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KernelOutIn(HeldWeight):
    """A float32 weight held [..., out, in] for the kernels, which take its matmuls of up to kernels.MAX_ROWS rows
    (benchmarks/log/2026.md, "Float32 weights in the CPU kernels") and, for a routed expert, its rows of any batch;
    longer matmuls run as over an OutIn weight (XLA)."""
    values: jax.Array

    def in_out(self):
        return jnp.swapaxes(self.values, -1, -2)

    def matmul(self, x):
        rows = x.reshape(-1, x.shape[-1])
        if kernels.fits(rows.shape[0]):
            y = kernels.matmul(rows.astype(jnp.float32), self.values)
            return y.astype(x.dtype).reshape(*x.shape[:-1], -1)
        return matmul(x, OutIn(self.values))

    def grouped(self, weights) -> bool:
        return all(isinstance(w, KernelOutIn) for w in weights) and len({w.values.shape for w in weights}) == 1

    def grouped_matmul(self, x, group_sizes, weights):
        return _grouped_matmul(x.astype(jnp.float32), x.dtype, group_sizes, weights, False)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KernelHeads(HeldWeight):
    """A float32 per-head weight of the absorbed attention (w_uk [h, d, c] or w_uv [h, d_v, c], as stored):
    per_head multiplies by it in the kernel for up to kernels.MAX_ROWS rows, else by XLA's einsum (whose batched
    dot ran w_uk at 6-45 GFLOP/s for 4-64 rows: benchmarks/log/2026.md, "Float32 weights in the CPU kernels").
    Elsewhere (the naive form) it reads as the array it holds."""
    values: jax.Array

    @property
    def shape(self) -> tuple:
        return self.values.shape

    @property
    def dtype(self):
        return self.values.dtype

    def astype(self, dtype):
        return self.values.astype(dtype)

    def in_out(self):
        return self.values

    def per_head(self, x, in_out: bool):
        rows = x.size // (x.shape[-1] * x.shape[-2])
        if kernels.fits(rows):
            y = kernels.heads_matmul(x.reshape(rows, *x.shape[-2:]).astype(jnp.float32), self.values, in_out=in_out)
            return y.astype(x.dtype).reshape(*x.shape[:-1], -1)
        return jnp.einsum("...hk,hkn->...hn" if in_out else "...hk,hnk->...hn", x, self.values.astype(x.dtype))


def kernel_reads(values, scale) -> bool:
    """Whether the CPU kernels read a weight stored as these values and scales: a 2-D int8 one, or a 2-D int4 one
    whose group is a multiple of 32 (so that each half-group is whole vectors)."""
    if values.ndim != 2:
        return False
    return values.dtype == jnp.int8 or (values.dtype == jnp.uint8 and int4_group(values.shape, scale.shape) % 32 == 0)


def kernel_layout(w: QuantizedArray, int8_activations: bool = False, consume: bool = False) -> KernelQuantized:
    """A weight that kernel_reads (or a PerLayer / PerExpert of them) as a KernelQuantized copy; consume=True
    deletes each stored array as soon as its copy exists, so that the peak stays one array (not one parameter of
    every layer) above the weights."""
    if not consume:
        return KernelQuantized(swap_last(w.values), swap_last(w.scale), int8_activations)
    return KernelQuantized(jax.tree.map(_moved_out_in, w.values), jax.tree.map(_moved_out_in, w.scale),
                           int8_activations)


def _moved_out_in(a):
    """a's [..., out, in] copy, made before a is deleted (a deleted array's pending reads would hold it)."""
    t = jax.block_until_ready(out_in_copy(a, consume=False))
    a.delete()
    freed(a.nbytes)  # its pages back to the OS every few hundred MB: the next copy may come from another arena
    return t


def _kernel_rows(x, w: KernelQuantized):
    """x's rows as the kernels take them for w: float32, zero-padded to an int4 weight's P inputs."""
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if w.values.dtype == jnp.uint8:
        rows = jnp.pad(rows, ((0, 0), (0, 2 * w.values.shape[-1] - rows.shape[1])))
    return rows


def kernel_matmul(x, w: KernelQuantized):
    """x [..., in] @ w in the single-weight kernel, at any row count -> [..., out] in x.dtype."""
    y = kernels.matmul(_kernel_rows(x, w), w.values, w.scale, int8_activations=w.int8_activations)
    return y.astype(x.dtype).reshape(*x.shape[:-1], -1)


def _grouped_matmul(rows, dtype, group_sizes, weights, int8_activations: bool):
    """rows [M, in] float32 sorted by group, group_sizes [E], E held weights of one format -> [M, out] in dtype:
    group e's rows times weight e, in one kernel call (kernels.grouped_matmul)."""
    pairs = [(w.values, getattr(w, "scale", None)) for w in weights]
    return kernels.grouped_matmul(rows, group_sizes, pairs, int8_activations=int8_activations).astype(dtype)


def _dequantize_out_in(values, scale):
    """A KernelQuantized weight's values and scales -> float32 [out, in] (int4: [out, P], padded inputs zero)."""
    if values.dtype == jnp.int8:
        return values.astype(jnp.float32) * scale
    n_out, half = values.shape
    groups = scale.shape[-1]
    v = values.reshape(n_out, groups, half // groups)
    q = jnp.stack([v & 15, v >> 4], axis=-2).astype(jnp.float32) - 8  # [out, groups, 2, g/2]
    return (q * scale[:, :, None, None]).reshape(n_out, 2 * half)


def _held_out_in_matmul(x, w: KernelQuantized):
    """More rows than the CPU kernels take (prefill chunks, blocks of routed experts) over a weight held
    [out, in]: tiles of whole output rows, each dequantized to float32 and contracted with x in one dot (no
    transposed copy of the stored bytes)."""
    values, scale = w.values, w.scale
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    n_out = values.shape[0]
    d_in = 2 * values.shape[1] if values.dtype == jnp.uint8 else values.shape[1]
    rows = jnp.pad(rows, ((0, 0), (0, d_in - rows.shape[1])))
    per = tile_size(n_out, quantized.PREFILL_TILE_BYTES // (4 * d_in))

    def tile(i):
        v = jax.lax.dynamic_slice_in_dim(values, i * per, per, axis=0)
        sc = jax.lax.dynamic_slice_in_dim(scale, i * per, per, axis=0)
        return jax.lax.dot_general(rows, _dequantize_out_in(v, sc), (((1,), (1,)), ((), ())))

    if per == n_out:
        y = tile(0)
    else:
        y = jnp.moveaxis(jax.lax.map(tile, jnp.arange(n_out // per)), 0, 1).reshape(rows.shape[0], n_out)
    return y.astype(x.dtype).reshape(*x.shape[:-1], n_out)


def hold_for_kernels(state, consume: bool = False, int8_activations: bool = False):
    """Every 2-D int8 / int4 matmul weight (Linear kernels, lm_head, routed experts split by unstack_layers) as a
    KernelQuantized [out, in] copy (int8_activations: the kernels' int8-activation path), every 2-D float32 one
    as a KernelOutIn copy (an OutIn one, as held by weight_layout out-in, in place), and the absorbed attention's
    float32 w_uk / w_uv as KernelHeads (in place); consume=True deletes each original as soon as it is copied
    (array by array: the peak is one array above the weights, and the freed pages go back to the OS). Stacked
    experts (moe_impl ragged) keep their layout."""
    def float_for_kernel(a):
        if isinstance(a, OutIn):
            return KernelOutIn(a.values) if a.values.dtype == jnp.float32 and a.values.ndim == 2 else a
        if not isinstance(a, jax.Array) or a.dtype != jnp.float32 or a.ndim != 2:
            return a
        return KernelOutIn(_moved_out_in(a) if consume else out_in_copy(a, False))

    def held(w):
        if not isinstance(w, QuantizedArray):
            out = jax.tree.map(float_for_kernel, w, is_leaf=lambda x: isinstance(x, OutIn))
        else:
            values, scales = jax.tree.leaves(w.values), jax.tree.leaves(w.scale)
            if not all(kernel_reads(v, s) for v, s in zip(values, scales)):
                return w
            out = kernel_layout(w, int8_activations, consume)
        if consume:
            release_freed_memory()  # the originals' pages back to the OS, parameter by parameter (util/heap.py)
        return out

    return _hold_head_weights(map_matmul_weights(state, held))


def _hold_head_weights(state):
    """The absorbed attention's float32 w_uk / w_uv as KernelHeads, in place: the kernel reads them as stored."""
    def held(a):
        return KernelHeads(a) if isinstance(a, jax.Array) and a.dtype == jnp.float32 and a.ndim == 3 else a

    def visit(path, x):
        return jax.tree.map(held, x) if {getattr(k, "key", None) for k in path} & {"w_uk", "w_uv"} else x

    return jax.tree_util.tree_map_with_path(visit, state, is_leaf=lambda x: isinstance(x, PerLayer))


def held_counts(state) -> tuple[int, int]:
    """(int8 / int4 matmul weights held for the kernels, those left in the stored layout) of a held state."""
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, (KernelQuantized, QuantizedArray)))
    return (sum(isinstance(w, KernelQuantized) for w in leaves), sum(isinstance(w, QuantizedArray) for w in leaves))

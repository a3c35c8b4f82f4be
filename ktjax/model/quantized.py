"""Weight-only int8 and int4 quantization of matmul weights, and matmuls that read the narrow bytes.

A weight is stored [..., in, out] (the Linear layout; leading axes stack layers or experts) as values and
scales of the same rank, so that stacks shard and index alike; in memory the two are one QuantizedArray:

    int8   values int8  [..., in, out]        scales float32 [..., 1, out]     one per output channel
    int4   values uint8 [..., P/2, out]       scales float32 [..., P/g, out]   one per g inputs and output

int4 is symmetric (-7..7, stored + 8 in a nibble), the input dimension zero-padded to P, a multiple of the
group size g. Group k's g rows sit in packed rows [k g/2, (k+1) g/2): row k g + j in the low nibble and row
k g + g/2 + j in the high one, so a group unpacks into two contiguous half-groups with no interleaving, and
a tile of whole groups needs nothing from its neighbours. The group size is implied by the shapes
(g = P / groups), and the dtype tells the formats apart (FP8 block scales are float8 values).

Why tiles. On a CPU, XLA converts a narrow weight into a full-size float32 copy before a dot instead of
fusing the conversion, and a fresh multi-megabyte buffer costs more (page faults) than the dot itself:
`x @ q.astype(f32)` on a 2048 x 8192 int8 matrix ran ~20x slower than the float32 matvec. So `matmul`
walks the weight in tiles of rows (a fori_loop: one small reused buffer), converts each tile, and applies
the scales to the tile's output, never to the weight: int8's per-channel scale multiplies the finished
[T, out] product once; int4's group scales multiply each group's partial product. Weights small enough
for one tile are dequantized whole. (bf16 weights under float32 compute gain nothing from tiles: on this
CPU the bf16 -> float32 conversion itself runs at ~0.3 G weights/s, against ~4 G for int8.)
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.model.fp8 import FP8_DTYPES, block_scaled_matmul
from ktjax.model.fp8 import dequantize as fp8_dequantize

WEIGHT_FORMATS = ("int8", "int4")
INT4_GROUP = 128    # docs/results.md: faster CPU decode than 64, ~8% more weight error
INT8_MAX, INT4_MAX = 127, 7
TILE_BYTES = 2 * 2**20  # float32 bytes of one converted tile: small enough to stay in cache and be reused
# From this many rows on (prefill chunks) an int8/int4 weight is dequantized in tiles of up to PREFILL_TILE_BYTES
# of float32, whole input rows each, and multiplied in one dot per tile: decode-sized tiles would cut a 512-row
# chunk's product into dozens of thin GEMMs (benchmarks/log/2026.md, "Decode attention in C++, and prefill with
# int8 / int4 weights").
PREFILL_ROWS = 64
PREFILL_TILE_BYTES = 64 * 2**20


# ---- shapes and bytes --------------------------------------------------------------------------------

def padded_inputs(d_in: int, group: int) -> int:
    return -(-d_in // group) * group


def stored_shapes(fmt: str, shape: tuple, group: int = INT4_GROUP) -> tuple[tuple, np.dtype, tuple]:
    """(values shape, values dtype, scales shape) of a weight [..., in, out] stored as `fmt`."""
    *lead, d_in, d_out = shape
    if fmt == "int8":
        return (*lead, d_in, d_out), np.dtype(np.int8), (*lead, 1, d_out)
    if fmt == "int4":
        p = padded_inputs(d_in, group)
        return (*lead, p // 2, d_out), np.dtype(np.uint8), (*lead, p // group, d_out)
    raise ValueError(f"unknown weight format {fmt!r}; one of {WEIGHT_FORMATS}")


def stored_bytes(fmt: str, shape: tuple, group: int = INT4_GROUP) -> int:
    """Bytes of values and float32 scales: the formula the tests hold actual arrays to."""
    values, dtype, scales = stored_shapes(fmt, shape, group)
    return int(np.prod(values, dtype=np.int64)) * dtype.itemsize + int(np.prod(scales, dtype=np.int64)) * 4


# ---- numpy: quantize and dequantize (the converter, and the reference for the jnp matmuls) -------------

def quantize_weight(w: np.ndarray, fmt: str, group: int = INT4_GROUP) -> tuple[np.ndarray, np.ndarray]:
    """A float weight [..., in, out] -> (values, float32 scales), as laid out in the module docstring."""
    w = np.asarray(w, np.float32)
    if fmt == "int8":
        scale = _symmetric_scale(np.abs(w).max(axis=-2, keepdims=True), INT8_MAX)
        return np.clip(np.rint(w / scale), -INT8_MAX, INT8_MAX).astype(np.int8), scale
    if fmt == "int4":
        *lead, d_in, d_out = w.shape
        p = padded_inputs(d_in, group)
        grouped = np.zeros((*lead, p, d_out), np.float32)
        grouped[..., :d_in, :] = w
        grouped = grouped.reshape(*lead, p // group, group, d_out)
        scale = _symmetric_scale(np.abs(grouped).max(axis=-2, keepdims=True), INT4_MAX)
        q = np.clip(np.rint(grouped / scale), -INT4_MAX, INT4_MAX).astype(np.int8) + 8
        return pack_weight_int4(q.reshape(*lead, p, d_out), group), scale[..., 0, :]
    raise ValueError(f"unknown weight format {fmt!r}; one of {WEIGHT_FORMATS}")


def _symmetric_scale(absmax: np.ndarray, qmax: int) -> np.ndarray:
    return np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)  # an all-zero channel stays zero


def pack_weight_int4(nibbles: np.ndarray, group: int) -> np.ndarray:
    """Values 0..15 [..., P, out] -> bytes [..., P/2, out]: each group's first half low, second half high."""
    *lead, p, d_out = nibbles.shape
    halves = nibbles.astype(np.uint8).reshape(*lead, p // group, 2, group // 2, d_out)
    return (halves[..., 0, :, :] | (halves[..., 1, :, :] << 4)).reshape(*lead, p // 2, d_out)


def unpack_weight_int4(packed: np.ndarray, group: int) -> np.ndarray:
    """The inverse of pack_weight_int4: bytes [..., P/2, out] -> values 0..15 [..., P, out]."""
    *lead, half, d_out = packed.shape
    g = packed.reshape(*lead, 2 * half // group, group // 2, d_out)
    return np.stack([g & 15, g >> 4], axis=-3).reshape(*lead, 2 * half, d_out)


def int4_group(values_shape: tuple, scales_shape: tuple) -> int:
    return 2 * values_shape[-2] // scales_shape[-2]


def dequantize_weight_np(values: np.ndarray, scales: np.ndarray, d_in: int) -> np.ndarray:
    """float32 [..., d_in, out] from either format (the reference the tests compare against)."""
    if values.dtype == np.int8:
        return values.astype(np.float32) * scales
    group = int4_group(values.shape, scales.shape)
    q = unpack_weight_int4(values, group).astype(np.float32) - 8
    return (q * np.repeat(scales, group, axis=-2))[..., :d_in, :]


# ---- jnp: one quantized weight, and matmuls on the stored bytes ------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A weight held narrow: its values and their scales, one pytree value (one nnx.Param), so that jit, scan
    and sharding carry and slice them together. The values' dtype names the format: float8 (128 x 128 block
    scales, ktjax/model/fp8.py), int8 (per-channel scales) or uint8 (packed int4, group scales)."""
    values: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple:
        """The stored values' shape (int4 packs two inputs per byte); leading axes are those of the weight."""
        return self.values.shape

    def __getitem__(self, index):
        """Index the leading (layer or expert) axes of values and scales together."""
        return QuantizedArray(self.values[index], self.scale[index])

    def astype(self, dtype):
        """The whole weight dequantized; an int4 weight keeps its zero-padded input rows (callers slice)."""
        return dequantize_weight(self, dtype)


# Up to this many rows an Fp8Products weight multiplies FP8 operands; more rows (prefill chunks) dequantize: the
# per-block products' float32 intermediate is 4 M / 128 of the weight's bytes (fp8.block_scaled_matmul), a quarter
# at 8 rows, while a prefill's product is bound by arithmetic, not by reading the weight.
FP8_PRODUCT_ROWS = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Products(QuantizedArray):
    """An FP8 weight (e4m3 values, 128 x 128 block scales) whose products take FP8 operands: the setting
    fp8_matmul fp8 (runtime/backend.py holds FP8 weights as this). Stored and indexed as a QuantizedArray."""

    def __getitem__(self, index):
        return Fp8Products(self.values[index], self.scale[index])


def hold_fp8_products(w):
    """An FP8 QuantizedArray as Fp8Products (values and scales shared, no copy); anything else as it is."""
    if isinstance(w, QuantizedArray) and not isinstance(w, Fp8Products) and np.dtype(
            jax.tree.leaves(w.values)[0].dtype) in FP8_DTYPES:  # values: an array, or PerLayer arrays
        return Fp8Products(w.values, w.scale)
    return w


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class OutIn:
    """A float weight held transposed, [..., out, in] (the runtime setting weight_layout out-in): XLA's CPU
    matrix-vector product reads a row-major [out, in] matrix at 1.6-1.9x the speed of [in, out]; a batch of 4-16
    rows runs about 1.4x slower and a prefill about 12% slower (docs/results.md, "Decode step")."""
    values: jax.Array

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise TypeError("an OutIn weight is read whole by quantized.matmul")
        return self


OUT_IN_ROWS = 32  # from this many rows on, an OutIn matmul puts the weight on the left


class HeldWeight:
    """A weight that a backend holds in a layout of its own (for example ktjax/cpu/weights.py, [out, in]),
    a registered pytree dataclass. Model code multiplies by it through these methods and names no backend."""

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise TypeError(f"a {type(self).__name__} weight is read whole")
        return self

    def matmul(self, x):
        """x [..., in] @ the weight -> [..., out] in x.dtype (a matrix weight)."""
        raise NotImplementedError

    def per_head(self, x, in_out: bool):
        """per_head(x, the weight, in_out) (a per-head weight)."""
        raise NotImplementedError

    def in_out(self):
        """The weight in the layout the model stores ([..., in, out]; a per-head weight as stored)."""
        raise NotImplementedError

    def grouped(self, weights) -> bool:
        """Whether grouped_matmul takes these per-group weights (this one first) in one call."""
        return False

    def grouped_matmul(self, x, group_sizes, weights):
        """x [M, in] with its rows sorted by group, group_sizes [E] and E weights (grouped) -> [M, out] in
        x.dtype: group e's rows times weight e."""
        raise NotImplementedError


def per_head(x, w, in_out: bool):
    """x [..., h, k] by each head's matrix of w: [h, k, n] (in_out: w_uk) or [h, n, k] (w_uv) -> [..., h, n] in
    x.dtype: XLA's einsum, or the backend's product where one holds w."""
    if isinstance(w, HeldWeight):
        return w.per_head(x, in_out)
    return jnp.einsum("...hk,hkn->...hn" if in_out else "...hk,hnk->...hn", x, w.astype(x.dtype))


def grouped(weights) -> bool:
    """Whether grouped_matmul takes these per-group weights (a backend holds them all, in one format)."""
    return isinstance(weights[0], HeldWeight) and weights[0].grouped(weights)


def grouped_matmul(x, group_sizes, weights):
    """x [M, in] with its rows sorted by group, group_sizes [E], and E weights (grouped) -> [M, out] in x.dtype:
    group e's rows times weight e, in one call."""
    return weights[0].grouped_matmul(x, group_sizes, weights)


def swap_last(arrays):
    """Each array transposed in its last two axes (an array, or the arrays of a PerLayer / PerExpert)."""
    return jax.tree.map(functools.partial(jnp.swapaxes, axis1=-1, axis2=-2), arrays)


def in_out(w):
    """The weight in the layout the model stores ([..., in, out]): a copy for an OutIn or held one, anything
    else as it is."""
    if isinstance(w, OutIn):
        return jnp.swapaxes(w.values, -1, -2)
    return w.in_out() if isinstance(w, HeldWeight) else w


def matmul(x, w):
    """x [..., in] @ w for a weight stored dense, FP8 (block scales), int8 or int4, held [out, in] (OutIn) or by a
    backend (HeldWeight); the result in x.dtype."""
    if isinstance(w, HeldWeight):
        return w.matmul(x)
    if isinstance(w, OutIn):
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] < OUT_IN_ROWS:
            return jnp.einsum("ti,oi->to", rows, w.values.astype(x.dtype)).reshape(*x.shape[:-1], -1)
        # many rows: the weight as the left operand ([out, T], then transposed) runs near the [in, out] speed
        y = jax.lax.dot_general(w.values.astype(x.dtype), rows, (((1,), (1,)), ((), ())))
        return y.T.reshape(*x.shape[:-1], -1)
    if not isinstance(w, QuantizedArray):  # bf16 weights under float32 compute: tiles did not help
        return x @ w.astype(x.dtype)
    values, scale = w.values, w.scale
    if np.dtype(values.dtype) in FP8_DTYPES:
        rows = x.reshape(-1, x.shape[-1])
        if isinstance(w, Fp8Products) and rows.shape[0] <= FP8_PRODUCT_ROWS and values.ndim == 2:
            return block_scaled_matmul(rows, values, scale).astype(x.dtype).reshape(*x.shape[:-1], -1)
        return x @ fp8_dequantize(values, scale, x.dtype)
    lead, d_in = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, d_in)
    if rows.shape[0] >= PREFILL_ROWS:
        y = _dequantized_tiles(rows.astype(jnp.float32), w)
    elif values.dtype == jnp.uint8:
        y = _int4_matmul(rows, values, scale)
    else:
        y = _tiled_matmul(rows, values) * scale.astype(jnp.float32)
    return y.astype(x.dtype).reshape(*lead, values.shape[-1])


def dequantize_weight(w, dtype):
    """The whole weight in `dtype` (jnp): for ragged_dot, which takes the stack at once."""
    if not isinstance(w, QuantizedArray):
        return w.astype(dtype)
    values, scale = w.values, w.scale
    if np.dtype(values.dtype) in FP8_DTYPES:
        return fp8_dequantize(values, scale, dtype)
    if values.dtype == jnp.int8:
        return (values.astype(jnp.float32) * scale).astype(dtype)
    group = int4_group(values.shape, scale.shape)
    *lead, half, d_out = values.shape
    g = values.reshape(*lead, 2 * half // group, group // 2, d_out)
    q = jnp.stack([g & 15, g >> 4], axis=-3).astype(jnp.float32) - 8  # [..., groups, 2, g/2, out]
    full = q * scale[..., :, None, None, :]
    return full.reshape(*lead, 2 * half, d_out).astype(dtype)  # padded rows are zero: callers slice to `in`


def _fits_one_tile(w) -> bool:
    """Small weights (tiny models, narrow projections) are dequantized whole: one small buffer, no loop."""
    return 2 * w.shape[-2] * w.shape[-1] * 4 <= TILE_BYTES if w.dtype == jnp.uint8 else w.size * 4 <= TILE_BYTES


def _rows_per_tile(d_in: int, d_out: int) -> int:
    """The most rows per int8 tile within TILE_BYTES of float32, a divisor of d_in."""
    most = max(1, TILE_BYTES // (4 * d_out))
    return max(r for r in range(1, min(d_in, most) + 1) if d_in % r == 0)


def _tiled_matmul(x, q):
    """x [T, in] @ q [in, out] converted to x.dtype a tile of rows at a time, accumulated in float32."""
    d_in, d_out = q.shape
    dtype = x.dtype

    def tile(xt, qt):
        return jnp.matmul(xt, qt.astype(dtype), preferred_element_type=jnp.float32)

    rows = d_in if _fits_one_tile(q) else _rows_per_tile(d_in, d_out)
    n = d_in // rows
    if n == 1:
        y = tile(x, q)
    else:
        xs, qs = x.reshape(-1, n, rows), q.reshape(n, rows, d_out)
        y = jax.lax.fori_loop(0, n, lambda i, acc: acc + tile(xs[:, i], qs[i]),
                              jnp.zeros((x.shape[0], d_out), jnp.float32))
    return y


def tile_size(n: int, most: int) -> int:
    """Rows per tile: the largest divisor of n up to `most`; all n when no divisor comes near (n prime, say),
    rather than thousands of thin tiles."""
    most = max(1, min(n, most))
    per = max(u for u in range(1, most + 1) if n % u == 0)
    return per if 4 * per >= most else n


def _dequantized_tiles(x, w: QuantizedArray):
    """x [T, in] float32 @ an int8/int4 weight in tiles of whole input rows (whole groups for int4), each
    dequantized to float32 and multiplied in one dot, accumulated in float32."""
    values, scale = w.values, w.scale
    d_out = values.shape[-1]
    packed = values.dtype == jnp.uint8
    unit = int4_group(values.shape, scale.shape) if packed else 1  # input rows per scale row
    d_in = 2 * values.shape[-2] if packed else values.shape[-2]
    x = jnp.pad(x, ((0, 0), (0, d_in - x.shape[1])))  # int4's padded inputs meet zero weights
    units = d_in // unit
    per = tile_size(units, PREFILL_TILE_BYTES // (4 * d_out * unit))
    if per == units:
        return jnp.matmul(x, dequantize_weight(w, jnp.float32), preferred_element_type=jnp.float32)
    stored_rows = per * unit // 2 if packed else per

    def tile(i, acc):
        v = jax.lax.dynamic_slice_in_dim(values, i * stored_rows, stored_rows, axis=0)
        s = jax.lax.dynamic_slice_in_dim(scale, i * per, per, axis=0) if packed else scale
        xt = jax.lax.dynamic_slice_in_dim(x, i * per * unit, per * unit, axis=1)
        w_tile = dequantize_weight(QuantizedArray(v, s), jnp.float32)
        return acc + jnp.matmul(xt, w_tile, preferred_element_type=jnp.float32)

    return jax.lax.fori_loop(0, units // per, tile, jnp.zeros((x.shape[0], d_out), jnp.float32))


def _int4_matmul(x, packed, scale):
    """x [T, in] @ int4 weight, one group per step: (x_lo @ lo + x_hi @ hi) * the group's scales.

    One group per step, as two plain 2-D matmuls: a batched einsum over several groups per step ran 2-14x
    slower on the CPU (XLA then converted the whole weight outside the loop at g = 128).
    """
    half, d_out = packed.shape
    groups = scale.shape[0]
    g = 2 * half // groups
    x = jnp.pad(x, ((0, 0), (0, 2 * half - x.shape[1])))  # the padded inputs meet zero weights
    if _fits_one_tile(packed):
        w = dequantize_weight(QuantizedArray(packed, scale), x.dtype)
        return jnp.matmul(x, w, preferred_element_type=jnp.float32)
    xs = x.reshape(-1, groups, 2, g // 2)
    ps = packed.reshape(groups, g // 2, d_out)

    def group(i, acc):
        lo = (ps[i] & 15).astype(x.dtype) - 8
        hi = (ps[i] >> 4).astype(x.dtype) - 8
        y = (jnp.matmul(xs[:, i, 0], lo, preferred_element_type=jnp.float32)
             + jnp.matmul(xs[:, i, 1], hi, preferred_element_type=jnp.float32))
        return acc + y * scale[i].astype(jnp.float32)

    return jax.lax.fori_loop(0, groups, group, jnp.zeros((x.shape[0], d_out), jnp.float32))

"""How the latent channels of one cache format are laid out for the kernel.

Triton wants power-of-two tensors, so the kernel reads c_kv in *chunks*: power-of-two column ranges of
the stored array, each holding latent channels that share one scale (quantized formats). For DeepSeek's
R = 512 the stored layout already fits (chunks of 128 for fp8/int8, 64 for int4, 512 unquantized) and the
wrapper passes the cache through untouched. Odd ranks (tiny test models) are padded by the wrapper: channel
c always stays at column c of the padded rank, so q_lat and the output just gain zero columns at the end.

int4 bytes hold channel j (low nibble) and channel j + half (high nibble): one loaded byte tile feeds two
chunks, the low one and the high one, each with its own scale.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ktjax.kv.formats import CacheFormat
from ktjax.kv.quant import pack_int4, unpack_int4

UNQUANTIZED_CHUNK = 512   # widest single chunk of an unquantized cache
MIN_DOT = 16              # Triton's tl.dot needs every dimension >= 16


def next_pow2(n: int, at_least: int = 1) -> int:
    return max(at_least, 1 << max(int(n) - 1, 0).bit_length())


@dataclasses.dataclass(frozen=True)
class Chunk:
    col: int      # first stored column (element, or byte for int4)
    width: int    # stored columns read (a power of two)
    part: str     # "all": the stored values; "low" / "high": the int4 nibble
    group: int    # its scale column (quantized formats)
    out: int      # first latent channel it holds


@dataclasses.dataclass(frozen=True)
class LatentLayout:
    rank: int                  # R, latent channels of the model
    rank_p: int                # padded rank the kernel sees (q_lat and output columns)
    width_p: int               # stored columns the kernel sees
    n_groups_p: int            # scale columns the kernel sees (0 unquantized)
    chunks: tuple[Chunk, ...]
    repack_int4: bool = False  # the stored int4 layout differs from the padded one: re-pack in the wrapper


def latent_layout(fmt: CacheFormat, rank: int) -> LatentLayout:
    if not fmt.quantized:
        return _unquantized_layout(rank)
    assert fmt.group & (fmt.group - 1) == 0 and fmt.group >= MIN_DOT, fmt
    return _int4_layout(fmt, rank) if fmt.packed else _grouped_layout(fmt, rank)


def _unquantized_layout(rank: int) -> LatentLayout:
    rank_p = next_pow2(rank, MIN_DOT)
    width = min(rank_p, UNQUANTIZED_CHUNK)
    chunks = tuple(Chunk(c, width, "all", -1, c) for c in range(0, rank_p, width))
    return LatentLayout(rank, rank_p, rank_p, 0, chunks)


def _group_width(fmt: CacheFormat, rank: int) -> tuple[int, int]:
    """(groups, kernel group width): one short group pads only to the next power of two."""
    n_groups = fmt.n_groups(rank)
    if n_groups == 1:
        return 1, next_pow2(rank, MIN_DOT)
    return n_groups, fmt.group


def _grouped_layout(fmt: CacheFormat, rank: int) -> LatentLayout:
    n_groups, width = _group_width(fmt, rank)
    chunks = tuple(Chunk(g * width, width, "all", g, g * width) for g in range(n_groups))
    return LatentLayout(rank, n_groups * width, n_groups * width, n_groups, chunks)


def _int4_layout(fmt: CacheFormat, rank: int) -> LatentLayout:
    n_groups, width = _group_width(fmt, rank)
    if n_groups == 1:
        # One group split in two halves, each at least MIN_DOT wide.
        width = max(width, 2 * MIN_DOT)
        half = width // 2
        chunks = (Chunk(0, half, "low", 0, 0), Chunk(0, half, "high", 0, half))
        return LatentLayout(rank, width, half, 1, chunks, repack_int4=rank != width)
    n_groups_p = n_groups + n_groups % 2  # whole groups in each half
    rank_p = n_groups_p * width
    half_groups = n_groups_p // 2
    chunks = []
    for g in range(half_groups):
        chunks.append(Chunk(g * width, width, "low", g, g * width))
        chunks.append(Chunk(g * width, width, "high", g + half_groups, rank_p // 2 + g * width))
    return LatentLayout(rank, rank_p, rank_p // 2, n_groups_p, tuple(chunks), repack_int4=rank != rank_p)


def pad_last(x, size: int, value=0):
    """Zero-pad (or `value`-pad) the last axis up to `size`; no copy when it already fits."""
    extra = size - x.shape[-1]
    if extra == 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)], constant_values=value)


def stored_for_kernel(layout: LatentLayout, fmt: CacheFormat, c_kv, scales):
    """(c_kv, scales) as the kernel reads them. A copy only for ranks that do not fit the layout."""
    if layout.repack_int4:
        c_kv = pack_int4(pad_last(unpack_int4(c_kv, layout.rank).astype(jnp.int32), layout.rank_p))
    else:
        c_kv = pad_last(c_kv, layout.width_p)
    if scales is not None:
        scales = pad_last(scales.astype(jnp.float32), layout.n_groups_p)
    return c_kv, scales

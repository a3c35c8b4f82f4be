"""Convert a Hugging Face DeepSeek folder (bf16 or FP8 safetensors) into a ktjax checkpoint, streaming.

    python convert/hf_to_ktjax.py --hf-dir DIR --out DIR [--weights {source,float32,bf16,fp8,int8,int4}]
                                  [--int4-group {64,128}] [--drop-mtp] [--dry-run] [--overwrite] [--quiet]

Everything that can be checked is checked before a byte is written (config, shard headers, every tensor's
shape, that every source tensor is used or deliberately skipped, disk space). The multi-token-prediction layer
(model/mtp.py) is kept where the folder has it, as the checkpoint's layer num_hidden_layers; --drop-mtp drops it.
Then each output tensor is read, transformed and written on its own, and each shard is closed once its last
tensor is read, so host memory stays bounded by the largest tensor, not the model (see checkpoint.py for the
layout).
The checkpoint is written into a hidden temporary folder beside --out and renamed at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import errno
import fcntl
import functools
import os
import re
import secrets
import shutil
import signal
import sys
import threading

import ml_dtypes
import numpy as np

from ktjax.weights.checkpoint import CHUNK_BYTES, MANIFEST, is_checkpoint
from ktjax.model.config import ModelConfig
from ktjax.errors import KtjaxError
from ktjax.model.fp8 import FP8_BLOCK, block_scale_shape, dequantize_blocks
from ktjax.weights.hub import resolve_model
from ktjax.weights.loader import (Entry, TensorSource, _skipped, layer_entries, mtp_absence, mtp_config,
                                  stack_entries, top_entries)
from ktjax.weights.params import MTP
from ktjax.util.units import format_bytes as fmt_bytes
from ktjax.model import quantized as weight_quant

WEIGHTS = ("source", "float32", "bf16", "fp8", *weight_quant.WEIGHT_FORMATS)
_CAST = {"float32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16)}
# Small files a model folder needs besides its weights (config, tokenizer, generation settings).
_COPIED_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken", ".py", ".md")
_INDEX = "model.safetensors.index.json"
_DISK_HEADROOM = 64 * 2**20  # zarr metadata, the manifest and file-system rounding


@dataclasses.dataclass
class Output:
    """One tensor of the checkpoint: what it is built from and how it is stored."""
    key: str
    entry: Entry
    scales: list[str | None]  # each source's FP8 block-scale tensor, or None for a dense source
    dtype: np.dtype           # stored dtype of the values
    keep_fp8: bool            # the values stay e4m3 and their block scales are written beside them
    shape: tuple              # the parameter's shape ([..., in, out]; stored so unless quantized)
    bytes_in: int
    quant: str | None = None  # "int8" or "int4": values and scales as in weight_quant.py
    group: int = weight_quant.INT4_GROUP

    @property
    def bytes_out(self) -> int:
        if self.quant:
            return weight_quant.stored_bytes(self.quant, self.shape, self.group)
        values = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        return values + (int(np.prod(block_scale_shape(self.shape), dtype=np.int64)) * 4 if self.keep_fp8 else 0)

    @property
    def arrays_out(self) -> int:
        return 2 if self.keep_fp8 or self.quant else 1

    @property
    def stored(self) -> tuple[tuple, np.dtype, tuple | None]:
        """(values shape, values dtype, scales shape or None) as written."""
        if self.quant:
            return weight_quant.stored_shapes(self.quant, self.shape, self.group)
        return self.shape, self.dtype, block_scale_shape(self.shape) if self.keep_fp8 else None

    @property
    def working_bytes(self) -> int:
        """Host memory held while making this output, at most: its inputs, a float32 dequantized copy, and
        three chunk bands (a converted band and tensorstore's copies). A stacked output streams one slice at
        a time."""
        parts = len(self.entry.sources) if self.entry.each else 1
        dense = int(np.prod(self.shape, dtype=np.int64)) * 4
        dequantized = 2 * dense if self.quant else 0 if self.keep_fp8 or not any(self.scales) else dense
        return (self.bytes_in + dequantized) // parts + 3 * min(self.bytes_out // parts, CHUNK_BYTES)


@dataclasses.dataclass
class Plan:
    hf_dir: str
    out: str
    weights: str
    outputs: list[Output]
    group: int
    source_count: int
    used: set[str]
    skipped: dict[str, list[str]]  # reason -> source tensor names
    copied_files: list[str]
    tensor_bytes: dict[str, int]   # every source tensor -> its size
    mtp_note: str | None = None    # why the folder's multi-token-prediction layer is not kept (None: kept, or none)
    mtp_kept: int = 0              # source tensors of the MTP layer kept

    @property
    def bytes_in(self) -> int:
        return sum(self.tensor_bytes[n] for n in self.used)

    @property
    def bytes_out(self) -> int:
        files = sum(os.path.getsize(os.path.join(self.hf_dir, f)) for f in self.copied_files)
        return sum(o.bytes_out for o in self.outputs) + files

    @property
    def tensors_out(self) -> int:
        return sum(o.arrays_out for o in self.outputs)

    @property
    def peak_bytes(self) -> int:
        return max((o.working_bytes for o in self.outputs), default=0)

    def bytes_by_kind(self) -> dict[str, int]:
        """Bytes out split into the quantized tensors and the rest (embeddings, norms, router, w_uk/w_uv)."""
        out = {"quantized": 0, "kept": 0}
        for o in self.outputs:
            out["quantized" if o.quant else "kept"] += o.bytes_out
        return out


# ---- the plan: every check, no writes ---------------------------------------------------------------

def _stored_dtype(weights: str, entry: Entry, src_dtype: np.dtype, fp8_source: bool) -> tuple[np.dtype, bool]:
    """(stored dtype, keep FP8) for one output under --weights."""
    if fp8_source:
        if weights in ("source", "fp8"):
            # kv_b_proj's per-head split cuts through 128x128 blocks: dequantize it, exactly, in float32.
            return (src_dtype, True) if entry.blockwise else (np.dtype(np.float32), False)
        return _CAST[weights], False
    floating = src_dtype.kind == "f" or src_dtype == _CAST["bf16"]
    if weights not in _CAST or not floating:
        return src_dtype, False
    if weights == "bf16" and entry.param is not None and entry.param.float32:
        return src_dtype, False
    return _CAST[weights], False


def _model_entries(cfg: ModelConfig, names: set[str]) -> list[tuple[str, Entry]]:
    from ktjax.weights.checkpoint import tensor_key

    out = [(tensor_key(e.path), e) for e in top_entries(cfg)]
    for i in range(cfg.num_hidden_layers):
        out += [(tensor_key(e.path, i), e) for e in layer_entries(cfg, i, i >= cfg.num_dense_layers, names)]
    for i in MTP.layers(cfg):  # the multi-token-prediction layer, where cfg keeps it (mtp_config)
        out += [(tensor_key(e.path, i), e) for e in stack_entries(cfg, MTP, i, names)]
    return out


def _is_mtp(name: str, cfg: ModelConfig) -> bool:
    """Whether `name` is of an MTP layer that is not kept (a kept one's only leftover, its copy of the embedding,
    is an unused tensor)."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return bool(m) and int(m.group(1)) >= cfg.num_hidden_layers + cfg.mtp_layers


LM_HEAD = ("lm_head", "kernel")


def _is_lm_head(entry: Entry) -> bool:
    return entry.param is not None and entry.param.path == LM_HEAD


def _plan_output(src: TensorSource, key: str, entry: Entry, weights: str,
                 group: int = weight_quant.INT4_GROUP, lm_head: str = "kept") -> Output:
    shape = tuple(entry.shape)
    scales = [src.check(n, s) for n, s in zip(entry.sources, entry.shapes)]
    dtypes = {src.file(n).dtype(n) for n in entry.sources}
    if len(dtypes) > 1 or len({s is None for s in scales}) > 1:
        raise KtjaxError(f"{entry.sources[0]} and the tensors stacked with it disagree in dtype or quantization")
    src_dtype = dtypes.pop()
    bytes_in = sum(src.file(n).nbytes(n) for n in entry.sources + [s for s in scales if s])
    if weights in weight_quant.WEIGHT_FORMATS and entry.param is not None and entry.param.quantize:
        _, dtype, _ = weight_quant.stored_shapes(weights, shape, group)
        return Output(key, entry, scales, dtype, False, shape, bytes_in, quant=weights, group=group)
    if lm_head == "int8" and _is_lm_head(entry):
        return Output(key, entry, scales, np.dtype(np.int8), False, shape, bytes_in, quant="int8", group=group)
    # Everything int8/int4 leaves alone stays in the source's precision (FP8 kv_b_proj: float32, exactly).
    dtype, keep_fp8 = _stored_dtype("source" if weights in weight_quant.WEIGHT_FORMATS else weights, entry, src_dtype,
                                    scales[0] is not None)
    return Output(key, entry, scales, dtype, keep_fp8, shape, bytes_in)


def _check_paths(hf_dir: str, out: str, overwrite: bool):
    if not os.path.isdir(hf_dir):
        raise KtjaxError(f"--hf-dir {hf_dir}: no such folder")
    if not out.strip():
        raise KtjaxError("--out is empty; name the checkpoint folder to create")
    real_src, real_out = os.path.realpath(hf_dir), os.path.realpath(out)
    if _contains(real_out, os.path.realpath(os.getcwd())):  # ".", "..", "/": replacing it loses the cwd
        raise KtjaxError(f"--out {out} is the current folder or one of its parents; choose a new folder")
    if _contains(real_out, real_src) or _contains(real_src, real_out):
        raise KtjaxError(f"--out {out} must lie outside --hf-dir {hf_dir} (and not contain it)")
    if os.path.lexists(out):
        if not overwrite:
            raise KtjaxError(f"--out {out} already exists; pass --overwrite to replace it, or choose another --out")
        if not os.path.isdir(out):
            raise KtjaxError(f"--out {out} exists and is not a folder; remove it or choose another --out")
        if not _replaceable(out):
            raise KtjaxError(f"--out {out} is not a ktjax checkpoint and not empty; --overwrite replaces only a "
                             "checkpoint: remove it yourself or choose another --out")
    parent = _existing_parent(out)
    if not os.access(parent, os.W_OK):
        raise KtjaxError(f"--out {out}: cannot write into {parent} (permission denied)")


def _replaceable(out: str) -> bool:
    """What --overwrite may replace: a ktjax checkpoint or an empty folder, never other data."""
    return os.path.isdir(out) and (not os.listdir(out) or is_checkpoint(out))


def _contains(folder: str, path: str) -> bool:
    """Whether real path `path` is `folder` or lies inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _existing_parent(out: str) -> str:
    """The nearest existing folder that will hold --out (for a symbolic link, the folder of its target)."""
    parent = os.path.dirname(os.path.realpath(out))
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    return parent


def make_plan(hf_dir: str, out: str, weights: str = "source", mtp: bool = True,
              overwrite: bool = False, group: int = weight_quant.INT4_GROUP, lm_head: str = "kept") -> Plan:
    """Check everything that can be checked without writing, and decide what each output tensor will be.
    `hf_dir` may be a Hugging Face Hub id (org/name[@revision]): its snapshot, fetched unless cached, is read.
    The folder's MTP layer is kept unless mtp=False (--drop-mtp) or the folder lacks some of its tensors."""
    hf_dir = resolve_model(hf_dir, "--hf-dir")  # a local folder of that name wins
    _check_paths(hf_dir, out, overwrite)
    cfg = ModelConfig.from_file(os.path.join(hf_dir, "config.json"))
    src = TensorSource(hf_dir, owned=True)
    try:
        for path in sorted(set(src.where.values())):  # parse every header now: a bad shard fails before writing
            src.shard(path)
        names = set(src.where)
        mtp_note = mtp_absence(cfg, names, mtp)
        cfg = mtp_config(cfg, names, mtp)
        outputs = [_plan_output(src, key, e, weights, group, lm_head) for key, e in _model_entries(cfg, names)]
        used = {n for o in outputs for n in o.entry.sources + o.scales if n}
        skipped = _skipped_by_reason(cfg, names - used)
        unexpected = sorted(names - used - {n for ns in skipped.values() for n in ns})
        if unexpected:
            raise KtjaxError(f"{hf_dir}: {len(unexpected)} tensor(s) that config.json does not account for, e.g. "
                             f"{', '.join(unexpected[:5])}; the config does not match the weights")
        if weights == "fp8" and not any(o.keep_fp8 for o in outputs):
            raise KtjaxError(f"--weights fp8 keeps FP8 weights with their block scales, but {hf_dir} holds no FP8 "
                             "weights; use --weights source, bf16 or float32")
        tensor_bytes = {n: src.file(n).nbytes(n) for n in names}
    finally:
        src.close()
    copied = sorted(f for f in os.listdir(hf_dir) if f.endswith(_COPIED_SUFFIXES) and f != _INDEX
                    and os.path.isfile(os.path.join(hf_dir, f)))
    mtp_layer = f"model.layers.{cfg.num_hidden_layers}."
    return Plan(hf_dir, out, weights, outputs, group, len(names), used, skipped, copied, tensor_bytes,
                mtp_note=mtp_note,
                mtp_kept=sum(n.startswith(mtp_layer) for n in used) if cfg.mtp_layers else 0)


def _skipped_by_reason(cfg: ModelConfig, unused: set[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in sorted(unused):
        if _is_mtp(n, cfg):
            out.setdefault("mtp", []).append(n)
        elif _skipped(n, cfg):
            out.setdefault("unused", []).append(n)
    return out


# ---- reporting -------------------------------------------------------------------------------------

def describe(plan: Plan) -> str:
    kept = sum(o.keep_fp8 for o in plan.outputs)
    quantized = sum(bool(o.quant) for o in plan.outputs)
    head = any(o.quant and _is_lm_head(o.entry) for o in plan.outputs)
    quantizes = plan.weights in weight_quant.WEIGHT_FORMATS
    which = (["attention projections, dense MLPs, shared and routed experts"] if quantizes else []) + (
        ["lm_head (int8)"] if head else [])
    lines = [f"ktjax conversion plan: {plan.hf_dir} -> {plan.out}",
             f"  weights:        --weights {plan.weights}"
             + (f" ({kept} FP8 tensors kept as e4m3 + {FP8_BLOCK}x{FP8_BLOCK} block scales)" if kept else "")
             + (f" ({quantized} tensors quantized{_quant_detail(plan)})" if quantized else ""),
             f"  source tensors: {plan.source_count} ({len(plan.used)} used, "
             f"{sum(len(v) for v in plan.skipped.values())} skipped)",
             f"  tensors out:    {plan.tensors_out} (+ {len(plan.copied_files)} config/tokenizer files)",
             f"  bytes in:       {fmt_bytes(plan.bytes_in)}",
             f"  bytes out:      {fmt_bytes(plan.bytes_out)}",
             *([f"    quantized:    {fmt_bytes(plan.bytes_by_kind()['quantized'])} ({', '.join(which)})",
                f"    kept:         {fmt_bytes(plan.bytes_by_kind()['kept'])} in source precision (embeddings, "
                + ("" if head else "lm_head, ") + "norms, router, w_uk/w_uv)"] if quantized else []),
             f"  peak memory:    about {fmt_bytes(plan.peak_bytes)} of arrays at once, "
             "plus about 250 MiB for Python, JAX and tensorstore"]
    mtp = plan.skipped.get("mtp", [])
    if plan.mtp_kept:
        lines.append(f"  multi-token-prediction layer: kept ({plan.mtp_kept} source tensors), the draft model of "
                     "speculative decoding; --drop-mtp drops it")
    if mtp:
        size = sum(plan.tensor_bytes[n] for n in mtp)
        why = plan.mtp_note or ("ktjax keeps the first MTP layer only" if plan.mtp_kept else
                                "config.json has no num_nextn_predict_layers")
        lines.append(f"  skipping the multi-token-prediction layer ({len(mtp)} tensors, {fmt_bytes(size)}, "
                     f"e.g. {mtp[0]}): {'--drop-mtp' if why == 'dropped at load' else why}")
    if plan.skipped.get("unused"):
        lines.append(f"  skipping {len(plan.skipped['unused'])} tensor(s) the model does not use "
                     f"(e.g. {plan.skipped['unused'][0]})")
    return "\n".join(lines)


def _quant_detail(plan: Plan) -> str:
    if plan.weights == "int4":
        return f", two per byte, one float32 scale per {plan.group} inputs and output"
    return ", one float32 scale per output channel"


def check_disk_space(plan: Plan):
    parent = _existing_parent(plan.out)
    free = shutil.disk_usage(parent).free
    need = plan.bytes_out + plan.bytes_out // 100 + _DISK_HEADROOM  # + chunk padding and file-system blocks
    if free < need:
        raise KtjaxError(f"not enough disk space for --out {plan.out}: the checkpoint needs {fmt_bytes(need)} "
                         f"and {parent} has {fmt_bytes(free)} free; free some space or choose another --out")


# ---- the conversion: one output tensor at a time -------------------------------------------------------

class _StreamingReader:
    """Reads each source tensor once, reports bytes to the progress bar, and closes each shard after its
    last tensor. The last output's inputs are kept for the next output when it reads the same tensors
    (kv_b_proj feeds both w_uk and w_uv)."""

    def __init__(self, plan: Plan, progress):
        self.src = TensorSource(plan.hf_dir, owned=True)
        self.progress = progress
        self.left: dict[str, int] = {}
        for n in plan.used:
            self.left[self.src.where[n]] = self.left.get(self.src.where[n], 0) + 1
        self.done: set[str] = set()
        self._last: tuple[tuple, list] = ((), [])

    def read_all(self, entry: Entry) -> list[tuple[np.ndarray, np.ndarray | None]]:
        key = tuple(entry.sources)
        if self._last[0] != key:
            self._last = ((), [])  # drop the previous inputs before reading new ones
            self._last = (key, [self.read(n, s) for n, s in zip(entry.sources, entry.shapes)])
        return self._last[1]

    def forget(self):
        self._last = ((), [])

    def read(self, name: str, shape: tuple) -> tuple[np.ndarray, np.ndarray | None]:
        q, scale = self.src.raw(name, shape)
        for n in (name, name + "_scale_inv") if scale is not None else (name,):
            self._finished(n)
        return q, scale

    def _finished(self, name: str):
        if name in self.done:
            return
        self.done.add(name)
        self.progress.update(self.src.file(name).nbytes(name))
        path = self.src.where[name]
        self.left[path] -= 1
        if self.left[path] == 0:
            self.src.close_shard(path)

    def close(self):
        self.forget()
        self.src.close()


def _dense(q: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    return q if scale is None else dequantize_blocks(q, scale)


def _write_whole(writer, reader: _StreamingReader, out: Output):
    from ktjax.weights.checkpoint import scale_key

    inputs = reader.read_all(out.entry)
    if out.quant:
        values, scales = weight_quant.quantize_weight(out.entry.fn(*[_dense(q, s) for q, s in inputs]), out.quant,
                                                      out.group)
        writer.write(scale_key(out.key), scales)
        writer.write(out.key, values)
        return
    if out.keep_fp8:
        values = out.entry.fn(*[q for q, _ in inputs])
        scales = out.entry.fn(*[s for _, s in inputs])
        writer.write(scale_key(out.key), scales, np.float32)
    else:
        values = out.entry.fn(*[_dense(q, s) for q, s in inputs])
    assert values.shape == out.shape, (out.key, values.shape, out.shape)  # a bug in the entries, not bad input
    writer.write(out.key, values, out.dtype)  # `values` may be a transposed view: copied band by band


def _write_stacked(writer, reader: _StreamingReader, out: Output):
    """A stacked output (the routed experts) written one slice at a time, as its sources are read."""
    from ktjax.weights.checkpoint import scale_key

    entry = out.entry
    reader.forget()
    values_shape, dtype, scales_shape = out.stored
    values = writer.create(out.key, values_shape, dtype)
    scales = None if scales_shape is None else writer.create(scale_key(out.key), scales_shape, np.float32)
    for j, (name, shape) in enumerate(zip(entry.sources, entry.shapes)):
        q, s = reader.read(name, shape)
        if out.quant:  # one expert at a time: the float32 copy is one expert's
            part_q, part_s = weight_quant.quantize_weight(entry.each(_dense(q, s)), out.quant, out.group)
            scales[j].write(part_s).result()
            values[j].write(part_q).result()
            continue
        if out.keep_fp8:
            scales[j].write(np.ascontiguousarray(entry.each(s), np.float32)).result()
            part = entry.each(q)
        else:
            part = entry.each(_dense(q, s))
        assert part.shape == out.shape[1:], (out.key, part.shape, out.shape)
        values[j].write(np.ascontiguousarray(part, out.dtype)).result()


def _write_checkpoint(plan: Plan, folder: str, quiet: bool):
    from tqdm import tqdm

    from ktjax.util.version import __version__
    from ktjax.weights.checkpoint import CheckpointWriter

    writer = CheckpointWriter(folder)
    with tqdm(total=plan.bytes_in, unit="B", unit_scale=True, unit_divisor=1000, desc="converting",
              disable=quiet, file=sys.stderr, dynamic_ncols=True) as progress:
        reader = _StreamingReader(plan, progress)
        try:
            for out in plan.outputs:
                (_write_stacked if out.entry.each else _write_whole)(writer, reader, out)
                progress.set_postfix_str(f"{len(writer.tensors)}/{plan.tensors_out} tensors", refresh=False)
        finally:
            reader.close()
    missed = plan.used - reader.done
    assert not missed, f"planned but never read: {sorted(missed)[:5]}"
    for f in plan.copied_files:
        shutil.copy2(os.path.join(plan.hf_dir, f), os.path.join(folder, f))
    writer.write_manifest(
        ktjax_version=__version__, source=os.path.abspath(plan.hf_dir), weights=plan.weights,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        fp8_block=FP8_BLOCK, **({"int4_group": plan.group} if plan.weights == "int4" else {}),
        source_tensor_count=plan.source_count, source_tensors_used=len(plan.used),
        source_tensors_skipped={k: len(v) for k, v in plan.skipped.items()}, bytes=plan.bytes_out)


class InterruptedAfterWriting(KeyboardInterrupt):
    """A signal that arrived while the finished checkpoint was being moved into place: it is complete."""


def convert(plan: Plan, quiet: bool = False, overwrite: bool = False):
    """Write the planned checkpoint into a temporary folder beside --out, then rename it into place.

    Only one conversion at a time may write a given --out (a lock beside it). Leftovers of an earlier
    conversion that was killed are recovered or named first. Whatever fails, the temporary folder is removed,
    with SIGINT/SIGTERM held until that clean-up ends, so "nothing written" is true when it is said.
    An --out that is a symbolic link to a checkpoint (checked by make_plan) names the checkpoint to replace:
    the new one is written beside that target, and the link keeps pointing at it.
    """
    out = os.path.realpath(plan.out) if os.path.islink(plan.out) else os.path.abspath(plan.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with _OutputLock(out):
        _recover_leftovers(out, overwrite)
        tmp = _new_folder(os.path.dirname(out), _partial_prefix(out))
        try:
            try:
                _write_checkpoint(plan, tmp, quiet)
            except ValueError as e:
                raise _as_write_error(e) from None
            with _signals_deferred() as received:
                _move_into_place(tmp, out, overwrite)
        except BaseException:
            with _signals_deferred():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if received:
            raise InterruptedAfterWriting


def _partial_prefix(out: str) -> str:
    return f".{os.path.basename(out)}.partial-"


def _backup_prefix(out: str) -> str:
    return f".{os.path.basename(out)}.old-"


def _new_folder(parent: str, prefix: str) -> str:
    """A new empty folder `prefix` + random letters in `parent`, with the mode the umask allows (tempfile.mkdtemp
    makes 0700 folders, and the checkpoint is this folder renamed)."""
    while True:
        path = os.path.join(parent, prefix + secrets.token_hex(4))
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue


def _as_write_error(e: ValueError) -> Exception:
    """tensorstore reports a failed write (disk full, permission) as ValueError("RESOURCE_EXHAUSTED: ...")."""
    if isinstance(e, KtjaxError) or not re.match(r"[A-Z_]+: ", str(e)):
        return e
    return OSError(str(e).splitlines()[0][:300])


def _move_into_place(tmp: str, out: str, overwrite: bool):
    """Rename the finished checkpoint to --out. Never replaces what appeared at --out after planning, and with
    --overwrite the old checkpoint stays whole (renamed aside) until the new one is in place."""
    if not os.path.lexists(out) or not overwrite:
        try:
            _rename_noreplace(tmp, out)
        except FileExistsError:
            raise KtjaxError(f"--out {out} appeared while converting; it was left alone and nothing was written "
                             "(pass --overwrite to replace it)") from None
        return
    if os.path.islink(out) or not _replaceable(out):  # checked again: it may have changed since planning
        raise KtjaxError(f"--out {out} is no longer a ktjax checkpoint; it was left alone and nothing was written")
    backup = _rename_aside(out)
    try:
        _rename_noreplace(tmp, out)
    except BaseException:
        os.rename(backup, out)
        raise
    # The manifest goes first: a removal cut short never leaves a folder that looks like a whole checkpoint.
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(backup, MANIFEST))
    shutil.rmtree(backup, ignore_errors=True)


def _rename_aside(out: str) -> str:
    """Rename `out` to a new backup name beside it, atomically and replacing nothing; so a `.old-*` folder
    exists only while it holds what was at `out` (no empty folder is reserved for it first)."""
    while True:
        backup = os.path.join(os.path.dirname(out), _backup_prefix(out) + secrets.token_hex(4))
        try:
            _rename_noreplace(out, backup)
            return backup
        except FileExistsError:  # that name is taken: draw another
            continue


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_noreplace(src: str, dst: str):
    """Rename `src` to `dst`, failing with FileExistsError where `dst` exists: atomically through Linux's
    renameat2(RENAME_NOREPLACE); where libc or the file system lacks it, a check just before the rename."""
    renameat2 = _libc_renameat2()
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), dst)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


@functools.lru_cache(maxsize=1)
def _libc_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


class _OutputLock:
    """An exclusive lock on one --out (flock on a hidden file beside it): a second converter exits at once.
    The lock file is removed on release; a locker checks that the file it locked is still the one at the path."""

    def __init__(self, out: str):
        self.out = out
        self.path = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.lock")
        self.fd = None

    def __enter__(self):
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise KtjaxError(f"--out {self.out}: another conversion is writing it now; wait for it to end, "
                                 "or choose another --out") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
            else:  # the holder before us removed the file: lock the new one
                os.close(fd)
        return self

    def __exit__(self, *exc):
        with _signals_deferred():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)  # closing releases the lock
            self.fd = None


def _recover_leftovers(out: str, overwrite: bool):
    """Clean up after a conversion of `out` that was killed (SIGKILL, power loss); the lock says none runs now.
    Its temporary folders are removed. Its backup (an --overwrite killed between its two renames) is renamed
    back to `out` when `out` is missing, and named otherwise: it holds the user's previous checkpoint."""
    parent = os.path.dirname(out)
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if name.startswith(_partial_prefix(out)):
            with _signals_deferred():
                shutil.rmtree(path, ignore_errors=True)
            print(f"note: removed {path}, left by an interrupted conversion", file=sys.stderr)
        elif name.startswith(_backup_prefix(out)):
            if os.path.islink(path) or not os.path.isdir(path):
                continue  # never made by a conversion
            if not os.listdir(path):  # reserved by an older ktjax that was killed before its first rename
                with contextlib.suppress(OSError):  # filled meanwhile: then it is named below, next time
                    os.rmdir(path)
                    print(f"note: removed {path}, an empty folder left by an interrupted --overwrite",
                          file=sys.stderr)
                continue
            if os.path.lexists(out):
                print(f"note: {path} holds {_backup_contents(path)}, which an interrupted --overwrite of {out} "
                      "replaced; it is kept: remove it when you no longer need it", file=sys.stderr)
                continue
            _rename_noreplace(path, out)
            if not overwrite:
                raise KtjaxError(f"--out {out} was restored from {path}, left by an interrupted --overwrite; "
                                 "pass --overwrite to replace it, or choose another --out")
            print(f"note: restored {out} from {path}, left by an interrupted --overwrite", file=sys.stderr)


def _backup_contents(path: str) -> str:
    """What a backup folder holds, in a few words for the recovery note."""
    if not is_checkpoint(path):
        return f"{len(os.listdir(path))} entries but no checkpoint manifest (what a cut-short removal left)"
    from ktjax.util.jsonio import read_json

    manifest = read_json(os.path.join(path, MANIFEST))
    return (f"a ktjax checkpoint ({manifest.get('weights', '?')} weights, converted {manifest.get('created', '?')} "
            f"from {manifest.get('source', '?')})")


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM until the block ends, so that clean-up and renames are never cut in half; yields
    the list of signals that arrived. Outside the main thread (no handlers there) it only yields."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM stops a conversion as Ctrl-C does (its temporary folder removed), also when main() is called
    in-process from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- the command line ------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """A bad flag is bad input like any other: one line, exit code 2."""
        print(f"error: {message} (run with --help for usage)", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="hf_to_ktjax.py", description="Convert a Hugging Face DeepSeek folder "
                                "(bf16 or FP8 safetensors) into a ktjax checkpoint, streaming.")
    from ktjax.util.version import version_text
    p.add_argument("--version", action="version", version=version_text(), help="print ktjax's version and exit")
    p.add_argument("--hf-dir", required=True, help="Hugging Face model folder (config.json + *.safetensors), or a "
                   "Hugging Face Hub id (org/name or org/name@revision), downloaded into the Hugging Face cache")
    p.add_argument("--out", required=True, help="checkpoint folder to create")
    p.add_argument("--weights", choices=WEIGHTS, default="source",
                   help="stored precision: source keeps what the folder has (FP8 stays FP8); float32 and bf16 "
                        "cast (dequantizing FP8); fp8 keeps FP8 weights with their block scales; int8 (one scale "
                        "per output channel) and int4 (group-wise scales) quantize the attention projections, "
                        "dense MLPs and experts, and keep the rest in source precision")
    p.add_argument("--int4-group", type=int, choices=(64, 128), default=weight_quant.INT4_GROUP,
                   help=f"inputs per int4 scale (default {weight_quant.INT4_GROUP})")
    p.add_argument("--lm-head", choices=("kept", "int8"), default="kept",
                   help="kept: lm_head in source precision (default); int8: one scale per vocabulary entry, a "
                        "quarter of its float32 bytes, which a decode step reads in full (llama.cpp's Q8_0 and "
                        "Q4_0 files store it as Q8_0 and Q6_K)")
    p.add_argument("--drop-mtp", action="store_true", help="drop the multi-token-prediction layer (kept by "
                   "default where the folder has it: speculative decoding's draft model)")
    p.add_argument("--keep-mtp", action="store_true", help="accepted for older scripts: keeping it is the default")
    p.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no plan and no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """The command line; returns the exit code (0 done, 2 bad input, 1 an I/O failure, 130 interrupted)."""
    from ktjax.util.process import OutputFailed, report_output_failure

    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag already reported
        return e.code
    try:
        with _sigterm_interrupts():
            return _run(args)
    except OutputFailed as e:  # stdout full, closed or a broken pipe: one line (none for the pipe), exit 1
        return report_output_failure(e)


def _run(args: argparse.Namespace) -> int:
    from ktjax.util.process import write_out
    from ktjax.util.text import utf8_error

    try:
        for flag, path in (("--hf-dir", args.hf_dir), ("--out", args.out)):
            if utf8_error(path):  # tensorstore and the manifest take UTF-8 paths only
                raise KtjaxError(f"{flag} {path!r}: {utf8_error(path)}; rename it")
        plan = make_plan(args.hf_dir, args.out, args.weights, not args.drop_mtp, args.overwrite, args.int4_group,
                         args.lm_head)
        if not args.quiet or args.dry_run:
            write_out(describe(plan) + "\n")
        if args.dry_run:
            write_out("dry run: nothing written\n")
            return 0
        check_disk_space(plan)
        convert(plan, args.quiet, args.overwrite)
    except KtjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except InterruptedAfterWriting:
        print(f"interrupted after {args.out} was written in full", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"error: writing {args.out} failed: {e}; nothing was written", file=sys.stderr)
        return 1
    if not args.quiet:
        write_out(f"wrote {args.out}: {plan.tensors_out} tensors, {fmt_bytes(plan.bytes_out)}\n")
    return 0

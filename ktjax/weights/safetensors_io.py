"""A small, strict safetensors reader over numpy memory maps.

The `safetensors` package's numpy loader has no float8 dtypes, and DeepSeek-V3's official weights are
float8_e4m3fn; ml_dtypes has them all. Reading the header ourselves also lets a truncated file or a corrupt
header fail with a message that names the file, before any tensor is touched.
"""
from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from ktjax.errors import KtjaxError
from ktjax.util.files import open_regular

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER = 100_000_000  # as the reference implementation (safetensors' MAX_HEADER_SIZE)
_MAX_RANK = 64


def _unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise KtjaxError(f"corrupt safetensors header: {duplicate!r} appears twice")
    return dict(pairs)


def parse_header(raw: bytes, data_size: int) -> dict[str, tuple[np.dtype, tuple, int]]:
    """Validate a safetensors header as the format's reference implementation does and return
    {name: (dtype, shape, begin)}; anything else is a KtjaxError (the caller adds the file name).

    The header is UTF-8 JSON: one object of tensors, each {"dtype", "shape", "data_offsets"}, names unique,
    plus an optional "__metadata__" map of strings. Offsets are integers; sorted, the tensors tile the data
    section from 0 to its very end, without gaps or overlaps, and each spans shape x dtype-size bytes.
    """
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        if isinstance(e, KtjaxError):
            raise
        raise KtjaxError(f"corrupt safetensors header ({str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise KtjaxError("corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise KtjaxError("corrupt safetensors header: __metadata__ must map strings to strings")
    entries = {name: _header_entry(name, entry) for name, entry in header.items()}
    end = 0
    for name, (dtype, shape, begin, stop) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != end:
            raise KtjaxError(f"corrupt safetensors header: {name!r} starts at byte {begin} of the data section, "
                             f"not at {end} where the previous tensor ends (a gap or an overlap)")
        end = stop
    if end > data_size:
        raise KtjaxError(f"truncated safetensors file: the tensors end at byte {end} of the data section, which "
                         f"has only {data_size} bytes; re-download this shard")
    if end < data_size:
        raise KtjaxError(f"corrupt safetensors file: {data_size - end} bytes after the last tensor")
    return {name: (dtype, shape, begin) for name, (dtype, shape, begin, _) in entries.items()}


def _header_entry(name: str, entry) -> tuple[np.dtype, tuple, int, int]:
    """(dtype, shape, begin, end) of one tensor, or a KtjaxError naming it."""
    def bad(why):
        return KtjaxError(f"corrupt safetensors header entry for {name!r}: {why}")

    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad('needs exactly "dtype", "shape" and "data_offsets"')
    if not isinstance(entry["dtype"], str) or entry["dtype"] not in DTYPES:
        raise bad(f"unknown dtype {str(entry['dtype'])[:40]!r} (one of {', '.join(DTYPES)})")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or len(shape) > _MAX_RANK or not all(_is_count(d) for d in shape):
        raise bad("shape must be a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(x) for x in offsets):
        raise bad("data_offsets must be two non-negative integers")
    dtype = np.dtype(DTYPES[entry["dtype"]])
    begin, end = offsets
    size = math.prod(shape) * dtype.itemsize
    if end - begin != size:
        raise KtjaxError(f"corrupt safetensors header: {name!r} has {end - begin} bytes for shape "
                         f"{tuple(shape)} of {entry['dtype']}")
    return dtype, tuple(shape), begin, end


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class SafetensorsFile:
    """One shard: `keys()`, `shape(name)`, `dtype(name)`, `get(name)` (a read-only memmap view).

    Use as a context manager, so the mapping is dropped (its pages stop counting as resident) when done.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            fd = open_regular(path, "safetensors shard")
            with os.fdopen(fd, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                if len(head) < 8:
                    raise KtjaxError(f"{path}: truncated safetensors file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", head)
                if n > min(_MAX_HEADER, size - 8):
                    raise KtjaxError(f"{path}: corrupt safetensors header (claims {n} header bytes in a "
                                     f"{size}-byte file)")
                raw = f.read(n)
        except FileNotFoundError:
            raise KtjaxError(f"{path}: file not found") from None
        except IsADirectoryError:
            raise KtjaxError(f"{path}: a folder, not a safetensors file") from None
        except PermissionError:
            raise KtjaxError(f"{path}: permission denied") from None
        try:
            self._entries = parse_header(raw, size - 8 - n)
        except KtjaxError as e:
            raise KtjaxError(f"{path}: {e}") from None
        self._data_start = 8 + n
        self._mmap = None
        self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        # Dropping the map unmaps it once no array still views it; callers copy what they keep.
        self._mmap = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def keys(self):
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def nbytes(self, name: str) -> int:
        dtype, shape, _ = self._entries[name]
        return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

    def get(self, name: str) -> np.ndarray:
        dtype, shape, begin = self._entries[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        start = self._data_start + begin
        raw = self._mmap[start:start + self.nbytes(name)]
        return raw.view(dtype).reshape(shape)

    def read(self, name: str) -> np.ndarray:
        """An owned copy of one tensor, read with pread: no mapping, so only this array counts as resident."""
        dtype, shape, begin = self._entries[name]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        out = np.empty(shape, dtype)
        view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], self._data_start + begin + done)
            if n == 0:
                raise KtjaxError(f"{self.path}: truncated safetensors file: {name!r} could not be read in full; "
                                 "re-download this shard")
            done += n
        return out


def _is_file_name(shard) -> bool:
    """A shard named by the index must be a file of the folder itself: no path, no "..", nothing outside."""
    return isinstance(shard, str) and shard not in ("", ".", "..") and os.sep not in shard and "\0" not in shard


def list_shards(folder: str) -> dict[str, str]:
    """Map each tensor name to its shard file, from model.safetensors.index.json or the *.safetensors present."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index_path):
        from ktjax.util.jsonio import read_json
        weight_map = read_json(index_path, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) and _is_file_name(s)
                                                       for n, s in weight_map.items()):
            raise KtjaxError(f"{index_path}: weight_map must map each tensor name to a shard file in {folder}")
        missing = sorted({s for s in weight_map.values() if not os.path.exists(os.path.join(folder, s))})
        if missing:
            raise KtjaxError(f"{index_path} names shard(s) that are not in {folder}: {', '.join(missing)}; "
                             "the download is incomplete")
        return {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not shards:
        raise KtjaxError(f"{folder}: no *.safetensors files and no model.safetensors.index.json")
    mapping = {}
    for shard in shards:
        path = os.path.join(folder, shard)
        for name in SafetensorsFile(path).keys():
            mapping[name] = path
    return mapping

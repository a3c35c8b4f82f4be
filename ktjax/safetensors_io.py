"""A small, strict safetensors reader over numpy memory maps.

The `safetensors` package's numpy loader has no float8 dtypes, and DeepSeek-V3's official weights are
float8_e4m3fn; ml_dtypes has them all. Reading the header ourselves also lets a truncated file or a corrupt
header fail with a message that names the file, before any tensor is touched.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from .errors import KtjaxError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One shard: `keys()`, `shape(name)`, `dtype(name)`, `get(name)` (a read-only memmap view).

    Use as a context manager, so the mapping is dropped (its pages stop counting as resident) when done.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise KtjaxError(f"{path}: truncated safetensors file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", head)
                if n > min(_MAX_HEADER, size - 8):
                    raise KtjaxError(f"{path}: corrupt safetensors header (claims {n} header bytes in a "
                                     f"{size}-byte file)")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise KtjaxError(f"{path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise KtjaxError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise KtjaxError(f"{path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self._data_start = 8 + n
        self._entries = {}
        data_size = size - self._data_start
        for name, entry in header.items():
            try:
                dtype = np.dtype(DTYPES[entry["dtype"]])
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise KtjaxError(f"{path}: corrupt safetensors header entry for {name!r}: {entry!r}") from None
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise KtjaxError(f"{path}: corrupt safetensors header: {name!r} has {end - begin} bytes for shape "
                                 f"{shape} of {entry['dtype']}")
            if end > data_size:
                raise KtjaxError(f"{path}: truncated safetensors file: {name!r} ends at byte {end} of the data "
                                 f"section, which has only {data_size} bytes; re-download this shard")
            self._entries[name] = (dtype, shape, begin)
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


def list_shards(folder: str) -> dict[str, str]:
    """Map each tensor name to its shard file, from model.safetensors.index.json or the *.safetensors present."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index_path):
        from .jsonio import read_json
        weight_map = read_json(index_path, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise KtjaxError(f"{index_path}: not a valid safetensors index (no \"weight_map\" object)")
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

"""The converted checkpoint: one uncompressed zarr3 array per parameter per layer, plus a manifest.

Layout (version 1) of a folder written by `convert/hf_to_ktjax.py`:

    manifest.json          format, layout_version, ktjax_version, source, weights, dtypes, tensor_count, tensors
    config.json            the source's config (and its tokenizer and generation files)
    params/embed           top-level parameters, named by their path in the model ("norm.weight", ...)
    params/layers/007/attn.w_uk           decoder layer 7's parameters, named relative to the layer
    params/layers/007/mlp.w_gate          routed experts [E, d, f], one chunk per expert
    params/layers/007/mlp.w_gate_scale    FP8 block scales (or int8/int4 scales), beside the values they scale
    params/layers/061/eh_proj.kernel      the multi-token-prediction layer (layer num_hidden_layers: its block's
                                          parameters and its own, model/mtp.py), where the source has it
    params/_METADATA       Orbax's tree metadata: `params/` is also an Orbax PyTree checkpoint of {key: array}

Arrays are written through tensorstore (Orbax's storage backend) in chunks of at most CHUNK_BYTES, so a
converter can write a stacked tensor one slice at a time and a loader can read one layer, or one device's
shard, at a time. The stacks that the model scans over are built at load time, one layer at a time.

Integrity: each chunk file ends with the crc32c of its bytes (zarr3's crc32c codec; tensorstore refuses a chunk
whose bytes changed), and the manifest holds one sha256 per array over its name, dtype, shape, zarr.json and
each chunk's size and crc32c in grid order, so a chunk moved, swapped or edited with its crc, an edited
zarr.json, a relabelled manifest entry or a layer folder that points at another layer is refused naming the
array. Before an array is first read its folders and chunk files are checked with lstat to be real folders and
regular files (a FIFO would block the reader). Checkpoints written before the digests load with a note.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import stat
import sys

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from flax import nnx

from ktjax.weights import params
from ktjax.model.config import ModelConfig
from ktjax.errors import KtjaxError, require_finite
from ktjax.util.jsonio import loads_bounded
from ktjax.model.fp8 import FP8_DTYPES
from ktjax.model.decoder import DeepseekModel, PerLayer
from ktjax.model.quantized import QuantizedArray
from ktjax.weights.quantize import set_param

FORMAT = "ktjax-checkpoint"
LAYOUT_VERSION = 1
MANIFEST = "manifest.json"
ORBAX_METADATA = "_METADATA"
PARAMS = "params"
SCALE_SUFFIX = "_scale"  # a QuantizedArray's scale: kernel -> kernel_scale, w_gate -> w_gate_scale
CHUNK_BYTES = 64 * 2**20
DIGESTS = "ktjax-array-sha256-1"  # the manifest's "digests": how each tensor entry's "digest" is computed
_MAX_ARRAY_METADATA = 2**20       # a zarr.json is a few hundred bytes
_MAX_CHUNKS = 2**22               # a real array has at most thousands; more means an edited chunk grid

# Each chunk ends with the crc32c of its bytes: tensorstore fails a chunk whose bytes changed ("Digest mismatch").
_CODECS = ts.CodecSpec({"driver": "zarr3", "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                                      {"name": "crc32c"}]})

# No cache: written chunks go straight to disk, so a writer holds only the slice it is writing.
_CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 0}})


# ---- names ---------------------------------------------------------------------------------------

def tensor_key(path: tuple, layer: int | None = None) -> str:
    """('attn', 'w_uk') in layer 7 -> 'layers/007/attn.w_uk'; ('norm', 'weight') -> 'norm.weight'."""
    name = ".".join(path)
    return name if layer is None else f"layers/{layer:03d}/{name}"


def scale_key(key: str) -> str:
    return key + SCALE_SUFFIX


# ---- arrays --------------------------------------------------------------------------------------

def _chunk_shape(shape: tuple, itemsize: int) -> list[int]:
    """One chunk per leading index for stacks (an expert, a head); bands of rows for large matrices."""
    if len(shape) >= 3:
        return [1, *shape[1:]]
    if len(shape) == 2:
        max_rows = max(1, CHUNK_BYTES // max(1, shape[1] * itemsize))
        n_chunks = max(1, -(-shape[0] // max_rows))
        return [max(1, -(-shape[0] // n_chunks)), max(1, shape[1])]  # equal bands: little padding in the last
    return [max(1, d) for d in shape]


def _spec(folder: str, key: str) -> dict:
    # Every chunk is stored, zeros included, and a missing chunk is an error when read, never the fill value.
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(folder, PARAMS, key)},
            "fill_missing_data_reads": False, "store_data_equal_to_fill_value": True}


class CheckpointWriter:
    """Writes arrays into a checkpoint folder and records each one for the manifest."""

    def __init__(self, folder: str):
        self.folder = folder
        self.tensors: dict[str, dict] = {}

    def create(self, key: str, shape: tuple, dtype) -> ts.TensorStore:
        """An empty array to fill slice by slice: `store[j].write(x).result()`."""
        dtype = np.dtype(dtype)
        self.tensors[key] = {"dtype": dtype.name, "shape": list(shape)}
        return ts.open(_spec(self.folder, key), create=True, dtype=ts.dtype(dtype.name), shape=list(shape),
                       chunk_layout=ts.ChunkLayout(write_chunk_shape=_chunk_shape(shape, dtype.itemsize)),
                       codec=_CODECS, context=_CONTEXT).result()

    def write(self, key: str, array: np.ndarray, dtype=None):
        """A whole array (a view is fine: a transposed one, say), converted to `dtype` and written in bands
        of whole chunks of at most ~CHUNK_BYTES, one band at a time: only one band is ever copied."""
        dtype = np.dtype(dtype or array.dtype)
        store = self.create(key, array.shape, dtype)
        if array.ndim == 0:
            store.write(np.asarray(array, dtype)).result()
            return
        chunk_rows = store.chunk_layout.write_chunk.shape[0]
        row_bytes = max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * dtype.itemsize)
        step = max(1, CHUNK_BYTES // (row_bytes * chunk_rows)) * chunk_rows
        rows = array.shape[0]
        for r0 in range(0, rows, step):
            band = np.ascontiguousarray(array[r0:r0 + step], dtype)
            store[r0:min(r0 + step, rows)].write(band).result()

    def write_manifest(self, **fields):
        """The manifest, written last: each tensor's digest is taken from the chunk files now on disk (their
        sizes and the crc32c tensorstore wrote at their ends), which also checks that every chunk was written."""
        dtypes: dict[str, int] = {}
        for key, t in self.tensors.items():
            dtypes[t["dtype"]] = dtypes.get(t["dtype"], 0) + 1
            t["digest"] = array_digest(self.folder, key, t)
        manifest = {"format": FORMAT, "layout_version": LAYOUT_VERSION, **fields, "dtypes": dtypes,
                    "digests": DIGESTS, "tensor_count": len(self.tensors), "tensors": self.tensors}
        os.makedirs(os.path.join(self.folder, PARAMS), exist_ok=True)
        _write_synced(os.path.join(self.folder, PARAMS, ORBAX_METADATA), orbax_tree_metadata(self.tensors))
        _write_synced(os.path.join(self.folder, MANIFEST), manifest)  # written last: a checkpoint is whole


def _write_synced(path: str, content: dict):
    with open(path, "w") as f:
        json.dump(content, f, indent=1)
        f.flush()
        os.fsync(f.fileno())  # tensorstore syncs each array it writes; the JSON files written after, too


def orbax_tree_metadata(keys) -> dict:
    """Orbax's PyTree metadata (as orbax-checkpoint writes it with use_ocdbt=False, use_zarr3=True) for a flat
    dict {key: numpy array}: Orbax looks for each leaf's zarr3 array at params/<key>, which is where it is, so
    `orbax.checkpoint.PyTreeCheckpointer().restore(<checkpoint>/params)` restores every stored array as stored
    (int4 packed, scales beside; no digest check beyond each chunk's crc32c)."""
    leaf = {"value_type": "np.ndarray", "skip_deserialize": False}
    return {"tree_metadata": {str((key,)): {"key_metadata": [{"key": key, "key_type": 2}],  # 2: a dict key
                                            "value_metadata": leaf} for key in keys},
            "use_ocdbt": False, "use_zarr3": True, "store_array_data_equal_to_fill_value": True,
            "custom_metadata": None}


def read_tensor(folder: str, key: str, index: tuple | None = None) -> np.ndarray:
    """One stored array, or its slice `index` (a tuple of slices), read into host memory. Tensorstore checks each
    chunk's crc32c; the file, metadata and digest checks are verify_array's, which the loader runs first."""
    try:
        store = ts.open(_spec(folder, key), open=True, context=_CONTEXT).result()
        values = (store if index is None else store[tuple(index)]).read().result()
    except ValueError as e:  # tensorstore reports a missing or unreadable array (or chunk) as ValueError
        raise KtjaxError(f"{folder}: cannot read tensor {key!r} ({str(e).splitlines()[0][:300]}); the checkpoint "
                         "is damaged, re-convert it") from None
    require_finite(values, f"{folder}: tensor {key!r}")
    return values


# ---- integrity: files, metadata and digests ---------------------------------------------------------------

def _damaged(folder: str, key: str, what: str) -> KtjaxError:
    return KtjaxError(f"{folder}: cannot read tensor {key!r}: {what}; the checkpoint is damaged, re-convert it")


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a folder"),
             (stat.S_ISREG, "a file"))
    return next((name for is_kind, name in kinds if is_kind(mode)), "a device or socket")


def _require(folder: str, key: str, path: str, is_kind) -> os.stat_result:
    """lstat `path` and refuse it unless it is a real folder (is_kind=stat.S_ISDIR) or a regular file: a symbolic
    link could point at another array, a FIFO would block whoever opens it. FileNotFoundError passes."""
    st = os.lstat(path)
    if not is_kind(st.st_mode):
        want = "folder" if is_kind is stat.S_ISDIR else "regular file"
        raise _damaged(folder, key, f"{os.path.relpath(path, folder)} is {_file_kind(st.st_mode)}, not a {want}")
    return st


def _array_metadata(folder: str, key: str, listed: dict) -> dict:
    """The array's zarr.json, reached through real folders only, which must say what the manifest says."""
    path = os.path.join(folder, PARAMS, key, "zarr.json")
    parts = key.split("/")
    try:
        for i in range(1, len(parts) + 1):
            _require(folder, key, os.path.join(folder, PARAMS, *parts[:i]), stat.S_ISDIR)
        _require(folder, key, path, stat.S_ISREG)
        with open(path, "rb") as f:
            raw = f.read(_MAX_ARRAY_METADATA + 1)
    except FileNotFoundError:
        raise KtjaxError(f"{folder}: tensor {key!r} is in the manifest but not stored; re-convert the model") \
            from None
    except OSError as e:
        raise KtjaxError(f"{path}: unreadable array metadata ({e.strerror}); re-convert the model") from None
    try:
        if len(raw) > _MAX_ARRAY_METADATA:
            raise ValueError("too large")
        meta = loads_bounded(raw)
        stored = (meta["shape"], meta["data_type"])
    except (ValueError, TypeError, KeyError, RecursionError) as e:
        raise KtjaxError(f"{path}: unreadable array metadata ({type(e).__name__}); re-convert the model") from None
    if stored != (listed["shape"], listed["dtype"]):
        raise KtjaxError(f"{folder}: tensor {key!r} is stored as {stored[1]} {stored[0]} but the manifest says "
                         f"{listed['dtype']} {listed['shape']}; re-convert the model")
    return meta


def _chunk_paths(folder: str, key: str, meta: dict) -> list[str]:
    """Every chunk file of the array, in grid order ("c/3/0/0"; a scalar's is "c")."""
    try:
        shape, chunk = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
        encoding = meta.get("chunk_key_encoding", {})
        ok = (len(chunk) == len(shape) and all(type(c) is int and c > 0 for c in chunk)
              and encoding.get("name") == "default" and encoding.get("configuration", {}).get("separator", "/") == "/")
        grid = [-(-s // c) for s, c in zip(shape, chunk)] if ok else []
        ok = ok and float(np.prod(grid, dtype=np.float64)) <= _MAX_CHUNKS
    except (KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise _damaged(folder, key, "its zarr.json has a chunk grid or chunk key encoding ktjax never writes")
    root = os.path.join(folder, PARAMS, key, "c")
    return [root + "".join(f"/{i}" for i in index) for index in itertools.product(*map(range, grid))]


def _check_chunks(folder: str, key: str, meta: dict, read_crc: bool) -> list[bytes]:
    """Every chunk (and each folder above it) checked to be a regular file (folder) before anything opens it;
    with `read_crc`, each chunk's size and its last 4 bytes (the crc32c the codec appended), in grid order."""
    seen_folders: set[str] = set()
    out = []
    for path in _chunk_paths(folder, key, meta):
        try:
            parent = os.path.dirname(path)
            while parent not in seen_folders and len(parent) > len(os.path.join(folder, PARAMS, key)):
                _require(folder, key, parent, stat.S_ISDIR)
                seen_folders.add(parent)
                parent = os.path.dirname(parent)
            size = _require(folder, key, path, stat.S_ISREG).st_size
            if read_crc:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                try:
                    crc = os.pread(fd, 4, max(0, size - 4)) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
                finally:
                    os.close(fd)
                out.append(size.to_bytes(8, "little") + crc)
        except FileNotFoundError:
            raise _damaged(folder, key, f"chunk {os.path.relpath(path, folder)} is missing") from None
        except OSError as e:
            raise _damaged(folder, key, f"chunk {os.path.relpath(path, folder)}: {e.strerror}") from None
    return out


def array_digest(folder: str, key: str, listed: dict) -> str:
    """sha256 over the array's name, its manifest dtype and shape, its zarr.json, and each chunk's size and
    crc32c in grid order: it changes when a chunk's bytes, place or metadata change, or the array is renamed.
    Reads only metadata and the last 4 bytes of each chunk, so checking it costs no pass over the data."""
    meta = _array_metadata(folder, key, listed)
    head = json.dumps([key, listed["dtype"], listed["shape"], meta], sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(head.encode())
    for chunk in _check_chunks(folder, key, meta, read_crc=True):
        digest.update(chunk)
    return digest.hexdigest()


def verify_array(folder: str, key: str, listed: dict, with_digest: bool = True):
    """Refuse an array whose files, metadata or (with_digest) digest disagree with its manifest entry, naming it.
    Without a digest (a checkpoint written before them) the files and metadata are still checked."""
    if not with_digest:
        _check_chunks(folder, key, _array_metadata(folder, key, listed), read_crc=False)
        return
    if not isinstance(listed.get("digest"), str):
        raise _damaged(folder, key, "its manifest entry has no digest")
    if array_digest(folder, key, listed) != listed["digest"]:
        raise _damaged(folder, key, "its chunks or metadata do not match its digest in the manifest (a chunk was "
                       "changed, swapped or moved, or the array relabelled)")


# ---- manifest --------------------------------------------------------------------------------------

def is_checkpoint(path: str) -> bool:
    """Whether `path` is a folder written by the converter (any layout version)."""
    from ktjax.util.jsonio import read_json
    try:
        return read_json(os.path.join(path, MANIFEST)).get("format") == FORMAT
    except KtjaxError:  # missing or unreadable: not a checkpoint
        return False


def read_manifest(path: str) -> dict:
    from ktjax.util.jsonio import read_json

    manifest_path = os.path.join(path, MANIFEST)
    manifest = read_json(manifest_path, "checkpoint manifest",
                         missing_hint="not a converted ktjax checkpoint; re-convert the model")
    if manifest.get("format") != FORMAT:
        raise KtjaxError(f"{manifest_path}: not a ktjax checkpoint manifest")
    version = manifest.get("layout_version")
    if version != LAYOUT_VERSION:
        raise KtjaxError(f"{path}: checkpoint layout version {version!r}, but this ktjax reads version "
                         f"{LAYOUT_VERSION}; re-convert the model with "
                         f"`python convert/hf_to_ktjax.py --hf-dir <hf folder> --out {path} --overwrite`")
    _check_tensor_table(manifest.get("tensors"), manifest_path)
    if manifest.get("digests", DIGESTS) != DIGESTS:
        raise KtjaxError(f"{manifest_path}: digests {str(manifest['digests'])[:60]!r}, but this ktjax checks "
                         f"{DIGESTS!r}; re-convert the model")
    return manifest


STORED_DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int8", "uint8")


def _check_tensor_table(tensors, manifest_path: str):
    """The manifest's "tensors": {key: {"dtype": one of STORED_DTYPES, "shape": [non-negative ints]}}."""
    if not isinstance(tensors, dict):
        raise KtjaxError(f"{manifest_path}: \"tensors\" must be an object of tensor entries; re-convert the model")
    for key, entry in tensors.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or entry.get("dtype") not in STORED_DTYPES or not isinstance(shape, list) \
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape):
            raise KtjaxError(f"{manifest_path}: tensor {key!r} has entry {str(entry)[:120]}; each needs a dtype "
                             f"(one of {', '.join(STORED_DTYPES)}) and a shape (a list of sizes); re-convert it")


# ---- loading ---------------------------------------------------------------------------------------

_QUANTIZED_DTYPES = (*FP8_DTYPES, np.dtype(np.int8), np.dtype(np.uint8))  # FP8, int8, packed int4


def _param_keys(cfg: ModelConfig, names: tuple) -> tuple[params.Stack | None, list[str]]:
    """(stack or None, the stored keys of a state leaf: one per layer of a stack); a QuantizedArray's scale
    is stored beside its values, under key + SCALE_SUFFIX."""
    row, stack, part = params.lookup(names)
    suffix = SCALE_SUFFIX if part == "scale" else ""
    return stack, [tensor_key(row.path, i) + suffix for i in (stack.layers(cfg) if stack else [None])]


class _StoredArrays:
    """A checkpoint's tensor table; each array is verified (files, metadata, digest) once, before its first read."""

    def __init__(self, folder: str, manifest: dict):
        self.folder = folder
        self.tensors = manifest["tensors"]
        self.with_digests = "digests" in manifest
        self._verified: set[str] = set()

    def verify(self, key: str):
        if key not in self._verified:
            verify_array(self.folder, key, self.tensors[key], self.with_digests)
            self._verified.add(key)


def _use_stored_quantized(model: DeepseekModel, cfg: ModelConfig, stored: _StoredArrays):
    """Turn the abstract model's parameters that the checkpoint stores quantized (FP8, int8, int4) into
    QuantizedArrays of the stored values and scales, shaped as stored (int4 is packed). The arrays the manifest
    calls quantized are verified first, so a relabelled dtype is refused by name."""
    tensors = stored.tensors

    def quantized(key):
        if np.dtype(tensors.get(key, {}).get("dtype", "float32")) not in _QUANTIZED_DTYPES:
            return False
        stored.verify(key)
        if scale_key(key) not in tensors:
            raise KtjaxError(f"{stored.folder}: tensor {key!r} is stored as {tensors[key]['dtype']} but the "
                             f"checkpoint has no {scale_key(key)!r} beside it; re-convert the model")
        stored.verify(scale_key(key))
        return True

    for path in _param_paths(nnx.state(model).to_pure_dict()):
        stack, keys = _param_keys(cfg, path)
        flags = {quantized(key) for key in keys}
        if flags != {True}:
            if len(flags) > 1:
                raise KtjaxError(f"checkpoint stores {keys[0]} quantized in some layers only; re-convert it")
            continue
        lead = (len(keys),) if stack else ()
        set_param(model, path, QuantizedArray(
            jax.ShapeDtypeStruct(lead + tuple(tensors[keys[0]]["shape"]), np.dtype(tensors[keys[0]]["dtype"])),
            jax.ShapeDtypeStruct(lead + tuple(tensors[scale_key(keys[0])]["shape"]), np.float32)))


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack, i, layer):
    return jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0)


def _leaf_keys(folder: str, cfg: ModelConfig, path: tuple, want: jax.ShapeDtypeStruct, stored: _StoredArrays):
    """(stack or None, the stored keys of one state leaf: one per layer of a stack), or one clear error
    where the checkpoint lacks a key, a shape disagrees with config.json or an array fails verification."""
    tensors = stored.tensors
    stack, keys = _param_keys(cfg, path)
    for key in keys:
        if key not in tensors:
            raise KtjaxError(f"{folder}: checkpoint has no tensor {key!r}; it was converted for another config "
                             "or is incomplete, re-convert it")
        shape = tuple(tensors[key]["shape"])
        if shape != want.shape[1 if stack else 0:]:
            raise KtjaxError(f"{folder}: tensor {key!r} has shape {shape} but config.json implies "
                             f"{want.shape[1 if stack else 0:]}; re-convert the model")
        stored.verify(key)
    return stack, keys


def _load_leaf(folder: str, cfg: ModelConfig, path: tuple, want: jax.ShapeDtypeStruct, stored: _StoredArrays,
               per_layer: bool = False):
    """One parameter on the default device; a stacked one is filled one layer at a time, or with per_layer held
    as one array per layer (model/decoder.py's PerLayer, as an Engine runs it: no stacked copy to split)."""
    stack, keys = _leaf_keys(folder, cfg, path, want, stored)
    if not stack:
        return jnp.asarray(read_tensor(folder, keys[0]), dtype=want.dtype)
    if per_layer:
        return PerLayer(tuple(jnp.asarray(read_tensor(folder, key), dtype=want.dtype) for key in keys))
    out = jnp.zeros(want.shape, want.dtype)
    for j, key in enumerate(keys):
        out = _set_layer(out, j, jnp.asarray(read_tensor(folder, key), dtype=want.dtype))
    return out


def _load_leaf_sharded(folder: str, cfg: ModelConfig, path: tuple, want: jax.ShapeDtypeStruct,
                       stored: _StoredArrays, sharding):
    """One parameter built straight into its sharded layout: each device's shard is read from the stored
    per-layer arrays (only the slice it holds), so the whole model never sits on one device or host."""
    stack, keys = _leaf_keys(folder, cfg, path, want, stored)

    def shard(index):
        if not stack:
            return np.asarray(read_tensor(folder, keys[0], index), want.dtype)
        layers = range(len(keys))[index[0]]
        return np.stack([np.asarray(read_tensor(folder, keys[j], index[1:]), want.dtype) for j in layers])

    return jax.make_array_from_callback(want.shape, sharding, shard)


def load_checkpoint(path: str, dtype=jnp.float32, mesh=None, notes: list | None = None,
                    mtp: bool = True, per_layer: bool = False,
                    on_param=None) -> tuple[ModelConfig, DeepseekModel]:
    """Read a converted checkpoint: (config, model).

    Dense parameters are cast to `dtype` (the router stays float32), as the Hugging Face loader does; FP8 parameters
    stay e4m3 with their block scales and are dequantized on the way into each matmul; int8 and int4 parameters stay
    narrow and are read tile by tile (weight_quant.matmul). With a `mesh` of several devices every parameter is read
    straight into the layout of ktjax/weights/sharding.py's rules (replication notes appended to `notes`). Each
    array is verified against the manifest before it is read (see the top of this file); a checkpoint written before
    digests loads with a note on stderr. The MTP layer is loaded where the config has one and the checkpoint holds
    it, unless mtp=False (the config returned then says num_nextn_predict_layers 0; a checkpoint with part of the
    layer gets a note in `notes`). per_layer (one device): each layer stack's parameters as one array per layer
    (PerLayer), the layout an Engine runs, so that no stacked copy of a parameter exists beside its layers while the
    Engine splits them. on_param(done, total) is called after each parameter is read (a progress report).
    """
    manifest = read_manifest(path)
    cfg = _with_stored_mtp(ModelConfig.from_file(os.path.join(path, "config.json")), manifest["tensors"], mtp, notes)
    stored = _StoredArrays(path, manifest)
    if not stored.with_digests:
        print(f"note: {path} was converted before checkpoints carried digests, so its arrays are not verified; "
              "re-convert it to add them", file=sys.stderr)
    abstract = nnx.eval_shape(lambda: DeepseekModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    _use_stored_quantized(abstract, cfg, stored)
    graphdef, state = nnx.split(abstract)
    pure = state.to_pure_dict()
    told = _counter(len(jax.tree_util.tree_leaves(pure)), on_param)  # on_param(done, total) per parameter
    if mesh is not None:
        from ktjax.weights.sharding import param_shardings

        values = jax.tree_util.tree_map_with_path(
            lambda p, want, sh: told(_load_leaf_sharded(path, cfg, params.key_names(p), want, stored, sh)),
            pure, param_shardings(cfg, pure, mesh, notes))
    else:
        values = jax.tree_util.tree_map_with_path(
            lambda p, want: told(_load_leaf(path, cfg, params.key_names(p), want, stored, per_layer)), pure)
    nnx.replace_by_pure_dict(state, values)
    return cfg, nnx.merge(graphdef, state)


def _counter(total: int, on_param):
    """A pass-through that calls on_param(done, total) for each value it passes (nothing without on_param)."""
    done = 0

    def told(value):
        nonlocal done
        done += 1
        if on_param is not None:
            on_param(done, total)
        return value
    return told


def _with_stored_mtp(cfg: ModelConfig, tensors: dict, keep: bool, notes: list | None) -> ModelConfig:
    """cfg, or cfg without its MTP layer where the checkpoint lacks it or keep=False (loader.mtp_config, which
    reads HF names: those of the MTP rows whose arrays are stored)."""
    from ktjax.weights.loader import mtp_config

    if not cfg.num_nextn_predict_layers:
        return cfg
    n = cfg.num_hidden_layers
    stored = {f"model.layers.{n}.{row.hf}" for row, _ in params.stack_params(cfg, params.MTP)
              if tensor_key(row.path, n) in tensors}
    return mtp_config(cfg, stored, keep, notes)


def _param_paths(pure: dict) -> list[tuple]:
    return [params.key_names(p) for p, _ in jax.tree_util.tree_leaves_with_path(pure)]



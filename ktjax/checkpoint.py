"""The converted checkpoint: one uncompressed zarr3 array per parameter per layer, plus a manifest.

Layout (version 1) of a folder written by `convert/hf_to_ktjax.py`:

    manifest.json          format, layout_version, ktjax_version, source, weights, dtypes, tensor_count, tensors
    config.json            the source's config (and its tokenizer and generation files)
    params/embed           top-level parameters, named by their path in the model ("norm.weight", ...)
    params/layers/007/attn.w_uk           decoder layer 7's parameters, named relative to the layer
    params/layers/007/mlp.w_gate          routed experts [E, d, f], one chunk per expert
    params/layers/007/mlp.w_gate_scale    FP8 block scales (or int8/int4 scales), beside the values they scale
    params/mtp/<hf name>   the multi-token-prediction layer, as the source names it (only with --keep-mtp)

Arrays are written through tensorstore (Orbax's storage backend) in chunks of at most CHUNK_BYTES, so a
converter can write a stacked tensor one slice at a time and a loader can read one layer, or one device's
shard, at a time. The stacks that the model scans over are built at load time, one layer at a time.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from flax import nnx

from . import params
from .config import ModelConfig
from .errors import KtjaxError, require_finite
from .fp8 import FP8_DTYPES
from .model import DeepseekModel
from .weight_quant import QuantizedArray, set_param

FORMAT = "ktjax-checkpoint"
LAYOUT_VERSION = 1
MANIFEST = "manifest.json"
PARAMS = "params"
SCALE_SUFFIX = "_scale"  # a QuantizedArray's scale: kernel -> kernel_scale, w_gate -> w_gate_scale
CHUNK_BYTES = 64 * 2**20

# No cache: written chunks go straight to disk, so a writer holds only the slice it is writing.
_CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 0}})


# ---- names ---------------------------------------------------------------------------------------

def tensor_key(path: tuple, layer: int | None = None) -> str:
    """('attn', 'w_uk') in layer 7 -> 'layers/007/attn.w_uk'; ('norm', 'weight') -> 'norm.weight'."""
    name = ".".join(path)
    return name if layer is None else f"layers/{layer:03d}/{name}"


def scale_key(key: str) -> str:
    return key + SCALE_SUFFIX


def mtp_key(hf_name: str) -> str:
    return f"mtp/{hf_name}"


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
                       context=_CONTEXT).result()

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
        dtypes: dict[str, int] = {}
        for t in self.tensors.values():
            dtypes[t["dtype"]] = dtypes.get(t["dtype"], 0) + 1
        manifest = {"format": FORMAT, "layout_version": LAYOUT_VERSION, **fields, "dtypes": dtypes,
                    "tensor_count": len(self.tensors), "tensors": self.tensors}
        with open(os.path.join(self.folder, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())  # tensorstore syncs each array it writes; the manifest, written last, too


def read_tensor(folder: str, key: str, index: tuple | None = None) -> np.ndarray:
    """One stored array, or its slice `index` (a tuple of slices), read into host memory."""
    try:
        store = ts.open(_spec(folder, key), open=True, context=_CONTEXT).result()
        values = (store if index is None else store[tuple(index)]).read().result()
    except ValueError as e:  # tensorstore reports a missing or unreadable array (or chunk) as ValueError
        raise KtjaxError(f"{folder}: cannot read tensor {key!r} ({str(e).splitlines()[0][:300]}); the checkpoint "
                         "is damaged, re-convert it") from None
    require_finite(values, f"{folder}: tensor {key!r}")
    return values


# ---- manifest --------------------------------------------------------------------------------------

def is_checkpoint(path: str) -> bool:
    """Whether `path` is a folder written by the converter (any layout version)."""
    from .jsonio import read_json
    try:
        return read_json(os.path.join(path, MANIFEST)).get("format") == FORMAT
    except KtjaxError:  # missing or unreadable: not a checkpoint
        return False


def read_manifest(path: str) -> dict:
    from .jsonio import read_json

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


def _use_stored_quantized(model: DeepseekModel, cfg: ModelConfig, tensors: dict):
    """Turn the abstract model's parameters that the checkpoint stores quantized (FP8, int8, int4) into
    QuantizedArrays of the stored values and scales, shaped as stored (int4 is packed)."""
    def quantized(key):
        return np.dtype(tensors.get(key, {}).get("dtype", "float32")) in _QUANTIZED_DTYPES

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


def _leaf_keys(folder: str, cfg: ModelConfig, path: tuple, want: jax.ShapeDtypeStruct, tensors: dict):
    """(stack or None, the stored keys of one state leaf: one per layer of a stack), or one clear error
    where the checkpoint lacks a key or a shape disagrees with config.json."""
    stack, keys = _param_keys(cfg, path)
    for key in keys:
        if key not in tensors:
            raise KtjaxError(f"{folder}: checkpoint has no tensor {key!r}; it was converted for another config "
                             "or is incomplete, re-convert it")
        shape = tuple(tensors[key]["shape"])
        if shape != want.shape[1 if stack else 0:]:
            raise KtjaxError(f"{folder}: tensor {key!r} has shape {shape} but config.json implies "
                             f"{want.shape[1 if stack else 0:]}; re-convert the model")
        _check_array_metadata(folder, key, tensors[key])
    return stack, keys


def _check_array_metadata(folder: str, key: str, listed: dict):
    """The stored array's own metadata (zarr.json) must say what the manifest says: shape and dtype."""
    path = os.path.join(folder, PARAMS, key, "zarr.json")
    try:
        with open(path) as f:
            meta = json.load(f)
        stored = (meta["shape"], meta["data_type"])
    except FileNotFoundError:
        raise KtjaxError(f"{folder}: tensor {key!r} is in the manifest but not stored; re-convert the model") \
            from None
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise KtjaxError(f"{path}: unreadable array metadata ({type(e).__name__}); re-convert the model") from None
    if stored != (listed["shape"], listed["dtype"]):
        raise KtjaxError(f"{folder}: tensor {key!r} is stored as {stored[1]} {stored[0]} but the manifest says "
                         f"{listed['dtype']} {listed['shape']}; re-convert the model")


def _load_leaf(folder: str, cfg: ModelConfig, path: tuple, want: jax.ShapeDtypeStruct, tensors: dict):
    """One parameter on the default device; a stacked one is filled one layer at a time."""
    stack, keys = _leaf_keys(folder, cfg, path, want, tensors)
    if not stack:
        return jnp.asarray(read_tensor(folder, keys[0]), dtype=want.dtype)
    out = jnp.zeros(want.shape, want.dtype)
    for j, key in enumerate(keys):
        out = _set_layer(out, j, jnp.asarray(read_tensor(folder, key), dtype=want.dtype))
    return out


def _load_leaf_sharded(folder: str, cfg: ModelConfig, path: tuple, want: jax.ShapeDtypeStruct, tensors: dict,
                       sharding):
    """One parameter built straight into its sharded layout: each device's shard is read from the stored
    per-layer arrays (only the slice it holds), so the whole model never sits on one device or host."""
    stack, keys = _leaf_keys(folder, cfg, path, want, tensors)

    def shard(index):
        if not stack:
            return np.asarray(read_tensor(folder, keys[0], index), want.dtype)
        layers = range(len(keys))[index[0]]
        return np.stack([np.asarray(read_tensor(folder, keys[j], index[1:]), want.dtype) for j in layers])

    return jax.make_array_from_callback(want.shape, sharding, shard)


def load_checkpoint(path: str, dtype=jnp.float32, mesh=None,
                    notes: list | None = None) -> tuple[ModelConfig, DeepseekModel]:
    """Read a converted checkpoint: (config, model).

    Dense parameters are cast to `dtype` (the router stays float32), as the Hugging Face loader does;
    FP8 parameters stay e4m3 with their block scales and are dequantized on the way into each matmul; int8
    and int4 parameters stay narrow and are read tile by tile (weight_quant.matmul). With a `mesh` of
    several devices every parameter is read straight into the layout of ktjax/sharding.py's rules (replication
    notes appended to `notes`).
    """
    manifest = read_manifest(path)
    cfg = ModelConfig.from_file(os.path.join(path, "config.json"))
    tensors = manifest["tensors"]
    abstract = nnx.eval_shape(lambda: DeepseekModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    _use_stored_quantized(abstract, cfg, tensors)
    graphdef, state = nnx.split(abstract)
    pure = state.to_pure_dict()
    if mesh is not None:
        from .sharding import param_shardings

        values = jax.tree_util.tree_map_with_path(
            lambda p, want, sh: _load_leaf_sharded(path, cfg, params.key_names(p), want, tensors, sh),
            pure, param_shardings(cfg, pure, mesh, notes))
    else:
        values = jax.tree_util.tree_map_with_path(
            lambda p, want: _load_leaf(path, cfg, params.key_names(p), want, tensors), pure)
    nnx.replace_by_pure_dict(state, values)
    return cfg, nnx.merge(graphdef, state)


def _param_paths(pure: dict) -> list[tuple]:
    return [params.key_names(p) for p, _ in jax.tree_util.tree_leaves_with_path(pure)]



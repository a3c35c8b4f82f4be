"""Read a Hugging Face DeepSeek folder (config.json + safetensors shards) into the model's parameters.

Every source tensor is accounted for: each is used exactly once or deliberately skipped (an MTP layer not
loaded, the MTP layer's copy of the embedding, rotary buffers, a tied lm_head), and a missing or unexpected
tensor, or a shape that disagrees with config.json, is a KtjaxError that names the tensor and its file.

The multi-token-prediction layer (model/mtp.py; config.json num_nextn_predict_layers) is loaded where the folder
holds its own tensors (enorm, hnorm, eh_proj, shared_head); where it holds none or only some, or the caller drops
it (mtp=False), the model is built without it (its cfg's num_nextn_predict_layers 0: mtp_config); a partial one
gets a note.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ktjax.model.config import ModelConfig
from ktjax.errors import KtjaxError, require_finite
from ktjax.model.fp8 import FP8_BLOCK, FP8_DTYPES, block_scale_shape, dequantize_blocks
from ktjax.model.decoder import EXPERT_STACKS, DeepseekModel
from ktjax.weights.params import ALL_STACKS, MTP, STACKS, Param, Stack, hf_sources
from ktjax.weights.safetensors_io import SafetensorsFile, list_shards


@dataclasses.dataclass
class Entry:
    """One model parameter (`path` in the state) built from source tensors by `fn`.

    `each` marks a stacked parameter (the routed experts): output[j] = each(source j), so a converter can
    stream it one source at a time. `blockwise` says that the transform only transposes or stacks, so FP8
    values and their 128 x 128 block scales can both go through it and stay quantized; otherwise (a
    reshape or a split that cuts through blocks, like kv_b_proj's per-head split) weights are dequantized.
    `param` is its row of the parameter table (ktjax/weights/params.py; None for an MTP tensor kept as the source
    has it), `shape` its shape in the checkpoint (per layer).
    """
    path: tuple
    sources: list[str]
    shapes: list[tuple]
    fn: Callable = lambda *a: a[0]
    each: Callable | None = None
    blockwise: bool = False
    param: Param | None = None
    shape: tuple | None = None


def _entries(cfg: ModelConfig, stack: Stack | None, layer: int | None, names: set[str]) -> list[Entry]:
    return [Entry(s.row.path, s.names, s.shapes, s.convert, s.each if s.per_expert else None, s.blockwise, s.row,
                  s.shape) for s in hf_sources(cfg, stack, layer, names)]


def layer_entries(cfg: ModelConfig, i: int, moe: bool, names: set[str]) -> list[Entry]:
    """Parameters of decoder layer i, with paths relative to the layer (the table's HF map)."""
    return _entries(cfg, next(s for s in STACKS if s.moe == moe), i, names)


def stack_entries(cfg: ModelConfig, stack: Stack, i: int, names: set[str]) -> list[Entry]:
    """Parameters of layer i of `stack` (a decoder stack or the MTP's), with paths relative to the layer."""
    return _entries(cfg, stack, i, names)


MTP_OWN = ("enorm", "hnorm", "eh_proj", "shared_head")  # the tensors that name an MTP layer (the block's do not)


def mtp_absence(cfg: ModelConfig, names: set[str], keep: bool = True) -> str | None:
    """Why cfg's MTP layer is not built from a source whose tensor names are `names`, or None where it is (or cfg
    has none): keep=False drops it; a source may hold none of it (transformers' save_pretrained never writes it)
    or only some of its own tensors (MTP_OWN: the block's are checked when read, as any layer's)."""
    if not cfg.num_nextn_predict_layers:
        return None
    layer = f"model.layers.{cfg.num_hidden_layers}."
    own = [n for e in stack_entries(cfg, MTP, cfg.num_hidden_layers, set()) for n in e.sources
           if n[len(layer):].split(".")[0] in MTP_OWN]
    missing = [n for n in own if n not in names]
    if not keep:
        return "dropped at load"
    if len(missing) == len(own):
        return "the weights hold no MTP layer"
    return f"the weights lack some of its tensors, e.g. {missing[0]}" if missing else None


def mtp_config(cfg: ModelConfig, names: set[str], keep: bool = True, notes: list | None = None) -> ModelConfig:
    """The config to build a model from a source whose tensor names are `names`: cfg, or cfg with
    num_nextn_predict_layers 0 where its MTP layer is not built (mtp_absence). A layer the source holds only part
    of (a damaged folder) gets a note; none at all (the usual Hugging Face export) or a drop asked for, none."""
    why = mtp_absence(cfg, names, keep)
    layer = f"model.layers.{cfg.num_hidden_layers}."
    if why is None:
        if cfg.num_nextn_predict_layers > 1 and notes is not None:
            notes.append(f"num_nextn_predict_layers={cfg.num_nextn_predict_layers}: ktjax loads the first "
                         f"multi-token-prediction layer ({layer}*) only")
        return cfg
    if notes is not None and why.startswith("the weights lack"):
        notes.append(f"the multi-token-prediction layer ({layer}*) is not loaded: {why}")
    return dataclasses.replace(cfg, num_nextn_predict_layers=0)


def top_entries(cfg: ModelConfig) -> list[Entry]:
    return _entries(cfg, None, None, set())


def _skipped(name: str, cfg: ModelConfig) -> bool:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        return True  # an MTP layer not loaded, or the MTP layer's copy of the embedding (the model's is used)
    if name.endswith("rotary_emb.inv_freq"):
        return True
    if cfg.tie_word_embeddings and name == "lm_head.weight":
        return True
    return name.endswith("mlp.gate.e_score_correction_bias") and cfg.topk_method != "noaux_tc"


class TensorSource:
    """Reads tensors by name across shards, dequantising FP8 block-scaled weights; tracks what was used.

    `owned=True` reads each tensor into its own array (pread) instead of viewing a memory map, so that a
    streaming reader holds only the arrays it keeps; `close_shard` drops a shard once it is done with it.
    """

    def __init__(self, folder: str, owned: bool = False):
        self.where = list_shards(folder)
        self.used: set[str] = set()
        self.owned = owned
        self._open: dict[str, SafetensorsFile] = {}

    def shard(self, path: str) -> SafetensorsFile:
        """One shard, its header parsed (and checked) on first use."""
        if path not in self._open:
            self._open[path] = SafetensorsFile(path)
        return self._open[path]

    def file(self, name: str) -> SafetensorsFile:
        """The shard that holds tensor `name`."""
        f = self.shard(self.where[name])
        if name not in f.keys():
            raise KtjaxError(f"{f.path}: the index lists {name!r} in this shard but the shard does not hold it")
        return f

    def check(self, name: str, shape: tuple) -> str | None:
        """Validate one tensor's presence and shape (and its FP8 scale's) from the headers alone.

        Returns the name of its block-scale tensor for an FP8 weight, else None.
        """
        if name not in self.where:
            raise KtjaxError(f"tensor {name!r} is missing from the checkpoint (config.json implies it exists)")
        f = self.file(name)
        if f.shape(name) != tuple(shape):
            raise KtjaxError(f"{f.path}: tensor {name!r} has shape {f.shape(name)} but config.json implies "
                             f"{tuple(shape)}; the config does not match the weights")
        scale_name = name + "_scale_inv"
        if scale_name not in self.where:
            if f.dtype(name) in FP8_DTYPES:
                raise KtjaxError(f"{f.path}: {name!r} is {f.dtype(name)} but has no {scale_name!r} beside it")
            return None
        want = block_scale_shape(tuple(shape))
        got = self.file(scale_name).shape(scale_name)
        if got != want:
            raise KtjaxError(f"{self.where[scale_name]}: {scale_name} has shape {got}; {name!r} of shape "
                             f"{tuple(shape)} needs {want} (one scale per {FP8_BLOCK}x{FP8_BLOCK} block)")
        return scale_name

    def raw(self, name: str, shape: tuple) -> tuple[np.ndarray, np.ndarray | None]:
        """The tensor as stored and its FP8 block scales (None for a dense tensor)."""
        scale_name = self.check(name, shape)
        self.used.add(name)
        w = self._read(name)
        if scale_name is None:
            return w, None
        self.used.add(scale_name)
        return w, self._read(scale_name)

    def get(self, name: str, shape: tuple) -> np.ndarray:
        w, scale = self.raw(name, shape)
        if scale is None:
            return np.asarray(w)
        return dequantize_blocks(w, scale)

    def _read(self, name: str) -> np.ndarray:
        f = self.file(name)
        values = f.read(name) if self.owned else f.get(name)
        require_finite(values, f"{f.path}: tensor {name!r}")
        return values

    def close_shard(self, path: str):
        f = self._open.pop(path, None)
        if f is not None:
            f.close()

    def close(self):
        for path in list(self._open):
            self.close_shard(path)


def load_hf_model(folder: str, cfg: ModelConfig, dtype=jnp.float32, mesh=None,
                  notes: list | None = None, on_param: Callable[[int, int], None] | None = None,
                  mtp: bool = True, experts_to=None) -> DeepseekModel:
    """Build a DeepseekModel from a Hugging Face folder; parameters are cast to `dtype` (router: float32).
    With a `mesh` (several devices) each parameter goes straight to its sharded layout (ktjax/weights/sharding.py's
    rules) as it is built: no device ever holds the whole model. Replication notes are appended to `notes`.
    on_param(done, total) is called after each parameter is placed (a layer stack's parameter: all its layers). The
    MTP layer is loaded where cfg has one and the folder holds it, unless mtp=False (mtp_config: model.cfg then says
    num_nextn_predict_layers 0; a folder with part of the layer gets a note). experts_to (experts host: a
    cpu/host_experts.py LoaderFill) receives the MoE layers' routed experts one tensor at a time instead of the
    model state, which then holds what experts_to.hosted gives (no layer stack of experts, and no device copy, is
    made)."""
    src = TensorSource(folder, owned=True)
    cfg = mtp_config(cfg, set(src.where), mtp, notes)
    abstract = nnx.eval_shape(lambda: DeepseekModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    target = state.to_pure_dict()
    shardings = None
    if mesh is not None:
        from ktjax.weights.sharding import param_shardings
        shardings = param_shardings(cfg, target, mesh, notes)
    # Owned reads (no memory map) and each parameter placed as soon as it is built: peak host memory stays
    # near the model's own size rather than a multiple of it.
    names = set(src.where)
    stacks = [(stack, [stack_entries(cfg, stack, i, names) for i in stack.layers(cfg)]) for stack in ALL_STACKS]
    placed, total = 0, len(top_entries(cfg)) + sum(len(per_layer[0]) for _, per_layer in stacks if per_layer)

    def tell():
        nonlocal placed
        placed += 1
        if on_param is not None:
            on_param(placed, total)

    try:
        for e in top_entries(cfg):
            _place(target, e.path, _build(src, e), shardings)
            tell()
        for stack, per_layer in stacks:
            for k in range(len(per_layer[0]) if per_layer else 0):
                path = (stack.name,) + per_layer[0][k].path
                if experts_to is not None and stack.name == "moe_layers" and path[-1] in EXPERT_STACKS:
                    _fill_experts(src, experts_to, [ents[k] for ents in per_layer], stack.layers(cfg),
                                  _leaf(target, path).dtype)
                    _leaf(target, path[:-1])[path[-1]] = experts_to.hosted(stack.layers(cfg))
                else:
                    _place(target, path, np.stack([_build(src, ents[k]) for ents in per_layer]), shardings)
                tell()
        if experts_to is not None:
            experts_to.finish()
        unused = sorted(n for n in names - src.used if not _skipped(n, cfg))
        if unused:
            raise KtjaxError(f"{folder}: {len(unused)} tensor(s) that config.json does not account for, e.g. "
                             f"{', '.join(unused[:5])}; the config does not match the weights")
    finally:
        src.close()
    missing = [p for p, leaf in jax.tree_util.tree_leaves_with_path(target)
               if isinstance(leaf, jax.ShapeDtypeStruct)]
    assert not missing, f"parameters left unloaded: {missing}"
    nnx.replace_by_pure_dict(state, target)
    return nnx.merge(graphdef, state)


def _place(target: dict, path: tuple, value: np.ndarray, shardings: dict | None = None):
    node, sharding = target, shardings
    for key in path[:-1]:
        node, sharding = node[key], None if sharding is None else sharding[key]
    want = node[path[-1]]
    assert want.shape == value.shape, (path, want.shape, value.shape)  # a bug in the entries, not bad input
    if sharding is None:
        node[path[-1]] = jnp.asarray(value, dtype=want.dtype)
    else:  # cast on the host, then each device receives only its own slice
        node[path[-1]] = jax.device_put(np.asarray(value).astype(want.dtype, copy=False), sharding[path[-1]])


def _leaf(target: dict, path: tuple):
    for key in path:
        target = target[key]
    return target


def _fill_experts(src: TensorSource, sink, entries: list[Entry], layers, dtype):
    """One routed-expert parameter of each MoE layer into sink.put, expert by expert, cast to `dtype`."""
    for layer, e in zip(layers, entries):
        name = e.path[-1]
        if e.each is None:  # the fused layout: one tensor holds the layer's experts
            for j, w in enumerate(_build(src, e)):
                sink.put(layer, name, j, w.astype(dtype, copy=False))
            continue
        for j, (source, shape) in enumerate(zip(e.sources, e.shapes)):
            sink.put(layer, name, j, e.each(src.get(source, shape)).astype(dtype, copy=False))


def _build(src: TensorSource, e: Entry) -> np.ndarray:
    return e.fn(*[src.get(n, s) for n, s in zip(e.sources, e.shapes)])

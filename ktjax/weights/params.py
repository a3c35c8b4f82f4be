"""The one table of the model's parameters: where each sits in the model state, which Hugging Face tensor(s)
it comes from and how, its logical axes (ktjax/weights/sharding.py's RULES), whether int8/int4 quantization applies.

The loader and converter (HF -> ours), the demo model's export (ours -> HF), sharding, the weight quantizer
and the checkpoint all read this table. Which parameters exist for a config is the model's business: an
abstract DeepseekModel (nnx.eval_shape) lists them with their shapes, and each has exactly one row here.
Adding a parameter means adding its module code and its row(s) below.

Layer parameters live in two stacks (leading axis = layer): `dense_layers` (the first first_k_dense_replace
layers) and `moe_layers` (the rest). Their paths and HF names are relative to one layer. The multi-token-prediction
module (ktjax/model/mtp.py) is a third stack, `mtp`, of one layer: HF layer num_hidden_layers, whose block has the
rows of any layer and five rows of its own (enorm, hnorm, eh_proj, shared_head.norm, shared_head.head).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class Stack:
    name: str
    moe: bool
    mtp: bool = False  # the MTP module's stack (its MLP is MoE where cfg.mtp_moe, whatever `moe` says)

    def layers(self, cfg) -> range:
        """The decoder layers this stack holds, in order (HF layer indices)."""
        if self.mtp:
            return range(cfg.num_hidden_layers, cfg.num_hidden_layers + cfg.mtp_layers)
        return range(cfg.num_dense_layers, cfg.num_hidden_layers) if self.moe else range(cfg.num_dense_layers)


STACKS = (Stack("dense_layers", moe=False), Stack("moe_layers", moe=True))  # the decoder's layers
MTP = Stack("mtp", moe=False, mtp=True)  # the multi-token-prediction module: a stack of 0 or 1 layers
ALL_STACKS = (*STACKS, MTP)
STACK_BY_NAME = {s.name: s for s in ALL_STACKS}


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter. `hf` is relative to "model.layers.{i}." for a layer parameter; "{j}" in it stands for
    routed expert j (one HF tensor per expert, stacked here). Rows that name the same HF tensor split it
    along its rows (axis -2), in table order (kv_b_proj -> w_uk, w_uv; gate_up_proj -> w_gate, w_up)."""
    path: tuple[str, ...]
    hf: str
    axes: tuple | None = None   # logical axis of each dimension (without the stack's layer axis); None: replicated
    quantize: bool = False      # int8/int4 weight quantization applies
    transpose: bool = False     # HF stores [out, in], the model [in, out] (Linear kernels, experts, the router)
    per_head: bool = False      # HF's first axis is heads x rows, split per head here
    fused: str | None = None    # the experts' fused tensor, transformers' in-memory layout, used when present
    fp8: bool = False           # FP8 block-scaled values may stay FP8 (the model reads it via weight_quant.matmul)
    float32: bool = False       # the model runs it in float32 whatever the compute dtype: never narrowed
    layer: bool = True          # in a layer stack (else top-level)


def kernel(module: tuple, hf: str, axes=None, quantize=True, layer=True) -> Param:
    """A Linear's kernel: HF's [out, in] weight transposed, read through weight_quant.matmul."""
    return Param(module + ("kernel",), hf + ".weight", axes, quantize, transpose=True, fp8=True, layer=layer)


def bias(module: tuple, hf: str, axes=None) -> Param:
    return Param(module + ("bias",), hf + ".bias", axes)


def norm(module: tuple, hf: str, layer=True) -> Param:
    return Param(module + ("weight",), hf + ".weight", layer=layer)


def experts(name: str, hf: str, fused: str) -> Param:
    """A routed-expert stack [E, in, out]: one HF tensor per expert, or transformers' fused [E, out, in]."""
    return Param(("mlp", name), f"mlp.experts.{{j}}.{hf}.weight", ("experts", None, None), quantize=True,
                 transpose=True, fp8=True, fused=f"mlp.experts.{fused}")


def swiglu(module: tuple, hf: str) -> list[Param]:
    """A dense MLP or the shared experts (biases when mlp_bias)."""
    return [kernel(module + ("gate_proj",), hf + ".gate_proj", (None, "ffn")),
            bias(module + ("gate_proj",), hf + ".gate_proj", ("ffn",)),
            kernel(module + ("up_proj",), hf + ".up_proj", (None, "ffn")),
            bias(module + ("up_proj",), hf + ".up_proj", ("ffn",)),
            kernel(module + ("down_proj",), hf + ".down_proj", ("ffn", None)),
            bias(module + ("down_proj",), hf + ".down_proj")]


HEADS = ("heads", None, None)
TABLE: tuple[Param, ...] = (
    Param(("embed",), "model.embed_tokens.weight", ("vocab", None), layer=False),
    norm(("norm",), "model.norm", layer=False),
    kernel(("lm_head",), "lm_head", (None, "vocab"), quantize=False, layer=False),
    norm(("input_norm",), "input_layernorm"),
    norm(("post_attn_norm",), "post_attention_layernorm"),
    kernel(("attn", "q_proj"), "self_attn.q_proj", (None, "heads")),
    kernel(("attn", "q_a_proj"), "self_attn.q_a_proj"),
    bias(("attn", "q_a_proj"), "self_attn.q_a_proj"),
    norm(("attn", "q_a_norm"), "self_attn.q_a_layernorm"),
    kernel(("attn", "q_b_proj"), "self_attn.q_b_proj", (None, "heads")),
    kernel(("attn", "kv_a_proj"), "self_attn.kv_a_proj_with_mqa"),
    bias(("attn", "kv_a_proj"), "self_attn.kv_a_proj_with_mqa"),
    norm(("attn", "kv_a_norm"), "self_attn.kv_a_layernorm"),
    Param(("attn", "w_uk"), "self_attn.kv_b_proj.weight", HEADS, per_head=True),
    Param(("attn", "w_uv"), "self_attn.kv_b_proj.weight", HEADS, per_head=True),
    kernel(("attn", "o_proj"), "self_attn.o_proj", ("heads", None)),
    bias(("attn", "o_proj"), "self_attn.o_proj"),
    # DeepSeek-V3.2's lightning indexer (ktjax/model/indexer.py); small, so replicated.
    kernel(("attn", "indexer", "wq_b"), "self_attn.indexer.wq_b"),
    kernel(("attn", "indexer", "wk"), "self_attn.indexer.wk"),
    norm(("attn", "indexer", "k_norm"), "self_attn.indexer.k_norm"),
    bias(("attn", "indexer", "k_norm"), "self_attn.indexer.k_norm"),
    Param(("attn", "indexer", "weights_proj", "kernel"), "self_attn.indexer.weights_proj.weight", transpose=True,
          float32=True),
    *swiglu(("mlp",), "mlp"),
    Param(("mlp", "router"), "mlp.gate.weight", transpose=True, float32=True),
    Param(("mlp", "router_bias"), "mlp.gate.e_score_correction_bias", float32=True),
    experts("w_gate", "gate_proj", fused="gate_up_proj"),
    experts("w_up", "up_proj", fused="gate_up_proj"),
    experts("w_down", "down_proj", fused="down_proj"),
    *swiglu(("mlp", "shared"), "mlp.shared_experts"),
    # The MTP layer's own (model/mtp.py); its block's parameters are the rows above.
    norm(("enorm",), "enorm"),
    norm(("hnorm",), "hnorm"),
    kernel(("eh_proj",), "eh_proj"),
    norm(("head_norm",), "shared_head.norm"),
    kernel(("head",), "shared_head.head", (None, "vocab"), quantize=False),
)
ROWS = {(p.layer, p.path): p for p in TABLE}
assert len(ROWS) == len(TABLE), "two rows for one parameter"
ORDER = {p: k for k, p in enumerate(TABLE)}

# A QuantizedArray (ktjax/model/quantized.py) is one parameter with two leaves, named by these fields.
PARTS = ("values", "scale")


# ---- paths ---------------------------------------------------------------------------------------------

def key_names(keypath) -> tuple[str, ...]:
    """A jax key path (a state's or a pure dict's) as names, without nnx.Variable's own `value` level."""
    names = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in keypath)
    return tuple(str(n) for n in names if n != "value")


def lookup(names: tuple) -> tuple[Param, Stack | None, str | None]:
    """(row, stack or None, QuantizedArray part or None) of a path in the model state; KeyError if none."""
    names = tuple(n for n in names if n != "value")
    part = names[-1] if names and names[-1] in PARTS else None
    names = names[:-1] if part else names
    stack = STACK_BY_NAME.get(names[0]) if names else None
    rel = names[1:] if stack else names
    return ROWS[(stack is not None, rel)], stack, part


def logical_axes(names: tuple, ndim: int) -> tuple:
    """The logical axes of a state leaf (None for each replicated dimension). A scale has its values' leading
    (layer, expert) axes; its last two are replicated (block or group scales do not follow heads)."""
    try:
        row, stack, part = lookup(names)
    except KeyError:
        return (None,) * ndim
    axes = ((None,) if stack else ()) + (row.axes or (None,) * (ndim - bool(stack)))
    if part == "scale":
        axes = axes[:-2] + (None, None)
    return axes if len(axes) == ndim else (None,) * ndim


# ---- the model's parameters ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def model_params(cfg) -> tuple[tuple[Param, Stack | None, tuple], ...]:
    """(row, stack or None, shape per layer) of every parameter of DeepseekModel(cfg), in state order, from
    an abstract model: no memory used."""
    import jax
    from flax import nnx

    from ktjax.model.decoder import DeepseekModel

    abstract = nnx.eval_shape(lambda: DeepseekModel(cfg, rngs=nnx.Rngs(0)))
    out = []
    for keypath, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(abstract).to_pure_dict()):
        row, stack, _ = lookup(key_names(keypath))
        out.append((row, stack, tuple(leaf.shape[1:] if stack else leaf.shape)))
    return tuple(out)


def stack_params(cfg, stack: Stack | None) -> list[tuple[Param, tuple]]:
    """(row, shape) of each parameter of one layer of `stack`, or of the top level for None, in table order."""
    return sorted(((row, shape) for row, s, shape in model_params(cfg) if s == stack), key=lambda p: ORDER[p[0]])


# ---- Hugging Face tensors <-> ours --------------------------------------------------------------------

def _swap(a):
    return np.swapaxes(a, -1, -2)


def _hf_part_shape(row: Param, shape: tuple) -> tuple:
    return (*shape[:-2], shape[-1], shape[-2]) if row.transpose else shape


@dataclasses.dataclass
class HfSource:
    """How one parameter (ours of `shape`) is read: from `names` (one HF tensor, or one per routed expert) of
    HF `shapes`."""
    row: Param
    shape: tuple
    names: list[str]
    shapes: list[tuple]
    per_expert: bool = False              # ours[j] = each(HF tensor j)
    split: tuple[int, int] | None = None  # (first row, rows) of an HF tensor shared with other rows, axis -2
    per_head: tuple | None = None         # reshape the HF tensor to [heads, rows, ...] first
    fused: bool = False                   # read from the experts' fused tensor

    def convert(self, *hf):
        return np.stack([self.each(w) for w in hf]) if self.per_expert else self.each(hf[0])

    def each(self, w):
        if self.per_head:
            w = w.reshape(self.per_head)
        if self.split:
            w = w[..., self.split[0]:self.split[0] + self.split[1], :]
        return _swap(w) if self.row.transpose else w

    @property
    def blockwise(self) -> bool:
        """FP8 values and their 128 x 128 block scales can both go through it and stay FP8: the model reads it
        narrow, and the transform only transposes or stacks (a split or a reshape cuts through blocks)."""
        return self.row.fp8 and not (self.split or self.per_head or self.fused)


def hf_sources(cfg, stack: Stack | None, layer: int | None, names: set[str]) -> list[HfSource]:
    """How each parameter of decoder layer `layer` (or of the top level) is read from a Hugging Face folder
    whose tensor names are `names` (the fused expert layout is used where `names` hold it), in table order."""
    prefix = "" if stack is None else f"model.layers.{layer}."
    groups: dict[tuple[str, bool], list[tuple[Param, tuple]]] = {}  # (HF name, fused) -> rows reading it
    for row, shape in stack_params(cfg, stack):
        fused = row.fused is not None and prefix + row.fused in names
        groups.setdefault((prefix + (row.fused if fused else row.hf), fused), []).append((row, shape))
    out = [s for (name, fused), rows in groups.items() for s in _read_one(name, fused, rows)]
    return sorted(out, key=lambda s: ORDER[s.row])


def _read_one(name: str, fused: bool, rows: list[tuple[Param, tuple]]) -> list[HfSource]:
    """The rows (in table order) that read HF tensor `name`: per expert, whole, or each a slice of its rows."""
    if "{j}" in name:  # one tensor per expert
        (row, shape), = rows
        part = _hf_part_shape(row, shape[1:])
        return [HfSource(row, shape, [name.format(j=j) for j in range(shape[0])], [part] * shape[0], True)]
    if len(rows) == 1 and not rows[0][0].per_head:
        (row, shape), = rows
        return [HfSource(row, shape, [name], [_hf_part_shape(row, shape)], fused=fused)]
    parts = [_hf_part_shape(row, shape) for row, shape in rows]  # stacked along axis -2 in the HF tensor
    full = (*parts[0][:-2], sum(p[-2] for p in parts), parts[0][-1])
    per_head = full if rows[0][0].per_head else None
    hf_shape = (full[0] * full[1], full[2]) if per_head else full
    first = np.cumsum([0] + [p[-2] for p in parts])
    return [HfSource(row, shape, [name], [hf_shape], split=(int(first[k]), parts[k][-2]), per_head=per_head)
            for k, (row, shape) in enumerate(rows)]


def hf_tensors(cfg, state: dict) -> dict[str, np.ndarray]:
    """The inverse: a model's pure-dict state (nnx.state(model).to_pure_dict()) under Hugging Face names and
    layouts, one tensor per expert (as save_pretrained writes them)."""
    parts: dict[str, list] = {}  # HF name -> the rows' parts, in table order (stack_params' order)
    per_head: set[str] = set()

    def add(prefix, tree, rows):
        for row, _ in rows:
            value = tree
            for key in row.path:
                value = value[key]
            ours = np.asarray(value)
            hf = _swap(ours) if row.transpose else ours
            if "{j}" in row.hf:
                parts.update({prefix + row.hf.format(j=j): [w] for j, w in enumerate(hf)})
                continue
            parts.setdefault(prefix + row.hf, []).append(hf)
            if row.per_head:
                per_head.add(prefix + row.hf)

    add("", state, stack_params(cfg, None))
    for stack in ALL_STACKS:
        rows = stack_params(cfg, stack)
        for j, i in enumerate(stack.layers(cfg) if rows else ()):
            add(f"model.layers.{i}.", _layer_of(state[stack.name], j), rows)
    out = {}
    for name, p in parts.items():  # rows that split one HF tensor come back together along its rows
        joined = np.concatenate(p, axis=-2) if len(p) > 1 else p[0]
        out[name] = np.ascontiguousarray(joined.reshape(-1, joined.shape[-1]) if name in per_head else joined)
    return out


def _layer_of(tree, j):
    return tree[j] if not isinstance(tree, dict) else {k: _layer_of(v, j) for k, v in tree.items()}

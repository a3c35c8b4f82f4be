"""The DeepSeek V2/V3 decoder: embedding, dense and MoE layer stacks, norm, lm_head.

Layers of one kind are stacked (leading axis = layer): the loaders, sharding and checkpoints see one array per
parameter. A stack runs with jax.lax.scan (a 61-layer model compiles like a 1-layer one), or, once the Engine
has split its weights into separate per-layer arrays (`unstack_layers`), as a loop unrolled over the layers:
XLA on the CPU copies each scanned layer's slice of every stacked weight before using it (three times the bytes
a matrix-vector product reads), while a separate array is read in place.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ktjax.model.config import ModelConfig
from ktjax.model.layers import MLP, Linear, RMSNorm, _init, rope_cos_sin
from ktjax.model.mla import MLA
from ktjax.model.moe import MoE, PerExpert, stack_experts
from ktjax.model.quantized import HeldWeight, OutIn, QuantizedArray, in_out


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """What a forward pass is specialised on (static under jax.jit)."""
    absorb: bool                    # absorbed (latent-space) or naive attention for these queries
    moe_impl: str = "auto"          # routed experts: auto, gather, ragged or blocked (moe.py)
    dtype: Any = jnp.float32        # compute dtype
    mesh: Any = None                # with expert_axis: the mesh whose axis splits the expert stacks
    expert_axis: str | None = None
    index_topk: int = 0             # sparse attention (DSA): keys kept per query; 0 = dense (no indexer)
    grouped_impl: str = "blocked"   # what moe_impl auto runs for many selections (the Engine: the backend door's)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, moe: bool, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.attn = MLA(cfg, dtype=dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = (MoE(cfg, dtype=dtype, rngs=rngs) if moe else
                    MLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs))

    def feed_forward(self, x, opts: RunOptions):
        h = self.post_attn_norm(x)
        if isinstance(self.mlp, MoE):
            return x + self.mlp(h, opts.moe_impl, opts.mesh, opts.expert_axis, opts.grouped_impl)
        return x + self.mlp(h)

    def __call__(self, x, cos, sin, mask, opts: RunOptions):
        x = x + self.attn(self.input_norm(x), cos, sin, mask, opts.absorb, opts.index_topk)
        return self.feed_forward(x, opts)


def make_stack(cfg: ModelConfig, moe: bool, n: int, *, dtype, rngs: nnx.Rngs) -> DecoderLayer | None:
    """n layers of one kind with every parameter stacked along a leading layer axis."""
    if n == 0:
        return None

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(r):
        return DecoderLayer(cfg, moe, dtype=dtype, rngs=r)

    return create(rngs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PerLayer:
    """A stacked parameter held as one array per layer (see the module docstring)."""
    arrays: tuple


def _is_per_layer(x) -> bool:
    return isinstance(x, PerLayer)


def _index(x, i):
    return jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)


def _take_layer(x, i: int):
    """Layer i of a stacked array (or expert i of a layer's expert stack), placed as the stack was (less its
    leading axis)."""
    spec = getattr(x.sharding, "spec", None)
    out = None if spec is None else jax.sharding.NamedSharding(x.sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
    return jax.jit(_index, out_shardings=out)(x, jnp.int32(i))


def _split(x, consume: bool):
    """The arrays along x's leading axis; consume=True deletes x once split."""
    parts = tuple(_take_layer(x, i) for i in range(x.shape[0]))
    if consume:
        x.delete()
    return parts


EXPERT_STACKS = ("w_gate", "w_up", "w_down")  # the MoE parameters stacked [layer, expert, ...]


def unstack_layers(state, stacks=("dense_layers", "moe_layers"), consume: bool = False,
                   split_experts: bool = False):
    """A model state whose stacked layer parameters are PerLayer arrays, and with split_experts each layer's
    routed-expert stacks PerExpert arrays (moe.py: on the CPU they are read in place). consume=True deletes
    each stacked array once split, so that the peak stays one parameter above the weights (only when nothing
    else holds them)."""
    def split(x):
        if _is_per_layer(x):  # already split (the model of another engine)
            return x
        return PerLayer(_split(x, consume))

    def split_with_experts(x):
        if _is_per_layer(x):  # another engine's arrays: copied, never deleted
            return PerLayer(tuple(p if isinstance(p, PerExpert) else PerExpert(_split(p, False)) for p in x.arrays))
        layers = tuple(PerExpert(_split(_take_layer(x, i), True)) for i in range(x.shape[0]))
        if consume:
            x.delete()
        return PerLayer(layers)

    for name in stacks:
        if name in state:
            if split_experts and name == "moe_layers":
                mlp = state[name]["mlp"]
                for p in EXPERT_STACKS:
                    mlp[p] = jax.tree.map(split_with_experts, mlp[p], is_leaf=_is_per_layer)
            state[name] = jax.tree.map(split, state[name], is_leaf=_is_per_layer)
    return state


def stack_layers(state):
    """The inverse of unstack_layers (and of hold_out_in, and of a backend's holding): each PerLayer parameter
    stacked again along a leading layer axis (and each PerExpert along an expert axis under it), each weight
    [in, out]: a copy."""
    def stack(x):
        return jnp.stack([stack_experts(a) for a in x.arrays]) if _is_per_layer(x) else x
    state = jax.tree.map(in_out, state, is_leaf=lambda x: isinstance(x, (OutIn, HeldWeight)))
    return jax.tree.map(stack, state, is_leaf=_is_per_layer)


_TRANSPOSE = jax.jit(lambda a: jnp.swapaxes(a, -1, -2))


def map_matmul_weights(state, fn):
    """fn(w) for every matmul weight of a model state (Linear kernels, lm_head, routed experts; not the router):
    an array, a QuantizedArray, or a PerLayer of them (of PerExpert ones for split experts)."""
    def visit(path, x):
        names = {getattr(k, "key", None) for k in path}
        return fn(x) if names & {"kernel", *EXPERT_STACKS} and "router" not in names else x

    return jax.tree_util.tree_map_with_path(visit, state,
                                            is_leaf=lambda x: isinstance(x, (PerLayer, QuantizedArray)))


def matmul_weight_dtypes(state) -> set:
    """The dtypes of a model state's matmul weights' stored arrays (see map_matmul_weights)."""
    found = set()

    def note(w):
        found.update(np.dtype(a.dtype) for a in jax.tree.leaves(w))
        return w

    map_matmul_weights(state, note)
    return found


def hold_out_in(state, consume: bool = False):
    """Every float matmul weight (Linear kernels, lm_head, routed experts split by unstack_layers) as an OutIn
    [out, in] copy (quantized.OutIn); quantized weights, embeddings, the router and the absorbed w_uk / w_uv
    keep their layout. consume=True deletes each original once copied."""
    def transposed(a):
        if not isinstance(a, jax.Array) or not jnp.issubdtype(a.dtype, jnp.floating) or a.ndim != 2:
            return a
        return OutIn(out_in_copy(a, consume))

    return map_matmul_weights(state, lambda w: w if isinstance(w, QuantizedArray) else jax.tree.map(transposed, w))


def out_in_copy(a, consume: bool):
    """A 2-D weight's [out, in] copy; consume=True deletes the original once copied."""
    t = _TRANSPOSE(a)
    if consume:
        a.delete()
    return t


def _layer_states(state):
    """Per-layer states of a stack's state whose leaves are PerLayer, or None for a stacked one."""
    leaves = jax.tree.leaves(state, is_leaf=_is_per_layer)
    if not leaves or not _is_per_layer(leaves[0]):
        return None
    return [jax.tree.map(lambda p, i=i: p.arrays[i], state, is_leaf=_is_per_layer)
            for i in range(len(leaves[0].arrays))]


def layer_of(stack: nnx.Module, j: int) -> nnx.Module:
    """Layer j of a stack (or of a submodule of one, such as stack.attn), stacked or held per layer."""
    graphdef, state = nnx.split(stack)
    layers = _layer_states(state)
    return nnx.merge(graphdef, layers[j] if layers is not None else jax.tree.map(lambda x: x[j], state))


def scan_layers(stack: DecoderLayer | None, x, step):
    """Run `step(layer, x) -> x` over each layer of a stack."""
    return scan_layers_cached(stack, 0, x, lambda layer, _, h: step(layer, h))


def scan_layers_cached(stack: DecoderLayer | None, first_layer: int, carry, step):
    """Run `step(layer, index, carry) -> carry` over each layer of a stack, with the layer's global index (each
    layer writes its own slice of the one stacked cache in place): unrolled over per-layer arrays, else scanned."""
    if stack is None:
        return carry
    graphdef, state = nnx.split(stack)
    layers = _layer_states(state)
    if layers is not None:
        for i, layer_state in enumerate(layers):
            carry = step(nnx.merge(graphdef, layer_state), first_layer + i, carry)
        return carry
    n = jax.tree.leaves(state)[0].shape[0]

    def body(c, xs):
        layer_state, index = xs
        return step(nnx.merge(graphdef, layer_state), index, c), None

    return jax.lax.scan(body, carry, (state, first_layer + jnp.arange(n)))[0]


class DeepseekModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Param(_init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), dtype))
        self.dense_layers = make_stack(cfg, False, cfg.num_dense_layers, dtype=dtype, rngs=rngs)
        self.moe_layers = make_stack(cfg, True, cfg.num_moe_layers, dtype=dtype, rngs=rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype,
                                                                   rngs=rngs)

    def embed_tokens(self, tokens, dtype):
        return self.embed[...][tokens].astype(dtype)

    def head(self, x):
        x = self.norm(x)
        return x @ self.embed[...].T.astype(x.dtype) if self.lm_head is None else self.lm_head(x)

    def __call__(self, tokens, opts: RunOptions):
        """Full causal forward over tokens [b, s] (no cache) -> logits [b, s, vocab] in float32."""
        b, s = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(s), (b, s))
        cos, sin = rope_cos_sin(self.cfg.rope, positions)
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), jnp.bool_)), (b, s, s))

        def step(layer, h):
            return layer(h, cos, sin, mask, opts)

        x = self.embed_tokens(tokens, opts.dtype)
        x = scan_layers(self.dense_layers, x, step)
        x = scan_layers(self.moe_layers, x, step)
        return self.head(x).astype(jnp.float32)

    def forward_cached(self, tokens, positions, cache, lengths, logits_index, opts: RunOptions):
        """One prefill chunk or decode step through the cache.

        tokens/positions [b, s]: the new tokens and their positions (>= cache_lens for padding, whose writes
        are dropped); lengths [b]: valid cache entries after this step; logits_index [b]: which of the s
        positions to return logits for, or None for all. -> (logits [b, vocab] or [b, s, vocab] float32, cache).
        """
        b, s = tokens.shape
        cos, sin = rope_cos_sin(self.cfg.rope, positions)

        def step(layer, index, carry):
            x, cache = carry
            h = layer.input_norm(x)
            c_kv, k_pe = layer.attn.latents(h, cos, sin)
            k_idx = None if layer.attn.indexer is None else layer.attn.indexer.keys(h, cos, sin)
            cache = cache.write(index, positions, c_kv, k_pe, k_idx)
            x = x + layer.attn.attend_cache(h, cos, sin, cache, index, positions, lengths, absorb=opts.absorb,
                                            index_topk=opts.index_topk)
            return layer.feed_forward(x, opts), cache

        carry = (self.embed_tokens(tokens, opts.dtype), cache)
        carry = scan_layers_cached(self.dense_layers, 0, carry, step)
        x, cache = scan_layers_cached(self.moe_layers, self.cfg.num_dense_layers, carry, step)
        if logits_index is not None:
            x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)[:, 0]
        return self.head(x).astype(jnp.float32), cache

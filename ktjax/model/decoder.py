"""The DeepSeek V2/V3 decoder: embedding, dense and MoE layer stacks, norm, lm_head, and the multi-token-prediction
module (model/mtp.py: a stack of one layer, run by mtp_forward / mtp_forward_cached) where the model has one.

Layers of one kind are stacked (leading axis = layer): the loaders, sharding and checkpoints see one array per
parameter. A stack runs with jax.lax.scan (a 61-layer model compiles like a 1-layer one), or, once the Engine
has split its weights into separate per-layer arrays (`unstack_layers`), as a loop unrolled over the layers:
XLA on the CPU copies each scanned layer's slice of every stacked weight before using it (three times the bytes
a matrix-vector product reads), while a separate array is read in place. The unrolled loop runs each layer
through one jitted function (`_layer_call`, the layer's index a traced argument): Python traces a stack's layer
once, not once per layer, and the lowered program holds one function that every layer calls (XLA on the CPU
inlines the calls: the compiled program is the unrolled one, each layer reading its own arrays in place).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ktjax.model.block import DecoderLayer, RunOptions, make_stack  # noqa: F401 (RunOptions: the model's API)
from ktjax.model.config import ModelConfig
from ktjax.model.layers import Linear, RMSNorm, _init, rope_cos_sin
from ktjax.model.moe import PerExpert, stack_experts
from ktjax.model.mtp import MTPLayer, make_mtp
from ktjax.model.quantized import HeldWeight, OutIn, QuantizedArray, in_out
from ktjax.util.heap import release_freed_memory


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
    """The arrays along x's leading axis; consume=True deletes x once split (the copies made first: a deleted
    array's pending reads would otherwise hold it, and its copies queue, past this call)."""
    parts = jax.block_until_ready(tuple(_take_layer(x, i) for i in range(x.shape[0])))
    if consume:
        x.delete()
    return parts


EXPERT_STACKS = ("w_gate", "w_up", "w_down")  # the MoE parameters stacked [layer, expert, ...]


LAYER_STACKS = ("dense_layers", "moe_layers", "mtp")  # the model's stacks (the MTP module: a stack of one layer)


def unstack_layers(state, stacks=LAYER_STACKS, consume: bool = False,
                   split_experts: bool = False):
    """A model state whose stacked layer parameters are PerLayer arrays, and with split_experts each layer's
    routed-expert stacks PerExpert arrays (moe.py: on the CPU they are read in place). consume=True deletes
    each stacked array once split, so that the peak stays one parameter above the weights (only when nothing
    else holds them); a state already held per layer (load_checkpoint per_layer) peaks one layer's array above
    them. release_freed_memory after each parameter: the freed buffers' pages go back to the OS (util/heap.py)."""
    def split(x):
        if _is_per_layer(x):  # already split (the model of another engine, or loaded per layer)
            return x
        parts = PerLayer(_split(x, consume))
        release_freed_memory()
        return parts

    def split_with_experts(x):
        if _is_per_layer(x):  # split per expert; a layer's array deleted once split where the caller owns it
            layers = PerLayer(tuple(p if isinstance(p, PerExpert) else PerExpert(_split(p, consume))
                                    for p in x.arrays))
        else:
            layers = PerLayer(tuple(PerExpert(_split(_take_layer(x, i), True)) for i in range(x.shape[0])))
            if consume:
                x.delete()
        release_freed_memory()
        return layers

    for name in stacks:
        if name in state:
            if split_experts and EXPERT_STACKS[0] in state[name]["mlp"]:  # an MoE stack
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


def scan_layers(stack: DecoderLayer | None, x, step, inputs: tuple = ()):
    """Run `step(layer, x, *inputs) -> x` over each layer of a stack (see scan_layers_cached)."""
    return scan_layers_cached(stack, 0, x, functools.partial(_without_index, step), inputs)


def _without_index(step, layer, _, x, *inputs):
    return step(layer, x, *inputs)


def scan_layers_cached(stack: DecoderLayer | None, first_layer: int, carry, step, inputs: tuple = ()):
    """Run `step(layer, index, carry, *inputs) -> carry` over each layer of a stack, with the layer's global index
    (each layer writes its own slice of the one stacked cache in place): unrolled over per-layer arrays, else
    scanned. `step` must close over no traced value (pass those as `inputs`): unrolled, each layer runs through
    one jitted call keyed on (the stack's graphdef, step), traced once for all the stack's layers."""
    if stack is None:
        return carry
    graphdef, state = nnx.split(stack)
    layers = _layer_states(state)
    if layers is not None:
        for i, layer_state in enumerate(layers):
            carry = _layer_call(graphdef, step, layer_state, np.int32(first_layer + i), carry, inputs)
        return carry
    n = jax.tree.leaves(state)[0].shape[0]

    def body(c, xs):
        layer_state, index = xs
        return _run_layer(graphdef, step, layer_state, index, c, inputs), None

    return jax.lax.scan(body, carry, (state, first_layer + jnp.arange(n)))[0]


def _run_layer(graphdef, step, layer_state, index, carry, inputs):
    return step(nnx.merge(graphdef, layer_state), index, carry, *inputs)


# One layer of an unrolled stack. The index is traced, so that every layer of a stack (the same graphdef, step,
# and state and carry shapes) hits one trace; a layer whose state differs in structure (a HostedExperts layer's
# static host handle) traces its own.
_layer_call = jax.jit(_run_layer, static_argnums=(0, 1))


def _with_nothing_deferred(x):
    """The MoE stack's carry under expert deferral (RunOptions.defer_experts): the hidden state and the deferred
    experts' sum pending from the MoE layer before, none before the first (the dense layers defer nothing)."""
    return x, jnp.zeros_like(x)


def _flush_deferred(carry):
    """The hidden state after the MoE stack with the last MoE layer's deferred experts added: the last layer
    defers nothing (as ktransformers, which turns deferral off for the model's last layer); added straight after
    its own output, they differ from summing them with the others only by float rounding."""
    x, pending = carry
    return x + pending


class DeepseekModel(nnx.Module):
    """The model: embedding, the dense and MoE layer stacks, the final norm and lm_head, and `mtp`, the
    multi-token-prediction module (model/mtp.py: an MTPLayer held as a stack of one layer) where the config has
    one (cfg.mtp_layers; a loader sets it to 0 where the weights lack it), else None."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Param(_init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), dtype))
        self.dense_layers = make_stack(cfg, False, cfg.num_dense_layers, dtype=dtype, rngs=rngs)
        self.moe_layers = make_stack(cfg, True, cfg.num_moe_layers, dtype=dtype, rngs=rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype,
                                                                   rngs=rngs)
        self.mtp = make_mtp(cfg, dtype=dtype, rngs=rngs)  # built last: the other parameters' draws stay as they were

    def embed_tokens(self, tokens, dtype):
        return self.embed[...][tokens].astype(dtype)

    def project(self, h):
        """lm_head (or the tied embedding) over final-normed hidden states h."""
        return h @ self.embed[...].T.astype(h.dtype) if self.lm_head is None else self.lm_head(h)

    def head(self, x):
        return self.project(self.norm(x))

    def mtp_layer(self) -> MTPLayer:
        """The MTP module's one layer (its stack's layer 0, stacked or held per layer)."""
        if self.mtp is None:
            raise ValueError("this model has no multi-token-prediction module (config.json has no "
                             "num_nextn_predict_layers, or its weights lack the layer)")
        return layer_of(self.mtp, 0)

    def __call__(self, tokens, opts: RunOptions, return_hidden: bool = False):
        """Full causal forward over tokens [b, s] (no cache) -> logits [b, s, vocab] in float32, and with
        return_hidden the final-normed hidden states [b, s, d] too."""
        b, s = tokens.shape
        cos, sin, mask = self._causal(b, s)

        def step(layer, h, cos, sin, mask):
            return layer(h, cos, sin, mask, opts)

        def deferring_step(layer, carry, cos, sin, mask):
            x, pending = carry
            return layer.deferring_ffn(layer.attend(x, cos, sin, mask, opts), pending, opts)

        inputs = (cos, sin, mask)
        x = self.embed_tokens(tokens, opts.dtype)
        x = scan_layers(self.dense_layers, x, step, inputs)
        if opts.defer_experts and self.moe_layers is not None:
            x = _flush_deferred(scan_layers(self.moe_layers, _with_nothing_deferred(x), deferring_step, inputs))
        else:
            x = scan_layers(self.moe_layers, x, step, inputs)
        h = self.norm(x)
        logits = self.project(h).astype(jnp.float32)
        return (logits, h) if return_hidden else logits

    def _causal(self, b: int, s: int):
        positions = jnp.broadcast_to(jnp.arange(s), (b, s))
        cos, sin = rope_cos_sin(self.cfg.rope, positions)
        return cos, sin, jnp.broadcast_to(jnp.tril(jnp.ones((s, s), jnp.bool_)), (b, s, s))

    def mtp_forward(self, hidden, tokens, opts: RunOptions):
        """The MTP module without a cache over positions 0..s-1: hidden [b, s, d] (h_p, final-normed), tokens
        [b, s] (t_{p+1}) -> (logits of t_{p+2} [b, s, vocab] float32, hidden out [b, s, d] (normed))."""
        b, s = tokens.shape
        cos, sin, mask = self._causal(b, s)
        return self.mtp_layer().draft(self.embed_tokens(tokens, opts.dtype), hidden, cos, sin, mask, opts)

    def forward_cached(self, tokens, positions, cache, lengths, logits_index, opts: RunOptions,
                       return_hidden: bool = False):
        """One prefill chunk or decode step through the cache.

        tokens/positions [b, s]: the new tokens and their positions (>= cache_lens for padding, whose writes
        are dropped); lengths [b]: valid cache entries after this step; logits_index [b]: which of the s
        positions to return logits for, or None for all. -> (logits [b, vocab] or [b, s, vocab] float32, cache),
        and with return_hidden (logits, cache, hidden): hidden the final-normed hidden state at the logits'
        positions ([b, d] or [b, s, d]) in the compute dtype, what the MTP module takes (mtp_forward_cached).
        """
        cos, sin = rope_cos_sin(self.cfg.rope, positions)

        def step(layer, index, carry, cos, sin, positions, lengths):
            x, cache = carry
            return layer.cached(index, x, cache, cos, sin, positions, lengths, opts)

        def deferring_step(layer, index, carry, cos, sin, positions, lengths):
            (x, pending), cache = carry
            x, cache = layer.attend_cached(index, x, cache, cos, sin, positions, lengths, opts)
            return layer.deferring_ffn(x, pending, opts), cache

        inputs = (cos, sin, positions, lengths)
        carry = (self.embed_tokens(tokens, opts.dtype), cache)
        x, cache = scan_layers_cached(self.dense_layers, 0, carry, step, inputs)
        first_moe = self.cfg.num_dense_layers
        if opts.defer_experts and self.moe_layers is not None:
            deferred, cache = scan_layers_cached(self.moe_layers, first_moe, (_with_nothing_deferred(x), cache),
                                                 deferring_step, inputs)
            x = _flush_deferred(deferred)
        else:
            x, cache = scan_layers_cached(self.moe_layers, first_moe, (x, cache), step, inputs)
        if logits_index is not None:
            x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)[:, 0]
        h = self.norm(x)
        logits = self.project(h).astype(jnp.float32)
        return (logits, cache, h) if return_hidden else (logits, cache)

    def mtp_forward_cached(self, hidden, tokens, positions, cache, lengths, logits_index, opts: RunOptions):
        """One step of the MTP module through the cache (model/mtp.py has the definition).

        hidden [b, s, d]: the final-normed hidden states h_p (forward_cached's return_hidden, or this method's
        hidden out for a further draft step); tokens [b, s]: t_{p+1}; positions [b, s]: p (>= cache_lens for
        padding, whose writes are dropped). The module writes its latents into cache layer cfg.num_hidden_layers
        (its slice: the cache needs LatentCache.create(..., extra_layers=1)) and attends over that layer's
        entries [0, lengths[b]) (lengths [b]: valid entries of the MTP slice after this step). logits_index as
        in forward_cached. -> (logits of t_{p+2} float32 ([b, vocab] or [b, s, vocab]), hidden out (normed,
        [b, d] or [b, s, d], compute dtype), cache).
        """
        cos, sin = rope_cos_sin(self.cfg.rope, positions)
        return self.mtp_layer().draft_cached(self.cfg.num_hidden_layers, self.embed_tokens(tokens, opts.dtype),
                                             hidden.astype(opts.dtype), cache, cos, sin, positions, lengths,
                                             logits_index, opts)

"""Mixture of experts: the router in its variants, and three ways to run the routed experts.

Routed expert weights are stacked [experts, ...]. `gather` reads only the selected experts' weights (for a
handful of tokens: decoding); `ragged` sorts tokens by expert and runs jax.lax.ragged_dot, a real grouped
GEMM on GPUs; `blocked` sorts tokens by expert into fixed-size blocks that each belong to one expert and
runs one matmul per used block, because on the CPU ragged_dot lowers to a dense masked product over every
expert (benchmarks/bench_moe.py measures the three). Where a backend holds the experts for one grouped call
(quantized.grouped), `blocked` needs no blocks: one call per weight runs each expert's exact rows.

On the CPU the Engine holds each layer's experts as separate arrays (`PerExpert`, made by
`decoder.unstack_layers(split_experts=True)`; runtime/backend.py decides where): XLA on the CPU copies any slice
of a stacked array before a matmul reads it, static or dynamic, so indexing a stack [E, d, f] by a routed expert id copies that expert's matrices
(three times the bytes the matmul reads). A routed expert then runs through jax.lax.switch over the experts,
each branch reading its own arrays in place.

Under the setting experts: host a backend holds a layer's routed experts outside the model state (ktjax/cpu/
host_experts.py) and leaves `HostedExperts` in their place: the experts kept on the device (gpu_experts), which run
here as usual, and the backend's `host` callable, which sums the others in one call (`hosted_experts`).

Expert deferral (the setting defer_experts k; ktransformers, SOSP'25): each token's k lowest-weight routed experts
are summed apart (`split_deferred`; one more call of whichever path runs the experts, over k assignments a token),
and the decoder adds that sum to the residual stream one MoE layer later (block.py DecoderLayer.deferring_ffn).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from ktjax.model.config import ModelConfig
from ktjax.model import quantized
from ktjax.model.layers import MLP, _init


def route(cfg: ModelConfig, logits, bias=None):
    """Router logits [T, E] (float32) -> (weights [T, k] float32, expert ids [T, k] int32).

    Follows transformers for what it implements (V2: softmax, greedy or group_limited_greedy, scaled; V3:
    sigmoid, noaux_tc with the correction bias, normalised then scaled) and DeepSeek's own code for the
    fields transformers ignores (V2 with norm_topk_prob; V3 with another scoring_func or topk_method).
    """
    scores = jax.nn.softmax(logits, axis=-1) if cfg.scoring_func == "softmax" else jax.nn.sigmoid(logits)
    noaux = cfg.topk_method == "noaux_tc"
    choice = scores + bias if noaux and bias is not None else scores
    if cfg.topk_method != "greedy" and cfg.n_group > 1:
        t, e = choice.shape
        grouped = choice.reshape(t, cfg.n_group, e // cfg.n_group)
        if noaux:
            group_scores = jax.lax.top_k(grouped, min(2, e // cfg.n_group))[0].sum(-1)
        else:
            group_scores = grouped.max(-1)
        _, top_groups = jax.lax.top_k(group_scores, cfg.topk_group)
        keep = jax.nn.one_hot(top_groups, cfg.n_group, dtype=jnp.bool_).any(axis=1)
        # V3 masks dropped groups with -inf, V2 with 0 (its scores are positive softmax values).
        choice = jnp.where(keep[:, :, None], grouped, -jnp.inf if noaux else 0.0).reshape(t, e)
    _, idx = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    normalise = cfg.norm_topk_prob and (cfg.arch == "deepseek_v3" or cfg.num_experts_per_tok > 1)
    if normalise:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    if cfg.normalizes_then_scales or not normalise:
        weights = weights * cfg.routed_scaling_factor
    return weights, idx.astype(jnp.int32)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        # The router stays float32 whatever the compute dtype, as in the reference.
        self.router = nnx.Param(_init(rngs.params(), (d, e), jnp.float32))
        self.router_bias = nnx.Param(jnp.zeros((e,), jnp.float32)) if cfg.topk_method == "noaux_tc" else None
        # Each a quantized.QuantizedArray when a checkpoint keeps the experts narrow: FP8 with block scales
        # [E, ceil(in/128), ceil(out/128)], or int8/int4 with channel or group scales.
        self.w_gate = nnx.Param(_init(rngs.params(), (e, d, f), dtype))
        self.w_up = nnx.Param(_init(rngs.params(), (e, d, f), dtype))
        self.w_down = nnx.Param(_init(rngs.params(), (e, f, d), dtype))
        self.shared = (MLP(d, f * cfg.n_shared_experts, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
                       if cfg.n_shared_experts else None)

    def __call__(self, x, impl: str = "auto", mesh=None, expert_axis: str | None = None, grouped: str = "blocked",
                 defer: int = 0):
        """x [..., d] -> [..., d]. With `expert_axis` (a mesh axis that splits the expert stacks; see
        ktjax/weights/sharding.py expert_axis) the routed experts run expert-parallel. With defer k > 0 (expert
        deferral, RunOptions.defer_experts) -> (now, later) [..., d] each: `later` the sum of each token's k
        lowest-weight routed experts, `now` the rest with the shared experts."""
        flat = x.reshape(-1, x.shape[-1])
        bias = None if self.router_bias is None else self.router_bias[...]
        weights, idx = route(self.cfg, flat.astype(jnp.float32) @ self.router[...], bias)
        args = (impl, mesh, expert_axis, grouped)
        if defer:
            (w_now, i_now), (w_later, i_later) = split_deferred(weights, idx, defer)
            now = self._routed(flat, w_now, i_now, *args).reshape(x.shape)
            later = self._routed(flat, w_later, i_later, *args).reshape(x.shape)
            return self._with_shared(now, x), later
        return self._with_shared(self._routed(flat, weights, idx, *args).reshape(x.shape), x)

    def _with_shared(self, y, x):
        return y if self.shared is None else y + self.shared(x)

    def _routed(self, flat, weights, idx, impl, mesh, expert_axis, grouped):
        """The routed experts' weighted sum [T, d] over the assignments (weights, idx [T, k'])."""
        experts = (self.w_gate[...], self.w_up[...], self.w_down[...])
        hosted = _hosted(experts[0])
        if hosted is not None:
            return hosted_experts(flat, weights, idx, experts, hosted, impl, grouped)
        impl = pick_impl(impl, *idx.shape, self.cfg.n_routed_experts, grouped)
        if expert_axis is None:
            return routed_experts(flat, weights, idx, experts, impl)
        return expert_parallel(mesh, expert_axis, flat, weights, idx, experts, impl)


def split_deferred(weights, idx, k: int):
    """Each token's routed assignments (weights, idx [T, top_k]) split for expert deferral -> ((weights, idx)
    [T, top_k - k] of its highest-weight experts, (weights, idx) [T, k] of its k lowest-weight ones). Equal
    weights: the earlier slot counts as the lower (a stable sort)."""
    order = jnp.argsort(weights, axis=-1, stable=True)  # ascending
    w, i = jnp.take_along_axis(weights, order, axis=-1), jnp.take_along_axis(idx, order, axis=-1)
    return (w[:, k:], i[:, k:]), (w[:, :k], i[:, :k])


def expert_parallel(mesh, axis: str, flat, weights, idx, experts, impl: str):
    """routed_experts with the expert stacks split over mesh axis `axis`: every device routes all tokens (the
    router is replicated), runs only the assignments to its own experts (the others weigh 0), and a psum adds
    the devices' outputs. Indexing a sharded expert stack in plain jit would make the partitioner gather it."""
    def local(flat, weights, idx, experts):
        n_local = experts[0].shape[0]
        first = jax.lax.axis_index(axis) * n_local
        mine = (idx >= first) & (idx < first + n_local)
        y = routed_experts(flat, jnp.where(mine, weights, 0.0), jnp.where(mine, idx - first, 0), experts, impl)
        return jax.lax.psum(y, axis)

    stacks = P(axis)  # a prefix: a QuantizedArray's values and scales split alike
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), (stacks,) * 3), out_specs=P(),
                         check_vma=False)(flat, weights, idx, experts)


def pick_impl(impl: str, tokens: int, top_k: int, n_routed: int, grouped: str = "blocked") -> str:
    """moe_impl auto resolved for one call: gather for few selections, else `grouped` (blocked or ragged, which the
    backend door picks for the platform: RunOptions.grouped_impl)."""
    if impl != "auto":
        return impl
    # Up to about two selections per expert, reading only the selected experts one pair at a time beats
    # sorting into blocks (docs/results.md: 16 tokens x top-6 of 64 experts, gather 288 ms, blocked 458).
    if tokens * top_k <= 2 * n_routed:
        return "gather"
    return grouped


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PerExpert:
    """One layer's stack of routed-expert arrays [E, ...] held as E separate arrays (see the module docstring);
    a QuantizedArray's values and scales are each split alike."""
    arrays: tuple

    def __getitem__(self, index):
        if index is not Ellipsis:  # a traced expert id would need the stack: run_expert switches instead
            raise TypeError("index a PerExpert with run_expert")
        return self


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class HostedExperts(PerExpert):
    """One layer's routed experts held by a backend outside the model state (the setting experts: host): `arrays`
    holds only the experts `kept` on the device (their ids, in order; of n_total), which the model sums as it sums
    any PerExpert ones; `host` sums the others: host(x [T, d], ids [T, k] int32 with -1 - e for an expert e kept
    here (not run there), weights [T, k]) -> [T, d] float32. The statics are part of the compiled program."""
    kept: tuple = dataclasses.field(default=(), metadata={"static": True})
    n_total: int = dataclasses.field(default=0, metadata={"static": True})
    host: object = dataclasses.field(default=None, metadata={"static": True})


def _hosted(w) -> HostedExperts | None:
    """The HostedExperts of a routed weight (a bare one, or inside a quantized / held weight), else None."""
    leaves = jax.tree.leaves(w, is_leaf=_is_per_expert)
    return leaves[0] if leaves and isinstance(leaves[0], HostedExperts) else None


def hosted_experts(x, weights, idx, experts, hosted: HostedExperts, impl: str, grouped: str = "blocked"):
    """routed_experts for experts a backend holds (HostedExperts): the host sums the assignments to its experts
    in one call, the kept experts run here over every assignment (those to host experts weighted 0), and the two
    sums add."""
    kept = np.asarray(hosted.kept, np.int32)
    local = np.full(hosted.n_total, -1, np.int32)  # expert id -> its index among the kept ones, or -1
    local[kept] = np.arange(len(kept), dtype=np.int32)
    on_device = jnp.asarray(local)[idx]
    y = None
    if len(kept) < hosted.n_total:
        host_ids = jnp.where(on_device >= 0, -1 - idx, idx)
        y = hosted.host(x, host_ids, weights).astype(x.dtype)
    if len(kept):
        mine = on_device >= 0
        impl = pick_impl(impl, *idx.shape, len(kept), grouped)
        y_kept = routed_experts(x, jnp.where(mine, weights, 0.0), jnp.maximum(on_device, 0), experts, impl)
        y = y_kept if y is None else y + y_kept
    return y


def _is_per_expert(x) -> bool:
    return isinstance(x, PerExpert)


def n_experts(w) -> int:
    leaf = jax.tree.leaves(w, is_leaf=_is_per_expert)[0]
    return len(leaf.arrays) if _is_per_expert(leaf) else leaf.shape[0]


def _expert_at(w, i: int):
    """Expert i (static) of a PerExpert weight, in place."""
    return jax.tree.map(lambda p: p.arrays[i], w, is_leaf=_is_per_expert)


def stack_experts(w):
    """A stacked weight from a PerExpert one (a copy; ragged_dot and checkpoints want the stack)."""
    return jax.tree.map(lambda p: jnp.stack(p.arrays) if _is_per_expert(p) else p, w, is_leaf=_is_per_expert)


def run_expert(experts, e, x):
    """SwiGLU of routed expert e (traced) on rows x [..., d]. Stacked weights are indexed (XLA on the CPU copies
    the slice); PerExpert weights are read in place by a switch over the experts."""
    w_gate = experts[0]
    if not _is_per_expert(jax.tree.leaves(w_gate, is_leaf=_is_per_expert)[0]):
        return _swiglu(x, *(w[e] for w in experts), quantized.matmul)
    branches = [functools.partial(_swiglu_of, _expert_at(experts, i)) for i in range(n_experts(w_gate))]
    return jax.lax.switch(e, branches, x)


def _swiglu_of(expert, x):
    return _swiglu(x, *expert, quantized.matmul)


def routed_experts(x, weights, idx, experts, impl: str):
    """x [T, d], weights/idx [T, k], experts (w_gate, w_up [E, d, f], w_down [E, f, d]) -> [T, d].

    Each stack is dense or a quantized.QuantizedArray (FP8 block scales, int8/int4 scales): weights are
    dequantized as late as each implementation allows. gather and blocked multiply by one expert's stored
    bytes tile by tile (quantized.matmul); ragged_dot takes the whole stack, dequantized.
    """
    if impl == "gather":
        return _experts_gather(x, weights, idx, experts)
    t, k = idx.shape
    order = jnp.argsort(idx.reshape(-1))  # assignments sorted by expert
    rows = x[order // k]
    group_sizes = jnp.bincount(idx.reshape(-1), length=n_experts(experts[0])).astype(jnp.int32)
    if impl == "ragged":
        out = _experts_ragged(rows, group_sizes, *(stack_experts(w) for w in experts))
    elif impl == "blocked" and _grouped(experts):
        out = _swiglu(rows, *experts, functools.partial(_grouped_matmul, group_sizes))
    elif impl == "blocked":
        out = _experts_blocked(rows, group_sizes, experts)
    else:
        raise ValueError(f"unknown MoE implementation {impl!r} (the settings table lists them: moe_impl)")
    out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
    return jnp.zeros_like(x).at[order // k].add(out.astype(x.dtype))


def _grouped(experts) -> bool:
    """Whether every routed weight is PerExpert arrays that a backend holds for one grouped call
    (quantized.grouped): then one call per weight runs each expert's exact rows, with no padding to blocks and
    no switch per block."""
    leaves = [jax.tree.leaves(w, is_leaf=_is_per_expert)[0] for w in experts]
    return all(_is_per_expert(p) for p in leaves) and all(
        quantized.grouped(_per_expert_weights(w)) for w in experts)


def _per_expert_weights(w) -> list:
    return [_expert_at(w, i) for i in range(n_experts(w))]


def _grouped_matmul(group_sizes, x, w):
    return quantized.grouped_matmul(x, group_sizes, _per_expert_weights(w))


def _swiglu(x, w_gate, w_up, w_down, matmul):
    return matmul(jax.nn.silu(matmul(x, w_gate)) * matmul(x, w_up), w_down)


def _experts_gather(x, weights, idx, experts):
    """One (token, expert) pair at a time, running that expert on that token: only the selected experts'
    bytes are read, and no [T, k, d, f] copy of gathered weights is built (2-4x faster on the CPU than
    gathering all of them first; benchmarks/log/2026.md). Pairs go in expert order, so that the pairs of one
    expert follow each other and the later ones find its matrices in the CPU's cache."""
    t, k = idx.shape
    flat = idx.reshape(-1)
    order = jnp.argsort(flat) if t > 1 else jnp.arange(t * k)

    def pair(j, acc):
        p = order[j]
        token = p // k
        y = run_expert(experts, flat[p], x[token])
        return acc.at[token].add(weights[token, p % k].astype(y.dtype) * y)

    return jax.lax.fori_loop(0, t * k, pair, jnp.zeros_like(x))


def _experts_ragged(rows, group_sizes, w_gate, w_up, w_down):
    def matmul(a, w):
        return jax.lax.ragged_dot(a, w.astype(a.dtype)[:, :a.shape[-1]], group_sizes)
    return _swiglu(rows, w_gate, w_up, w_down, matmul)


def _experts_blocked(rows, group_sizes, experts, block: int = 32):
    """Grouped matmul as one dense matmul per block of `block` rows that all belong to one expert.

    Each expert's rows are padded to a multiple of `block`, so the padded layout has at most
    ceil(M / block) + E blocks (a static bound); blocks past the last used one are skipped.
    """
    m, d = rows.shape
    n = n_experts(experts[0])
    block = min(block, max(1, m))
    n_blocks = -(-m // block) + n
    padded_sizes = -(-group_sizes // block) * block
    padded_start = jnp.cumsum(padded_sizes) - padded_sizes
    start = jnp.cumsum(group_sizes) - group_sizes
    expert_of_row = jnp.repeat(jnp.arange(n), group_sizes, total_repeat_length=m)
    dest = padded_start[expert_of_row] + jnp.arange(m) - start[expert_of_row]
    buf = jnp.zeros((n_blocks * block, d), rows.dtype).at[dest].set(rows)
    block_expert = jnp.minimum(
        jnp.searchsorted(jnp.cumsum(padded_sizes), jnp.arange(n_blocks) * block, side="right"), n - 1)
    used = padded_sizes.sum() // block

    def one_block(i):
        def run(_):
            xb = jax.lax.dynamic_slice_in_dim(buf, i * block, block)
            return run_expert(experts, block_expert[i], xb)
        return jax.lax.cond(i < used, run, lambda _: jnp.zeros((block, d), rows.dtype), None)

    out = jax.lax.map(one_block, jnp.arange(n_blocks)).reshape(n_blocks * block, d)
    return out[dest]

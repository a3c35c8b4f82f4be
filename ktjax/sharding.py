"""Sharding over a mesh of devices: the mesh, one table of partition rules, weight placement, and the latent
cache sharded along the sequence.

Mesh axes: `model` (tensor and expert parallelism, and the cache's sequence) and, for a 2-D mesh `AxB`,
`data` (A devices over the batch) x `model` (B devices). Weights are placed with NamedSharding by RULES and
the parameter table's logical axes (ktjax/params.py); `jax.jit` partitions the rest of the model from there.

MLA's cache is shared by every head, so sharding it by heads would copy all of it onto each device. ktjax
shards it by sequence instead: device k of the `model` axis holds tokens [k T/N, (k+1) T/N) of every
sequence, so N devices hold N times the context. Writes and attention over that cache run inside
`jax.shard_map`: a write keeps only the positions that fall in the device's range (a plain scatter into a
sequence-sharded array makes the partitioner gather the whole cache), and attention computes each device's
partial result (all heads, its own tokens) with its log-sum-exp, merged across devices by a pmax and a psum.

Several machines: call `initialize_multihost()` in every process before anything else touches JAX; the mesh
then spans every process's devices (jax.devices()), and the same code runs unchanged.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import params
from .errors import KtjaxError
from .runtime import parse_mesh

DATA, MODEL = "data", "model"

# Logical axis -> mesh axis: the one table of partition rules. A logical axis whose mesh axis is absent
# from the mesh (`data` on a 1-D mesh) is replicated.
RULES = {
    "batch": DATA,       # concurrent sequences: data parallelism (cache and activations)
    "cache_seq": MODEL,  # the latent cache's token axis
    "heads": MODEL,      # q projections, w_uk, w_uv, the input of o_proj
    "experts": MODEL,    # the routed-expert stacks (and their FP8 block scales)
    "ffn": MODEL,        # the intermediate dimension of dense MLPs and shared experts
    "vocab": MODEL,      # embedding rows and lm_head columns
}


# -- the mesh -----------------------------------------------------------------------------------------------
def make_mesh(spec=None) -> Mesh:
    """A mesh over the devices: N on the `model` axis, or AxB as `data` x `model`."""
    shape = parse_mesh(spec) or (jax.device_count(),)
    have = jax.device_count()
    if math.prod(shape) > have:
        raise KtjaxError(f"mesh {'x'.join(map(str, shape))} needs {math.prod(shape)} devices but {have} "
                         f"{'is' if have == 1 else 'are'} available (on a CPU, set XLA_FLAGS="
                         f"--xla_force_host_platform_device_count={math.prod(shape)} before JAX starts)")
    names = (MODEL,) if len(shape) == 1 else (DATA, MODEL)
    # Auto axes: the partitioner propagates the weights' shardings through the model (no explicit-sharding
    # annotations needed in model code).
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape),
                         devices=jax.devices()[:math.prod(shape)])


def initialize_multihost(coordinator_address: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None):
    """Join a multi-machine run: one process per machine, each calling this first. With no arguments JAX
    reads them from the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU) or from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID; afterwards jax.devices() lists every machine's devices."""
    # CPU devices of different processes exchange data through gloo (GPUs use NCCL whatever this says).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def mesh_size(mesh: Mesh, axis: str) -> int:
    return mesh.shape.get(axis, 1)


# -- weights ------------------------------------------------------------------------------------------------
def _path_names(path) -> tuple[str, ...]:
    names = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    return names[:-1] if names and names[-1] == "value" else names  # nnx.Variable's own leaf


def logical_axes(names: tuple[str, ...], ndim: int) -> tuple:
    """The logical axes of a parameter from its path (None for each replicated dimension): the parameter
    table's (ktjax/params.py); a quantized weight's scale takes its values' leading (expert) axes."""
    return params.logical_axes(names, ndim)


def _divisible(cfg, logical: str, size: int, n: int) -> bool:
    # Heads are split whole: a flattened heads x head_dim dimension must split on a head boundary.
    return size % n == 0 and (logical != "heads" or cfg.num_attention_heads % n == 0)


def _units(cfg, logical: str, size: int) -> int:
    return cfg.num_attention_heads if logical == "heads" else size


def param_spec(cfg, names, shape, mesh: Mesh, notes: dict) -> P:
    """The PartitionSpec of one parameter; a dimension its mesh axis does not divide is replicated and noted."""
    spec = []
    for logical, size in zip(logical_axes(names, len(shape)), shape):
        axis = RULES.get(logical) if logical else None
        n = mesh_size(mesh, axis) if axis else 1
        if n > 1 and not _divisible(cfg, logical, size, n):
            notes.setdefault((logical, _units(cfg, logical, size), axis, n), []).append("/".join(names))
            axis = None
        spec.append(axis if n > 1 else None)
    return P(*spec)


def param_shardings(cfg, abstract_state, mesh: Mesh, notes: list | None = None):
    """NamedSharding for every leaf of a model state (arrays or jax.ShapeDtypeStruct, e.g. from nnx.eval_shape):
    what a loader passes as target shardings to restore a checkpoint straight into the sharded layout.
    Replication fallbacks are appended to `notes` as sentences."""
    found: dict = {}

    def one(path, leaf):
        return NamedSharding(mesh, param_spec(cfg, _path_names(path), leaf.shape, mesh, found))

    shardings = jax.tree_util.tree_map_with_path(one, abstract_state)
    if notes is not None:
        notes.extend(replication_note(*key, paths) for key, paths in sorted(found.items(), key=str))
    return shardings


def replication_note(logical, units, axis, n, paths) -> str:
    return (f"{logical} ({units}) not divisible by the {n} devices of mesh axis '{axis}': replicated "
            f"{', '.join(paths)}")


def place_state(cfg, state, mesh: Mesh) -> tuple[object, list[str]]:
    """Put a model state on the mesh by the rules; returns (sharded state, replication notes)."""
    notes: list[str] = []
    return jax.device_put(state, param_shardings(cfg, state, mesh, notes)), notes


def per_device_bytes(tree) -> int:
    """Bytes that the most loaded device holds of a pytree of arrays (its actual shards)."""
    per_device: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)


# -- the latent cache ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """How a LatentCache [L, B, T, ...] lies on a mesh: T over `seq_axis`, B over `batch_axis` (or None)."""
    mesh: Mesh
    seq_axis: str | None
    batch_axis: str | None

    @property
    def spec(self) -> P:
        return P(None, self.batch_axis, self.seq_axis, None)

    @property
    def sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec)

    @property
    def rows(self) -> P:
        """Spec of per-sequence inputs ([b, ...]): split like the cache's batch axis."""
        return P(self.batch_axis)


def cache_layout(mesh: Mesh | None, batch: int, notes: list | None = None) -> CacheLayout | None:
    """The cache layout for `batch` sequences on a mesh (None on one device: the plain single-device path).
    A batch the data axis does not divide stays replicated over it, with a note."""
    if mesh is None or mesh.size == 1:
        return None
    n_data = mesh_size(mesh, DATA)
    batch_axis = DATA if n_data > 1 and batch % n_data == 0 else None
    if n_data > 1 and batch_axis is None and notes is not None:
        notes.append(f"batch ({batch}) not divisible by the {n_data} devices of mesh axis 'data': the cache is "
                     "replicated over it")
    return CacheLayout(mesh, MODEL if mesh_size(mesh, MODEL) > 1 else None, batch_axis)


def _shard_offset(layout: CacheLayout, local_len: int):
    """First global position held by this device (inside shard_map)."""
    return jax.lax.axis_index(layout.seq_axis) * local_len if layout.seq_axis else 0


def write_sharded(layout: CacheLayout, buffers, layer, positions, new):
    """Scatter new values [b, s, ...] of `layer` at global positions [b, s] into sequence-sharded buffers
    [L, B, T, ...]. Each device keeps the positions in its own range and drops the rest (mode='drop'), so
    nothing moves between devices. `buffers` and `new` are tuples (c_kv, scales, k_pe), None entries allowed."""
    cache_spec, rows = layout.spec, layout.rows

    def local(buffers, layer, positions, new):
        t_local = next(b for b in buffers if b is not None).shape[2]
        pos = positions - _shard_offset(layout, t_local)
        pos = jnp.where((pos >= 0) & (pos < t_local), pos, t_local)  # out of this device's range: dropped
        b = jnp.arange(pos.shape[0])[:, None]
        return tuple(None if buf is None else buf.at[layer, b, pos].set(x.astype(buf.dtype), mode="drop")
                     for buf, x in zip(buffers, new))

    specs = tuple(None if b is None else cache_spec for b in buffers)
    new_specs = tuple(None if x is None else rows for x in new)
    return jax.shard_map(local, mesh=layout.mesh, in_specs=(specs, P(), rows, new_specs), out_specs=specs,
                         check_vma=False)(buffers, layer, positions, new)


def merge_partials(o, lse, axis: str):
    """Merge per-device attention results o [..., D] (normalised over the device's keys) with their
    log-sum-exp lse [...]: out = sum_k exp(lse_k - M) o_k / sum_k exp(lse_k - M), M = max_k lse_k."""
    m = jax.lax.pmax(lse, axis)
    w = jnp.exp(lse - m)
    both = jax.lax.psum(jnp.concatenate([o * w[..., None], w[..., None]], axis=-1), axis)
    return both[..., :-1] / both[..., -1:]


def attend_sharded(layout: CacheLayout, partial_fn, queries, weights, buffers, layer, q_positions, lengths):
    """Attention over a sequence-sharded cache. partial_fn(queries, weights, (c_kv, scales, k_pe), q_positions,
    lengths) -> (o, lse) over one device's keys, given positions relative to its first token. queries (a tuple
    of [b, ...] arrays, all heads) and weights (a tuple, whole) are replicated over the sequence axis; the
    devices' results are merged by log-sum-exp."""
    cache_spec, rows = layout.spec, layout.rows

    def local(queries, weights, buffers, layer, q_positions, lengths):
        layer_cache = tuple(None if b is None else jax.lax.dynamic_index_in_dim(b, layer, 0, keepdims=False)
                            for b in buffers)
        offset = _shard_offset(layout, layer_cache[0].shape[1])
        o, lse = partial_fn(queries, weights, layer_cache, q_positions - offset, lengths - offset)
        return merge_partials(o, lse, layout.seq_axis) if layout.seq_axis else o

    specs = tuple(None if b is None else cache_spec for b in buffers)
    return jax.shard_map(local, mesh=layout.mesh,
                         in_specs=(tuple(rows for _ in queries), tuple(P() for _ in weights), specs, P(), rows,
                                   rows),
                         out_specs=rows, check_vma=False)(queries, weights, buffers, layer, q_positions, lengths)


# -- experts ------------------------------------------------------------------------------------------------
def _context_model_axis(n_experts: int) -> int:
    """Devices on the `model` axis of the mesh being traced under (jax.set_mesh), if they divide the experts;
    else 0 (no expert parallelism: the stacks are replicated by the rules' fallback)."""
    mesh = jax.sharding.get_abstract_mesh()
    n = 0 if mesh.empty or MODEL not in mesh.axis_names else mesh.shape[MODEL]
    return n if n > 1 and n_experts % n == 0 else 0


def moe_forward(moe, x, impl: str):
    """MoE.__call__, expert-parallel when the experts are sharded: every device routes all tokens (the router
    is replicated), runs only the assignments to its own experts (the others weigh 0), and a psum adds the
    devices' outputs. Indexing a sharded expert stack in plain jit would make the partitioner gather it."""
    if not _context_model_axis(moe.cfg.n_routed_experts):
        return moe(x, impl)
    return moe(x, impl, run_experts=_expert_parallel)


def _expert_parallel(flat, weights, idx, experts, impl):
    from .moe import routed_experts

    def local(flat, weights, idx, experts):
        n_local = experts[0].shape[0]
        first = jax.lax.axis_index(MODEL) * n_local
        mine = (idx >= first) & (idx < first + n_local)
        y = routed_experts(flat, jnp.where(mine, weights, 0.0), jnp.where(mine, idx - first, 0), experts, impl)
        return jax.lax.psum(y, MODEL)

    stacks = P(MODEL)  # a prefix: a QuantizedArray's values and scales split alike
    return jax.shard_map(local, in_specs=(P(), P(), P(), (stacks,) * 3), out_specs=P(),
                         check_vma=False)(flat, weights, idx, experts)

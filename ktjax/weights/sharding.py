"""Sharding over a mesh of devices: the mesh, one table of partition rules, and placement.

Mesh axes: `model` (tensor and expert parallelism, and the cache's sequence) and, for a 2-D mesh `AxB`,
`data` (A devices over the batch) x `model` (B devices). Weights are placed with NamedSharding by RULES and
each parameter's logical axes (the parameter table, ktjax/weights/params.py); `jax.jit` partitions the rest of the
model from there. The cache's layout (kv/layout.py: sequence-sharded, merged by log-sum-exp) and expert
parallelism (moe.py) take their mesh axes from here; no compute module imports this one.

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

from ktjax.weights import params
from ktjax.errors import KtjaxError
from ktjax.kv.layout import CacheLayout

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
def make_mesh(shape: tuple[int, ...] | None = None) -> Mesh | None:
    """A mesh over the devices: N on the `model` axis, or AxB as `data` x `model` (a shape from
    RuntimeConfig.mesh; None: all local devices on one axis). None when that is a single device: the plain
    single-device path, decided here only."""
    shape = shape or (jax.device_count(),)
    have = jax.device_count()
    if math.prod(shape) > have:
        raise KtjaxError(f"mesh {'x'.join(map(str, shape))} needs {math.prod(shape)} devices but {have} "
                         f"{'is' if have == 1 else 'are'} available (on a CPU, set XLA_FLAGS="
                         f"--xla_force_host_platform_device_count={math.prod(shape)} before JAX starts)")
    if math.prod(shape) == 1:
        return None
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
    table's (ktjax/weights/params.py); a quantized weight's scale takes its values' leading (expert) axes."""
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
def cache_layout(mesh: Mesh | None, batch: int, notes: list | None = None) -> CacheLayout | None:
    """Where a cache of `batch` sequences lies on the mesh, by RULES: its sequence over the `cache_seq` axis,
    its batch over the `batch` axis when that divides it (else replicated, with a note). None without a mesh."""
    if mesh is None:
        return None
    n_data = mesh_size(mesh, RULES["batch"])
    batch_axis = RULES["batch"] if n_data > 1 and batch % n_data == 0 else None
    if n_data > 1 and batch_axis is None and notes is not None:
        notes.append(f"batch ({batch}) not divisible by the {n_data} devices of mesh axis '{RULES['batch']}': "
                     "the cache is replicated over it")
    seq_axis = RULES["cache_seq"] if mesh_size(mesh, RULES["cache_seq"]) > 1 else None
    return CacheLayout(mesh, seq_axis, batch_axis)


def seq_shards(mesh: Mesh | None) -> int:
    """Devices that a cache's sequence is split over."""
    return 1 if mesh is None else mesh_size(mesh, RULES["cache_seq"])


def expert_axis(mesh: Mesh | None, n_experts: int) -> str | None:
    """The mesh axis that splits the routed experts (expert parallelism), if it divides them; else None (the
    stacks are then replicated by the rules' fallback)."""
    axis = RULES["experts"]
    n = 0 if mesh is None else mesh_size(mesh, axis)
    return axis if n > 1 and n_experts % n == 0 else None

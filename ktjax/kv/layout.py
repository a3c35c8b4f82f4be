"""Where a latent cache lies: on one device, or sharded along the sequence (and batch) over a mesh.

MLA's cache is shared by every head, so sharding it by heads would copy all of it onto each device. It is
sharded by sequence instead: device k of the sequence axis holds tokens [k T/N, (k+1) T/N) of every
sequence, so N devices hold N times the context. Writes and attention run inside `jax.shard_map`: a write
keeps only the positions that fall in the device's range (a plain scatter into a sequence-sharded array makes
the partitioner gather the whole cache), and attention computes each device's partial result (all heads, its
own tokens) with its log-sum-exp, merged across devices by a pmax and a psum.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """How a cache [L, B, T, ...] lies on a mesh: T over `seq_axis`, B over `batch_axis` (either may be None).
    ktjax/weights/sharding.py builds it from the partition rules."""
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

    def _offset(self, local_len: int):
        """First global position held by this device (inside shard_map)."""
        return jax.lax.axis_index(self.seq_axis) * local_len if self.seq_axis else 0

    def write(self, buffers, layer, positions, new):
        """Scatter new values [b, s, ...] of `layer` at global positions [b, s] into buffers [L, B, T, ...].
        Each device keeps the positions in its own range and drops the rest, so nothing moves between
        devices. `buffers` and `new` are tuples (c_kv, scales, k_pe), None entries allowed."""
        def local(buffers, layer, positions, new):
            t_local = next(b for b in buffers if b is not None).shape[2]
            pos = positions - self._offset(t_local)
            pos = jnp.where((pos >= 0) & (pos < t_local), pos, t_local)  # out of this device's range: dropped
            return store_rows(buffers, layer, sequence_pages(pos), pos, new)

        specs = tuple(None if b is None else self.spec for b in buffers)
        new_specs = tuple(None if x is None else self.rows for x in new)
        return jax.shard_map(local, mesh=self.mesh, in_specs=(specs, P(), self.rows, new_specs), out_specs=specs,
                             check_vma=False)(buffers, layer, positions, new)

    def attend(self, partial_fn, queries, weights, buffers, layer, q_positions, lengths):
        """partial_fn(queries, weights, (c_kv, scales, k_pe) of one layer, q_positions, lengths) -> (o, lse)
        over one device's keys, positions given relative to its first token. queries (a tuple of [b, ...],
        all heads) and weights (a tuple, whole) are replicated over the sequence axis; the devices' results
        merge by log-sum-exp."""
        def local(queries, weights, buffers, layer, q_positions, lengths):
            layer_cache = tuple(None if b is None else jax.lax.dynamic_index_in_dim(b, layer, 0, keepdims=False)
                                for b in buffers)
            offset = self._offset(layer_cache[0].shape[1])
            o, lse = partial_fn(queries, weights, layer_cache, q_positions - offset, lengths - offset)
            return merge_partials(o, lse, self.seq_axis) if self.seq_axis else o

        specs = tuple(None if b is None else self.spec for b in buffers)
        in_specs = (tuple(self.rows for _ in queries), tuple(P() for _ in weights), specs, P(), self.rows,
                    self.rows)
        return jax.shard_map(local, mesh=self.mesh, in_specs=in_specs, out_specs=self.rows,
                             check_vma=False)(queries, weights, buffers, layer, q_positions, lengths)


def store_rows(buffers, layer, page, slot, new):
    """Store new values [b, s, ...] (a tuple, None entries allowed) into buffers [L, n_pages, page_size, ...] at
    (layer, page [b, s], slot [b, s]); a page or slot past the buffer (padding, another device's share) is
    dropped."""
    return tuple(None if buf is None else buf.at[layer, page, slot].set(x.astype(buf.dtype), mode="drop")
                 for buf, x in zip(buffers, new))


def sequence_pages(positions):
    """A dense cache's page of each position [b, s]: sequence b's one page is page b."""
    return jnp.broadcast_to(jnp.arange(positions.shape[0])[:, None], positions.shape)


def merge_partials(o, lse, axis: str):
    """Merge per-device attention results o [..., D] (normalised over the device's keys) with their
    log-sum-exp lse [...]: out = sum_k exp(lse_k - M) o_k / sum_k exp(lse_k - M), M = max_k lse_k."""
    m = jax.lax.pmax(lse, axis)
    w = jnp.exp(lse - m)
    both = jax.lax.psum(jnp.concatenate([o * w[..., None], w[..., None]], axis=-1), axis)
    return both[..., :-1] / both[..., -1:]

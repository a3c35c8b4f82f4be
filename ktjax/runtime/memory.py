"""Memory planning: what is free, what the weights and activations take, and the longest cache that fits."""
from __future__ import annotations

import resource

import jax

from ktjax.kv.formats import CacheFormat
from ktjax.model.config import ModelConfig
from ktjax.util.units import format_bytes

HEADROOM = 0.9  # leave 10% of the budget for what the estimate misses (fragmentation, XLA scratch)


def device_memory_stats() -> dict | None:
    """The default device's allocator statistics, or None on a host platform (a CPU keeps none: its memory is the
    process's, read from the OS instead)."""
    dev = jax.devices()[0]
    return dev.memory_stats() if dev.platform != "cpu" else None


def available_bytes() -> int:
    """Free memory on the default device: a GPU's limit minus what is in use (JAX preallocates, so this is
    what remains of its pool), or the host's MemAvailable on a CPU."""
    stats = device_memory_stats()
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def activation_bytes(cfg: ModelConfig, batch: int, chunk: int, kv_block: int, itemsize: int = 4) -> int:
    """A generous estimate of one prefill chunk's working set: hidden states, queries in latent space, one
    key block's scores and expansions, the MoE's sorted rows and the logits."""
    h = cfg.num_attention_heads
    per_token = (8 * cfg.hidden_size + 3 * h * (cfg.kv_lora_rank + cfg.qk_head_dim)
                 + 3 * h * kv_block + 4 * max(cfg.num_experts_per_tok, 1) * max(cfg.moe_intermediate_size,
                                                                                 cfg.intermediate_size // 4))
    return batch * chunk * per_token * itemsize + batch * cfg.vocab_size * 8


def max_cache_lens(cfg: ModelConfig, fmt: CacheFormat, batch: int, budget: int, weight_bytes: int,
                   act_bytes: int) -> int:
    """The longest per-sequence cache that fits `budget` after weights and activations (0 if none does)."""
    return max(cache_room(budget, weight_bytes, act_bytes) // (batch * fmt.bytes_per_token(cfg)), 0)


def cache_room(budget: int, weight_bytes: int, act_bytes: int) -> int:
    """Bytes of `budget` left for the cache once the headroom, weights and activations are taken (< 0: they
    do not fit)."""
    return int(budget * HEADROOM) - weight_bytes - act_bytes


def weight_bytes_on_load(folder: str, itemsize: int) -> int:
    """What a model folder's weights take once loaded, from its headers alone (nothing read or allocated):
    floating tensors at the compute dtype's width (a Hugging Face folder's FP8 weights are dequantized to it,
    their block scales dropped), a converted checkpoint's int8 / int4 / FP8 tensors and scales as stored."""
    return sum(count * (itemsize if cast else dtype.itemsize) for dtype, count, cast in _stored_tensors(folder))


def stored_weights(folder: str) -> tuple[int, dict[str, int], bool]:
    """A model folder's weights as stored, from its headers: (their bytes, the bytes of each dtype that loading
    casts to the compute dtype, whether every tensor is cast), to say why the weights take what they take."""
    total, cast_bytes, every = 0, {}, True
    for dtype, count, cast in _stored_tensors(folder):
        total += count * dtype.itemsize
        every &= cast
        if cast:
            cast_bytes[dtype.name] = cast_bytes.get(dtype.name, 0) + count * dtype.itemsize
    return total, cast_bytes, every


def _stored_tensors(folder: str):
    """(dtype, elements, cast to the compute dtype at load) for each tensor the loader keeps."""
    import numpy as np

    from ktjax.weights.checkpoint import is_checkpoint, read_manifest

    if is_checkpoint(folder):
        for key, t in read_manifest(folder)["tensors"].items():
            dtype = np.dtype(t["dtype"])
            stored = dtype.kind in "iu" or dtype.itemsize == 1 or key.endswith("_scale")  # int8, int4, FP8
            yield dtype, int(np.prod(t["shape"], dtype=np.int64)), not stored
        return
    from ktjax.weights.safetensors_io import SafetensorsFile, list_shards

    for shard in sorted(set(list_shards(folder).values())):
        with SafetensorsFile(shard) as f:
            for n in f.keys():
                if not n.endswith("_scale_inv"):
                    yield f.dtype(n), int(np.prod(f.shape(n), dtype=np.int64)), True


def weights_note(folder: str | None, held_dtype) -> str | None:
    """Why the loaded weights take more than the folder (e.g. "float32 copy of a 6.8 MiB bfloat16 checkpoint"),
    or None when they are held as stored."""
    import numpy as np

    if folder is None:
        return None
    total, cast_bytes, every = stored_weights(folder)
    held = np.dtype(held_dtype).name
    main = max(cast_bytes, key=cast_bytes.get, default=held)  # a few float32 norms beside bf16 matrices: bf16
    if main == held:
        return None
    if every:
        return f"{held} copy of a {format_bytes(total)} {main} checkpoint; --dtype sets it"
    return f"its {format_bytes(cast_bytes[main])} of {main} tensors held as {held}; --dtype sets it"


def check_budget_holds_weights(folder: str, budget: int, itemsize: int, devices: int):
    """Refuse, before anything is read, a memory budget (per device) smaller than the weights' share of one
    device: a lower bound, since replicated parameters take their whole size on every device."""
    weights = weight_bytes_on_load(folder, itemsize)
    if weights / devices > budget:
        from ktjax.errors import KtjaxError
        per_device = f", {format_bytes(weights / devices)} per device over {devices}" if devices > 1 else ""
        raise KtjaxError(f"memory budget {format_bytes(budget)} is smaller than the weights "
                         f"({format_bytes(weights)}{per_device}); raise --memory-budget, use more devices (--mesh) "
                         "or a narrower checkpoint (convert with --weights int8 or int4)")


def peak_memory_bytes() -> int:
    """Peak device memory where the backend reports it; on a CPU, the process's peak resident set."""
    stats = device_memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

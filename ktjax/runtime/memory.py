"""Memory planning: what is free, what the weights and activations take, and the longest cache that fits.

Two memories (MemoryPlan): the device side (each device's weights, the cache, a prefill chunk's activations)
and the host side (the routed experts in host RAM, under the setting experts: host). memory_budget budgets the
device side; on a CPU-only machine both sides are the same RAM, so the budget holds their sum. Not budgeted:
the runtime's fixed cost (RUNTIME_FIXED_BYTES: the JAX/XLA runtime and the compiled programs), which the
peak can exceed the budget by (docs/results.md, "Memory at real size").
"""
from __future__ import annotations

import dataclasses
import resource

import jax

from ktjax.kv.formats import CacheFormat
from ktjax.model.config import ModelConfig
from ktjax.util.units import format_bytes

MIN_BUCKET = 16


def seq_bucket(n: int) -> int:
    """Pad lengths to powers of two (at least 16), so that many lengths share a few compiled programs."""
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


HEADROOM = 0.9  # leave 10% of the budget for what the estimate misses (fragmentation, XLA scratch)
# Resident memory the budget does not cover, measured on a CPU at V2-Lite's full size (27 layers, int4): the
# peak is 1.8 GB above the weights and cache, once the cache is allocated after the programs compile (Python and
# the JAX/XLA runtime ~0.5 GB, the compiled programs, heap that XLA's compile leaves behind; 2.2-2.3 GB when the
# compile ran beside the cache); docs/results.md, "Memory at real size".
RUNTIME_FIXED_BYTES = 2_000_000_000


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """What one engine's cache plan takes. Device side, per device: the weights held there (under experts host:
    the non-expert weights and the experts kept by gpu_experts), the cache, one prefill chunk's activations.
    Host side: the routed experts in host RAM (experts host; 0 otherwise). one_memory: a CPU-only machine, where
    both sides are the same RAM and the budget holds their sum."""
    weights: int
    cache: int
    activations: int
    host_experts: int = 0
    one_memory: bool = True
    budget: int | None = None

    @property
    def device(self) -> int:
        return self.weights + self.cache + self.activations

    @property
    def host(self) -> int:
        return self.host_experts

    @property
    def budgeted(self) -> int:
        """What the budget must hold: the device side, and the host side where it is the same memory."""
        return self.device + (self.host if self.one_memory else 0)

    def stats(self) -> dict:
        """device_memory and host_memory (bytes, planned), for --json stats, --dry-run and the server."""
        return {"device_memory": {"weights": self.weights, "cache": self.cache, "activations": self.activations,
                                  "total": self.device},
                "host_memory": {"experts": self.host_experts, "total": self.host},
                "memory_budget": self.budget, "one_memory": self.one_memory,
                "runtime_fixed_bytes": RUNTIME_FIXED_BYTES}

    def note(self) -> str | None:
        """Where the experts are counted, under experts host; None otherwise."""
        if not self.host_experts:
            return None
        if self.one_memory:
            return (f"experts host on a CPU-only machine: device and host memory are the same RAM, so the budget "
                    f"holds both ({format_bytes(self.device)} device side + {format_bytes(self.host)} of experts)")
        return (f"experts host: the memory budget is the device's ({format_bytes(self.device)} planned); the experts "
                f"take {format_bytes(self.host)} of host RAM")


def one_memory() -> bool:
    """Whether device and host memory are the same RAM (a CPU-only machine)."""
    return jax.devices()[0].platform == "cpu"


def host_available_bytes() -> int:
    """The host's MemAvailable (what host-side experts may take on a machine with an accelerator)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


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
    return host_available_bytes()


def activation_bytes(cfg: ModelConfig, batch: int, chunk: int, kv_block: int, itemsize: int = 4) -> int:
    """A generous estimate of one prefill chunk's working set: hidden states, queries in latent space, one
    key block's scores and expansions, the MoE's sorted rows and the logits."""
    h = cfg.num_attention_heads
    per_token = (8 * cfg.hidden_size + 3 * h * (cfg.kv_lora_rank + cfg.qk_head_dim)
                 + 3 * h * kv_block + 4 * max(cfg.num_experts_per_tok, 1) * max(cfg.moe_intermediate_size,
                                                                                 cfg.intermediate_size // 4))
    return batch * chunk * per_token * itemsize + batch * cfg.vocab_size * 8


def auto_cache_lens(cfg: ModelConfig, fmt: CacheFormat, batch: int, budget: int, weight_bytes: int, act_bytes: int,
                    needed: int, shards: int = 1) -> tuple[int, int, int]:
    """cache_lens auto -> (cache_lens, its attention block, the tokens per sequence that fit): the longest cache
    the budget holds after the weights and activations, never past the model's window (positions past it are
    never used) nor below `needed` (the caller refuses a budget whose fits fall short), rounded to whole blocks
    within the budget."""
    from ktjax.kv.cache import plan_cache_lens

    fits = max_cache_lens(cfg, fmt, batch, budget, weight_bytes, act_bytes) * shards
    requested = max(needed, min(fits, cfg.max_position_embeddings))
    cache_lens, block = plan_cache_lens(requested, shards)
    if cache_lens > fits:  # rounding up must not leave the budget
        cache_lens = max(needed, requested // (block * shards) * block * shards)
        cache_lens, block = plan_cache_lens(cache_lens, shards)
    return cache_lens, block, fits


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
    return sum(count * (itemsize if cast else dtype.itemsize) for _, dtype, count, cast in _stored_tensors(folder))


def is_routed_expert(name: str) -> bool:
    """Whether a stored tensor (a converted checkpoint's key or a Hugging Face name) is a routed expert's."""
    return ".mlp.experts." in name or name.rsplit("/", 1)[-1].removesuffix("_scale") in (
        "mlp.w_gate", "mlp.w_up", "mlp.w_down")


def weight_sides_on_load(folder: str, itemsize: int, experts: str, gpu_experts, n_routed: int) -> tuple[int, int]:
    """(device side, host side) bytes of a folder's weights once loaded, from its headers: with experts host the
    routed experts are host memory, and the experts gpu_experts keeps have device copies too (the host store
    keeps every expert); with experts device everything is the device's."""
    device = host = 0
    for name, dtype, count, cast in _stored_tensors(folder):
        size = count * (itemsize if cast else dtype.itemsize)
        if experts == "host" and is_routed_expert(name):
            host += size
        else:
            device += size
    kept = len(gpu_experts) if isinstance(gpu_experts, tuple) else gpu_experts
    return device + host * min(kept, n_routed) // max(n_routed, 1), host


def stored_weights(folder: str) -> tuple[int, dict[str, int], bool]:
    """A model folder's weights as stored, from its headers: (their bytes, the bytes of each dtype that loading
    casts to the compute dtype, whether every tensor is cast), to say why the weights take what they take."""
    total, cast_bytes, every = 0, {}, True
    for _, dtype, count, cast in _stored_tensors(folder):
        total += count * dtype.itemsize
        every &= cast
        if cast:
            cast_bytes[dtype.name] = cast_bytes.get(dtype.name, 0) + count * dtype.itemsize
    return total, cast_bytes, every


def _stored_tensors(folder: str):
    """(name, dtype, elements, cast to the compute dtype at load) for each tensor the loader keeps."""
    import numpy as np

    from ktjax.weights.checkpoint import is_checkpoint, read_manifest

    if is_checkpoint(folder):
        for key, t in read_manifest(folder)["tensors"].items():
            dtype = np.dtype(t["dtype"])
            stored = dtype.kind in "iu" or dtype.itemsize == 1 or key.endswith("_scale")  # int8, int4, FP8
            yield key, dtype, int(np.prod(t["shape"], dtype=np.int64)), not stored
        return
    from ktjax.weights.safetensors_io import SafetensorsFile, list_shards

    for shard in sorted(set(list_shards(folder).values())):
        with SafetensorsFile(shard) as f:
            for n in f.keys():
                if not n.endswith("_scale_inv"):
                    yield n, f.dtype(n), int(np.prod(f.shape(n), dtype=np.int64)), True


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


def check_budget_holds_weights(folder: str, budget: int, itemsize: int, devices: int, experts: str = "device",
                               gpu_experts=0):
    """Refuse, before anything is read, a memory budget (per device) smaller than the weights' share of one
    device: a lower bound, since replicated parameters take their whole size on every device. With experts host
    the budget is the device side's, unless host and device are one RAM (a CPU-only machine)."""
    weights = weight_bytes_on_load(folder, itemsize)
    if experts == "host" and not one_memory():
        import os

        n_routed = ModelConfig.from_file(os.path.join(folder, "config.json")).n_routed_experts
        weights = weight_sides_on_load(folder, itemsize, experts, gpu_experts, n_routed)[0]
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


def plan_folder(folder: str, runtime, batch: int, needed: int) -> tuple[int, MemoryPlan, str | None]:
    """A model folder's cache and memory plan from its headers and config.json alone, no weight read (the CLI's
    --dry-run) -> (cache_lens, the MemoryPlan, a note): what an Engine's plan_cache gives once loaded, with the
    weights' bytes from the headers (weight_sides_on_load) instead of the arrays."""
    import os

    from ktjax.errors import KtjaxError
    from ktjax.kv.cache import cache_bytes, plan_cache_lens

    cfg = ModelConfig.from_file(os.path.join(folder, "config.json"))
    itemsize = runtime.jnp_dtype.itemsize
    device, host = weight_sides_on_load(folder, itemsize, runtime.experts, runtime.gpu_experts, cfg.n_routed_experts)
    chunk = min(runtime.chunk_size, seq_bucket(needed))
    act = activation_bytes(cfg, batch, chunk, plan_cache_lens(chunk)[1], itemsize)
    window, fmt, one = cfg.max_position_embeddings, runtime.cache_dtype, one_memory()
    budget, note = runtime.memory_budget or available_bytes(), None
    if runtime.cache_lens == "auto":
        budgeted = device + (host if one else 0)
        cache_lens, _, fits = auto_cache_lens(cfg, fmt, batch, budget, budgeted, act, needed)
        if fits < needed:
            raise KtjaxError(f"memory budget {format_bytes(budget)} holds {format_bytes(budgeted)} of weights and "
                             f"{format_bytes(act)} of activations but only {max(fits, 0)} cached tokens per "
                             f"sequence, fewer than the {needed} needed")
        note = f"cache_lens auto: {cache_lens} tokens ({'the window' if fits >= window else 'what the budget holds'})"
    elif runtime.cache_lens is None:
        cache_lens = plan_cache_lens(seq_bucket(needed))[0]
    else:
        cache_lens = plan_cache_lens(min(runtime.cache_lens, max(needed, window)))[0]
    plan = MemoryPlan(device, cache_bytes(cfg, fmt, batch, cache_lens), act, host, one, runtime.memory_budget)
    return cache_lens, plan, "; ".join(n for n in (note, plan.note()) if n) or None


def describe_plan(plan: MemoryPlan) -> list[str]:
    """The plan as lines for a person (--dry-run, the CLI's stats)."""
    lines = [f"device memory {format_bytes(plan.device)}: weights {format_bytes(plan.weights)}, cache "
             f"{format_bytes(plan.cache)}, activations {format_bytes(plan.activations)}",
             f"host memory {format_bytes(plan.host)}" + (" (routed experts)" if plan.host else "")]
    if plan.budget is not None:
        held = "device + host, one RAM" if plan.one_memory and plan.host else "device side"
        lines.append(f"memory budget {format_bytes(plan.budget)} holds the {held}: {format_bytes(plan.budgeted)} "
                     f"planned, {round((1 - HEADROOM) * 100)}% kept as headroom")
    lines.append(f"not budgeted: the runtime's fixed cost, about {format_bytes(RUNTIME_FIXED_BYTES)} (JAX/XLA and "
                 "the compiled programs)")
    return lines

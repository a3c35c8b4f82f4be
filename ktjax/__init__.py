"""ktjax: DeepSeek MLA models in JAX, for long context on limited memory."""
from __future__ import annotations

from ktjax.util.version import __version__  # noqa: E402

from ktjax.model.config import ModelConfig  # noqa: E402
from ktjax.errors import KtjaxError  # noqa: E402


def load(path: str, *, progress=None, **settings):
    """Load a converted ktjax checkpoint or a Hugging Face DeepSeek folder and return an Engine (with the
    folder's tokenizer when it has one). `path` may also be a Hugging Face Hub id, `org/name` or
    `org/name@revision`, fetched into huggingface_hub's cache (ktjax/weights/hub.py). `settings`: any runtime
    setting (ktjax/runtime/settings.py); per-call ones (temperature, max_new_tokens, ...) become the engine's
    defaults. `progress`: a ktjax/runtime/progress.py Progress told of the "load" phase, parameter by parameter."""
    from ktjax.runtime.settings import resolve

    return open_folder(path, *resolve(**settings), progress=progress)


def open_folder(path: str, runtime, defaults, progress=None):
    """`load` with settings already resolved (runtime.resolve): the CLI validates its flags once, up front."""
    import os

    from ktjax.weights.checkpoint import is_checkpoint, load_checkpoint
    from ktjax.weights.hub import resolve_model
    from ktjax.weights.loader import load_hf_model
    from ktjax.weights.sharding import make_mesh

    path = resolve_model(path)  # a Hub id -> its snapshot folder; a local path stays as it is
    if not os.path.isdir(path):
        raise KtjaxError(f"{path}: no such model folder")
    mesh = make_mesh(runtime.mesh)  # built once, here; a mesh larger than the machine is refused before any read
    generation, tokenizer = read_generation_config(path), _tokenizer(path)  # checked before any weight is read
    if runtime.defer_experts and os.path.isfile(os.path.join(path, "config.json")):  # its bound is the model's
        runtime.check_for_model(ModelConfig.from_file(os.path.join(path, "config.json")))
    if runtime.memory_budget is not None:
        from ktjax.runtime.memory import check_budget_holds_weights
        check_budget_holds_weights(path, runtime.memory_budget, runtime.jnp_dtype.itemsize,
                                   1 if mesh is None else mesh.size, runtime.experts, runtime.gpu_experts)
    notes: list[str] = []
    from ktjax.runtime.progress import NO_PROGRESS

    progress = progress or NO_PROGRESS
    progress.phase("load", 0, "parameters")
    # Checked first: a converted folder holds a copy of config.json too. One whose manifest is damaged (it still
    # has params/) goes to the checkpoint reader too, which says what is wrong with the manifest.
    if is_checkpoint(path) or os.path.isdir(os.path.join(path, "params")):
        # per layer on one device: the Engine runs layers as separate arrays, and splitting a stack would hold
        # every parameter twice for a while (docs/results.md, "Memory at real size")
        cfg, model = load_checkpoint(path, runtime.jnp_dtype, mesh=mesh, notes=notes, per_layer=mesh is None,
                                     on_param=progress.update)
    else:
        cfg = ModelConfig.from_file(os.path.join(path, "config.json"))
        from ktjax.runtime.backend import loader_fill  # experts host: the routed experts straight into host memory

        model = load_hf_model(path, cfg, runtime.jnp_dtype, mesh=mesh, notes=notes,  # placed tensor by tensor
                              on_param=progress.update, experts_to=loader_fill(cfg, runtime, mesh))
    engine = _engine(cfg, model, runtime, defaults, mesh, notes, generation, tokenizer, own_weights=True)
    progress.end()
    return engine


def load_model(cfg: ModelConfig, model, *, tokenizer=None, generation_config: dict | None = None, **settings):
    """An Engine for a model already in memory (a freshly built or quantized DeepseekModel): the mesh is built
    and the weights are placed here, as `load` does for a folder."""
    from ktjax.runtime.settings import resolve

    return engine_for(cfg, model, *resolve(**settings), tokenizer=tokenizer, generation_config=generation_config)


def engine_for(cfg: ModelConfig, model, runtime, defaults, *, tokenizer=None, generation_config: dict | None = None):
    """`load_model` with settings already resolved."""
    from ktjax.weights.sharding import make_mesh, place_state

    mesh = make_mesh(runtime.mesh)
    notes: list[str] = []
    if mesh is not None:
        from flax import nnx
        graphdef, state = nnx.split(model)
        state, notes = place_state(cfg, state, mesh)
        model = nnx.merge(graphdef, state)
    return _engine(cfg, model, runtime, defaults, mesh, notes, generation_config or {}, tokenizer)


def _engine(cfg, model, runtime, defaults, mesh, notes, generation_config, tokenizer, own_weights=False):
    from ktjax.runtime.engine import Engine

    return Engine(cfg, model, runtime, defaults=defaults, generation_config=generation_config, mesh=mesh,
                  notes=notes, tokenizer=tokenizer, own_weights=own_weights)


def _tokenizer(folder: str):
    """The folder's tokenizer, or None when it has no tokenizer.json (token ids only)."""
    import os

    from ktjax.runtime.tokenizer import Tokenizer

    # lexists, not isfile: a tokenizer.json that is a FIFO or a folder is refused by from_folder, not ignored
    return Tokenizer.from_folder(folder) if os.path.lexists(os.path.join(folder, "tokenizer.json")) else None


def read_generation_config(folder: str) -> dict:
    """Sampling defaults and every end-of-sequence id from generation_config.json (empty if absent)."""
    import os

    from ktjax.util.jsonio import read_json

    path = os.path.join(folder, "generation_config.json")
    if not os.path.exists(path):
        return {}
    raw = read_json(path, "generation config")
    try:
        return _generation_defaults(raw)
    except KtjaxError as e:
        raise KtjaxError(f"{path}: {e}") from None


def _generation_defaults(raw) -> dict:
    """generation_config.json's sampling settings, type-checked here and range-checked as the same CLI flags are."""
    import math

    from ktjax.model.config import token_ids
    from ktjax.util.jsonio import json_type_name
    from ktjax.util.text import short_repr
    from ktjax.runtime.settings import CallSettings

    if not isinstance(raw, dict):
        raise KtjaxError(f"must hold a JSON object of settings, not a {json_type_name(raw)}")
    out = {k: raw[k] for k in ("temperature", "top_k", "top_p", "do_sample") if raw.get(k) is not None}
    for key in ("temperature", "top_p"):
        value = out.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise KtjaxError(f"{key}={short_repr(value)} must be a number")
    if not isinstance(out.get("top_k", 0), int) or isinstance(out.get("top_k"), bool):
        raise KtjaxError(f"top_k={short_repr(out['top_k'])} must be an integer")
    if not isinstance(out.get("do_sample", False), bool):
        raise KtjaxError(f"do_sample={short_repr(out['do_sample'])} must be true or false")
    CallSettings.from_overrides(**{k: out.get(k) for k in ("temperature", "top_k", "top_p")})
    out["eos_token_ids"] = token_ids(raw, "eos_token_id")
    return out


__all__ = ["load", "load_model", "open_folder", "engine_for", "ModelConfig", "KtjaxError", "__version__"]

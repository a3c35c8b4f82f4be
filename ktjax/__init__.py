"""ktjax: DeepSeek MLA models in JAX, for long context on limited memory."""
from __future__ import annotations

__version__ = "0.1.0"

from .config import ModelConfig  # noqa: E402
from .errors import KtjaxError  # noqa: E402


def load(path: str, **settings):
    """Load a converted ktjax checkpoint or a Hugging Face DeepSeek folder and return an Engine (with the
    folder's tokenizer when it has one). `settings`: any runtime setting (ktjax/runtime.py); per-call ones
    (temperature, max_new_tokens, ...) become the engine's defaults."""
    from .runtime import resolve

    return open_folder(path, *resolve(**settings))


def open_folder(path: str, runtime, defaults):
    """`load` with settings already resolved (runtime.resolve): the CLI validates its flags once, up front."""
    import os

    from .checkpoint import is_checkpoint, load_checkpoint
    from .loader import load_hf_model
    from .sharding import make_mesh

    if not os.path.isdir(path):
        raise KtjaxError(f"{path}: no such model folder")
    mesh = make_mesh(runtime.mesh)  # built once, here; a mesh larger than the machine is refused before any read
    if runtime.memory_budget is not None:
        from .memory import check_budget_holds_weights
        check_budget_holds_weights(path, runtime.memory_budget, runtime.jnp_dtype.itemsize,
                                   1 if mesh is None else mesh.size)
    notes: list[str] = []
    if is_checkpoint(path):  # checked first: a converted folder holds a copy of config.json too
        cfg, model = load_checkpoint(path, runtime.jnp_dtype, mesh=mesh, notes=notes)
    else:
        cfg = ModelConfig.from_file(os.path.join(path, "config.json"))
        model = load_hf_model(path, cfg, runtime.jnp_dtype, mesh=mesh, notes=notes)  # placed tensor by tensor
    return _engine(cfg, model, runtime, defaults, mesh, notes, read_generation_config(path), _tokenizer(path))


def load_model(cfg: ModelConfig, model, *, tokenizer=None, generation_config: dict | None = None, **settings):
    """An Engine for a model already in memory (a freshly built or quantized DeepseekModel): the mesh is built
    and the weights are placed here, as `load` does for a folder."""
    from .runtime import resolve

    return engine_for(cfg, model, *resolve(**settings), tokenizer=tokenizer, generation_config=generation_config)


def engine_for(cfg: ModelConfig, model, runtime, defaults, *, tokenizer=None, generation_config: dict | None = None):
    """`load_model` with settings already resolved."""
    from .sharding import make_mesh, place_state

    mesh = make_mesh(runtime.mesh)
    notes: list[str] = []
    if mesh is not None:
        from flax import nnx
        graphdef, state = nnx.split(model)
        state, notes = place_state(cfg, state, mesh)
        model = nnx.merge(graphdef, state)
    return _engine(cfg, model, runtime, defaults, mesh, notes, generation_config or {}, tokenizer)


def _engine(cfg, model, runtime, defaults, mesh, notes, generation_config, tokenizer):
    from .engine import Engine

    return Engine(cfg, model, runtime, defaults=defaults, generation_config=generation_config, mesh=mesh,
                  notes=notes, tokenizer=tokenizer)


def _tokenizer(folder: str):
    """The folder's tokenizer, or None when it has no tokenizer.json (token ids only)."""
    import os

    from .tokenizer import Tokenizer

    return Tokenizer.from_folder(folder) if os.path.isfile(os.path.join(folder, "tokenizer.json")) else None


def read_generation_config(folder: str) -> dict:
    """Sampling defaults and every end-of-sequence id from generation_config.json (empty if absent)."""
    import json
    import os

    path = os.path.join(folder, "generation_config.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise KtjaxError(f"{path}: not valid JSON ({e})") from None
    eos = raw.get("eos_token_id")
    out = {k: raw[k] for k in ("temperature", "top_k", "top_p", "do_sample") if raw.get(k) is not None}
    out["eos_token_ids"] = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return out


__all__ = ["load", "load_model", "open_folder", "engine_for", "ModelConfig", "KtjaxError", "__version__"]

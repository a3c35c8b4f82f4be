"""ktjax: DeepSeek MLA models in JAX, for long context on limited memory."""
from __future__ import annotations

__version__ = "0.1.0"

from .config import ModelConfig  # noqa: E402
from .errors import KtjaxError  # noqa: E402


def load(path: str, **overrides):
    """Load a converted ktjax checkpoint or a Hugging Face DeepSeek folder and return an Engine.
    Overrides: runtime settings (ktjax/runtime.py)."""
    import os

    from .checkpoint import is_checkpoint, load_checkpoint
    from .engine import Engine
    from .loader import load_hf_model
    from .runtime import RuntimeConfig
    from .sharding import make_mesh

    runtime = RuntimeConfig.from_overrides(**overrides)
    if not os.path.isdir(path):
        raise KtjaxError(f"{path}: no such model folder")
    mesh = make_mesh(runtime.mesh)  # a mesh larger than the machine is refused before any weight is read
    generation = read_generation_config(path)  # checked before any weight is read, too
    # Checked first: a converted folder holds a copy of config.json too. One whose manifest is damaged (it still
    # has params/) goes to the checkpoint reader too, which says what is wrong with the manifest.
    if is_checkpoint(path) or os.path.isdir(os.path.join(path, "params")):
        cfg, model = load_checkpoint(path, runtime.jnp_dtype, mesh=mesh)  # straight into the sharded layout
    else:
        cfg = ModelConfig.from_file(os.path.join(path, "config.json"))
        model = load_hf_model(path, cfg, runtime.jnp_dtype, mesh=mesh)  # placed tensor by tensor
    return Engine(cfg, model, runtime, generation)


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
    try:
        return _generation_defaults(raw)
    except KtjaxError as e:
        raise KtjaxError(f"{path}: {e}") from None


def _generation_defaults(raw) -> dict:
    """generation_config.json's sampling settings, type-checked here and range-checked as the same CLI flags are."""
    import math

    from .config import json_type_name, token_ids
    from .runtime import RuntimeConfig

    if not isinstance(raw, dict):
        raise KtjaxError(f"must hold a JSON object of settings, not a {json_type_name(raw)}")
    out = {k: raw[k] for k in ("temperature", "top_k", "top_p", "do_sample") if raw.get(k) is not None}
    for key in ("temperature", "top_p"):
        value = out.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise KtjaxError(f"{key}={value!r} must be a number")
    if not isinstance(out.get("top_k", 0), int) or isinstance(out.get("top_k"), bool):
        raise KtjaxError(f"top_k={out['top_k']!r} must be an integer")
    if not isinstance(out.get("do_sample", False), bool):
        raise KtjaxError(f"do_sample={out['do_sample']!r} must be true or false")
    RuntimeConfig.from_overrides(**{k: out.get(k) for k in ("temperature", "top_k", "top_p")})
    out["eos_token_ids"] = token_ids(raw, "eos_token_id")
    return out


__all__ = ["load", "ModelConfig", "KtjaxError", "__version__"]

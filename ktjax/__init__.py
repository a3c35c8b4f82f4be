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
    if is_checkpoint(path):  # checked first: a converted folder holds a copy of config.json too
        cfg, model = load_checkpoint(path, runtime.jnp_dtype, mesh=mesh)  # straight into the sharded layout
    else:
        cfg = ModelConfig.from_file(os.path.join(path, "config.json"))
        model = load_hf_model(path, cfg, runtime.jnp_dtype, mesh=mesh)  # placed tensor by tensor
    return Engine(cfg, model, runtime, read_generation_config(path))


def read_generation_config(folder: str) -> dict:
    """Sampling defaults and every end-of-sequence id from generation_config.json (empty if absent)."""
    import os

    from .jsonio import read_json

    path = os.path.join(folder, "generation_config.json")
    if not os.path.exists(path):
        return {}
    raw = read_json(path, "generation config")
    eos = raw.get("eos_token_id")
    out = {k: raw[k] for k in ("temperature", "top_k", "top_p", "do_sample") if raw.get(k) is not None}
    out["eos_token_ids"] = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return out


__all__ = ["load", "ModelConfig", "KtjaxError", "__version__"]

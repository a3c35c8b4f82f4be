"""ktjax: DeepSeek MLA models in JAX, for long context on limited memory."""
from __future__ import annotations

__version__ = "0.1.0"

from .config import ModelConfig  # noqa: E402
from .errors import KtjaxError  # noqa: E402


def load(path: str, **overrides):
    """Load a Hugging Face DeepSeek folder and return an Engine. Overrides: the runtime settings (dtype, ...)."""
    import os

    from .engine import Engine
    from .loader import load_hf_model
    from .runtime import RuntimeConfig

    runtime = RuntimeConfig.from_overrides(**overrides)
    if not os.path.isdir(path):
        raise KtjaxError(f"{path}: no such model folder")
    cfg = ModelConfig.from_file(os.path.join(path, "config.json"))
    return Engine(cfg, load_hf_model(path, cfg, runtime.jnp_dtype), runtime)


__all__ = ["load", "ModelConfig", "KtjaxError", "__version__"]

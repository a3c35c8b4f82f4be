"""A loaded model's weights quantized in memory (tests and benchmarks; the converter writes the same arrays):
which parameters the table marks for int8 / int4, and the model surgery that swaps them in."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ktjax.model.quantized import INT4_GROUP, QuantizedArray, quantize_weight
from ktjax.weights import params


def quantized_paths(path: tuple) -> bool:
    """Whether a parameter (its path in the model state) is quantized: the parameter table's `quantize`
    (attention projections, dense MLPs, shared and routed experts; not embeddings, lm_head, norms, the router
    or w_uk/w_uv)."""
    return params.lookup(path)[0].quantize


def quantize_model(model, fmt: str, group: int = INT4_GROUP):
    """Replace each quantized parameter of an nnx model by a QuantizedArray in `fmt`, in place."""
    for path, var in list(nnx.state(model).flat_state()):
        path = tuple(map(str, path))
        if quantized_paths(path):
            values, scales = quantize_weight(np.asarray(var[...], np.float32), fmt, group)
            set_param(model, path, QuantizedArray(jnp.asarray(values), jnp.asarray(scales)))
    return model


def set_param(model, path: tuple, value):
    """Replace the parameter at `path` (in the model state) by nnx.Param(value): a QuantizedArray, say."""
    module = model
    for name in path[:-1]:
        module = getattr(module, name)
    setattr(module, path[-1], nnx.Param(value))

"""Whether the Pallas kernel tests interpret the kernels (the default, on the CPU) or compile them for the GPU
(KTJAX_PALLAS_COMPILED=1, which benchmarks/gpu_check.sh sets), and what follows from that, for every kernel test
module: the interpret flag, the compile options, the skip without a GPU and the float32 references."""
import contextlib
import os
import warnings

import jax
import pytest

from ktjax.pallas import platform

COMPILED = os.environ.get("KTJAX_PALLAS_COMPILED") == "1"
INTERPRET = not COMPILED
# A module that tests kernels sets `pytestmark = skip_without_gpu` (it marks nothing when interpreting).
skip_without_gpu = pytest.mark.skipif(COMPILED and not platform.on_gpu(), reason="KTJAX_PALLAS_COMPILED=1 needs a GPU")


@contextlib.contextmanager
def kernel_test_context():
    """No interpret-mode notices; compiled, XLA's float32 dots at full precision (a GPU defaults to TF32, and the
    references must stay float32)."""
    with warnings.catch_warnings(), jax.default_matmul_precision("highest" if COMPILED else None):
        warnings.simplefilter("ignore", platform.InterpretModeWarning)
        yield


def run_jitted(fn, *args):
    """jit and run. Interpreted kernels spend their time in XLA's CPU compiler, so skip its optimisation."""
    return jax.jit(fn).lower(*args).compile({} if COMPILED else {"xla_backend_optimization_level": 0})(*args)

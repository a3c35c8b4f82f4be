"""ktjax's C++ matmul kernels for the CPU (ktjax/csrc/matmul.cc): built on first use, called through XLA's FFI.

XLA's CPU dot turns an int8/int4 weight into a float32 copy before multiplying, and a decode step is a few rows
against every weight (benchmarks/RESULTS.md, "CPU kernels"). The kernels read the stored bytes once, from
weights the Engine holds [out, in] (weight_quant.KernelQuantized), on XLA's own thread pool.

The library is compiled with the system's C++ compiler (`$CXX`, else g++ or c++) against jaxlib's FFI headers
into `$KTJAX_KERNEL_DIR` (default ~/.cache/ktjax/kernels), once per source, jaxlib and CPU; a machine without a
compiler runs XLA's dot (the setting cpu_kernels: auto), or is told why (cpu_kernels: on).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from .errors import KtjaxError

SOURCE = Path(__file__).parent / "csrc" / "matmul.cc"
TARGETS = {np.dtype(np.int8): "KtjaxMatmulInt8", np.dtype(np.uint8): "KtjaxMatmulInt4"}
MAX_ROWS = 16  # up to this many rows the kernels beat XLA's dot (benchmarks/RESULTS.md, "CPU kernels")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")


def kernel_dir() -> Path:
    return Path(os.environ.get("KTJAX_KERNEL_DIR") or Path.home() / ".cache" / "ktjax" / "kernels")


def _compiler() -> str | None:
    """$CXX when set (and only it), else the first of g++, c++, clang++ on the PATH."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((name for name in names if shutil.which(name)), None)


def _cpu_signature() -> str:
    """What -march=native depends on: a library built on one CPU may not run on another."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def library_path(compiler: str) -> Path:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(), compiler.encode(), " ".join(FLAGS).encode(),
                 _cpu_signature().encode()):
        key.update(part)
    return kernel_dir() / f"ktjax_matmul_{key.hexdigest()[:16]}.so"


def build() -> Path:
    """The compiled library (compiled now if it is not there yet); KtjaxError says why it cannot be."""
    compiler = _compiler()
    if compiler is None:
        raise KtjaxError(f"cpu_kernels: no C++ compiler found ({os.environ.get('CXX') or 'g++, c++, clang++'}; set CXX "
                         "or install g++)")
    out = library_path(compiler)
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Compile to a temporary name and rename: a concurrent or interrupted build never leaves a torn file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
    except OSError as e:
        raise KtjaxError(f"cpu_kernels: cannot write {out.parent} ({e.strerror}); set KTJAX_KERNEL_DIR to a "
                         "writable folder") from None
    cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise KtjaxError(f"cpu_kernels: compiling {SOURCE.name} failed ({' '.join(cmd)}):\n"
                             f"{done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    except (OSError, subprocess.SubprocessError) as e:
        raise KtjaxError(f"cpu_kernels: compiling {SOURCE.name} failed ({e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _registered() -> bool:
    path = build()
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
    except OSError as e:  # a damaged file in the cache: say which, never delete it
        raise KtjaxError(f"cpu_kernels: cannot load {path} ({e}); remove it to rebuild") from None
    for target in TARGETS.values():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)), platform="cpu")
    return True


@functools.cache
def available() -> str | None:
    """None when the kernels are built and registered, else why not (one line)."""
    try:
        _registered()
    except KtjaxError as e:
        return str(e).splitlines()[0]
    return None


def require():
    """Build and register the kernels now, or raise KtjaxError with the reason."""
    try:
        _registered()
    except KtjaxError as e:
        raise KtjaxError(f"{e}\n(cpu_kernels auto or off runs XLA's dot instead)") from None


def fits(rows: int) -> bool:
    """Whether a matmul of `rows` rows goes to a kernel (decode steps); longer ones (prefill) run XLA's dot."""
    return rows <= MAX_ROWS


def matmul(x, values, scale):
    """x [T, K] float32 @ an int8 ([N, K], scales [N, 1]) or int4 ([N, P/2], scales [N, P/g]; x zero-padded to
    P) weight held [out, in] -> [T, N] float32."""
    _registered()  # a program traced here may be compiled or loaded from JAX's persistent cache: register first
    call = jax.ffi.ffi_call(TARGETS[np.dtype(values.dtype)], jax.ShapeDtypeStruct((x.shape[0], values.shape[0]),
                                                                                 jnp.float32),
                            vmap_method="sequential")
    return call(x, values, scale)

"""Building ktjax's C++ CPU kernels (ktjax/cpu/csrc/) and registering them with XLA's FFI.

The library is compiled with the system's C++ compiler (`$CXX`, else g++ or c++) against jaxlib's FFI headers
into `$KTJAX_KERNEL_DIR` (default ~/.cache/ktjax/kernels), once per source, jaxlib, flags and CPU. It is built at
first use (the first Engine that runs the kernels, ~30 s once), not at install: it is built for the CPU it runs on
(-march=native) against the installed jaxlib, both of which can change after `pip install`, and an editable install
would not rebuild it when a source changes; importing ktjax or collecting the tests never builds it. A machine
without a compiler runs XLA's dot (the setting cpu_kernels: auto, with one note), or is told why (cpu_kernels: on).
Libraries not loaded for STALE_DAYS are removed when a new one is built.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import jaxlib

from ktjax.errors import KtjaxError

SOURCES = tuple(Path(__file__).parent / "csrc" / name for name in ("matmul.cc", "attention.cc"))
HEADERS = tuple(Path(__file__).parent / "csrc" / name for name in ("simd.h", "pool.h"))
# -w: jaxlib's FFI headers warn under GCC, and a failed build's message should show the error, not those.
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-w")
# The instruction set the library is built for: this CPU's own by default; $KTJAX_CPU_MARCH (a -march value such as
# x86-64-v3) builds a separate library for another target, which is how CI runs the AVX2 code paths on an
# AVX-512 machine (tests/test_cpu_build.py).
MARCH_ENV = "KTJAX_CPU_MARCH"
LIBRARY_GLOB = "ktjax_matmul_*.so"
STALE_DAYS = 30  # a library not loaded for this long is removed when another is built (its inputs changed)
# The functions the library exports (matmul.cc, attention.cc), registered as FFI targets for the CPU.
EXPORTS = ("KtjaxMatmulInt8", "KtjaxMatmulInt4", "KtjaxMatmulF32", "KtjaxMatmulInt8Q8", "KtjaxMatmulInt4Q8",
           "KtjaxDecodeAttention", "KtjaxHeadsMatmulF32", "KtjaxGroupedMatmul", "KtjaxHostExperts")


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


def march() -> str:
    return os.environ.get(MARCH_ENV) or "native"


def flags() -> tuple[str, ...]:
    return (*FLAGS, f"-march={march()}", *bridge_flags())


# The GPU bridge of experts: host (matmul.cc, KTJAX_CUDA): KtjaxHostExperts on the CUDA platform, built into the
# library where JAX runs on a GPU and the CUDA runtime's headers and library are found (JAX's CUDA wheels ship them).
BRIDGE_TARGET = ("KtjaxHostExperts", "KtjaxHostExpertsCuda")  # (the FFI name, the CUDA handler's symbol)


def cuda_home() -> Path | None:
    """A folder with include/cuda_runtime.h and lib/ (or lib64/) libcudart: $CUDA_HOME, JAX's nvidia-cuda-runtime
    wheel, or /usr/local/cuda*; None where there is none."""
    candidates = [os.environ.get("CUDA_HOME") or ""]
    try:  # JAX's CUDA wheels (nvidia-cuda-runtime): found by name, not a dependency of ktjax
        wheel = importlib.util.find_spec("nvidia.cuda_runtime")
        candidates += list(wheel.submodule_search_locations or []) if wheel else []
    except ImportError:
        pass
    candidates += sorted(map(str, Path("/usr/local").glob("cuda*")), reverse=True)
    return next((Path(c) for c in candidates if c and (Path(c) / "include" / "cuda_runtime.h").is_file()), None)


def bridge_flags(compile_only: bool = False) -> tuple[str, ...]:
    """The flags that build the GPU bridge in: where JAX runs on a GPU and cuda_home() finds the runtime (or, with
    compile_only, wherever the headers are: tests/test_host_experts.py compiles it on any machine); else none."""
    home = cuda_home()
    if home is None or not (compile_only or jax.default_backend() == "gpu"):
        return ()
    return ("-DKTJAX_CUDA", f"-I{home / 'include'}")


def bridge_libraries() -> tuple[str, ...]:
    """What the bridge links (after the sources): the CUDA runtime, found again at load through the rpath."""
    if not bridge_flags():
        return ()
    home = cuda_home()
    lib = next((home / d for d in ("lib64", "lib") if (home / d).is_dir()), home / "lib")
    return (f"-L{lib}", f"-Wl,-rpath,{lib}", "-lcudart")


def integer_products_fast() -> bool:
    """Whether the library runs the int8-activation kernels on AVX-512 VNNI (without it they run the same
    arithmetic in plain C++, correctly but slowly): this CPU has it and the library is built for this CPU."""
    return march() == "native" and "avx512_vnni" in _cpu_signature().split()


def library_path(compiler: str) -> Path:
    """One file per sources, jaxlib, compiler, flags and CPU: any change builds a new library."""
    key = hashlib.sha256()
    for part in (*(f.read_bytes() for f in SOURCES + HEADERS), jaxlib.__version__.encode(), compiler.encode(),
                 " ".join(flags()).encode(), _cpu_signature().encode()):
        key.update(part)
    return kernel_dir() / LIBRARY_GLOB.replace("*", key.hexdigest()[:16])


def remove_stale(folder: Path, keep: Path, now: float | None = None) -> list[Path]:
    """Remove the libraries in `folder` not loaded for STALE_DAYS (registered() marks a library at each load) and
    the temporary files of builds interrupted over an hour ago; never `keep`, and nothing but ktjax's own names.
    -> the paths removed."""
    now = time.time() if now is None else now
    removed = []
    for path, age in [*((p, STALE_DAYS * 86400) for p in folder.glob(LIBRARY_GLOB)),
                      *((p, 3600) for p in folder.glob("tmp*.so"))]:
        try:
            if path != keep and path.is_file() and not path.is_symlink() and now - path.stat().st_mtime > age:
                path.unlink()
                removed.append(path)
        except OSError:  # another process removed or is using it: not ours to fight over
            pass
    return removed


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
    cmd = [compiler, *flags(), f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), *bridge_libraries(), "-o", tmp]
    names = " and ".join(source.name for source in SOURCES)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise KtjaxError(f"cpu_kernels: compiling {names} failed ({' '.join(cmd)}):\n"
                             f"{done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
        remove_stale(out.parent, keep=out)
    except (OSError, subprocess.SubprocessError) as e:
        raise KtjaxError(f"cpu_kernels: compiling {names} failed ({e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def library() -> ctypes.CDLL:
    """Build (if needed) and load the library once per process; KtjaxError says why it cannot be."""
    path = build()
    try:
        os.utime(path)  # in use: remove_stale keeps it
    except OSError:
        pass
    try:
        return ctypes.cdll.LoadLibrary(str(path))
    except OSError as e:  # a damaged file in the cache: say which, never delete it
        raise KtjaxError(f"cpu_kernels: cannot load {path} ({e}); remove it to rebuild") from None


@functools.cache
def registered() -> bool:
    """Build (if needed), load and register the library once per process; KtjaxError says why it cannot be."""
    lib = library()
    for target in EXPORTS:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)), platform="cpu")
    if bridge_flags():
        name, symbol = BRIDGE_TARGET
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="CUDA")
    return True


def bridge_built() -> bool:
    """Whether the library holds the GPU bridge (built for a GPU with the CUDA runtime found)."""
    return bool(bridge_flags()) and available() is None


@functools.cache
def available() -> str | None:
    """None when the kernels are built and registered, else why not (one line)."""
    try:
        registered()
    except KtjaxError as e:
        return str(e).splitlines()[0]
    return None


def require():
    """Build and register the kernels now, or raise KtjaxError with the reason."""
    try:
        registered()
    except KtjaxError as e:
        raise KtjaxError(f"{e}\n(cpu_kernels auto or off runs XLA's dot instead)") from None

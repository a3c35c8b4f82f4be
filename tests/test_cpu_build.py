"""Building ktjax's C++ CPU kernels (ktjax/cpu/build.py): the C++ cache-format table follows kv/formats.py, nothing
builds at import or test collection, stale libraries are removed (and nothing else), and a second build for a plain
x86-64-v3 target (no AVX-512) runs the same kernel tests, so the AVX2 code paths are executed, not only compiled."""
from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ktjax.cpu import build
from ktjax.kv.formats import NAMES

ROOT = Path(__file__).resolve().parent.parent
KERNEL_TESTS = ("tests/test_cpu_kernels.py", "tests/test_cpu_attention.py", "tests/test_activation_quant.py")


def test_the_cpp_cache_format_enum_follows_kv_formats():
    """attention.cc's `enum Format` names kv/formats.py's NAMES in order (kFloat32 = 0, kBf16 = 1, ...), and the
    Python side passes those numbers: a new cache format cannot reach the kernel under another's number."""
    source = (ROOT / "ktjax" / "cpu" / "csrc" / "attention.cc").read_text()
    body = re.search(r"enum Format : int64_t \{([^}]*)\}", source).group(1)
    enum = {name.strip(): int(value) for name, value in (item.split("=") for item in body.split(","))}
    assert enum == {"k" + name.capitalize(): i for i, name in enumerate(NAMES)}
    from ktjax.cpu import kernels
    assert kernels.CACHE_FORMATS == {name: i for i, name in enumerate(NAMES)}


def test_importing_and_collecting_never_build(tmp_path):
    """Importing ktjax and collecting the kernel tests leave the kernel folder untouched (the tests build at first
    use, through the cpu_kernels_built fixture)."""
    kernels = tmp_path / "kernels"
    env = dict(os.environ, KTJAX_KERNEL_DIR=str(kernels), JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           *KERNEL_TESTS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert re.search(r"\d+ tests collected", done.stdout), done.stdout[-500:]
    assert not kernels.exists()


DAY = 86400
# (file name, age in seconds, is it the library in use, removed?)
STALE_CASES = [
    ("ktjax_matmul_0123456789abcdef.so", 40 * DAY, False, True),    # not loaded for 40 days
    ("ktjax_matmul_fedcba9876543210.so", 2 * DAY, False, False),    # loaded two days ago
    ("ktjax_matmul_1111111111111111.so", 40 * DAY, True, False),    # the one just built or loaded
    ("tmpab12cd.so", 2 * 3600, False, True),                        # an interrupted build's temporary file
    ("tmpef34gh.so", 60, False, False),                             # a build in progress
    ("notes.txt", 400 * DAY, False, False),                         # not ktjax's: never touched
    ("ktjax_matmul_2222222222222222.so.bak", 400 * DAY, False, False),
]


def test_stale_libraries_are_removed_and_nothing_else(tmp_path):
    now = time.time()
    keep = None
    for name, age, in_use, _ in STALE_CASES:
        path = tmp_path / name
        path.write_bytes(b"x")
        os.utime(path, (now - age, now - age))
        keep = path if in_use else keep
    link = tmp_path / "ktjax_matmul_3333333333333333.so"  # a link someone made: not a library ktjax built
    link.symlink_to(tmp_path / "notes.txt")
    removed = build.remove_stale(tmp_path, keep=keep, now=now)
    assert sorted(p.name for p in removed) == sorted(name for name, *_, gone in STALE_CASES if gone)
    for name, *_, gone in STALE_CASES:
        assert (tmp_path / name).exists() != gone, name
    assert link.is_symlink()


def _runs_x86_64_v3() -> str | None:
    """Why this machine cannot run an x86-64-v3 build, or None."""
    if platform.machine() != "x86_64":
        return "not an x86-64 machine"
    if build._compiler() is None:
        return "no C++ compiler"
    cpu = build._cpu_signature().split()
    missing = [f for f in ("avx2", "fma", "bmi2", "f16c", "movbe") if f not in cpu]
    return f"this CPU lacks {missing}" if missing else None


@pytest.mark.skipif(_runs_x86_64_v3() is not None, reason=str(_runs_x86_64_v3()))
def test_an_x86_64_v3_build_passes_the_kernel_tests(tmp_path):
    """KTJAX_CPU_MARCH=x86-64-v3 builds a second library (its own file) with no AVX-512 instruction in it, and the
    kernel test modules pass against it: the AVX2 code of simd.h and matmul.cc runs on the same test vectors."""
    env = dict(os.environ, KTJAX_CPU_MARCH="x86-64-v3", JAX_PLATFORMS="cpu")
    where = subprocess.run([sys.executable, "-c", "from ktjax.cpu import build; print(build.build())"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=900)
    assert where.returncode == 0, where.stderr[-2000:]
    v3 = Path(where.stdout.strip().splitlines()[-1])
    assert v3 != build.library_path(build._compiler())
    disassembly = subprocess.run(["objdump", "-d", str(v3)], capture_output=True, text=True, timeout=300)
    if disassembly.returncode == 0:
        assert "zmm" not in disassembly.stdout, "an AVX-512 register in the x86-64-v3 build"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *KERNEL_TESTS],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    tail = done.stdout[-3000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    counts = re.search(r"(\d+) passed", done.stdout)
    assert counts and int(counts.group(1)) > 100, tail  # the modules' own skips (platform cases) may remain

"""Build and load the native CPU kernels (JIT, cached in torch's extensions directory).

The per-ISA translation units (``isa_*.cpp``, plain C++ without torch headers) are compiled by
the C++ compiler directly, each with its own ``-m`` flags, into object files; the torch binding
(``ops.cpp``) is then built with ``torch.utils.cpp_extension.load`` and linked with them. Every
unit gets ``-O3 -ffp-contract=off`` (no FMA contraction: the level tables must be bit-identical
to :func:`qins.formats.level_table`). The build directory name carries a hash of the sources,
the flags, the torch version and install path, the Python version, the compiler (``CXX``) and the
source directory, so an edit, a torch upgrade or another venv or compiler rebuilds, a
repeat call loads the cached module, and checkouts in different directories never share (and
rebuild) one build directory.

A build never waits on a dead process: the whole build (the ISA units and torch's ``load``) runs
under an ``fcntl.flock`` on ``qins.lock`` in the build directory, which the kernel releases when its
holder exits however it exits (SIGKILL and OOM included). torch's own lock file (``lock``) has no
such release: a build killed while holding it left it behind, and every later process waited on it
forever. Under the flock no other process of this module is inside torch's ``load`` for this
directory, so a ``lock`` file found then is a dead build's, and is removed before loading.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; torch's own lock only
    fcntl = None  # type: ignore[assignment]

import torch

__all__ = ["load_native", "SOURCE_DIR", "build_directory"]

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
COMMON_FLAGS = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-math-errno", "-fPIC"]
X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
# (source, ISA flags) of the units compiled outside cpp_extension.
ISA_UNITS = [("isa_scalar.cpp", [])] + (
    [("isa_avx2.cpp", ["-mavx2", "-mfma"]), ("isa_avx512.cpp", ["-mavx512f", "-mavx512bw", "-mavx512vbmi", "-mfma"])]
    if X86 else []
)
DEFINES = ["-DQINS_X86"] if X86 else []
# ops.cpp splits rows and blocks over threads with at::parallel_for, whose OpenMP region is inline in
# ATen's headers: compiled without -fopenmp it runs on one thread whatever torch.set_num_threads says.
# Linux torch wheels are built with OpenMP and load libgomp.so.1 first, so the module's own
# libgomp.so.1 dependency resolves to that one runtime (and its thread count).
OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []


def _digest() -> str:
    h = hashlib.sha256()
    for name in sorted(p.name for p in SOURCE_DIR.iterdir() if p.suffix in (".cpp", ".h")):
        h.update(name.encode() + (SOURCE_DIR / name).read_bytes())
    h.update(repr((COMMON_FLAGS, ISA_UNITS, DEFINES, OPENMP_FLAGS, torch.__version__)).encode())
    # The interpreter, the torch install and the compiler too: venvs that share one checkout (the nox
    # environments) must not share, and relink, one build directory; a changed CXX recompiles.
    h.update(repr((sys.version, sys.implementation.cache_tag, torch.__file__, os.environ.get("CXX", "c++"))).encode())
    # The source directory too: cpp_extension writes absolute source paths into build.ninja, so two
    # checkouts of the same sources sharing one directory rebuild ops.o at every alternation, and a
    # process loading the module during the other's rebuild can fail (and fall back to the reference).
    h.update(str(SOURCE_DIR).encode())
    return h.hexdigest()[:16]


def build_directory() -> Path:
    """``$TORCH_EXTENSIONS_DIR`` (else torch's default build root) / ``qins_cpu_<digest>``, as torch's own
    extensions resolve their root."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / f"qins_cpu_{_digest()}"


def _compile_unit(cxx: str, src: str, flags: list[str], out_dir: Path) -> Path:
    obj = out_dir / (Path(src).stem + ".o")
    if obj.exists():
        return obj
    tmp = out_dir / f"{obj.name}.{os.getpid()}.tmp"
    # shlex.split: "ccache c++" too
    cmd = [*shlex.split(cxx), *COMMON_FLAGS, *DEFINES, *flags, "-c", str(SOURCE_DIR / src), "-o", str(tmp)]
    logger.debug("qins: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"qins: compiling {src} failed:\n{proc.stderr[-4000:]}")
    os.replace(tmp, obj)
    return obj


#: How long a process waits for another live process's build (seconds) before giving up with
#: ``TimeoutError`` (the caller then falls back to the reference). An undisturbed build takes 30-60 s.
LOCK_TIMEOUT_S = 1800.0


@contextlib.contextmanager
def _build_lock(out_dir: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the exclusive flock on ``out_dir / "qins.lock"``; remove a dead build's torch ``lock``."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(out_dir / "qins.lock", "a+") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"qins: another process has been building in {out_dir} "
                                       f"for over {timeout_s:.0f} s") from None
                time.sleep(0.2)
        try:
            stale = out_dir / "lock"
            if stale.exists():
                logger.warning("qins: removing %s, left by a build that was killed", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def load_native() -> ModuleType:
    """Build (first call) or load (cached) the native module; raises on any failure."""
    from torch.utils.cpp_extension import load

    start = time.perf_counter()
    out_dir = build_directory()
    out_dir.mkdir(parents=True, exist_ok=True)
    cxx = os.environ.get("CXX", "c++")
    with _build_lock(out_dir):
        objs = [_compile_unit(cxx, src, flags, out_dir) for src, flags in ISA_UNITS]
        module = load(
            name=out_dir.name,
            sources=[str(SOURCE_DIR / "ops.cpp")],
            extra_cflags=[*COMMON_FLAGS, *DEFINES, *OPENMP_FLAGS],
            extra_ldflags=[str(o) for o in objs] + OPENMP_FLAGS,
            extra_include_paths=[str(SOURCE_DIR)],
            build_directory=str(out_dir),
            verbose=False,
        )
    logger.info("qins: native CPU kernels ready in %.1f s (%s)", time.perf_counter() - start, out_dir)
    return module

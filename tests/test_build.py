"""The native build (`qins.kernels.cpu.build`): cache key, directory, per-unit compiles, loading.

The kernels themselves are pinned in ``tests/test_kernels.py``; here, how they are built: the
build directory's name is a digest of every source byte and every flag (a change can never load a
stale module), each ISA unit compiles once, atomically, with its own flags, and a compiler error
surfaces with its message.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from qins.kernels.cpu import build


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """A private copy of the kernel sources, installed as the build's SOURCE_DIR."""
    src = tmp_path / "src"
    src.mkdir()
    for p in build.SOURCE_DIR.iterdir():
        if p.suffix in (".cpp", ".h"):
            shutil.copy(p, src / p.name)
    monkeypatch.setattr(build, "SOURCE_DIR", src)
    return src


def test_digest_depends_on_every_source_byte_flag_and_the_source_directory(sources, monkeypatch):
    d0 = build._digest()
    assert len(d0) == 16 and int(d0, 16) >= 0 and build._digest() == d0
    monkeypatch.undo()
    assert build._digest() != d0  # same bytes in another checkout: its own build directory
    monkeypatch.setattr(build, "SOURCE_DIR", sources)
    (sources / "notes.txt").write_text("not a source")
    assert build._digest() == d0
    header = sources / "qins_kernels.h"
    header.write_bytes(header.read_bytes() + b" ")
    d1 = build._digest()
    assert d1 != d0
    (sources / "extra.cpp").write_text("")
    assert build._digest() not in (d0, d1)
    (sources / "extra.cpp").unlink()
    assert build._digest() == d1
    for name, value in (
        ("COMMON_FLAGS", build.COMMON_FLAGS + ["-g"]),
        ("ISA_UNITS", build.ISA_UNITS[:1]),
        ("DEFINES", build.DEFINES + ["-DX"]),
    ):
        with monkeypatch.context() as m:
            m.setattr(build, name, value)
            assert build._digest() != d1, name
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "0.0.0")
        assert build._digest() != d1


def test_build_directory_is_the_digest_under_torchs_extension_root(tmp_path, monkeypatch):
    from torch.utils.cpp_extension import get_default_build_root

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert build.build_directory() == tmp_path / f"qins_cpu_{build._digest()}"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert build.build_directory() == Path(get_default_build_root()) / f"qins_cpu_{build._digest()}"


def test_compile_unit_compiles_once_with_its_flags_and_atomically(sources, tmp_path, monkeypatch):
    (sources / "unit.cpp").write_text("int qins_unit_answer() { return 42; }\n")
    out = tmp_path / "out"
    out.mkdir()
    calls = []
    run = subprocess.run
    monkeypatch.setattr(build.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or run(cmd, **kw))
    obj = build._compile_unit(os.environ.get("CXX", "c++"), "unit.cpp", ["-DUNIT_FLAG"], out)
    assert obj == out / "unit.o" and obj.stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == ["unit.o"]  # compiled to a temp name, then renamed
    (cmd,) = calls
    assert cmd[0] == os.environ.get("CXX", "c++")
    assert cmd[1:] == [*build.COMMON_FLAGS, *build.DEFINES, "-DUNIT_FLAG", "-c", str(sources / "unit.cpp"),
                       "-o", str(out / f"unit.o.{os.getpid()}.tmp")]
    assert build._compile_unit("c++", "unit.cpp", ["-DUNIT_FLAG"], out) == obj and len(calls) == 1  # cached


def test_compile_unit_logs_its_command_at_debug_level(sources, tmp_path, caplog):
    (sources / "unit.cpp").write_text("int qins_unit_answer() { return 42; }\n")
    cxx = os.environ.get("CXX", "c++")
    with caplog.at_level(logging.DEBUG, logger=build.__name__):
        build._compile_unit(cxx, "unit.cpp", ["-DUNIT_FLAG"], tmp_path)
    cmd = [cxx, *build.COMMON_FLAGS, *build.DEFINES, "-DUNIT_FLAG", "-c", str(sources / "unit.cpp"),
           "-o", str(tmp_path / f"unit.o.{os.getpid()}.tmp")]
    assert [r.getMessage() for r in caplog.records] == ["qins: " + " ".join(cmd)]


def test_compile_error_message_is_the_tail_of_the_compilers_text(sources, tmp_path, monkeypatch):
    """The last 4000 characters of stderr, as text (not a bytes repr)."""
    stderr = "".join(f"line {i}: error\n" for i in range(1000))  # ~14 kB
    monkeypatch.setattr(
        build.subprocess,
        "run",
        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", stderr if kw.get("text") else stderr.encode()),
    )
    with pytest.raises(RuntimeError) as info:
        build._compile_unit("c++", "broken.cpp", [], tmp_path)
    assert str(info.value) == f"qins: compiling broken.cpp failed:\n{stderr[-4000:]}"


def test_compile_unit_raises_with_the_compiler_message(sources, tmp_path):
    (sources / "broken.cpp").write_text("int broken( {\n")
    with pytest.raises(RuntimeError, match=r"(?s)qins: compiling broken\.cpp failed:\n.*error") as info:
        build._compile_unit(os.environ.get("CXX", "c++"), "broken.cpp", [], tmp_path)
    assert "broken.cpp" in str(info.value).split("\n", 1)[1]
    assert not (tmp_path / "broken.o").exists()


def test_load_native_builds_the_isa_units_then_links_them_into_ops(tmp_path, monkeypatch, caplog):
    """The wiring, without a build: each ISA unit compiled with its flags, then torch's ``load``.

    (That the real build succeeds and loads is pinned by ``test_native_built_under_ci`` in
    tests/test_kernels.py, and every kernel test uses the module it loads.)
    """
    import torch.utils.cpp_extension as cpp

    root = tmp_path / "not" / "yet"  # created, parents included
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    monkeypatch.setenv("CXX", "my-c++")
    units, loads = [], []
    monkeypatch.setattr(build, "_compile_unit", lambda cxx, src, flags, out: units.append((cxx, src, flags, out))
                        or out / f"{src}.o")
    monkeypatch.setattr(cpp, "load", lambda **kw: loads.append(kw) or "module")
    with caplog.at_level(logging.INFO, logger=build.__name__):
        assert build.load_native() == "module"
    out = build.build_directory()
    assert [r.getMessage().split(" in ")[0] for r in caplog.records] == ["qins: native CPU kernels ready"]
    assert caplog.records[0].getMessage().endswith(f"s ({out})")
    seconds = float(caplog.records[0].getMessage().split(" in ")[1].split(" s ")[0])
    assert 0 <= seconds < 60  # the time this call took (no build here), not a clock reading
    assert out.is_dir() and out.parent == root
    assert units == [("my-c++", src, flags, out) for src, flags in build.ISA_UNITS]
    (kw,) = loads
    assert kw == dict(
        name=out.name,
        sources=[str(build.SOURCE_DIR / "ops.cpp")],
        extra_cflags=[*build.COMMON_FLAGS, *build.DEFINES, *build.OPENMP_FLAGS],
        extra_ldflags=[str(out / f"{src}.o") for src, _ in build.ISA_UNITS] + build.OPENMP_FLAGS,
        extra_include_paths=[str(build.SOURCE_DIR)],
        build_directory=str(out),
        verbose=False,
    )
    monkeypatch.delenv("CXX")
    units.clear()
    build.load_native()
    assert {u[0] for u in units} == {"c++"}


def test_digest_depends_on_the_python_the_torch_install_and_the_compiler(monkeypatch):
    import sys

    import torch

    d0 = build._digest()
    for patch in (lambda m: m.setattr(sys, "version", sys.version + " other"),
                  lambda m: m.setattr(torch, "__file__", "/elsewhere/torch/__init__.py"),
                  lambda m: m.setenv("CXX", "clang++")):
        with monkeypatch.context() as m:
            patch(m)
            assert build._digest() != d0
    assert build._digest() == d0


def test_a_compiler_launcher_in_cxx_is_split_into_its_words(sources, tmp_path):
    (sources / "unit.cpp").write_text("int qins_unit_answer() { return 42; }\n")
    cxx = os.environ.get("CXX", "c++")
    obj = build._compile_unit(f"env {cxx}", "unit.cpp", [], tmp_path)  # as "ccache c++" would be
    assert obj.stat().st_size > 0


def test_concurrent_first_use_in_two_threads_builds_once(monkeypatch):
    import threading
    import time

    import qins.kernels as qk

    calls = []

    def slow_build():
        calls.append(threading.get_ident())
        time.sleep(0.3)
        return "module"

    monkeypatch.setattr(qk, "_native", qk._UNSET)
    monkeypatch.setattr(qk._build, "load_native", slow_build)
    got = []
    threads = [threading.Thread(target=lambda: got.append(qk.native_module())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == ["module", "module"] and len(calls) == 1


def _thread_cpu_ticks() -> dict[int, int]:
    """CPU clock ticks (user + system) of every thread of this process, by thread id."""
    ticks = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        ticks[int(task.name)] = int(fields[11]) + int(fields[12])
    return ticks


@pytest.mark.slow  # about a CPU second of kernel work
@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or (os.cpu_count() or 1) < 2,
                    reason="needs Linux's per-thread CPU times and two cores")
def test_the_native_kernel_runs_its_rows_on_every_torch_thread():
    """at::parallel_for's region is inline OpenMP: a module built without -fopenmp runs it on the
    calling thread alone. With two torch threads, another thread must do a share of the work."""
    import qins
    import qins.kernels as qk

    if qk.native_module() is None:
        pytest.skip("native CPU kernels unavailable")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        layer = qins.ProjectiveLinear.from_linear(torch.nn.Linear(4096, 2048, bias=False), cache_weight=False)
        x = torch.randn(1, 4096)
        with torch.inference_mode():
            layer(x)  # the worker threads exist from here on
            before = _thread_cpu_ticks()
            for _ in range(400):
                layer(x)
        after = _thread_cpu_ticks()
    finally:
        torch.set_num_threads(threads)
    main = threading.get_native_id()
    gained = {tid: after[tid] - before.get(tid, 0) for tid in after}
    mine = gained.pop(main)
    assert mine > 0 and max(gained.values(), default=0) >= mine // 4, (mine, gained)


#: isa_avx2.cpp's per-column helpers (QINS_HOT): each call inside a kernel's column loop handles 8 or
#: 32 weights, so one left out of line costs a call per step.
AVX2_HOT_HELPERS = ("lookup8", "load_w8", "load_w32", "signed8", "hsum8", "w1")


@pytest.mark.skipif(not build.X86, reason="the AVX2 unit is built on x86 only")
def test_the_avx2_per_column_helpers_are_inlined_into_every_kernel():
    """GCC's inliner budgets per translation unit: when isa_avx2.cpp grew, it left ``lookup8`` out of
    line in every kernel (30 calls; batch 8, 3072x3072, 7% slower on AMD EPYC 25/1, results
    bit-identical, so no other test saw it). The helpers are ``always_inline``; the built AVX2
    object must hold none of them as a function of its own. ``nm`` comes with binutils, which
    linked the module."""
    from qins.kernels import native_module

    assert native_module() is not None, "the native module did not build"
    obj = build.build_directory() / "isa_avx2.o"
    nm = shutil.which("nm")
    assert obj.is_file() and nm, (obj, nm)
    names = subprocess.run([nm, "-C", str(obj)], capture_output=True, text=True, check=True).stdout
    functions = [line.split(" ", 2)[-1] for line in names.splitlines() if " t " in line or " T " in line]
    assert functions, "nm listed no functions in the AVX2 object"
    out_of_line = [f for f in functions if any(f"::{h}(" in f or f"::{h}<" in f for h in AVX2_HOT_HELPERS)]
    assert not out_of_line, f"per-column helpers compiled out of line: {out_of_line}"

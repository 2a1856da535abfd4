"""Version matrix: the compat and generation tests under each supported transformers release.

One session per transformers version, ``matrix-<version>``. Each session builds its own venv,
installs the pinned CPU torch *first* (so that nothing pulls a CUDA build), then the package
with its test extras and the pinned transformers in one resolver run, then runs
``tests/test_compat.py``, ``tests/test_generation.py``, ``tests/test_persistence.py`` and the
quantizer's own tests (``tests/test_hf_quantizer.py``, ``tests/test_hf_registration.py``: the
4.x-only loader hooks run for real under 4.x).

    nox                              # whole matrix (venvs under .nox/, reused when present)
    nox -R                           # reuse venvs and skip the installs: fastest local rerun
    nox -s "matrix-4.44.0"           # one version
    nox -s matrix-4.44.0 -- -x -q    # extra args go to pytest (-n 0: one process, no pytest-xdist workers)

The versions are chosen to bracket every API change the compat patch handles:

- 4.44.0: the lowest supported release (`transformers>=4.44`); the whole legacy cache API is
  native (the patch must add nothing);
- 4.53.3: ``get_max_length`` gone (removed in 4.49), tuple conversions and ``seen_tokens``
  still native;
- 4.57.6: ``seen_tokens``/``get_usable_length`` (4.54) and ``key_cache``/``value_cache``
  (4.56) gone;
- 5.x (latest): legacy tuple conversions and ``modeling_attn_mask_utils`` helpers gone,
  ``get_max_length`` back but returning -1, ``generate`` renames the cache kwarg.
"""
from __future__ import annotations

import functools
import os
import random
import subprocess
import sys

import nox

TORCH = "torch==2.13.0"
TRANSFORMERS_VERSIONS = ("4.44.0", "4.53.3", "4.57.6", "5.24.0")
TESTS = (
    "tests/test_compat.py",
    "tests/test_generation.py",
    "tests/test_persistence.py",
    "tests/test_hf_quantizer.py",
    "tests/test_hf_registration.py",
    "tests/test_hf_import.py",
    "tests/test_hf_quantize_on_load.py",
    "tests/test_hf_embeddings.py",
    "tests/test_cli.py",
)
TRITON = "triton==3.9.0"

nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True
# uv builds the venvs and installs into them where it is installed (the test extra's nox[uv]): the same
# packages as pip's resolver picks, in a fraction of pip's time; virtualenv + pip where it is not.
nox.options.default_venv_backend = "uv|virtualenv"

# pip's settings that uv must see too: uv reads neither pip.conf nor PIP_* variables. find-links is where
# a machine keeps its CPU torch wheel (torch==2.13.0+cpu): without it uv would resolve torch==2.13.0 from
# the index alone, which on Linux is the CUDA build.
_PIP_TO_UV = {"find-links": ("UV_FIND_LINKS", ","), "constraint": ("UV_CONSTRAINT", " ")}


def _uv_env(session: nox.Session) -> dict[str, str]:
    """UV_FIND_LINKS / UV_CONSTRAINT from pip's configuration (environment first, then its files).

    Empty under the virtualenv backend (pip reads its own configuration) and for a variable already set.
    """
    return dict(_pip_settings_for_uv()) if session.venv_backend == "uv" else {}


@functools.cache
def _pip_settings_for_uv() -> tuple[tuple[str, str], ...]:
    """:func:`_uv_env`'s variables, read once per nox run (``pip config list`` is a subprocess)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=False).stdout
    config: dict[str, str] = {}
    for line in listed.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            config[key.strip()] = value.strip().strip("'\"")
    env = {}
    for name, (variable, separator) in _PIP_TO_UV.items():
        if variable in os.environ:
            continue
        for section in (":env:", "install", "global"):  # pip's precedence: PIP_* variables, then [install], [global]
            if config.get(f"{section}.{name}"):
                env[variable] = separator.join(config[f"{section}.{name}"].split())
                break
    return tuple(env.items())


def _pip_install(session: nox.Session, *args: str) -> None:
    """session.install with pip's find-links and constraints, whichever of pip and uv installs."""
    session.install(*args, env=_uv_env(session))


def _install(session: nox.Session, transformers_version: str) -> None:
    """torch pinned first (CPU wheel), then the package with its test extra and the pinned transformers."""
    _pip_install(session, TORCH)
    _pip_install(session, "-e", ".[test]", f"transformers=={transformers_version}", TORCH)


@nox.session(name="triton", reuse_venv=True, default=False)
def triton(session: nox.Session) -> None:
    """The Triton kernel (qins/kernels/triton_kernel.py) in the CPU interpreter: ``nox -s triton``.

    Not part of the default ``nox`` run. Torch pinned first (CPU wheel), then the package and
    triton in one resolver run with the torch pin repeated, so triton cannot pull another torch.
    ``QINS_REQUIRE_TRITON=1`` turns the test file's skip-if-missing into a failure.
    """
    _pip_install(session, TORCH)
    _pip_install(session, "-e", ".[test]", TRITON, TORCH)
    session.run("python", "-c", "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, "
                "'triton', triton.__version__)")
    env = {"TRITON_INTERPRET": "1", "QINS_REQUIRE_TRITON": "1"}
    session.run("python", "-m", "pytest", "tests/test_triton.py", "-p", "no:cacheprovider", "--run-slow",
                *(session.posargs or ["-q"]), env=env)


@nox.session(name="mutation", reuse_venv=True, default=False)
def mutation(session: nox.Session) -> None:
    """Mutation testing of every module of qins/ with mutmut: ``nox -s mutation``.

    Not part of the default ``nox`` run nor of ``.ci/run``. Configuration: ``[tool.mutmut]`` in
    pyproject.toml. mutmut keeps its results in ``mutants/``, mirrored before and after the run by the
    committed ledger ``docs/mutation-ledger/`` (``docs/mutation.py``); a rerun only re-tests mutants of
    functions that changed (``nox -s mutation -- "qins.encode*"`` re-tests one module). The report
    (``docs/mutation.py --check``) fails below a 95% score or on a stale equivalents entry.
    """
    _pip_install(session, TORCH)
    _pip_install(session, "-e", ".[test,real,mutation]", TRITON, TORCH)  # triton: its kernel's tests run too
    env = {"CI": "true", "HYPOTHESIS_PROFILE": "ci", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TRITON_INTERPRET": "1"}
    session.run("python", "docs/mutation.py", "--restore-ledger", env=env)  # continue the committed run
    try:
        session.run("mutmut", "run", "--max-children", "2", *session.posargs, env=env)
    finally:  # an interrupted run keeps what it checked
        session.run("python", "docs/mutation.py", "--save-ledger", env=env)
    session.run("python", "docs/mutation.py", "--check", env=env)


@nox.session(name="order", reuse_venv=True, default=False)
def order(session: nox.Session) -> None:
    """``pytest tests`` in a random order (pytest-randomly; the seed is printed): ``nox -s order``.

    ``nox -s order -- -q --randomly-seed=N`` replays the order of seed N. Hypothesis uses the
    ``ci`` profile, as CI does.
    """
    _pip_install(session, TORCH)
    _pip_install(session, "-e", ".[test,real,mutation]", TORCH)
    env = {"HYPOTHESIS_PROFILE": "ci", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = list(session.posargs or ["-q"])
    if not any(a.startswith("--randomly-seed") for a in args):
        seed = random.SystemRandom().randrange(2**32)
        session.log(f"pytest-randomly seed {seed}: replay this order with nox -s order -- -q --randomly-seed={seed}")
        args.append(f"--randomly-seed={seed}")
    session.run("python", "-m", "pytest", "tests", "-p", "randomly", "-p", "no:cacheprovider", "--run-slow", *args,
                env=env)


for _version in TRANSFORMERS_VERSIONS:

    @nox.session(name=f"matrix-{_version}", reuse_venv=True)
    def _matrix(session: nox.Session, _v: str = _version) -> None:
        _install(session, _v)
        session.run("python", "-c", "import torch, transformers; print('torch', torch.__version__, "
                    "'cuda', torch.version.cuda, 'transformers', transformers.__version__)")
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        # every test (--run-slow), on every core; a module's tests stay in one worker (its fixtures are built once)
        session.run("python", "-m", "pytest", *TESTS, "-p", "no:cacheprovider", "--run-slow", "-n", "auto",
                    "--dist", "loadfile", *(session.posargs or ["-q"]), env=env)

"""Per-CPU baselines (perf/cpu.py): what "same CPU" means, and where each CPU's baselines are found."""
from __future__ import annotations

import pytest

from perf.baseline import (
    all_saved_runs,
)
from perf.cpu import cpu_identity, cpu_key, cpu_label, same_cpu
from tests.perf_gate.support import (
    EPYC,
    MACHINE,
    XEON,
    write,
)

# --------------------------------------------------------------------------------------------
# Per-CPU baselines: what "same CPU" means
# --------------------------------------------------------------------------------------------


def test_same_cpu_ignores_clock_stepping_and_non_isa_flags():
    other_boot = dict(XEON, stepping=3, hz_actual_friendly="2.0 GHz", flags=XEON["flags"] + ["hypervisor", "rdpid"])
    assert same_cpu(XEON, other_boot)
    assert cpu_key(XEON) == cpu_key(other_boot)


@pytest.mark.parametrize(
    "change",
    [
        {"brand_raw": "Intel(R) Xeon(R) Platinum 8480"},
        {"vendor_id_raw": "AuthenticAMD"},
        {"family": 25},
        {"model": 143},
        {"flags": ["avx2", "avx512f", "avx512vnni", "avx512vbmi", "sse2"]},  # no AMX
        {"flags": ["avx2", "avx512_vnni", "avx512vbmi", "amx_tile", "sse2"]},  # no AVX-512F
    ],
)
def test_different_cpu(change):
    other = dict(XEON, **change)
    assert not same_cpu(XEON, other)
    assert cpu_key(XEON) != cpu_key(other)


def test_isa_flags_compared_without_underscores():
    assert same_cpu(dict(XEON, flags=["avx512_vnni"]), dict(XEON, flags=["avx512vnni"]))
    assert "amxtile" in cpu_identity(XEON)["isa"] and "sse2" not in cpu_identity(XEON)["isa"]
    assert "AMD EPYC" in cpu_label(EPYC) and "family 26 model 2" in cpu_label(EPYC)


def test_all_saved_runs_finds_every_cpu_and_the_old_layout(tmp_path):
    store = tmp_path / ".benchmarks"
    a = write(store / cpu_key(XEON) / MACHINE / "0001_baseline.json", "{}")
    b = write(store / cpu_key(EPYC) / MACHINE / "0001_baseline.json", "{}")
    c = write(store / MACHINE / "0002_baseline.json", "{}")
    write(store / cpu_key(EPYC) / "Linux-CPython-3.12-64bit" / "0003_baseline.json", "{}")  # other Python
    assert set(all_saved_runs(store, MACHINE)) == {a, b, c}
    assert all_saved_runs(tmp_path / "nothing", MACHINE) == []

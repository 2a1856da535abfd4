"""CPU identity: which baselines may gate speed on this machine.

Speed figures are only compared against a baseline measured on the same CPU (:func:`same_cpu`);
other baselines serve the accuracy gate and the A/B mode only.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping

#: ISA extensions that change which kernels torch (and the QINS decode) run, so a baseline
#: measured without one of them (or with one this CPU lacks) is other hardware. Compared after
#: dropping underscores (py-cpuinfo lists both ``avx512vnni`` and ``avx512_vnni``).
ISA_FLAGS = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512bf16",
    "avx512vbmi", "avx512fp16", "avxvnni", "amxtile", "amxbf16", "amxint8",
)


def cpu_identity(cpu: Mapping | None) -> dict:
    """The part of py-cpuinfo's record (pytest-benchmark's ``machine_info["cpu"]``) that defines "same CPU".

    Same CPU = same vendor id, same brand string, same family and model number, and the same
    subset of ``ISA_FLAGS``. Clock speed, stepping, cache sizes, core count and the hostname are
    left out (a VM reports them differently from boot to boot).
    """
    cpu = cpu if isinstance(cpu, Mapping) else {}
    flags = {str(f).replace("_", "").lower() for f in (cpu.get("flags") or [])}
    return {
        "vendor": str(cpu.get("vendor_id_raw") or cpu.get("vendor_id") or "?"),
        "brand": " ".join(str(cpu.get("brand_raw") or cpu.get("brand") or "?").split()),
        "family": cpu.get("family"),
        "model": cpu.get("model"),
        "isa": sorted(f for f in ISA_FLAGS if f in flags),
    }


def cpu_label(cpu: Mapping | None) -> str:
    """Human-readable: ``AMD EPYC (AuthenticAMD family 26 model 2; avx2 avx512f ...)``."""
    i = cpu_identity(cpu)
    return f"{i['brand']} ({i['vendor']} family {i['family']} model {i['model']}; {' '.join(i['isa']) or 'no AVX2'})"


def cpu_key(cpu: Mapping | None) -> str:
    """A directory name for the per-CPU baseline storage: readable brand/family/model + a hash of the identity."""
    i = cpu_identity(cpu)
    digest = hashlib.sha1(json.dumps(i, sort_keys=True).encode()).hexdigest()[:8]
    brand = re.sub(r"[^A-Za-z0-9]+", "_", i["brand"]).strip("_")[:40] or "cpu"
    return f"{brand}-f{i['family']}m{i['model']}-{digest}"


def same_cpu(a: Mapping | None, b: Mapping | None) -> bool:
    return cpu_identity(a) == cpu_identity(b)


def baseline_cpu(machine_info: Mapping | None) -> dict:
    return (machine_info or {}).get("cpu") or {} if isinstance(machine_info, Mapping) else {}



_CPU_CACHE: dict = {}


def this_cpu() -> dict:
    """py-cpuinfo's record of this machine's CPU (what pytest-benchmark stores as machine_info["cpu"]).

    Read once per process: py-cpuinfo takes about a second.
    """
    if "cpu" not in _CPU_CACHE:
        import cpuinfo

        _CPU_CACHE["cpu"] = cpuinfo.get_cpu_info()
    return _CPU_CACHE["cpu"]

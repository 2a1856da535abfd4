"""Quantize a transformers safetensors checkpoint on disk, one tensor at a time: :func:`quantize_checkpoint`.

The library side of ``qins quantize SRC DST`` (:mod:`qins.cli`). ``SRC`` is a directory written by
``save_pretrained`` (config.json, ``model.safetensors`` or shards with their index). The Linears to
quantize are those :func:`qins.convert_model_to_projective` would convert (same ``skip`` list; the
model is built on the meta device from config.json, no weight is read for that). Each output shard
is written with its header first (every output tensor's dtype and shape is known from the input
headers) and then tensor by tensor: each input tensor is read on its own (its bytes alone are
memory-mapped, read-only, copied and unmapped: no more than one tensor's pages are ever mapped, and
no mapping of a whole shard counts against a data-size limit) and a Linear weight is encoded block by
block of rows (:func:`qins.streaming.encode_rows`). Peak
memory is therefore about the largest tensor as stored, plus its codes, plus one block's encoding
temporaries (a per-tensor format: plus the whole tensor's), whatever the model's size.

``DST`` gets the QINS shards, their index, config.json with the ``quantization_config`` (loads with
``from_pretrained`` after ``import qins``) and SRC's other files (tokenizer, generation config).
It is written under a temporary name and renamed at the end: an error leaves no ``DST``. The codes
equal those of ``from_pretrained(SRC, torch_dtype=dtype)`` followed by the conversion.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch

from ...convert import select_linears
from ...formats import QinsConfig
from ...hf_config import quantization_config_dict
from ...streaming import encode_rows

__all__ = ["QuantizeSummary", "quantize_checkpoint"]

PathLike = Union[str, "os.PathLike[str]"]
INDEX = "model.safetensors.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class QuantizeSummary:
    """What :func:`quantize_checkpoint` wrote. ``layers``: Linears quantized; ``tensors``: input
    tensors read; ``bytes_before``/``bytes_after``: tensor bytes of the input and output shards
    (headers excluded); ``seconds``: wall time; ``files``: output shard names."""

    layers: int
    tensors: int
    bytes_before: int
    bytes_after: int
    seconds: float
    files: tuple[str, ...]


def _source_files(src: Path) -> list[str]:
    if (src / INDEX).is_file():
        with open(src / INDEX) as fh:
            return sorted(set(json.load(fh)["weight_map"].values()))
    if (src / "model.safetensors").is_file():
        return ["model.safetensors"]
    found = sorted(p.name for p in src.iterdir()) if src.is_dir() else []
    raise ValueError(f"{src}: no model.safetensors or {INDEX} (found {found[:8]}); qins quantize reads safetensors "
                     "checkpoints: re-save the model with save_pretrained(..., safe_serialization=True)")


def _targets(src: Path, skip: tuple[str, ...]) -> tuple[set[str], str, dict]:
    """(Linear names to quantize, base_model_prefix, config.json as a dict) from SRC's config alone."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if not (src / "config.json").is_file():
        raise ValueError(f"{src}: no config.json; SRC must be a directory written by save_pretrained")
    raw = json.loads((src / "config.json").read_text())
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method")
        raise ValueError(f"{src}: the checkpoint is already quantized (quant_method {method!r}); "
                         "qins quantize reads full-precision checkpoints")
    config = AutoConfig.from_pretrained(src, local_files_only=True)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError:  # not a causal LM: the base model
            model = AutoModel.from_config(config)
    todo, _ = select_linears(model, skip)
    shapes = {name: (m.out_features, m.in_features) for name, m in todo}
    return set(shapes), getattr(model, "base_model_prefix", "") or "", {"raw": raw, "shapes": shapes}


def _layer_of(key: str, targets: set[str], prefix: str) -> str | None:
    if not key.endswith(".weight"):
        return None
    name = key[: -len(".weight")]
    if name in targets:
        return name
    return name if prefix and f"{prefix}.{name}" in targets else None


def _read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (tensor name -> dtype, shape, data_offsets) and where its data
    starts. Read with plain file reads: no mapping of the whole file (which a data-size limit such
    as ``ulimit -d`` would count). ``ValueError`` for a file that is not a well-formed safetensors."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise ValueError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: corrupt safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    for key, entry in header.items():
        begin, end = entry.get("data_offsets", (0, -1))
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None or end - begin != torch.Size(entry.get("shape", ())).numel() * dtype.itemsize \
                or 8 + n + end > size:
            raise ValueError(f"{path}: bad safetensors entry {key!r}: {entry}")
    return header, 8 + n


def _read_tensor(path: Path, entry: dict, data_start: int) -> torch.Tensor:
    """One tensor of a safetensors file: its bytes alone are memory-mapped (read-only), copied into
    a tensor, and unmapped, so only one tensor's pages are ever mapped."""
    import mmap

    begin, end = entry["data_offsets"]
    dtype, shape = _DTYPES[entry["dtype"]], entry["shape"]
    if end == begin:
        return torch.empty(shape, dtype=dtype)
    start = data_start + begin
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), start + (end - begin) - aligned, offset=aligned,
                                           access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)[start - aligned:]
        try:
            out = torch.empty(end - begin, dtype=torch.uint8)
            out.numpy()[:] = view  # the one copy
        finally:
            view.release()
    return out.view(dtype).reshape(shape)


def _plan(path: Path, targets: set[str], prefix: str,
          config: QinsConfig) -> tuple[list[tuple[str, str | None, list]], dict, int]:
    """Per input tensor: (key, layer name or None, [(output key, torch dtype, shape)]), in file
    order; and the file's header and data start (:func:`_read_header`)."""
    header, data_start = _read_header(path)
    plan = []
    for key, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dtype, shape = _DTYPES[entry["dtype"]], tuple(entry["shape"])
        layer = _layer_of(key, targets, prefix)
        if layer is None:
            plan.append((key, None, [(key, dtype, shape)]))
            continue
        if len(shape) != 2 or not dtype.is_floating_point:
            raise ValueError(f"{path.name}: {key}: a Linear weight must be a 2-D float tensor, "
                             f"got {entry['dtype']} {list(shape)}")
        logs = config.log_shape(shape[0])
        outs = [(f"{layer}.stored", torch.uint8, shape)]
        if not config.packed:
            outs.append((f"{layer}.sign", torch.int8, shape))
        outs += [(f"{layer}.log_min", torch.float32, logs), (f"{layer}.log_max", torch.float32, logs)]
        if config.shared_tables:  # in qins.encode's order, as the codes are written
            outs += [(f"{layer}.row_table", torch.uint8, shape[:1]), (f"{layer}.row_scale", torch.float32, shape[:1])]
        plan.append((key, layer, outs))
    return plan, header, data_start


def _header(plan: list, metadata: dict) -> tuple[bytes, int]:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for _, _, outs in plan:
        for key, dtype, shape in outs:
            size = torch.Size(shape).numel() * dtype.itemsize
            header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, offset


def _write(fh, t: torch.Tensor) -> int:
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    fh.write(memoryview(data))
    return data.nbytes


def quantize_checkpoint(src: PathLike, dst: PathLike, config: QinsConfig | None = None, *,
                        skip: Iterable[str] = ("lm_head",), cache_weight: bool = True,
                        dtype: torch.dtype = torch.float32,
                        progress: Callable[[int, int, str], None] | None = None) -> QuantizeSummary:
    """Write a QINS copy of the safetensors checkpoint ``src`` to the new directory ``dst``.

    ``config`` (default ``QinsConfig()``), ``skip`` and ``cache_weight`` as for
    :func:`qins.convert_model_to_projective`; they are recorded in ``dst``'s config.json. Each
    Linear weight is cast to ``dtype`` before encoding (what ``from_pretrained(src,
    torch_dtype=dtype)`` would hold); other tensors are copied as stored. ``progress(done, total,
    key)`` is called after each input tensor. Raises ``ValueError`` (nothing is left at ``dst``)
    for a missing config.json or safetensors weights, an already-quantized checkpoint, a ``dst``
    that exists, a Linear weight missing or of the wrong shape, or a NaN/±Inf weight (naming it).
    """
    start = time.perf_counter()
    config = config or QinsConfig()
    src, dst = Path(src), Path(dst)
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    if dst.exists():
        raise ValueError(f"{dst} exists; give qins quantize a new directory")
    files = _source_files(src)
    targets, prefix, info = _targets(src, skip)
    read = {f: _plan(src / f, targets, prefix, config) for f in files}
    plans = {f: r[0] for f, r in read.items()}
    found = {layer for plan in plans.values() for _, layer, _ in plan if layer}
    missing = sorted(targets - found - {f"{prefix}.{n}" for n in found})
    if missing:
        more = " ..." if len(missing) > 4 else ""
        raise ValueError(f"{src}: no weight for the Linears {missing[:4]}{more}; add them "
                         "to --skip to leave them out, or check that config.json belongs to these weights")
    total = sum(len(p) for p in plans.values())
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))  # renamed to dst at the end
    done = before = after = 0
    weight_map: dict[str, str] = {}
    try:
        for name in files:
            header, size = _header(plans[name], {"format": "pt"})
            with open(work / name, "wb") as out:
                out.write(header)
                for key, layer, outs in plans[name]:
                    _, header_map, data_start = read[name]
                    tensor = _read_tensor(src / name, header_map[key], data_start)
                    before += tensor.numel() * tensor.element_size()
                    if layer is None:
                        after += _write(out, tensor)
                    else:
                        shape = info["shapes"].get(layer) or info["shapes"].get(f"{prefix}.{layer}")
                        if tuple(tensor.shape) != shape:
                            raise ValueError(f"{key}: shape {list(tensor.shape)}, but config.json makes {layer} "
                                             f"{list(shape)}")
                        try:
                            codes = encode_rows(tensor, config, dtype)
                        except ValueError as exc:
                            raise ValueError(f"cannot quantize {key}: {exc}") from exc
                        del tensor
                        after += sum(_write(out, c) for c in codes if c is not None)
                        del codes
                    weight_map.update({k: name for k, _, _ in outs})
                    done += 1
                    if progress is not None:
                        progress(done, total, key)
            if (work / name).stat().st_size != len(header) + size:  # the header promised these offsets
                raise OSError(f"{work / name}: wrote {(work / name).stat().st_size} bytes, "
                              f"expected {len(header) + size}")
        if len(files) > 1:
            index = {"metadata": {"total_size": after}, "weight_map": weight_map}
            (work / INDEX).write_text(json.dumps(index, indent=2))
        raw = dict(info["raw"])
        raw["quantization_config"] = quantization_config_dict(config, skip, cache_weight)
        (work / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        for extra in sorted(src.iterdir()):
            if extra.is_file() and extra.name not in ("config.json", INDEX) and not extra.name.endswith(
                    (".safetensors", ".bin", ".pt", ".pth", ".gguf")):
                shutil.copy2(extra, work / extra.name)
        os.replace(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return QuantizeSummary(layers=len(found), tensors=done, bytes_before=before, bytes_after=after,
                           seconds=time.perf_counter() - start, files=tuple(files))

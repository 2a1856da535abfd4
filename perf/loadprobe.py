"""Peak memory of loading a checkpoint into a QINS model, in a fresh process; run by perf/test_load_memory.py.

    python -m perf.loadprobe on-load|then-convert CHECKPOINT_DIR

* ``on-load``: ``from_pretrained(dir, quantization_config=qins.QinsHfConfig(cache_weight=False),
  torch_dtype=torch.float32)``: each Linear is encoded as its weight arrives;
* ``then-convert``: ``from_pretrained(dir, torch_dtype=torch.float32)`` then
  ``convert_model_to_projective(model, QinsConfig(), cache_weight=False)``.

Same format (the library default) and result in both. One thread. The process imports torch,
transformers and qins and builds a throwaway tiny Llama before it measures, so imported code is
resident first. Prints one JSON line (bytes): ``rss_start`` (VmRSS before the load), ``peak``
(VmHWM during the load, after resetting it through /proc/self/clear_refs; ru_maxrss where that is
not allowed, with ``peak_reset`` false; it includes the checkpoint's file pages that the loader
memory-maps), ``anon_start``/``anon_peak`` (RssAnon before, and its largest sample every 2 ms
during the load: the memory the load itself allocates), ``model_bytes`` (:func:`qins.model_memory` total of the
loaded model), ``largest`` (elements of the largest Linear weight) and ``seconds`` (wall time).
"""
from __future__ import annotations

import json
import re
import resource
import sys
import threading
import time


def _kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"^{field}:\s+(\d+)\s+kB", fh.read(), re.M).group(1)) * 1024


class _AnonPeak:
    """Samples the anonymous resident set (``RssAnon``: memory the process allocated, not the
    checkpoint's memory-mapped file pages, which the loader maps and the kernel can drop) every
    ``interval`` seconds in a thread; ``peak`` is the largest sample."""

    def __init__(self, interval: float = 0.002) -> None:
        self.peak, self._stop = _kib("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, _kib("RssAnon"))

    def __enter__(self) -> _AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _kib("RssAnon"))


def probe(mode: str, path: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    import qins
    from qins import ProjectiveLinear, QinsConfig, convert_model_to_projective, model_memory
    from qins.testing.models import tiny_llama

    warm = tiny_llama(hidden_size=32, num_hidden_layers=1, vocab_size=64)
    convert_model_to_projective(warm, QinsConfig(), cache_weight=False)
    del warm
    qins.QinsHfConfig  # noqa: B018  (registers the quantizer)
    rss_start, anon_start = _kib("VmRSS"), _kib("RssAnon")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        reset = True
    except OSError:
        reset = False
    t0 = time.perf_counter()
    sampler = _AnonPeak().__enter__()
    if mode == "on-load":
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qins.QinsHfConfig(cache_weight=False),
                                                     torch_dtype=torch.float32, local_files_only=True)
    elif mode == "then-convert":
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, local_files_only=True)
        convert_model_to_projective(model, QinsConfig(), cache_weight=False)
    else:
        raise ValueError(f"unknown mode {mode!r}; expected on-load or then-convert")
    sampler.__exit__()
    seconds = time.perf_counter() - t0
    peak = _kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    layers = [m for m in model.modules() if isinstance(m, ProjectiveLinear)]
    return {"mode": mode, "rss_start": rss_start, "peak": peak, "peak_reset": reset, "seconds": seconds,
            "anon_start": anon_start, "anon_peak": sampler.peak,
            "model_bytes": model_memory(model).total, "layers": len(layers),
            "largest": max(m.in_features * m.out_features for m in layers)}


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1], sys.argv[2])), flush=True)

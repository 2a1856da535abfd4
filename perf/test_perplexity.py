"""Perplexity of a real causal LM per weight format: the full measurement behind tests/test_real_lm.py.

SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32 by transformers: the fp32 reference) on
gensim's Lee news corpus: ``--perf-ppl-windows`` windows of 512 scored tokens (default 98: 50,176
tokens), every target scored once with its own window's context, all torch threads. Every format
quantizes the same decoder Linears (``qins.testing.lm_formats``: everything but the tied
``lm_head``), and ``qins-packed-emb`` the token embedding and the tied ``lm_head`` too; the calibrated
formats use 32 sequences of 512 tokens of Wikipedia prose (a different text) for :func:`qins.calibrate`.

Per format the figures are the perplexity, its increase over fp32 (``ppl_increase_pct``, gated by
the accuracy gate: deterministic, a rise of more than ``--perf-ppl-tol-pct`` points over the
baseline fails), the difference to int8's increase with a paired bootstrap 95% interval over
blocks of 128 tokens (``minus_int8_points``), and the conversion time. The issue's absolute targets
are stated met or missed in the summary (``perf_gate.accuracy_target``):

* 1 byte/weight, data-free default: increase <= int8-per-row's;
* 1 byte/weight, best mode (calibrated allowed): increase <= half of int8's;
* 2 bytes/weight, best mode: increase <= bf16's + 0.05 points.
"""
from __future__ import annotations

import pytest
import torch

from qins.testing import lm_formats as F
from qins.testing import perplexity as P
from qins.testing.cores import usable_cores
from qins.testing.real_lm import MissingRealAsset, load_smollm2, news_text, wiki_text
from tests.accuracy_utils import in_ci

CTX = 512
CALIBRATION_SEQUENCES = 32
#: the formats in the order they run; fp32 first (the reference), int8 second (the yardstick)
#: qins-packed-emb (the embedding and tied lm_head in QINS too) last: the cost of that coverage, no target
ORDER = ("fp32", "int8-row", "bf16", "qins-packed", "qins-packed-calibrated", "qins-split", "qins-split-calibrated",
         "qins-packed-emb")


def _run(windows: int) -> F.FormatRun:
    """SmolLM2, the news windows and the calibration batches (fails under CI when an asset is missing)."""
    try:
        tok, model = load_smollm2()
        news, wiki = news_text(), wiki_text()
    except MissingRealAsset as exc:
        if in_ci():
            pytest.fail(f"CI is set and a real asset is missing: {exc}", pytrace=False)
        pytest.skip(str(exc))
    wins = P.windows(tok(news, return_tensors="pt", add_special_tokens=False).input_ids[0], CTX, windows)
    batches = F.token_batches(
        tok(wiki, return_tensors="pt", add_special_tokens=False).input_ids[0], CALIBRATION_SEQUENCES, CTX
    )
    return F.FormatRun(model, wins, batches)


@pytest.fixture(scope="module")
def run(request) -> F.FormatRun:
    threads = torch.get_num_threads()  # the perf suite runs at --perf-threads (1 by default); perplexity is not timed
    torch.set_num_threads(usable_cores())
    yield _run(request.config.getoption("perf_ppl_windows"))
    torch.set_num_threads(threads)


@pytest.mark.parametrize("fmt", ORDER)
def test_perplexity_smollm2(benchmark, perf_gate, run, fmt):
    benchmark.group = "perplexity SmolLM2-135M, Lee news"
    nll = run.measure(fmt)
    ref, int8 = run.measure("fp32"), run.measure("int8-row")
    benchmark.pedantic(lambda: None, rounds=1)  # the figures come from the measurement above
    increase = P.increase_pct(nll, ref)
    vs_int8 = P.paired_bootstrap(nll, int8, ref)
    figures = {
        "format": fmt,
        "bytes_per_weight": F.BYTES_PER_WEIGHT[fmt],
        "tokens": int(nll.numel()),
        "ppl": P.perplexity(nll),
        "fp32_ppl": P.perplexity(ref),
        "ppl_increase_pct_value": increase,
        "minus_int8_points": {"value": vs_int8.value, "low": vs_int8.low, "high": vs_int8.high},
        "convert_cpu_s": run.convert_s[fmt],
        "threads": torch.get_num_threads(),
    }
    if fmt != "fp32":
        figures["accuracy"] = {"ppl_increase_pct": {"value": increase, "kind": "ppl_increase_pct"}}
    perf_gate.record(benchmark, figures, key=f"perplexity/smollm2/{fmt}")
    int8_increase = P.increase_pct(int8, ref)
    if fmt == "qins-packed":
        perf_gate.accuracy_target(benchmark, f"1 B/w data-free: {increase:+.3f}% vs int8-row {int8_increase:+.3f}% "
                                  f"(difference {vs_int8} points), target <= int8's", increase <= int8_increase)
    elif fmt == "qins-packed-calibrated":
        perf_gate.accuracy_target(
            benchmark,
            f"1 B/w best: {increase:+.3f}% vs half of int8-row's {int8_increase / 2:+.3f}% "
            f"(difference to int8 {vs_int8} points), target <= half",
            increase <= int8_increase / 2,
        )
    elif fmt == "qins-split-calibrated":
        bf16 = P.increase_pct(run.measure("bf16"), ref)
        perf_gate.accuracy_target(
            benchmark,
            f"2 B/w best: {increase:+.3f}% vs bf16 {bf16:+.3f}%, target <= bf16's + 0.05 points",
            increase <= bf16 + 0.05,
        )

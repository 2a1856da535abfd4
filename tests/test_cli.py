"""``qins quantize SRC DST`` (qins/cli.py, qins/integrations/transformers/checkpoint.py): the output loads with
from_pretrained and holds the codes of load-then-convert; options, summary, progress, errors (nothing written), and
a checkpoint larger than the memory the process may use."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qins
from qins import ProjectiveLinear, QinsConfig, convert_model_to_projective
from qins.cli import _progress_bar, main
from qins.testing.models import tiny_llama

ROOT = Path(__file__).resolve().parent.parent


def _src(tmp_path, dtype=torch.bfloat16, shard="20KB", **kwargs) -> Path:
    model = tiny_llama(hidden_size=32, num_hidden_layers=2, vocab_size=64, **kwargs).to(dtype)
    path = tmp_path / "src"
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    (path / "tokenizer_config.json").write_text("{}")
    return path


def _load(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32, **kwargs)


@pytest.mark.slow  # a checkpoint written and loaded twice: seconds
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_quantize_writes_a_checkpoint_with_the_codes_of_load_then_convert(tmp_path, capsys, shard) -> None:
    src = _src(tmp_path, shard=shard)
    assert main(["quantize", str(src), str(tmp_path / "dst"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"layers quantized: 14 \(21 tensors read, [0-9]+ shard\(s\)\)", out)
    assert re.search(r"bytes: [0-9.]+ KiB -> [0-9.]+ KiB \(0\.[0-9]+x\)", out) and re.search(r"time: [0-9.]+ s", out)
    dst = tmp_path / "dst"
    assert (dst / "tokenizer_config.json").is_file() and (dst / "generation_config.json").is_file()
    assert (dst / "model.safetensors.index.json").is_file() is bool(shard)
    quantized = _load(dst)
    reference = _load(src)
    convert_model_to_projective(reference, QinsConfig())
    got, want = quantized.state_dict(), reference.state_dict()
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def test_the_options_set_the_format_skip_list_and_cache_mode(tmp_path) -> None:
    src = _src(tmp_path, dtype=torch.float16)
    assert main(["quantize", str(src), str(tmp_path / "dst"), "--format", "split", "--per-tensor", "--skip", "lm_head",
                 "--skip", "*.o_proj", "--memory-saving", "--dtype", "float16", "--quiet"]) == 0
    saved = json.loads((tmp_path / "dst" / "config.json").read_text())["quantization_config"]
    config = QinsConfig(packed=False, per_row=False)
    assert saved == qins.hf_config.quantization_config_dict(config, ["lm_head", "*.o_proj"], False)
    from transformers import AutoModelForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "dst", torch_dtype=torch.float16, local_files_only=True)
    reference = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float16, local_files_only=True)
    convert_model_to_projective(reference, config, skip=["lm_head", "*.o_proj"], cache_weight=False)
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, ProjectiveLinear)}
    assert len(layers) == 12 and all(m.config == config and not m.cache_weight for m in layers.values())
    for key, value in reference.state_dict().items():
        assert torch.equal(quantized.state_dict()[key], value), key


@pytest.mark.slow  # a fresh interpreter imports torch and transformers
def test_python_dash_m_qins_runs_the_command(tmp_path) -> None:
    src = _src(tmp_path, shard=None)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "qins", "quantize", str(src), str(tmp_path / "dst")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"qins quantize: {src} -> {tmp_path / 'dst'}\n")
    assert "qins quantize:" not in proc.stderr  # no progress bar off a terminal


def _fails(argv, capsys, message: str) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_errors_name_the_problem_and_leave_nothing_written(tmp_path, capsys) -> None:
    src = _src(tmp_path)
    (tmp_path / "taken").mkdir()
    _fails(
        ["quantize", str(src), str(tmp_path / "taken"), "--quiet"], capsys,
        r"taken exists; give qins quantize a new directory",
    )
    _fails(["quantize", str(tmp_path / "taken"), str(tmp_path / "d1"), "--quiet"], capsys,
           r"no model\.safetensors or model\.safetensors\.index\.json \(found \[\]\)")
    assert main(["quantize", str(src), str(tmp_path / "q"), "--quiet"]) == 0
    capsys.readouterr()
    _fails(["quantize", str(tmp_path / "q"), str(tmp_path / "d2"), "--quiet"], capsys,
           r"the checkpoint is already quantized \(quant_method 'qins'\)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "src", "taken"]


def test_a_non_finite_weight_is_named_and_nothing_is_left_behind(tmp_path, capsys) -> None:
    model = tiny_llama(hidden_size=32, num_hidden_layers=1, vocab_size=64)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 1] = float("inf")
    model.save_pretrained(tmp_path / "src")
    _fails(["quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--quiet"], capsys,
           r"cannot quantize model\.layers\.0\.mlp\.up_proj\.weight: .*non-finite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_missing_linear_weight_is_refused_naming_it(tmp_path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    src = _src(tmp_path, shard=None)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    _fails(["quantize", str(src), str(tmp_path / "dst"), "--quiet"], capsys,
           r"no weight for the Linears \['model\.layers\.0\.self_attn\.q_proj'\]; add them to --skip")


def test_a_usage_error_exits_2(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["quantize", "only-src"])
    assert info.value.code == 2


class _Terminal:
    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_is_a_plain_counter_on_a_terminal_without_tqdm(monkeypatch) -> None:
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails
    update, close = _progress_bar(True)
    update(1, 2, "a.weight")
    update(2, 2, "b.weight")
    close()
    assert (
        term.text.startswith("\rqins quantize: 1/2 tensors  a.weight")
        and "\rqins quantize: 2/2 tensors  b.weight" in term.text
    )
    assert term.text.endswith("\n")
    assert _progress_bar(False)[0] is None


#: the command's peak resident memory above its start may exceed 2x the largest tensor in float32 by
#: this much: transformers' model code and the meta model built from config.json (~130 MiB), the
#: encoder's workspace for one block of rows and allocator slack (measured 283 MiB in all on Intel
#: Xeon family 6 model 207, largest tensor 4096x1024)
CLI_FIXED_OVERHEAD = 320 * 2**20
_RUNNER = """
import re, resource, sys
def kib(k):
    return int(re.search(k + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
import torch
torch.set_num_threads(1)
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from qins.cli import main
start = kib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
rc = main(sys.argv[1:])
print("RESULT", rc, start, kib("VmHWM"), flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA and /proc are Linux")
def test_a_checkpoint_larger_than_the_memory_allowed_is_quantized_in_bounded_memory(tmp_path) -> None:
    import resource

    from qins.testing.models import tiny_llama_config, write_llama_checkpoint

    config = tiny_llama_config(hidden_size=1024, intermediate_size=4096, num_hidden_layers=20, vocab_size=1024,
                               num_attention_heads=16, num_key_value_heads=8)
    info = write_llama_checkpoint(tmp_path / "src", config, max_shard_bytes=200 << 20)
    limit = 576 << 20  # data segment limit of the process (ulimit -d): below the checkpoint's size
    assert info["bytes"] > limit
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _RUNNER, "quantize", str(tmp_path / "src"), str(tmp_path / "dst"),
                           "--quiet"],
                          capture_output=True, text=True, env=env, timeout=900,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (limit, limit)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rc, start, peak = proc.stdout.split("RESULT")[-1].split()
    assert int(rc) == 0
    bound = 2 * 4 * info["largest"] + CLI_FIXED_OVERHEAD
    assert int(peak) - int(start) <= bound, (int(peak) - int(start), bound)
    model = _load(tmp_path / "dst")
    assert sum(isinstance(m, ProjectiveLinear) for m in model.modules()) == 140

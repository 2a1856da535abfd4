"""The ``qins`` command line: ``qins quantize SRC DST`` (also ``python -m qins quantize ...``).

Quantizes a transformers safetensors checkpoint directory into a QINS one that
``AutoModelForCausalLM.from_pretrained(DST)`` loads after ``import qins``
(:mod:`qins.integrations.transformers.checkpoint`:
one tensor at a time, memory-mapped; peak memory about twice the largest tensor in float32 plus a
fixed overhead, whatever the model's size). Shows a progress bar on a terminal (tqdm when installed,
else a plain counter) and prints a summary: layers quantized, bytes before and after, time.
Exit status 0 on success, 1 on an error (one line on stderr, nothing written), 2 on a usage error.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

__all__ = ["main"]

_DTYPES = ("float32", "bfloat16", "float16")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qins", description="QINS weight storage for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a safetensors checkpoint directory to QINS, one tensor at a time",
                       description="Write a QINS copy of the transformers checkpoint SRC (a save_pretrained directory "
                                   "with safetensors weights) to the new directory DST.")
    q.add_argument("src", metavar="SRC", help="checkpoint directory (config.json + safetensors shards)")
    q.add_argument("dst", metavar="DST", help="output directory (must not exist)")
    q.add_argument("--format", choices=("packed", "split"), default="packed",
                   help="packed: 1 byte per weight (default); split: 2 bytes (code + sign)")
    q.add_argument("--spacing", choices=("mulaw", "log"), default="mulaw",
                   help="level spacing (default mulaw: logarithmic at the top, uniform near zero)")
    q.add_argument("--log-range", choices=("mse", "minmax"), default="mse",
                   help="range rule of the log spacing (default mse; minmax needs --spacing log)")
    q.add_argument("--per-tensor", action="store_true", help="one log range per tensor instead of per row")
    q.add_argument("--shared-tables", type=int, default=None, metavar="N",
                   help="N (1-16) mulaw tables per layer shared by its rows, each row scaled (faster kernels); "
                        "0: a range per row; default: QinsConfig's")
    q.add_argument("--skip", action="append", metavar="PATTERN",
                   help="leave Linears with this name or glob unconverted (repeatable; default: lm_head)")
    q.add_argument("--memory-saving", action="store_true",
                   help="record cache_weight=false: the loaded model keeps only the codes (no decoded weight)")
    q.add_argument("--dtype", choices=_DTYPES, default="float32",
                   help="dtype the weights are encoded from, as from_pretrained(torch_dtype=...) would load them")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _progress_bar(enabled: bool) -> tuple[Callable[[int, int, str], None] | None, Callable[[], None]]:
    """A progress callback for :func:`qins.integrations.transformers.checkpoint.quantize_checkpoint` and its
    closer: tqdm where installed, else a counter rewritten in place; nothing off a terminal."""
    if not enabled or not sys.stderr.isatty():
        return None, lambda: None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    state: dict = {}

    def update(done: int, total: int, key: str) -> None:
        if tqdm is not None:
            bar = state.get("bar") or state.setdefault("bar", tqdm(total=total, desc="qins quantize", unit="tensor"))
            bar.set_postfix_str(key[-40:], refresh=False)
            bar.update(done - bar.n)
        else:
            sys.stderr.write(f"\rqins quantize: {done}/{total} tensors  {key[-40:]:<40}")
            sys.stderr.flush()

    def close() -> None:
        if "bar" in state:
            state["bar"].close()
        elif tqdm is None:
            sys.stderr.write("\n")

    return update, close


def _mib(n: int) -> str:
    """Bytes as MiB, or KiB below 1 MiB."""
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 1024:,.1f} KiB"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = _parser().parse_args(argv)
    import torch

    from .formats import QinsConfig
    from .integrations.transformers.checkpoint import quantize_checkpoint

    try:
        config = QinsConfig(packed=args.format == "packed", log_range=args.log_range, per_row=not args.per_tensor,
                            spacing=args.spacing, shared_tables=args.shared_tables)
    except (TypeError, ValueError) as exc:
        print(f"qins quantize: {exc}", file=sys.stderr)
        return 2
    update, close = _progress_bar(not args.quiet)
    try:
        summary = quantize_checkpoint(args.src, args.dst, config, skip=tuple(args.skip or ("lm_head",)),
                                      cache_weight=not args.memory_saving, dtype=getattr(torch, args.dtype),
                                      progress=update)
    except (ValueError, OSError) as exc:
        close()
        print(f"qins quantize: error: {exc}", file=sys.stderr)
        return 1
    close()
    print(f"qins quantize: {args.src} -> {args.dst}")
    print(f"  layers quantized: {summary.layers} ({summary.tensors} tensors read, {len(summary.files)} shard(s))")
    rule = config.spacing if config.spacing == "mulaw" else f"log {config.log_range}"
    rows = (f"{config.shared_tables} shared tables" if config.shared_tables else "per row") if config.per_row \
        else "per tensor"
    print(f"  format: {args.format}, {rule}, {rows}; "
          f"skip {list(args.skip or ('lm_head',))}; cache_weight {not args.memory_saving}")
    ratio = summary.bytes_after / summary.bytes_before if summary.bytes_before else float("nan")
    print(f"  bytes: {_mib(summary.bytes_before)} -> {_mib(summary.bytes_after)} ({ratio:.3f}x)")
    print(f"  time: {summary.seconds:.1f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Prints the README's accuracy row: QINS round trip of 0.02·randn(3072, 3072), seed 0."""
import torch

from qins import convert_to_qins, qins_error_bound, reconstruct_from_qins

torch.manual_seed(0)
w = torch.randn(3072, 3072) * 0.02
stored, sign, lo, hi = convert_to_qins(w)
w_hat = reconstruct_from_qins(stored, sign, lo, hi)
log_err = (w_hat.double().abs().log() - w.double().abs().log()).abs().max().item()
rel = ((w_hat - w).abs() / w.abs()).double()
print("| log_min | log_max | Δ/2 (nats) | max measured log error | max relative weight error | median |")
print(
    f"| {lo:.2f} | {hi:.2f} | {qins_error_bound(lo, hi):.5f} | {log_err:.5f} | {100 * rel.max().item():.2f} % | "
    f"{100 * rel.median().item():.2f} % |"
)

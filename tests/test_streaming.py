"""qins.streaming: a weight encoded block by block of rows equals the whole-weight encode, bit for bit."""
from __future__ import annotations

import pytest
import torch

from qins import ProjectiveLinear, QinsConfig, encode
from qins.streaming import encode_rows, encoded_layer


def _configs() -> list[QinsConfig]:
    """The default formats, and the minmax ones of the log spacing where that is a separate field."""
    log = {"spacing": "log"} if "spacing" in QinsConfig.__dataclass_fields__ else {}
    return [QinsConfig(), QinsConfig(packed=False), QinsConfig(per_row=False), QinsConfig(packed=False, per_row=False),
            QinsConfig(log_range="minmax", **log), QinsConfig(packed=False, log_range="minmax", per_row=False, **log)]


CONFIGS = _configs()


def _weight(dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(41, 70, generator=g) * 0.02
    w[4] = 0.0  # an all-zero row
    w[9, :5] = 1e-30  # subnormal magnitudes
    return w.to(dtype)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_elements", [70 * 2, 70 * 20, 1 << 22])
def test_encoding_in_blocks_of_rows_equals_encoding_the_whole_weight(config, dtype, block_elements) -> None:
    w = _weight(dtype)
    want = encode(w, config)
    got = encode_rows(w, config, block_elements=block_elements)
    for a, b in zip(got, want):
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b))


def test_the_compute_dtype_is_applied_before_encoding() -> None:
    w = _weight(torch.bfloat16)
    got, want = encode_rows(w, QinsConfig(), torch.float32, block_elements=700), encode(w.float(), QinsConfig())
    assert got[1] is None and want[1] is None
    for i in (0, 2, 3):
        assert torch.equal(got[i], want[i])


@pytest.mark.parametrize("cache_weight", [True, False])
def test_the_encoded_layer_is_the_one_from_linear_makes(cache_weight) -> None:
    w = _weight(torch.bfloat16)
    linear = torch.nn.Linear(70, 41, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(w)
    want = ProjectiveLinear.from_linear(linear, QinsConfig(), cache_weight=cache_weight)
    got = encoded_layer(w, QinsConfig(), cache_weight=cache_weight)
    assert got.compute_dtype == want.compute_dtype == torch.bfloat16 and got.cache_weight is cache_weight
    for key, value in want.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key
    if cache_weight:
        assert torch.equal(got._cached_weight, want._cached_weight)


def test_a_non_finite_weight_names_the_rows_of_its_block() -> None:
    w = _weight()
    w[20, 3] = float("inf")
    with pytest.raises(ValueError, match=r"^rows 20-21: "):  # per-row ranges are encoded block by block
        encode_rows(w, QinsConfig(shared_tables=0), block_elements=70 * 2)
    with pytest.raises(ValueError, match=r"^rows 20-21: "):  # shared tables: the first pass reads the blocks
        encode_rows(w, QinsConfig(shared_tables=4), block_elements=70 * 2)
    with pytest.raises(ValueError, match=r"expected a 2-D weight"):
        encode_rows(w[0], QinsConfig())

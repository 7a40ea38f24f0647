"""Row padding: which row counts are computed as taller products, that the real rows keep their
product, and that each shape is timed once per machine and read back from the cache after."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from specdecode.models import row_padding
from specdecode.models.kernels import PackedLinear, onednn_usable, pack_linears
from specdecode.models.row_padding import ShapeTiming, choose_row_padding, tune_row_padding

needs_onednn = pytest.mark.skipif(
    not onednn_usable(torch.float32), reason="this torch build has no oneDNN packed linear"
)


def test_row_counts_are_padded_to_the_fastest_taller_product_only_where_it_gains():
    measured = {1: 2.3, 2: 2.6, 3: 2.1, 4: 2.0, 5: 2.0, 6: 1.9, 7: 2.2, 8: 2.3}
    assert choose_row_padding(measured) == {1: 6, 2: 6, 3: 6}  # 4, 5 -> 6 gain 5 %: not more
    assert choose_row_padding({1: 1.0, 2: 1.1, 4: 0.97}) == {2: 4}  # 1 -> 4 is within the margin
    assert choose_row_padding({1: 2.0, 4: 1.0, 6: 1.0}) == {1: 4}  # the smallest among equals
    assert choose_row_padding({1: 1.0, 2: 2.0}, margin=0.0) == {}  # never padded to be slower
    with pytest.raises(ValueError, match="margin"):
        choose_row_padding({1: 1.0}, margin=1.0)


@needs_onednn
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_padded_products_keep_the_real_rows_product(rows):
    gen = torch.Generator().manual_seed(rows)
    linear = nn.Linear(96, 40)
    packed = PackedLinear(linear)
    packed.pad_rows = {1: 6, 2: 6, 3: 4}
    x = torch.randn(1, rows, 96, generator=gen)  # (B, T, in)
    with torch.no_grad():
        want, got = linear(x), packed(x)
    assert got.shape == (1, rows, 40) and got.is_contiguous()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert "pad_rows" in repr(packed)


@needs_onednn
def test_large_shapes_are_timed_once_and_read_back_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECDECODE_HOME", str(tmp_path))
    monkeypatch.delenv("SPECDECODE_RECALIBRATE", raising=False)
    model = nn.Sequential(nn.Linear(1024, 512), nn.Linear(512, 16))  # 2 MiB and 32 KiB
    kernels = pack_linears(model)
    big, small = kernels.packed[("", "0")], kernels.packed[("", "1")]
    assert isinstance(big, PackedLinear) and isinstance(small, PackedLinear)

    timed = []
    real_time_rows = row_padding.time_rows

    def counting(modules, rows, repeats=row_padding.REPEATS):
        timed.append(modules[0].out_features)
        return real_time_rows(modules, rows, repeats=1)

    monkeypatch.setattr(row_padding, "time_rows", counting)
    (timing,) = tune_row_padding(kernels, max_rows=4)
    assert timed == [512]  # the small layer is never timed, nor padded
    assert sorted(timing.seconds) == [1, 2, 3, 4] and all(s > 0 for s in timing.seconds.values())
    assert big.pad_rows == timing.pad_rows and small.pad_rows == {}
    assert all(n < m <= 4 for n, m in big.pad_rows.items())

    # a second process reads the timings; a forced recalibration measures again
    big.pad_rows = {}
    (again,) = tune_row_padding(kernels, max_rows=4)
    assert timed == [512] and again == timing and big.pad_rows == timing.pad_rows
    monkeypatch.setenv("SPECDECODE_RECALIBRATE", "1")
    tune_row_padding(kernels, max_rows=4)
    assert timed == [512, 512]

    # a damaged cache file is measured anew, not trusted
    monkeypatch.delenv("SPECDECODE_RECALIBRATE")
    (cached,) = (tmp_path / "row-padding").glob("*.json")
    cached.write_text("{not json")
    tune_row_padding(kernels, max_rows=4)
    assert timed == [512, 512, 512]
    assert ShapeTiming.from_dict(json.loads(cached.read_text())).out_features == 512


@needs_onednn
def test_max_rows_must_be_positive():
    kernels = pack_linears(nn.Sequential(nn.Linear(8, 8)))
    with pytest.raises(ValueError, match="max_rows"):
        tune_row_padding(kernels, max_rows=0)

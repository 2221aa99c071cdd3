"""devtools.stats.percentile: nearest rank, one of the samples, and no samples is an error."""

from __future__ import annotations

import pytest

from devtools.stats import percentile


def test_nearest_rank_of_the_sorted_samples() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 100 .. 1, unsorted on purpose
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 51.0
    assert percentile(values, 99) == 100.0
    assert percentile(values, 100) == 100.0


def test_always_one_of_the_samples() -> None:
    assert percentile([1.0, 2.0], 50) == 2.0
    assert percentile([7.5], 0) == percentile([7.5], 99) == 7.5
    assert percentile(iter([3.0, 1.0, 2.0]), 50) == 2.0


def test_no_samples_raises() -> None:
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)


@pytest.mark.parametrize("p", [-1, 100.5])
def test_p_out_of_range_raises(p: float) -> None:
    with pytest.raises(ValueError, match="within"):
        percentile([1.0], p)

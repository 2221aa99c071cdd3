"""The one percentile the benchmarks report (nearest rank, no interpolation)."""

from __future__ import annotations

from collections.abc import Iterable


def percentile(values: Iterable[float], p: float) -> float:
    """The ``p``-th percentile (0 <= p <= 100) of ``values``: the sample at rank
    ``floor(p / 100 * n)`` of the sorted samples, the largest for ``p = 100``.

    Always one of the samples, never an interpolation between two. No samples, no
    percentile: an empty ``values`` raises :class:`ValueError` (as ``statistics.median``
    does), so a caller that can see none decides what it reports instead of a 0 or a NaN
    that could pass for a figure.
    """
    if not 0 <= p <= 100:
        raise ValueError(f"percentile: p must be within [0, 100], not {p}")
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no samples")
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

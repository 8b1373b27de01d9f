"""Means over repeated seeds with a 95% t-interval: the sweep's configurations.csv and the study plots' error
bars."""
from __future__ import annotations

import math


def mean_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of its two-sided Student-t interval); the half-width is nan for fewer than two values."""
    from scipy import stats

    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)


def grouped(points: list[tuple[float, float]]) -> list[tuple[float, float, float]]:
    """(x, mean y, half-width) for each distinct x of (x, y) points, in x order; a half-width of 0 where one
    point has that x."""
    by_x: dict[float, list[float]] = {}
    for x, y in points:
        by_x.setdefault(x, []).append(y)
    out = []
    for x in sorted(by_x):
        mean, half = mean_interval(by_x[x])
        out.append((x, mean, 0.0 if math.isnan(half) else half))
    return out

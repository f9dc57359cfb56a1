"""Intervals over seeds: the mean of repeated runs, their spread and a 95% t-interval.

A study repeated with seeds 0..N-1 reports per metric the mean of the N values, their sample
standard deviation (ddof=1) and the two-sided 95% confidence interval of the mean from Student's
t distribution with N-1 degrees of freedom, ``mean ± t(0.975, N-1) · std / √N``
(``scipy.stats.t.interval`` with the standard error ``scipy.stats.sem``).

Two edge cases, decided here once:

- seeds that agree exactly give a zero-width interval, low = high = mean (scipy answers NaN for a
  zero scale, and the mean of equal floats can be off by an ulp);
- one seed has no spread: std, low and high are NaN, not the value, because a zero-width interval
  would claim a certainty that one run cannot give. No value at all: the mean is NaN too.

In a csv file a metric ``m`` takes the five columns of ``SUFFIXES``: ``m`` (the mean; with one
seed, the value itself, so a one-seed file reads like a single run), ``m.std``,
``m.ci95_low``, ``m.ci95_high`` and ``m.n`` (the number of values). NaN is written ``nan``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
SUFFIXES = ("", ".std", ".ci95_low", ".ci95_high", ".n")


@dataclass(frozen=True)
class Interval:
    """Mean, sample standard deviation and the 95% t-interval of ``n`` values."""

    mean: float
    std: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        """``t · std / √n``: the ``±`` of ``mean ± half_width`` (NaN for fewer than 2 values)."""
        return (self.high - self.low) / 2

    def columns(self, metric: str) -> dict[str, float | int]:
        """The five csv columns of ``metric`` (see the module docstring)."""
        values = (self.mean, self.std, self.low, self.high, self.n)
        return {metric + s: v for s, v in zip(SUFFIXES, values, strict=True)}

    @classmethod
    def from_columns(cls, row: Mapping[str, Any], metric: str) -> Interval:
        """The Interval that ``columns`` wrote into ``row`` (numbers, or csv text); a metric
        the row lacks is n=0, all NaN."""

        def number(suffix: str) -> float:
            try:
                return float(row.get(metric + suffix))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                return math.nan

        n = number(".n")
        return cls(number(""), number(".std"), number(".ci95_low"), number(".ci95_high"),
                   0 if math.isnan(n) else int(n))

    def text(self, fmt: str = "{:.3f}", with_n: bool = False) -> str:
        """``0.512 ± 0.034`` (``fmt`` formats both numbers); one value alone; ``-`` for none."""
        if self.n == 0 or math.isnan(self.mean):
            return "-"
        out = fmt.format(self.mean)
        if self.n > 1:
            out += " ± " + fmt.format(self.half_width)
        return out + (f" (n={self.n})" if with_n else "")


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """The interval of the mean of ``values`` (see the module docstring for n < 2 and ties)."""
    a = np.asarray([float(v) for v in values], dtype=float)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if a.size and not np.isfinite(a).all():
        raise ValueError(f"values must be finite, got {a.tolist()}")
    n = int(a.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, math.nan, 0)
    if n == 1:
        return Interval(float(a[0]), math.nan, math.nan, math.nan, 1)
    if np.ptp(a) == 0:  # the seeds agree: exactly the value, zero width
        v = float(a[0])
        return Interval(v, 0.0, v, v, n)
    mean = float(a.mean())
    low, high = stats.t.interval(confidence, df=n - 1, loc=mean, scale=stats.sem(a, ddof=1))
    return Interval(mean, float(a.std(ddof=1)), float(low), float(high), n)

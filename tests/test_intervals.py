"""Intervals over seeds: the t-interval against a hand computation, ties, one value, csv columns."""

import math

import pytest

from fedsim.intervals import SUFFIXES, Interval, t_interval

# Student t quantiles t(0.975, df) from a printed table (not from scipy, which the code uses).
T975 = {1: 12.7062, 2: 4.3027, 4: 2.7764}


def by_hand(values):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T975[n - 1] * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


@pytest.mark.parametrize("values", [[1.0, 2.0, 4.0], [0.61, 0.58], [10, 12, 9, 14, 11]])
def test_the_interval_is_the_t_interval_by_hand(values):
    iv = t_interval(values)
    mean, std, low, high = by_hand(values)
    assert iv.n == len(values)
    assert iv.mean == pytest.approx(mean, rel=1e-12)
    assert iv.std == pytest.approx(std, rel=1e-12)
    # the table's quantiles have 5 significant digits
    assert iv.low == pytest.approx(low, rel=1e-4) and iv.high == pytest.approx(high, rel=1e-4)
    assert iv.half_width == pytest.approx((high - low) / 2, rel=1e-4)


def test_seeds_that_agree_give_zero_width_at_the_value():
    v = 0.1  # numpy's mean of three 0.1 is 0.1 + 1 ulp, their std 1.7e-17, not 0
    iv = t_interval([v, v, v])
    assert (iv.mean, iv.std, iv.low, iv.high, iv.n) == (v, 0.0, v, v, 3)
    assert iv.half_width == 0.0
    assert iv.text("{:.2f}") == "0.10 ± 0.00"


def test_one_value_has_no_spread_and_none_has_no_mean():
    one = t_interval([0.75])
    assert one.mean == 0.75 and one.n == 1
    assert math.isnan(one.std) and math.isnan(one.low) and math.isnan(one.high)
    assert one.text() == "0.750" and one.text(with_n=True) == "0.750 (n=1)"
    none = t_interval([])
    assert none.n == 0 and math.isnan(none.mean) and none.text() == "-"


def test_text_is_mean_plus_minus_half_width():
    iv = t_interval([1.0, 2.0, 4.0])
    assert iv.text("{:.2f}", with_n=True) == f"2.33 ± {iv.half_width:.2f} (n=3)"
    assert t_interval([0.5, 0.7]).text("{:.0%}").startswith("60% ± ")


def test_columns_round_trip_through_csv_text():
    iv = t_interval([3.0, 5.0, 4.0])
    cols = iv.columns("quality.final")
    assert list(cols) == ["quality.final" + s for s in SUFFIXES]
    assert cols["quality.final.n"] == 3
    as_text = {k: str(v) for k, v in cols.items()}
    back = Interval.from_columns(as_text, "quality.final")
    assert back == iv
    single = Interval.from_columns({k: str(v) for k, v in t_interval([2]).columns("m").items()},
                                   "m")
    assert single.mean == 2 and single.n == 1 and math.isnan(single.low)
    assert Interval.from_columns({}, "m").n == 0


@pytest.mark.parametrize("bad", [[1.0, math.nan], [math.inf, 1.0]])
def test_non_finite_values_are_refused(bad):
    with pytest.raises(ValueError, match="finite"):
        t_interval(bad)

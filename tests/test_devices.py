"""Device presets, overrides and per-client spread."""

import numpy as np
import pytest

from fedsim.devices import PROFILES, build_fleet


def test_presets_are_ordered_by_capability():
    m, lp, c = PROFILES["mobile"], PROFILES["laptop"], PROFILES["cloud"]
    assert m.flops_per_s < lp.flops_per_s < c.flops_per_s
    assert m.memory_gib < lp.memory_gib < c.memory_gib
    assert m.wired_rate_bps is None and c.wired_rate_bps is not None


def test_overrides_and_spread(scenario_factory):
    sc = scenario_factory(clients=[
        {"profile": "mobile", "count": 4000, "spread": {"flops_per_s": 0.5},
         "overrides": {"memory_gib": 6, "distance_m": [50, 100]}},
        {"profile": "cloud", "count": 3},
    ], network__cells=[{}, {}])
    fleet = build_fleet(sc, np.random.default_rng(0))
    phones = np.arange(4000)
    assert np.all(fleet.memory_gib[phones] == 6)
    # lognormal around the preset: the median is the preset, sigma of ln is 0.5
    assert np.median(fleet.flops_per_s[phones]) == pytest.approx(5e10, rel=0.05)
    assert np.std(np.log(fleet.flops_per_s[phones])) == pytest.approx(0.5, rel=0.05)
    d = fleet.distance_m[phones]
    assert d.min() >= 50 and d.max() <= 100
    # area-uniform: P(d < r) = (r^2 - 50^2) / (100^2 - 50^2)
    assert np.mean(d < 75) == pytest.approx((75**2 - 50**2) / (100**2 - 50**2), abs=0.03)
    assert set(fleet.cell[phones]) == {0, 1}  # spread over both cells
    assert list(fleet.cell[4000:]) == [-1, -1, -1] and fleet.wired[4000:].all()


def test_same_seed_same_fleet(scenario_factory):
    sc = scenario_factory(clients=[{"profile": "mobile", "count": 50,
                                    "spread": {"flops_per_s": 0.3}}])
    a = build_fleet(sc, np.random.default_rng(9))
    b = build_fleet(sc, np.random.default_rng(9))
    assert np.array_equal(a.flops_per_s, b.flops_per_s)
    assert np.array_equal(a.distance_m, b.distance_m)

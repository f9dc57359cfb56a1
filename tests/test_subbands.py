"""OFDMA windows: the series serves each flow what integrating its rate would, to rounding."""

import math

import numpy as np
import pytest

from fedsim import subbands

B, GAMMA = 20e6, 10 ** (-5 / 10)  # a 20 MHz carrier, -5 dB outage


def _direct(segments, state):
    """Bits served to a flow of full-band SNR ``state`` over (dt, K) segments, rate by rate."""
    return sum(dt * subbands.rate_bps(B, k, state, GAMMA) for dt, k in segments)


@pytest.mark.parametrize("k0", [32, 57, 400, 1600, 20000])
def test_the_series_serves_what_the_rates_integrate(k0):
    rng = np.random.default_rng(k0)
    win = subbands.Window(B, k0, GAMMA)
    segments = [(float(rng.exponential(0.01)), int(rng.integers(win.k_lo, win.k_hi + 1)))
                for _ in range(300)]
    for dt, k in segments[:100]:
        win.advance(dt, k)
    snap = win.snapshot()  # a flow joins after the first 100 segments
    for dt, k in segments[100:]:
        win.advance(dt, k)
    states = np.exp(rng.uniform(np.log(GAMMA / win.k_lo), np.log(1e5), 50))
    big_l, q, cls = win.shape(states)
    on = cls == subbands.ON
    assert on.any()
    vec = win.served(big_l[on], q[on], np.zeros(on.sum()))
    for s, served in zip(states[on], vec, strict=True):
        exact = _direct(segments, s)
        assert served == pytest.approx(exact, rel=1e-12)
        one = win.served_one(*win.shape_one(float(s))[:2], 0)
        assert one == pytest.approx(exact, rel=1e-12)
        late = win.served_one(*win.shape_one(float(s))[:2], snap)
        assert late == pytest.approx(_direct(segments[100:], s), rel=1e-12)


def test_classes_and_bounds_within_a_window():
    win = subbands.Window(B, 1000, GAMMA)
    assert (win.k_lo, win.k_hi) == (969, 1031)
    on, marginal, off = GAMMA / win.k_lo * 1.01, GAMMA / 1000, GAMMA / win.k_hi * 0.99
    assert [win.shape_one(s)[2] for s in (on, marginal, off)] == [
        subbands.ON, subbands.MARGINAL, subbands.OFF]
    # An on-flow's rate is largest at the window's fewest flows: a bound of its finish.
    for k in range(win.k_lo, win.k_hi + 1):
        assert subbands.rate_bps(B, k, on, GAMMA) <= win.rate_lo(on)
    assert subbands.rate_bps(B, win.k_lo, marginal, GAMMA) == 0.0
    assert subbands.rate_bps(B, win.k_hi, marginal, GAMMA) > 0.0


def test_scalar_and_vector_rates_agree_with_the_channel_law():
    state = np.array([1e-4, 0.3, 7.0, 1e3])
    for k in (1, 5, 300):
        vec = subbands.rates_bps(B, k, state, GAMMA)
        assert list(vec) == [subbands.rate_bps(B, k, float(s), GAMMA) for s in state]
        assert vec[-1] == B / k * math.log2(1 + k * 1e3)


def test_a_window_survives_its_checkpoint_exactly():
    win = subbands.Window(B, 77, GAMMA)
    for dt, k in [(0.1, 75), (0.2, 79), (0.05, 77)]:
        win.advance(dt, k)
    win.snapshot()
    back = subbands.Window.restored(B, GAMMA, win.state())
    assert back.served_one(3.0, 0.5, 1) == win.served_one(3.0, 0.5, 1)
    assert back.served_one(3.0, 0.5, 0) == win.served_one(3.0, 0.5, 0)

"""Fluid flows at scale: the virtual clock and the OFDMA windows give the finish times of
recomputing every rate at each change (the coupled link), through joins, leaves, fading blocks
and checkpoints; a heap far smaller than the cell's flows is enough."""

import numpy as np
import pytest
from test_channels import _world

from fedsim import links, subbands
from fedsim.channels import DOWNLINK, UPLINK, SharedLink
from fedsim.clock import Clock

N = 400  # clients in the cell


def _cell(scenario_factory, sharing="ofdma"):
    sc = scenario_factory(
        clients=[{"profile": "mobile", "count": N, "overrides": {"distance_m": [50, 600]}}],
        network__channel={"name": "pathloss", "fading": True, "coherence_time_s": 0.2},
        network__cells=[{"uplink_bandwidth_hz": 20e6, "downlink_bandwidth_hz": 20e6,
                         "sharing": sharing}])
    return _world(sc)


def _play(env, link, seed, cancel=True):
    """Random joins (a burst at t=0, then one by one), sizes and cancels; each flow's
    (finish time, ok), and the link's carried bits and busy time."""
    rng = np.random.default_rng(seed)
    starts = np.where(rng.random(N) < 0.3, 0.0, rng.exponential(3.0, N))
    sizes = rng.integers(20_000, 400_000, N)
    drops = {int(c): float(t) for c, t in zip(rng.choice(N, 40, replace=False),
                                               rng.uniform(0.5, 6.0, 40), strict=True)}
    out = {}

    def flow(c):
        yield env.timeout(float(starts[c]))
        ok = yield link.transfer(c, int(sizes[c]))
        out[c] = (env.now, ok)

    def drop(c, at):
        yield env.timeout(at)
        if c not in out:
            link.cancel(c)
            out[c] = ("cancelled", at)

    for c in range(N):
        env.process(flow(c))
    if cancel:
        for c, at in drops.items():
            env.process(drop(c, at))
    env.run(until=60.0)
    return out, link.bits_carried, link.busy_s


def _same(a, b):
    assert a[0].keys() == b[0].keys()
    for c, (t, ok) in a[0].items():
        t2, ok2 = b[0][c]
        assert ok == ok2
        if t != "cancelled":
            assert t == pytest.approx(t2, rel=1e-9, abs=1e-12), c
    assert a[1] == pytest.approx(b[1], rel=1e-9)
    assert a[2] == pytest.approx(b[2], rel=1e-9)


def test_ofdma_windows_finish_flows_when_recomputing_every_rate_would(scenario_factory,
                                                                     monkeypatch):
    env, _, ch = _world_env(scenario_factory)
    windowed = SharedLink(env, ch, 0, UPLINK)
    seen = []
    original = SharedLink._open_window
    monkeypatch.setattr(SharedLink, "_open_window",
                        lambda self, rem: (seen.append(self._k), original(self, rem)))
    got = _play(env, windowed, seed=1)
    assert max(seen) > 100  # the windows did serve the flows, most of the time
    monkeypatch.setattr(subbands, "SMALLEST", 10**9)  # every rate at every change
    env2, _, ch2 = _world_env(scenario_factory)
    _same(got, _play(env2, SharedLink(env2, ch2, 0, UPLINK), seed=1))


def test_the_virtual_clock_finishes_flows_when_recomputing_every_rate_would(
        scenario_factory, monkeypatch):
    env, _, ch = _world_env(scenario_factory)
    got = _play(env, SharedLink(env, ch, 0, DOWNLINK), seed=2)
    env2, _, ch2 = _world_env(scenario_factory)
    monkeypatch.setattr(type(ch2), "separable_band_hz", lambda self, cell, direction: None)
    coupled = SharedLink(env2, ch2, 0, DOWNLINK)
    _same(got, _play(env2, coupled, seed=2))
    assert coupled._band_hz is None and coupled._win is None


def _world_env(scenario_factory):
    return _cell(scenario_factory)


@pytest.mark.parametrize("direction", [UPLINK, DOWNLINK])
def test_a_link_restored_mid_flight_goes_on_exactly(scenario_factory, direction):
    """state() -> restore() into a fresh link, both continued alike: the same bits."""
    env, _, ch = _cell(scenario_factory)
    link = SharedLink(env, ch, 0, direction)
    told = {}
    for c in range(200):
        link.transfer(c, 300_000 + 1000 * c, on_end=lambda ok, c=c: told.setdefault(c, env.now))
    env.run(until=1.3)  # mid-block, some flows done
    assert told and link.active
    doc = link.state()
    if direction == UPLINK:
        assert doc["window"] is not None
    twin_env = Clock(env.now)
    twin = SharedLink(twin_env, ch, 0, direction)
    twin.restore(doc)
    assert twin.remaining_bits.tolist() == link.remaining_bits.tolist()
    assert twin.rates.tolist() == link.rates.tolist()


def test_a_heap_of_32_serves_thousands_of_flows(scenario_factory):
    """Far more flows than the heap holds: every one still ends, in target order."""
    env, _, ch = _cell(scenario_factory)
    ch.cfg = ch.cfg.model_copy(update={"fading": False})
    link = SharedLink(env, ch, 0, DOWNLINK)
    ends = []
    link.transfer_many(list(range(N)), [100_000] * N,
                       [lambda ok, c=c: ends.append((env.now, c, ok)) for c in range(N)])
    assert len(link._heap) <= links._HEAP < N
    env.run()
    assert len(ends) == N and all(ok for _, _, ok in ends)
    times = [t for t, _, _ in ends]
    assert times == sorted(times)
    eff = ch.efficiency(0, DOWNLINK, ch.flow_state(DOWNLINK, np.arange(N), 0.0))
    assert [c for _, c, _ in ends] == sorted(range(N), key=lambda c: (-eff[c], c))


def test_k_equal_flows_on_an_ofdma_window_take_the_closed_form(scenario_factory):
    """100 flows of one SNR on an OFDMA uplink, served by a window: all end together at
    8 n / ((B / K) log2(1 + K s)) (the closed form of test_channels' K equal flows)."""
    import math

    k, bw, n = 100, 20e6, 200_000
    sc = scenario_factory(
        clients=[{"profile": "mobile", "count": k, "overrides": {"distance_m": [300, 300]}}],
        network__channel={"name": "pathloss", "shadowing_sigma_db": 0, "fading": False},
        network__cells=[{"uplink_bandwidth_hz": bw, "sharing": "ofdma"}])
    env, _, ch = _world(sc)
    link = SharedLink(env, ch, 0, UPLINK)
    ends = []
    link.transfer_many(list(range(k)), [n] * k,
                       [lambda ok, c=c: ends.append((env.now, ok)) for c in range(k)])
    env.run(until=1e-12)
    assert link._win is not None and link._win.k0 == k
    env.run()
    snr = 10 ** (ch.snr_db[UPLINK][0] / 10)
    expected = 8 * n / ((bw / k) * math.log2(1 + k * snr))
    assert len(ends) == k and all(ok for _, ok in ends)
    assert all(t == pytest.approx(expected, rel=1e-12) for t, _ in ends)

"""Channels and fluid cell sharing against closed-form results."""

import math

import numpy as np
import pytest

from fedsim.channels import (
    CHANNELS,
    DOWNLINK,
    UPLINK,
    PathlossChannel,
    SharedLink,
    make_channel,
    pathloss_db,
    rayleigh_power_gain,
)
from fedsim.clock import Clock
from fedsim.devices import build_fleet
from fedsim.errors import FedsimError


def _world(sc):
    fleet = build_fleet(sc, np.random.default_rng(0))
    env = Clock()
    ch = make_channel(sc.network.channel, sc.network.cells, fleet, np.random.default_rng(1))
    return env, fleet, ch


def _finish_times(env, link, sizes, starts=None):
    """Start flows of ``sizes`` bytes (at ``starts``) on ``link``; return each finish time."""
    starts = starts or [0.0] * len(sizes)
    out = {}

    def flow(i, nbytes, at):
        yield env.timeout(at)
        ok = yield link.transfer(i, nbytes)
        out[i] = (env.now, ok)

    for i, (n, at) in enumerate(zip(sizes, starts, strict=True)):
        env.process(flow(i, n, at))
    env.run()
    return out


def test_registry_names():
    assert CHANNELS.names() == ["pathloss", "static", "trace"]


def test_static_single_upload_exact(scenario_factory):
    rate = 12.5e6
    sc = scenario_factory(network__cells=[{"uplink_rate_bps": rate}])
    env, _, ch = _world(sc)
    link = SharedLink(env, ch, 0, UPLINK)
    n = 3_141_592
    (t, ok), = _finish_times(env, link, [n]).values()
    assert ok
    assert t == pytest.approx(8 * n / rate, rel=1e-12)
    assert link.busy_s == pytest.approx(t, rel=1e-12)
    assert link.bits_carried == 8 * n


def test_pathloss_single_upload_shannon(scenario_factory):
    bw = 10e6
    sc = scenario_factory(
        clients=[{"profile": "mobile", "count": 1, "overrides": {"distance_m": [200, 200]}}],
        network__channel={"name": "pathloss", "shadowing_sigma_db": 0, "fading": False},
        network__cells=[{"uplink_bandwidth_hz": bw}],
    )
    env, _fleet, ch = _world(sc)
    # SNR by hand: 23 dBm UE + 0 dBi + 15 dBi BS - PL(0.2 km) vs -174 + 10 log10(B) + 5 dB.
    pl = 128.1 + 37.6 * math.log10(0.2)
    snr_db = 23 + 0 + 15 - pl - (-174 + 10 * math.log10(bw) + 5)
    rate = bw * math.log2(1 + 10 ** (snr_db / 10))
    link = SharedLink(env, ch, 0, UPLINK)
    n = 2_000_000
    (t, ok), = _finish_times(env, link, [n]).values()
    assert ok
    assert t == pytest.approx(8 * n / rate, rel=1e-9)
    assert pathloss_db(np.array([1000.0]))[0] == pytest.approx(128.1)


@pytest.mark.parametrize("k", [2, 3, 7])
def test_ofdma_k_flows_take_k_times_longer(scenario_factory, k):
    rate = 8e6
    sc = scenario_factory(clients=[{"profile": "laptop", "count": k}],
                          network__cells=[{"uplink_rate_bps": rate, "sharing": "ofdma"}])
    env, _, ch = _world(sc)
    link = SharedLink(env, ch, 0, UPLINK)
    n = 1_000_000
    solo = 8 * n / rate
    times = _finish_times(env, link, [n] * k)
    assert all(ok for _, ok in times.values())
    for t, _ in times.values():
        assert t == pytest.approx(k * solo, rel=1e-9)


def test_two_flows_by_hand(scenario_factory):
    """R = 8 Mbit/s shared by two flows of 1 MB and 3 MB starting together.

    Both move at 4 Mbit/s until the 1 MB flow ends at 8e6/4e6 = 2 s; by then the other has sent
    1 MB and its last 2 MB go at the full 8 Mbit/s: 16e6/8e6 = 2 s more, ending at 4 s.
    """
    sc = scenario_factory(clients=[{"profile": "laptop", "count": 2}],
                          network__cells=[{"uplink_rate_bps": 8e6}])
    env, _, ch = _world(sc)
    link = SharedLink(env, ch, 0, UPLINK)
    times = _finish_times(env, link, [1_000_000, 3_000_000])
    assert times[0][0] == pytest.approx(2.0, rel=1e-12)
    assert times[1][0] == pytest.approx(4.0, rel=1e-12)


def test_late_joiner_slows_the_first(scenario_factory):
    """8 Mbit/s; flow A (2 MB) alone for 1 s (1 MB sent), then B (0.5 MB) joins: both at
    4 Mbit/s; B ends after 1 s (t=2, A has 0.5 MB left), A alone again ends at t=2.5."""
    sc = scenario_factory(clients=[{"profile": "laptop", "count": 2}],
                          network__cells=[{"uplink_rate_bps": 8e6}])
    env, _, ch = _world(sc)
    link = SharedLink(env, ch, 0, UPLINK)
    times = _finish_times(env, link, [2_000_000, 500_000], starts=[0.0, 1.0])
    assert times[1][0] == pytest.approx(2.0, rel=1e-12)
    assert times[0][0] == pytest.approx(2.5, rel=1e-12)


def test_cancel_speeds_up_the_others(scenario_factory):
    sc = scenario_factory(clients=[{"profile": "laptop", "count": 2}],
                          network__cells=[{"uplink_rate_bps": 8e6}])
    env, _, ch = _world(sc)
    link = SharedLink(env, ch, 0, UPLINK)
    done = {}

    def a():
        yield link.transfer(0, 2_000_000)
        done[0] = env.now

    def b():
        link.transfer(1, 10_000_000)
        yield env.timeout(1.0)
        link.cancel(1)  # A has sent 0.5 MB at 4 Mbit/s; 1.5 MB left at 8 Mbit/s = 1.5 s

    env.process(a())
    env.process(b())
    env.run()
    assert done[0] == pytest.approx(2.5, rel=1e-12)
    assert link.bits_carried == pytest.approx(8 * 2_000_000 + 4e6, rel=1e-12)


def test_pathloss_ofdma_uplink_power_concentration(scenario_factory):
    """OFDMA uplink: each of K flows gets B/K Hz at K times the full-band SNR; TDMA gets the
    whole band 1/K of the time at the full-band SNR (so OFDMA is faster for power-limited UEs)."""
    k, bw, n = 4, 20e6, 1_000_000
    base = dict(
        clients=[{"profile": "mobile", "count": k, "overrides": {"distance_m": [400, 400]}}],
        network__channel={"name": "pathloss", "shadowing_sigma_db": 0, "fading": False,
                          "outage_snr_db": -50},
    )
    finish = {}
    for sharing in ("ofdma", "tdma"):
        sc = scenario_factory(network__cells=[{"uplink_bandwidth_hz": bw, "sharing": sharing}],
                              **base)
        env, _fleet, ch = _world(sc)
        snr = 10 ** (ch.snr_db[UPLINK][0] / 10)
        link = SharedLink(env, ch, 0, UPLINK)
        t = _finish_times(env, link, [n] * k)[0][0]
        gain = k if sharing == "ofdma" else 1
        assert t == pytest.approx(8 * n / ((bw / k) * math.log2(1 + gain * snr)), rel=1e-9)
        finish[sharing] = t
    assert finish["ofdma"] < finish["tdma"]


def test_downlink_ofdma_has_no_power_gain(scenario_factory):
    sc = scenario_factory(
        clients=[{"profile": "mobile", "count": 2, "overrides": {"distance_m": [300, 300]}}],
        network__channel={"name": "pathloss", "shadowing_sigma_db": 0, "fading": False},
    )
    _, _, ch = _world(sc)
    r1 = ch.rates_bps(0, DOWNLINK, np.array([0]), 0.0)[0]
    r2 = ch.rates_bps(0, DOWNLINK, np.array([0, 1]), 0.0)
    assert r2 == pytest.approx([r1 / 2, r1 / 2], rel=1e-12)


def test_outage_without_fading_fails_the_flow(scenario_factory):
    sc = scenario_factory(
        clients=[{"profile": "mobile", "count": 1, "overrides": {"distance_m": [5000, 5000]}}],
        network__channel={"name": "pathloss", "shadowing_sigma_db": 0, "fading": False,
                          "outage_snr_db": 0},
    )
    env, _, ch = _world(sc)
    link = SharedLink(env, ch, 0, UPLINK)
    (t, ok), = _finish_times(env, link, [1000]).values()
    assert ok is False and t == 0.0


def test_fading_changes_rates_each_coherence_block(scenario_factory):
    sc = scenario_factory(
        clients=[{"profile": "mobile", "count": 1, "overrides": {"distance_m": [100, 100]}}],
        network__channel={"name": "pathloss", "shadowing_sigma_db": 0, "fading": True,
                          "coherence_time_s": 0.01, "outage_snr_db": -50},
    )
    env, _, ch = _world(sc)
    assert isinstance(ch, PathlossChannel)
    c = np.array([0])
    r = [ch.rates_bps(0, UPLINK, c, t)[0] for t in (0.0, 0.005, 0.01, 0.02)]
    assert r[0] == r[1] and r[1] != r[2] != r[3]
    assert ch.next_change_s(0.005) == pytest.approx(0.01)
    # A transfer through many blocks ends where the integral of the rate reaches its bits.
    link = SharedLink(env, ch, 0, UPLINK)
    n = 5_000_000
    (t, ok), = _finish_times(env, link, [n]).values()
    blocks = np.arange(int(t / 0.01) + 1)
    rates = np.array([ch.rates_bps(0, UPLINK, c, b * 0.01 + 1e-6)[0] for b in blocks])
    sent = rates[:-1].sum() * 0.01 + rates[-1] * (t - blocks[-1] * 0.01)
    assert ok and sent == pytest.approx(8 * n, rel=1e-9)


def test_rayleigh_gain_is_exponential_and_reproducible():
    g = rayleigh_power_gain(42, np.arange(200_000), 3, 0)
    assert g.mean() == pytest.approx(1.0, abs=0.01)
    assert np.var(g) == pytest.approx(1.0, abs=0.03)  # Exp(1): variance 1
    assert np.array_equal(g, rayleigh_power_gain(42, np.arange(200_000), 3, 0))
    assert not np.array_equal(g, rayleigh_power_gain(42, np.arange(200_000), 4, 0))


def test_trace_channel_replays_steps(tmp_path, scenario_factory):
    trace = tmp_path / "trace.csv"
    trace.write_text("time_s,uplink_bps,downlink_bps\n0,8e6,1e7\n1,4e6,1e7\n")
    sc = scenario_factory(network__channel={"name": "trace", "trace_path": str(trace)})
    env, _, ch = _world(sc)
    link = SharedLink(env, ch, 0, UPLINK)
    # 1.5 MB: 1 MB in the first second at 8 Mbit/s, then 0.5 MB at 4 Mbit/s = 1 s more.
    (t, ok), = _finish_times(env, link, [1_500_000]).values()
    assert ok and t == pytest.approx(2.0, rel=1e-12)


def test_trace_channel_bad_file(tmp_path, scenario_factory):
    bad = tmp_path / "bad.csv"
    bad.write_text("time,rate\n0,1\n")
    sc = scenario_factory(network__channel={"name": "trace", "trace_path": str(bad)})
    with pytest.raises(FedsimError, match="trace_path"):
        _world(sc)


def test_wired_clients_bypass_the_cell(scenario_factory):
    from fedsim.channels import Network

    sc = scenario_factory(clients=[{"profile": "cloud", "count": 2}])
    env = Clock()
    fleet = build_fleet(sc, np.random.default_rng(0))
    net = Network(env, sc, fleet)
    assert net.link(0, UPLINK) is net.wired
    t = {}

    def go(c):
        yield net.link(c, UPLINK).transfer(c, 1_000_000)
        t[c] = env.now

    env.process(go(0))
    env.process(go(1))
    env.run()
    assert t[0] == t[1] == pytest.approx(8e6 / 1e9)  # not shared: each at its own 1 Gbit/s


def test_scalar_and_vector_hash_agree():
    from fedsim.rng import hashed_uniform, hashed_uniform_one

    ids = np.array([0, 1, 7, 12345, 2**40])
    for b in (0, 5, 2**61 + 3):
        vec = hashed_uniform(99, ids, b)
        assert [hashed_uniform_one(99, int(a), b) for a in ids] == list(vec)


@pytest.mark.parametrize("name", ["static", "pathloss"])
def test_scalar_paths_match_vectorized(scenario_factory, name):
    sc = scenario_factory(clients=[{"profile": "mobile", "count": 6}],
                          network__channel={"name": name, **(
                              {"coherence_time_s": 0.01} if name == "pathloss" else {})})
    _, _, ch = _world(sc)
    ids = np.arange(6)
    for t in (0.0, 0.013, 1.7):
        vec = ch.flow_state(UPLINK, ids, t)
        assert [ch.flow_state_one(UPLINK, int(c), t) for c in ids] == pytest.approx(vec, rel=1e-12)
        for k in (1, 3, 6):
            rates = ch.shared_rates(0, UPLINK, np.full(k, vec[0]))
            assert ch.rate_among(0, UPLINK, float(vec[0]), k) == pytest.approx(rates[-1], rel=1e-12)


def test_freed_slots_keep_join_order_and_the_separable_rates(scenario_factory):
    """A flow that leaves gives its slot to the last one (O(1)); the flows that end together
    are still told in the order they joined, the checkpoint document lists them in that order,
    and a downlink's cached spectral efficiencies give exactly ``shared_rates``' rates."""
    sc = scenario_factory(
        clients=[{"profile": "mobile", "count": 1, "overrides": {"distance_m": [d, d]}}
                 for d in (300, 150, 300, 450, 150)],  # clients 0-4
        network__channel={"name": "pathloss", "shadowing_sigma_db": 0, "fading": False},
        network__cells=[{"downlink_bandwidth_hz": 10e6}])
    env, _, ch = _world(sc)
    link = SharedLink(env, ch, 0, DOWNLINK)
    told = []

    def flow(i, nbytes):
        ok = yield link.transfer(i, nbytes)
        told.append((i, env.now, ok))

    for i in (3, 0, 1, 2, 4):  # joins in this order, at one instant: slots 0-4
        env.process(flow(i, 5_000_000 if i == 2 else 500_000))
    env.run(until=1e-9)
    link.cancel(0)  # client 4, the last, moves into slot 1: ahead of client 1 in the arrays
    env.run(until=2e-9)
    assert link._ids[: link.active].tolist() == [3, 4, 1, 2]
    assert link.clients.tolist() == [3, 1, 2, 4] == link.state()["ids"]  # join order
    exact = ch.shared_rates(0, DOWNLINK, link.flow_states)
    assert np.array_equal(link.rates, exact)  # (B / K) x cached log2(1 + SNR): the same bits
    env.run()
    # Clients 1 and 4 (both 150 m, the same size) end at one instant and are told in the
    # order they joined (1 first, though 4 sits before it); client 2's big flow ends last.
    (i1, t1, _), (i4, t4, _) = [x for x in told if x[0] in (1, 4)]
    assert (i1, i4) == (1, 4) and t1 == t4
    assert [x[0] for x in told][-1] == 2 and all(ok for _, _, ok in told)
    assert link.active == 0 and not link.events

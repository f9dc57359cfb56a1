"""Inter-cell interference: the hexagonal layout, two cells with one flow each against the
closed form, reuse 3 and `none` leaving today's rates, interference lifting when the
neighbour's flow ends, a many-cell run that resumes identically."""

import math

import numpy as np
import pytest
from test_checkpoint import full_and_resumed

from fedsim.channels import BS_ANTENNA_GAIN_DBI, BS_NOISE_FIGURE_DB, UPLINK
from fedsim.engine import Simulation, run
from fedsim.interference import colours, hex_axial, hex_positions_m
from fedsim.scenario import ScenarioError, validate


def two_cells(interference, positions=((0.0, 0.0), (500.0, 0.0))):
    return validate({
        "name": "sinr", "seed": 4, "rounds": 1,
        "workload": {"name": "synthetic", "update_bytes": 2_000_000, "download_bytes": 1},
        "clients": [{"profile": "mobile", "count": 1, "cells": [0],
                     "overrides": {"distance_m": [200, 200], "mean_off_s": 0}},
                    {"profile": "mobile", "count": 1, "cells": [1],
                     "overrides": {"distance_m": [300, 300], "mean_off_s": 0}}],
        "network": {"channel": {"name": "pathloss", "shadowing_sigma_db": 0, "fading": False},
                    "cells": [{"uplink_bandwidth_hz": 5e6, "position_m": list(p)}
                              for p in positions],
                    "interference": interference},
        "training": {"local_steps": 1},
    })


def test_hex_layout_rings_and_reuse_3_colours():
    assert hex_axial(7)[0] == (0, 0) and len(set(hex_axial(19))) == 19
    pos = hex_positions_m(7, 500.0)
    d = np.linalg.norm(pos[1:] - pos[0], axis=1)
    assert d == pytest.approx(np.full(6, 500.0))  # ring 1 at one inter-site distance
    assert np.linalg.norm(pos[1] - pos[2]) == pytest.approx(500.0)  # neighbours on the ring
    from fedsim.scenario import CellConfig
    col = colours([CellConfig() for _ in range(19)])
    pos = hex_positions_m(19, 500.0)
    for i in range(19):  # co-channel sites (same colour) are at least sqrt(3) ISD apart
        for j in range(i + 1, 19):
            if col[i] == col[j]:
                assert np.linalg.norm(pos[i] - pos[j]) >= math.sqrt(3) * 500 - 1e-6


def by_hand_uplink_rate(sim, client, other):
    """B·log2(1 + SINR), SINR = S / (N + I), each term from the formulas, in watts."""
    f, inter = sim.fleet, sim.network.interference
    cell = int(f.cell[client])
    site = inter.sites_m[cell]
    own_d = np.linalg.norm(inter.clients_m[client] - site)
    assert own_d == pytest.approx(f.distance_m[client])
    eirp = f.tx_power_dbm + f.antenna_gain_dbi + BS_ANTENNA_GAIN_DBI
    pl = lambda d: 128.1 + 37.6 * math.log10(d / 1000)  # noqa: E731
    s_w = 10 ** ((eirp[client] - pl(own_d) - 30) / 10)
    i_w = 10 ** ((eirp[other] - pl(np.linalg.norm(inter.clients_m[other] - site)) - 30) / 10)
    n_w = 10 ** ((-174 + 10 * math.log10(5e6) + BS_NOISE_FIGURE_DB - 30) / 10)
    return 5e6 * math.log2(1 + s_w / (n_w + i_w)), 5e6 * math.log2(1 + s_w / n_w)


def rates_while_both_send(sc):
    """Run until both uploads are in flight; the uplink rates of clients 0 and 1 then."""
    sim = Simulation(sc)
    sim.env.process(sim.policy.run())
    ul = sim.network.cells[UPLINK]
    while not (ul[0].active and ul[1].active):
        sim.env.step()
    t = sim.env.now
    while sim.env.peek() <= t:  # the instant's recomputations
        sim.env.step()
    return sim, float(ul[0].rates[0]), float(ul[1].rates[0])


def test_two_cells_one_flow_each_reuse_1_equals_the_closed_form():
    sim, r0, r1 = rates_while_both_send(two_cells({"model": "load", "reuse": 1}))
    want0, alone0 = by_hand_uplink_rate(sim, 0, 1)
    want1, _ = by_hand_uplink_rate(sim, 1, 0)
    assert r0 == pytest.approx(want0, rel=1e-12) and r1 == pytest.approx(want1, rel=1e-12)
    assert r0 < alone0  # interference costs rate
    # once the first upload ends, the other is alone: its noise-limited rate again
    _, alone1 = by_hand_uplink_rate(sim, 1, 0)
    ul = sim.network.cells[UPLINK]
    while ul[0].active and ul[1].active:
        sim.env.step()
    t = sim.env.now
    while sim.env.peek() <= t:
        sim.env.step()
    left, alone = (ul[0], alone0) if ul[0].active else (ul[1], alone1)
    assert left.active == 1
    assert float(left.rates[0]) == pytest.approx(alone, rel=1e-12)


def test_none_and_reuse_3_neighbours_give_todays_rates_bit_for_bit():
    _, base0, base1 = rates_while_both_send(two_cells({"model": "none"}))
    # cells 0 and 1 of the hexagonal layout have different reuse-3 colours
    sc = two_cells({"model": "load", "reuse": 3})
    sc = sc.model_copy(update={"network": sc.network.model_copy(update={"cells": [
        c.model_copy(update={"position_m": None}) for c in sc.network.cells]})})
    _, r0, r1 = rates_while_both_send(sc)
    assert (r0, r1) == (base0, base1)
    # and without interference the run is today's run: same events as with the default
    doc = two_cells({"model": "none"})
    assert run(doc).recorder.events_csv() == run(
        doc.model_copy(update={"network": doc.network.model_copy(
            update={"interference": type(doc.network.interference)()})})).recorder.events_csv()


def test_interference_needs_an_snr_channel_and_all_or_no_positions():
    with pytest.raises(ScenarioError, match=r"network\.interference\.model: load needs a channel"):
        validate({"name": "x", "rounds": 1, "workload": {"name": "synthetic"},
                  "clients": [{"profile": "mobile", "count": 1}],
                  "network": {"interference": {"model": "load"}}})
    with pytest.raises(ScenarioError, match="position_m for every cell or for none"):
        validate({"name": "x", "rounds": 1, "workload": {"name": "synthetic"},
                  "clients": [{"profile": "mobile", "count": 1}],
                  "network": {"cells": [{"position_m": [0, 0]}, {}]}})


def seven_cells(**extra):
    return validate({
        "name": "hex7", "seed": 2, "rounds": 3,
        "workload": {"name": "synthetic", "update_bytes": 400_000, "download_bytes": 200_000,
                     "flops_per_step": 2e10},
        "clients": [{"profile": "mobile", "count": 140}, {"profile": "laptop", "count": 35}],
        "network": {"channel": {"name": "pathloss"}, "cells": [{}] * 7,
                    "interference": {"model": "load", "reuse": 1}},
        "round_policy": {"name": "deadline", "deadline_s": 20, "clients_per_round": 60},
        **extra})


def test_interference_slows_a_loaded_hex_network_and_resumes_identically(tmp_path):
    loaded = run(seven_cells())
    quiet = run(seven_cells().model_copy(update={"network": seven_cells().network.model_copy(
        update={"interference": type(seven_cells().network.interference)()})}))
    up = [r.summary["latency_s"]["upload"]["p50"] for r in (loaded, quiet)]
    assert up[0] > up[1]
    sc = seven_cells(output={"checkpoint_every": 1})
    full, resumed = full_and_resumed(sc, tmp_path, 0)
    assert resumed.recorder.events_csv() == full.recorder.events_csv()


def test_fedcs_expects_the_interference_its_own_choice_creates():
    """Two clients in co-channel cells chosen together: the expected upload is at the SINR
    their simultaneous uploads give (the closed form above), not the noise-limited rate."""
    from fedsim.plugins import DeadlineAwareSelectorConfig
    from fedsim.selection import DeadlineAware

    sim = Simulation(two_cells({"model": "load", "reuse": 1}))
    sel = DeadlineAware(DeadlineAwareSelectorConfig(deadline_s=60, estimate="exact"), sim)
    with_sinr, alone = by_hand_uplink_rate(sim, 0, 1)
    f = sim.fleet
    rest = 1 * 8 / sim.network.channel.rate_among(0, "downlink",
                                                   sim.network.channel.flow_state_one(
                                                       "downlink", 0, 0.0), 1)
    rest += sim.workload.plan(0, 0).flops / f.flops_per_s[0]
    both = sel.expected_s([0, 1], 0)[0]
    assert both == pytest.approx(rest + 2_000_000 * 8 / with_sinr, rel=1e-9)
    assert sel.expected_s([0], 0)[0] == pytest.approx(rest + 2_000_000 * 8 / alone, rel=1e-9)


def crowded(association):
    """Seven hexagonal cells 500 m apart, phones dropped up to 500 m from their own site."""
    return validate({
        "name": "assoc", "seed": 2, "rounds": 1,
        "workload": {"name": "synthetic", "update_bytes": 100_000, "download_bytes": 1},
        "clients": [{"profile": "mobile", "count": 140}, {"profile": "cloud", "count": 2}],
        "network": {"channel": {"name": "pathloss", "shadowing_sigma_db": 8},
                    "cells": [{} for _ in range(7)],
                    "interference": {"model": "load", "reuse": 1},
                    "association": association},
        "training": {"local_steps": 1},
    })


def test_clients_are_served_by_their_nearest_site_unless_association_is_drawn():
    drawn, nearest = Simulation(crowded("drawn")), Simulation(crowded("nearest"))
    wireless = drawn.fleet.cell >= 0
    # the same drop: positions and round-robin cells as drawn
    np.testing.assert_array_equal(drawn.network.interference.clients_m,
                                  nearest.network.interference.clients_m)
    assert (drawn.fleet.cell[wireless] == np.arange(140) % 7).all()
    inter = nearest.network.interference
    d_m = np.linalg.norm(inter.clients_m[:, None, :] - inter.sites_m[None], axis=2)
    assert (nearest.fleet.cell[wireless] == d_m[wireless].argmin(axis=1)).all()
    moved = (nearest.fleet.cell != drawn.fleet.cell) & wireless
    assert 0 < moved.sum() < 140  # a 500 m drop on a 500 m grid crosses into neighbours
    # the serving distance, path loss and SNR follow the new site; wired clients stay wired
    assert nearest.fleet.distance_m[wireless] == pytest.approx(
        np.maximum(d_m[wireless].min(axis=1), 1.0))
    assert (nearest.fleet.cell[~wireless] == -1).all()
    assert (nearest.network.channel.snr_db[UPLINK][moved]
            > drawn.network.channel.snr_db[UPLINK][moved]).all()

"""Mobility: path loss following a traced client along the 3GPP law, Gudmundson-correlated
shadowing, handover with hysteresis, random waypoints inside the layout, resume, validation."""

import math

import numpy as np
import pytest
from test_checkpoint import full_and_resumed

from fedsim.channels import BS_ANTENNA_GAIN_DBI, BS_NOISE_FIGURE_DB, UPLINK
from fedsim.engine import Simulation, run
from fedsim.scenario import ScenarioError, validate


def world(mobility, cells=({"position_m": [0, 0]},), clients=1, sigma=0.0, **extra):
    return validate({
        "name": "moving", "seed": 5, "rounds": 2,
        "workload": {"name": "synthetic", "update_bytes": 300_000, "download_bytes": 100_000,
                     "flops_per_step": 1e10},
        "clients": [{"profile": "mobile", "count": clients,
                     "overrides": {"distance_m": [100, 100], "mean_off_s": 0}}],
        "network": {"channel": {"name": "pathloss", "shadowing_sigma_db": sigma,
                                "fading": False},
                    "cells": [{"uplink_bandwidth_hz": 10e6, **c} for c in cells],
                    "mobility": mobility},
        **extra})


def line_trace(tmp_path, x0, x1, seconds):
    p = tmp_path / "walk.csv"
    p.write_text(f"time_s,client,x_m,y_m\n0,0,{x0},0\n{seconds},0,{x1},0\n")
    return str(p)


def test_a_client_walking_away_follows_the_3gpp_path_loss(tmp_path):
    sc = world({"model": "trace", "trace_path": line_trace(tmp_path, 100, 1000, 90),
                "update_s": 1.0})
    sim = Simulation(sc)
    ch, f = sim.network.channel, sim.fleet
    noise = -174 + 10 * math.log10(10e6) + BS_NOISE_FIGURE_DB
    for t in (1.0, 10.0, 45.0, 89.0, 90.0, 120.0):
        d_m = 100 + 10.0 * min(t, 90.0)  # 10 m/s, then held at the last row
        want = (f.tx_power_dbm[0] + f.antenna_gain_dbi[0] + BS_ANTENNA_GAIN_DBI
                - (128.1 + 37.6 * math.log10(d_m / 1000)) - noise)
        got = 10 * math.log10(ch.flow_state_one(UPLINK, 0, t))
        assert got == pytest.approx(want, abs=1e-9), t


def test_shadowing_decorrelates_with_the_distance_moved_gudmundson():
    sc = world({"model": "random-waypoint", "speed_mps": [10, 10], "pause_s": 0,
                "decorrelation_m": 50.0}, clients=4000, sigma=8.0)
    sim = Simulation(sc)
    mob = sim.network.mobility
    before = mob.shadow_db.copy()
    assert before.std() == pytest.approx(8.0, rel=0.05)
    mob.advance_to(1.0)  # every client moved 10 m (or reached its waypoint: fewer)
    moved = np.linalg.norm(mob.pos_m - mob.start_m, axis=1)
    full = moved > 10 - 1e-9
    rho = np.corrcoef(before[full], mob.shadow_db[full])[0, 1]
    assert rho == pytest.approx(math.exp(-10 / 50), abs=0.02)
    assert mob.shadow_db.std() == pytest.approx(8.0, rel=0.05)  # stationary: σ stays


def test_handover_to_the_stronger_site_past_the_hysteresis(tmp_path):
    sc = world({"model": "trace", "trace_path": line_trace(tmp_path, 100, 400, 300),
                "handover": True, "hysteresis_db": 3.0},
               cells=({"position_m": [0, 0]}, {"position_m": [500, 0]}))
    sim = Simulation(sc)
    mob = sim.network.mobility
    assert sim.fleet.cell[0] == 0
    # 37.6·log10(d0/d1) > 3 dB  <=>  d0 > 500·r/(1 + r), r = 10^(3/37.6): 272.9 m
    r = 10 ** (3 / 37.6)
    cross_m = 500 * r / (1 + r)
    for t in range(1, 301):
        mob.advance_to(float(t))
        x = 100 + t
        assert sim.fleet.cell[0] == (1 if x > cross_m else 0), (t, x)


def test_random_waypoints_stay_in_the_layout_and_the_run_resumes_identically(tmp_path):
    sc = world({"model": "random-waypoint", "speed_mps": [1, 20], "pause_s": 2,
                "update_s": 0.5, "handover": True},
               cells=({}, {}, {}), clients=60, sigma=6.0, rounds=4,
               output={"checkpoint_every": 1})
    sim = Simulation(sc)
    mob = sim.network.mobility
    mob.advance_to(200.0)
    assert (np.linalg.norm(mob.pos_m, axis=1) <= mob.radius_m + 1e-6).all()
    assert set(sim.fleet.cell.tolist()) <= {0, 1, 2}
    full, resumed = full_and_resumed(sc, tmp_path, 1)
    static = run(sc.model_copy(update={"network": sc.network.model_copy(update={
        "mobility": type(sc.network.mobility)()})}))
    assert full.recorder.events_csv() != static.recorder.events_csv()  # they do move
    assert resumed.recorder.events_csv() == full.recorder.events_csv()


@pytest.mark.parametrize(("network", "message"), [
    ({"mobility": {"model": "trace"}}, "trace_path: mobility model trace needs a CSV"),
    ({"mobility": {"model": "random-waypoint"}}, "needs a channel whose rates follow"),
    ({"mobility": {"speed_mps": [3, 1]}}, "speed_mps must be"),
])
def test_mobility_config_errors(network, message):
    with pytest.raises(ScenarioError, match=message):
        validate({"name": "x", "rounds": 1, "workload": {"name": "synthetic"},
                  "clients": [{"profile": "mobile", "count": 1}], "network": network})


def test_moving_clients_with_interference_move_their_interference_and_resume(tmp_path):
    sc = world({"model": "random-waypoint", "speed_mps": [10, 30], "pause_s": 0,
                "handover": True}, cells=({}, {}, {}), clients=90, sigma=6.0, rounds=3,
               output={"checkpoint_every": 1})
    sc = sc.model_copy(update={"network": sc.network.model_copy(update={
        "interference": type(sc.network.interference)(model="load")})})
    sim = Simulation(sc)
    inter, mob = sim.network.interference, sim.network.mobility
    assert np.array_equal(inter.clients_m, mob.pos_m)  # one set of positions
    before = inter.gain_w.copy()
    sim.network.channel.flow_state_one(UPLINK, 0, 5.0)  # the channel moves them to t = 5 s
    assert np.array_equal(inter.clients_m, mob.pos_m) and not np.array_equal(
        before, inter.gain_w)
    full, resumed = full_and_resumed(sc, tmp_path, 0)
    assert resumed.recorder.events_csv() == full.recorder.events_csv()

"""Energy: one update's joules per phase by hand, the kappa model, wired clients, batteries
that keep a client out of selection, a fleet that runs flat, the figure. Network-only runs."""

import csv
import io

import pytest

from fedsim.devices import PROFILES
from fedsim.energy import radio_tx_power_w
from fedsim.engine import Simulation, run
from fedsim.metrics import write_run_dir
from fedsim.plots import energy as energy_figure
from fedsim.scenario import validate

ONE = {
    "name": "joules", "seed": 0, "rounds": 1,
    "workload": {"name": "synthetic", "update_bytes": 250_000, "download_bytes": 500_000,
                 "flops_per_step": 1e10},
    "clients": [{"profile": "mobile", "count": 1, "overrides": {"mean_off_s": 0}}],
    "network": {"channel": {"name": "static"},
                "cells": [{"uplink_rate_bps": 8e6, "downlink_rate_bps": 40e6}]},
    "training": {"local_steps": 2},
}


def test_one_update_on_a_static_link_is_power_times_time_per_phase():
    sim = Simulation(validate(ONE))
    result = sim.run()
    m = PROFILES["mobile"]
    compute_s, down_s, up_s = 2e10 / m.flops_per_s, 500_000 * 8 / 40e6, 250_000 * 8 / 8e6
    tx_w = m.tx_circuit_w + 10 ** ((m.tx_power_dbm - 30) / 10) / m.pa_efficiency
    assert tx_w == pytest.approx(1.288 + 0.19953 / 0.35, rel=1e-4)  # 23 dBm ~ 0.2 W out
    want = {"compute": m.train_power_w * compute_s, "uplink": tx_w * up_s,
            "downlink": m.rx_power_w * down_s}
    got = result.summary["energy_j"]["mobile"]
    for phase, joules in want.items():
        assert got[phase]["total"] == pytest.approx(joules, rel=1e-12)
        assert got[phase]["p50"] == pytest.approx(joules, rel=1e-12)
    row = result.clients[0]
    assert row["energy_compute_j"] == pytest.approx(want["compute"], rel=1e-12)
    T = result.summary["sim_time_s"]
    used = sum(want.values()) + m.idle_power_w * T
    assert row["battery_charge"] == pytest.approx(1 - used / (m.battery_wh * 3600), rel=1e-12)
    assert result.recorder.rounds[0]["energy_j"] == pytest.approx(sum(want.values()))


def test_kappa_model_is_kappa_f_cubed_times_the_compute_time():
    sc = validate({**ONE, "energy": {"compute": "kappa", "kappa": 1e-28}})
    got = run(sc).summary["energy_j"]["mobile"]["compute"]["total"]
    m = PROFILES["mobile"]
    assert got == pytest.approx(1e-28 * m.cpu_hz ** 3 * 2e10 / m.flops_per_s, rel=1e-12)


def test_wired_clients_spend_no_radio_energy_and_no_battery():
    sc = validate({**ONE, "clients": [{"profile": "cloud", "count": 1}]})
    result = run(sc)
    got = result.summary["energy_j"]["cloud"]
    assert got["uplink"]["total"] == 0 and got["downlink"]["total"] == 0
    assert got["compute"]["total"] == pytest.approx(400.0 * 2e10 / 5e13, rel=1e-12)
    assert result.clients[0]["battery_charge"] == 1.0


def selected(result):
    rows = csv.DictReader(io.StringIO(result.recorder.events_csv()))
    return [(int(r["round"]), int(r["client"])) for r in rows if r["kind"] == "select"]


def test_a_battery_below_the_threshold_keeps_the_client_out_of_selection():
    # Client 0's battery holds 4 J: its first update (2.25 J) takes it under half.
    doc = {**ONE, "rounds": 3, "energy": {"min_charge": 0.5},
           "clients": [{"profile": "mobile", "count": 1,
                        "overrides": {"mean_off_s": 0, "battery_wh": 4 / 3600}},
                       {"profile": "laptop", "count": 1, "overrides": {"mean_off_s": 0}}]}
    result = run(validate(doc))
    picks = selected(result)
    assert (0, 0) in picks and (0, 1) in picks
    assert [c for r, c in picks if r > 0] == [1, 1]  # the flat phone is out after round 0
    assert result.clients[0]["battery_charge"] < 0.5 < result.clients[1]["battery_charge"]
    # every battery starts below the threshold: only the mains-powered machine takes part
    low = {**doc, "energy": {"min_charge": 0.5, "initial_charge": 0.4},
           "clients": [doc["clients"][0], {"profile": "cloud", "count": 1}]}
    assert {c for _, c in selected(run(validate(low)))} == {1}


def test_a_fleet_of_flat_batteries_ends_the_run_early():
    doc = {**ONE, "rounds": 5, "energy": {"min_charge": 0.5},
           "clients": [{"profile": "mobile", "count": 2,
                        "overrides": {"mean_off_s": 0, "battery_wh": 4 / 3600}}]}
    result = run(validate(doc))
    assert result.summary["rounds_completed"] == 1
    assert "fleet_depleted" in result.recorder.events_csv()


def test_energy_figure_is_drawn(tmp_path):
    doc = {**ONE, "rounds": 2, "clients": [{"profile": "mobile", "count": 2},
                                           {"profile": "cloud", "count": 1}]}
    out = write_run_dir(run(validate(doc)), tmp_path / "run")
    png = energy_figure(out)
    assert png is not None and png.stat().st_size > 10_000


def test_radio_power_of_an_output_level():
    assert radio_tx_power_w(30.0, 1.0, 0.5) == pytest.approx(1.0 + 1.0 / 0.5)  # 30 dBm = 1 W

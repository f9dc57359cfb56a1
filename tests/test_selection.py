"""Client selection: the expected time by hand, FedCS never over the deadline with an exact
estimate and more finishers than uniform on the stragglers, fastest-k's first k, Oort's
exploration and utility order, validation, resume. Network-only (synthetic) worlds: seconds."""

import csv
import io
import math

import numpy as np
import pytest
from test_checkpoint import full_and_resumed

from fedsim.engine import Simulation, run
from fedsim.scenario import ScenarioError, load, validate

STATIC = {
    "name": "sel", "seed": 3, "rounds": 2,
    "workload": {"name": "synthetic", "update_bytes": 250_000, "download_bytes": 500_000,
                 "flops_per_step": 1e10},
    "clients": [{"profile": "mobile", "count": 6}, {"profile": "laptop", "count": 3}],
    "network": {"channel": {"name": "static"},
                "cells": [{"uplink_rate_bps": 8e6, "downlink_rate_bps": 40e6}]},
    "training": {"local_steps": 2},
    "round_policy": {"name": "deadline", "deadline_s": 4.0},
}


def scenario(**changes):
    doc = {**STATIC, **changes}
    return validate(doc)


def events(result, kind):
    rows = csv.DictReader(io.StringIO(result.recorder.events_csv()))
    return [r for r in rows if r["kind"] == kind]


def test_expected_time_is_the_closed_form_on_a_static_cell():
    sc = scenario(selection={"name": "deadline-aware", "estimate": "exact"})
    sim = Simulation(sc)
    f = sim.fleet.flops_per_s
    # Two clients in the one cell: each downloads at 40e6/2 and uploads at 8e6/2 bits/s.
    got = sim.selector.expected_s([0, 7], 0)
    want = [500_000 * 8 / 20e6 + 2e10 / f[c] + 250_000 * 8 / 4e6 for c in (0, 7)]
    assert got == pytest.approx(want, rel=1e-12)
    alone = sim.selector.expected_s([0], 0, shared=False)
    assert alone[0] == pytest.approx(500_000 * 8 / 40e6 + 2e10 / f[0] + 250_000 * 8 / 8e6)


@pytest.mark.parametrize("channel", [{"name": "static"},
                                     {"name": "pathloss", "shadowing_sigma_db": 8}])
def test_deadline_aware_with_exact_estimates_never_expects_past_the_deadline(channel):
    sc = scenario(selection={"name": "deadline-aware", "estimate": "exact"}, rounds=3,
                  network={**STATIC["network"], "channel": channel,
                           "cells": [{"uplink_bandwidth_hz": 10e6, "downlink_bandwidth_hz": 20e6,
                                      "uplink_rate_bps": 8e6, "downlink_rate_bps": 40e6}]})
    sim = Simulation(sc)
    result = sim.run()
    picked = events(result, "select")
    assert picked, "no client was selected"
    expected = [float(r["detail"].removeprefix("expected_s=")) for r in picked]
    assert max(expected) <= 4.0
    # ... and every client it left out would have pushed someone past it (FedCS is greedy).
    sel = result.summary["selection"]
    assert sel["name"] == "deadline-aware" and sel["uploads"] >= 1
    assert sel["expected_s"]["p95"] <= 4.0


def test_static_exact_expectation_is_what_happens():
    """No fading, no other traffic, all selected download and upload together: the selector's
    model is the engine's, so expected = actual (to float rounding) for every upload."""
    sc = scenario(selection={"name": "deadline-aware", "estimate": "exact"},
                  clients=[{"profile": "laptop", "count": 3}],
                  network={"channel": {"name": "static"},
                           "cells": [{"uplink_rate_bps": 8e6, "downlink_rate_bps": 40e6}]})
    result = run(sc)
    sel = result.summary["selection"]
    assert sel["uploads"] == len(events(result, "select")) >= 4  # every selected one uploaded
    assert sel["abs_error_s"]["p95"] < 1e-9
    assert sel["expected_s"]["p50"] == pytest.approx(sel["actual_s"]["p50"], rel=1e-12)


def stragglers(selection, k=10):
    return load("scenarios/deadline-stragglers.yaml", [
        "workload.name=synthetic", "workload.flops_per_step=4.4e10",
        "workload.update_bytes=600000", "workload.download_bytes=600000",
        f"round_policy.clients_per_round={k}", "rounds=3", f"selection={selection}"])


def accepted(result):
    return result.summary["counts"]["updates_accepted"]


def test_deadline_aware_finishes_more_than_uniform_on_the_stragglers():
    uniform = run(stragglers("{name: uniform}"))
    exact = run(stragglers("{name: deadline-aware, estimate: exact}"))
    realistic = run(stragglers("{name: deadline-aware}"))
    assert accepted(exact) > accepted(uniform)
    assert accepted(realistic) > accepted(uniform)
    misses = [r.summary["overload"]["deadline_misses"] for r in (uniform, exact)]
    assert misses[1] < misses[0]
    # deterministic per seed
    again = run(stragglers("{name: deadline-aware}"))
    assert again.recorder.events_csv() == realistic.recorder.events_csv()


def test_fastest_k_over_selects_and_keeps_the_first_k():
    result = run(stragglers("{name: fastest-k, over_selection: 1.5, estimate: exact}", k=6))
    # ceil(1.5 x 6) = 9 selected a round, the first 6 accepted close it, 3 stopped in flight
    assert [(r["selected"], r["arrived"], r["aggregated"]) for r in result.recorder.rounds] == [
        (9, 6, 6)] * 3
    stopped = events(result, "over_selected")
    assert len(stopped) == 9
    assert {r["detail"] for r in stopped} <= {"downlink", "train", "uplink"}
    assert result.summary["overload"]["deadline_misses"] == 0
    uniform = run(stragglers("{name: uniform}", k=6))  # 6 at random: stragglers among them
    assert uniform.summary["overload"]["deadline_misses"] > 0
    assert accepted(uniform) < accepted(result) == 18


def tail_world(k, over_selection=1.0, rounds=100):
    """The tail-at-scale scenario at 1,000 clients, 10 of them 125x slower (1.25 s vs 10 ms)."""
    return load("scenarios/tail-at-scale.yaml", [
        f"rounds={rounds}", "clients.0.count=990", "clients.1.count=10",
        f"round_policy.clients_per_round={k}",
        f"selection={{name: uniform, over_selection: {over_selection}}}"])


def slow_rounds(result):
    return sum(r["end_s"] - r["start_s"] > 1.0 for r in result.recorder.rounds)


def test_tail_at_scale_slow_rounds_follow_the_closed_form_and_over_selection_removes_them():
    from scipy.stats import binom, hypergeom

    # Dean & Barroso 2013: a round waits for its slowest client, so it is slow exactly when
    # one of the 10 slow clients of 1,000 is among its 50: P = 1 - C(990,50)/C(1000,50).
    p = 1 - hypergeom(1000, 10, 50).pmf(0)
    assert p == pytest.approx(1 - math.comb(990, 50) / math.comb(1000, 50))
    result = run(tail_world(50))
    n_slow = slow_rounds(result)
    lo, hi = binom(100, p).ppf([0.0005, 0.9995])  # deterministic per seed; 99.9 % band
    assert lo <= n_slow <= hi, (n_slow, p)
    assert 0 < n_slow < 100
    # Uniform over-selection (Bonawitz et al. 2019: 130 %): ceil(1.3 x 50) = 65 selected, the
    # first 50 kept; at most 10 of the 65 are slow, so no round ever waits for one. The fast
    # ones all arrive at the same instant and all of them are kept (past their upload's end,
    # as at a deadline); exactly the slow ones are stopped.
    over = run(tail_world(50, over_selection=1.3))
    assert [r["selected"] for r in over.recorder.rounds] == [65] * 100
    assert min(r["aggregated"] for r in over.recorder.rounds) >= 55
    assert slow_rounds(over) == 0
    slow_picked = [r for r in events(over, "select") if int(r["client"]) >= 990]
    assert len(slow_picked) > 0
    assert sorted((r["round"], r["client"]) for r in events(over, "over_selected")) == sorted(
        (r["round"], r["client"]) for r in slow_picked)
    assert over.summary["sim_time_s"] < result.summary["sim_time_s"] / 10
    # over_selection 1 is plain uniform, draw for draw
    plain = run(tail_world(50, over_selection=1.0, rounds=5))
    assert plain.recorder.events_csv() == run(load("scenarios/tail-at-scale.yaml", [
        "rounds=5", "clients.0.count=990", "clients.1.count=10",
        "round_policy.clients_per_round=50"])).recorder.events_csv()


def test_utility_explores_unseen_clients_then_prefers_utility_times_speed():
    sc = scenario(selection={"name": "utility", "exploration": 0.0, "estimate": "exact"},
                  round_policy={"name": "deadline", "deadline_s": 100.0, "clients_per_round": 3})
    sim = Simulation(sc)
    sel = sim.selector
    # Nobody seen: every slot explores (at least k - seen), drawn from the seeded stream.
    first = sel.select(np.arange(9), 3, 0)
    assert len(first) == 3 and len(set(first)) == 3
    for c in range(9):  # then utilities by hand: client 8 the most useful, 2 next, 5 next
        sel.arrived(c, 10, {8: 9.0, 2: 5.0, 5: 4.0}.get(c, 1.0))
    assert sel.select(np.arange(9), 3, 1) == [2, 5, 8]
    # A preferred time below a client's expected one discounts it by (T/t)^penalty.
    t8 = sel.expected_s([8], 1, shared=False)[0]
    slow = sel.cfg.model_copy(update={"preferred_s": t8 / 10, "straggler_penalty": 2.0})
    sel.cfg = slow
    times = sel.expected_s(list(range(9)), 1, shared=False)
    speed = np.where(times > t8 / 10, (t8 / 10 / times) ** 2, 1.0)
    utility = np.array([90.0 if c == 8 else 50.0 if c == 2 else 40.0 if c == 5 else 10.0
                        for c in range(9)])
    want = sorted(int(i) for i in np.argsort(-(utility * speed), kind="stable")[:3])
    assert sel.select(np.arange(9), 3, 1) == want


@pytest.mark.parametrize(("changes", "message"), [
    ({"selection": {"name": "deadline-aware"}, "round_policy": {"name": "sync"}},
     "selection.deadline_s: deadline-aware selection needs a deadline"),
    ({"selection": {"name": "utility"}, "round_policy": {"name": "sync"}},
     "selection.preferred_s: utility selection needs a preferred round time"),
    ({"selection": {"name": "fastest-k"}, "round_policy": {"name": "async"}},
     "selection.name: fastest-k keeps the first k arrivals of a round; async rounds"),
    ({"selection": {"name": "fastest-k"}},
     "round_policy.clients_per_round: fastest-k needs k"),
    ({"selection": {"name": "fastest-k", "over_selection": 0.5},
      "round_policy": {"name": "sync", "clients_per_round": 2}}, "over_selection"),
    ({"selection": {"name": "uniform", "estimate": "exact"}}, "estimate"),
    ({"selection": {"name": "uniform", "over_selection": 1.3}},
     "round_policy.clients_per_round: uniform with over_selection > 1 needs k"),
    ({"selection": {"name": "uniform", "over_selection": 1.3},
      "round_policy": {"name": "async"}}, "selection.name: uniform with over_selection > 1"),
])
def test_selection_config_errors_name_the_key(changes, message):
    with pytest.raises(ScenarioError, match=message):
        scenario(**changes)


def test_a_utility_run_resumes_identically(tmp_path):
    sc = scenario(selection={"name": "utility", "exploration": 0.3}, rounds=4,
                  round_policy={"name": "deadline", "deadline_s": 6.0, "clients_per_round": 4},
                  output={"checkpoint_every": 1})
    full, resumed = full_and_resumed(sc, tmp_path, 1)
    assert resumed.recorder.events_csv() == full.recorder.events_csv()
    a, b = dict(full.summary), dict(resumed.summary)
    a.pop("wall_time_s"), b.pop("wall_time_s")
    assert a == b and math.isfinite(a["selection"]["actual_s"]["p50"])


def test_the_one_screen_summary_shows_energy_and_what_selection_expected(tmp_path):
    from fedsim.cli import format_summary

    sc = scenario(selection={"name": "deadline-aware", "estimate": "exact"})
    s = run(sc).summary
    text = format_summary(s, tmp_path)
    sel = s["selection"]
    assert (f"selection        deadline-aware: expected {sel['expected_s']['p50']:.3f} s, "
            f"actual {sel['actual_s']['p50']:.3f} s per update (p50)") in text
    line = next(x for x in text.splitlines() if x.startswith("energy "))
    assert "mobile " in line and "laptop " in line and " J" in line
    assert "selection" not in format_summary(run(scenario()).summary, tmp_path)  # uniform

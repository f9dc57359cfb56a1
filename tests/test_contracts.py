"""Behavioural contracts of the plug-in families, parametrized over every registry entry (the
config round trips are in test_plugins.py; codecs, aggregators, partitioners and projectors
have theirs in their own modules' tests)."""

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.attacks import attack
from fedsim.channels import DOWNLINK, UPLINK, make_channel
from fedsim.devices import build_fleet
from fedsim.engine import Simulation
from fedsim.executors import make_executor
from fedsim.plugins import ATTACKS, CHANNELS, EXECUTORS, ROUND_POLICIES


def _trace(tmp_path: Path) -> str:
    path = tmp_path / "trace.csv"
    path.write_text("time_s,uplink_bps,downlink_bps\n0,2e6,8e6\n1.5,5e5,4e6\n")
    return str(path)


def _channel_doc(name: str, tmp_path: Path) -> dict:
    return {"name": name, **({"trace_path": _trace(tmp_path)} if name == "trace" else {})}


@pytest.mark.parametrize("name", CHANNELS.names())
def test_every_channel_shares_a_cell_and_estimates_consistently(name, scenario_factory,
                                                                tmp_path):
    """Rates are finite and >= 0, one per flow; more flows never raise the cell's total much
    beyond one flow's (shared, not multiplied); the scalar estimate equals the vectorized rate
    of the same flow among the same number of flows; the next change is in the future."""
    sc = scenario_factory(clients=[{"profile": "mobile", "count": 6,
                                    "overrides": {"mean_off_s": 0.0}}],
                          network__channel=_channel_doc(name, tmp_path))
    fleet = build_fleet(sc, np.random.default_rng(0))
    ch = make_channel(sc.network.channel, sc.network.cells, fleet, np.random.default_rng(1))
    clients = np.arange(6)
    for direction in (UPLINK, DOWNLINK):
        for t in (0.0, 2.0):
            rates = ch.rates_bps(0, direction, clients, t)
            assert rates.shape == (6,) and np.all(np.isfinite(rates)) and np.all(rates >= 0)
            state = ch.flow_state_one(direction, 3, t)
            assert ch.rate_among(0, direction, state, 6) == pytest.approx(
                ch.shared_rates(0, direction, np.full(6, state))[-1], rel=1e-12)
            alone = ch.rates_bps(0, direction, clients[3:4], t)[0]
            assert ch.estimate_rate_bps(3, direction, t, 0) == pytest.approx(alone, rel=1e-12)
        assert ch.next_change_s(0.0) > 0.0


def _policy_scenario(name: str, scenario_factory):
    policy = {"name": name, **({"deadline_s": 500.0} if name == "deadline" else {}),
              **({"buffer_size": 2, "concurrency": 3} if name == "async" else {})}
    return scenario_factory(rounds=3, round_policy=policy,
                            clients=[{"profile": "laptop", "count": 5,
                                      "overrides": {"mean_off_s": 0.0}}])


@pytest.mark.parametrize("name", ROUND_POLICIES.names())
def test_every_round_policy_closes_its_rounds_deterministically(name, scenario_factory):
    """Every round closes with at least one aggregated update, rounds follow each other in
    simulated time, and the same scenario gives the same rows again."""
    sc = _policy_scenario(name, scenario_factory)
    a, b = Simulation(sc).run(), Simulation(sc).run()
    rows = a.recorder.rounds
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["aggregated"] >= 1 for r in rows)
    assert all(r0["end_s"] <= r1["end_s"] for r0, r1 in itertools.pairwise(rows))
    assert rows == b.recorder.rounds
    assert a.summary["rounds_completed"] == 3


class _Square:
    """A picklable job (a RemoteJob): its result is a pure function of its input."""

    def __init__(self, x: int) -> None:
        self.x = x

    def run(self, cache) -> int:
        return self.x * self.x


@pytest.mark.parametrize("name", [n for n in EXECUTORS.names() if n != "ray"])
def test_every_executor_returns_what_the_job_computes(name):
    """(ray has its own test in test_executors.py: starting Ray costs ~20 s.)"""
    ex = make_executor(EXECUTORS.parse({"name": name}))
    try:
        jobs = [ex.submit(_Square(i)) for i in range(4)]
        assert [j.result() for j in jobs] == [0, 1, 4, 9]
    finally:
        ex.close()


DELTA = {"w": torch.tensor([[1.0, -2.0], [0.5, 3.0]]), "b": torch.tensor([3.0, -4.0])}


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_attack_changes_the_update_reproducibly(name):
    """Same keys and shapes, a different update, the same one for the same generator state."""
    a = attack(name, DELTA, 5.0, np.random.default_rng(7))
    b = attack(name, DELTA, 5.0, np.random.default_rng(7))
    assert a.keys() == DELTA.keys()
    for k, v in DELTA.items():
        assert a[k].shape == v.shape and torch.equal(a[k], b[k])
        assert not torch.equal(a[k], v)

"""Malicious client groups and the quarantine of over-large updates, on tiny models."""

import csv
import io

import numpy as np
import pytest
import torch

from fedsim.aggregators import global_norm
from fedsim.attacks import ATTACKS, attack
from fedsim.engine import Simulation
from fedsim.scenario import validate

DELTA = {"a": torch.tensor([[1.0, -2.0], [0.5, 0.0]]), "b": torch.tensor([3.0, 4.0])}


def test_scale_and_sign_flip_are_exact():
    rng = np.random.default_rng(0)
    up = attack("scale", DELTA, 10.0, rng)
    flipped = attack("sign-flip", DELTA, 10.0, rng)
    for k, v in DELTA.items():
        assert torch.equal(up[k], v * 10)
        assert torch.equal(flipped[k], v * -10)


def test_random_has_factor_times_the_honest_norm_per_tensor_and_is_seeded():
    a = attack("random", DELTA, 3.0, np.random.default_rng(1))
    b = attack("random", DELTA, 3.0, np.random.default_rng(1))
    c = attack("random", DELTA, 3.0, np.random.default_rng(2))
    for k, v in DELTA.items():
        assert float(a[k].norm()) == pytest.approx(3.0 * float(v.norm()), rel=1e-5)
        assert torch.equal(a[k], b[k])
        assert not torch.equal(a[k], c[k])
    assert set(ATTACKS) == {"scale", "sign-flip", "random"}


def scenario(attack=None, aggregation=None, rounds=1):
    groups = [{"profile": "cloud", "count": 5, "model": "tiny-bert"},
              {"profile": "cloud", "count": 1, "model": "tiny-bert", "attack": attack}]
    return validate({
        "name": "tiny-poison", "seed": 5, "rounds": rounds, "workload": {"name": "real"},
        "clients": groups, "server": {"model": None},
        "task": {"dataset": "bbc-news", "kind": "classification", "max_train_examples": 200,
                 "eval_examples": 20, "partition": {"name": "iid"}},
        "training": {"local_steps": 2, "batch_size": 8, "max_length": 32, "lr": 5e-3},
        "aggregation": aggregation or {"name": "fedavg"},
    })


def family_step(sim):
    """Run one round; the change of the family adapter."""
    fam = sim.workload.families["tiny-bert"]
    before = {k: v.clone() for k, v in fam.adapter.items()}
    res = sim.run()
    return res, {k: fam.adapter[k] - before[k] for k in before}


def test_a_malicious_client_sends_its_attacked_update():
    """Client 5 (the attacker group) of the same seed sends 10x its honest delta: the family's
    fedavg step is more than twice the clean one."""
    _, honest = family_step(Simulation(scenario()))
    _, boosted = family_step(Simulation(scenario({"kind": "scale", "factor": 10})))
    assert global_norm(boosted) > 2 * global_norm(honest)


def events(res):
    return list(csv.DictReader(io.StringIO(res.recorder.events_csv())))


def test_over_large_updates_are_quarantined_and_never_aggregated():
    """max_update_norm between the honest and the 100x update norms: the attacker's update is
    rejected at ingest (an event that says why), the honest ones are aggregated."""
    sim = Simulation(scenario({"kind": "scale", "factor": 100},
                              {"name": "fedavg", "max_update_norm": 5.0}))
    wl = sim.workload
    honest_norms = []
    for c in range(5):
        wl.download_bytes(c)
        honest_norms.append(global_norm(wl.train(c, 0, wl.plan(c, 0)).delta))
    assert max(honest_norms) * 100 > 5.0 > max(honest_norms)  # the limit separates them
    sim = Simulation(scenario({"kind": "scale", "factor": 100},
                              {"name": "fedavg", "max_update_norm": 5.0}))
    res = sim.run()
    rejected = [e for e in events(res) if e["kind"] == "rejected"]
    assert [e["client"] for e in rejected] == ["5"]
    assert "max_update_norm" in rejected[0]["detail"]
    assert res.summary["overload"]["rejected_updates"] == 1
    assert res.summary["counts"]["updates_accepted"] == 5


def test_median_holds_off_a_sign_flipping_minority_that_moves_the_mean():
    """5 honest + 1 sign-flip x10: fedavg's step points against its clean step; the median's
    stays with the clean median's (the median of 6 is the mean of the 2 middle values)."""
    _, clean = family_step(Simulation(scenario(None, {"name": "fedavg"})))
    _, clean_median = family_step(Simulation(scenario(None, {"name": "median"})))
    flip = {"kind": "sign-flip", "factor": 10}
    _, mean_step = family_step(Simulation(scenario(flip, {"name": "fedavg"})))
    _, median_step = family_step(Simulation(scenario(flip, {"name": "median"})))

    def cosine(x, y):
        num = sum(float((x[k] * y[k]).sum()) for k in x)
        return num / (global_norm(x) * global_norm(y))

    assert cosine(mean_step, clean) < 0
    assert cosine(median_step, clean_median) > 0.5, cosine(median_step, clean_median)
    assert global_norm(median_step) < 2 * global_norm(clean_median) < global_norm(mean_step)

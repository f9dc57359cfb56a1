"""The real workload inside the engine: tiny models end to end, and the quickstart itself."""

import csv
import json
import subprocess
import sys

import pytest

from fedsim.engine import Simulation
from fedsim.scenario import validate

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def tiny_scenario(**changes):
    doc = {
        "name": "tiny-real", "seed": 3, "rounds": 2,
        "workload": {"name": "real"},
        "clients": [
            {"profile": "mobile", "count": 2, "model": "tiny-bert", "overrides": {"mean_off_s": 0}},
            {"profile": "cloud", "count": 2, "model": "tiny-bert"},
        ],
        "network": {"channel": {"name": "static"}, "cells": [{}]},
        "task": {"dataset": "bbc-news", "kind": "classification", "max_train_examples": 200,
                 "eval_examples": 40, "partition": {"name": "iid"}},
        "training": {"local_steps": 3, "batch_size": 8, "max_length": 32, "lr": 5e-3},
    }
    doc.update(changes)
    return validate(doc)


def test_tiny_real_run_end_to_end(tmp_path):
    from fedsim.metrics import write_run_dir

    sim = Simulation(tiny_scenario())
    res = sim.run()
    s = res.summary
    assert s["rounds_completed"] == 2
    assert s["quality"]["metric"] == "accuracy"
    assert len(s["quality"]["server_by_round"]) == 2
    assert all(0.0 <= v <= 1.0 for v in s["quality"]["server_by_round"])
    assert set(s["quality"]["clients_final"]) == {0, 1, 2, 3}
    # codec none: fp32 plus the payload's framing (names, shapes, CRC), so slightly below 1
    assert s["comm"]["bytes_up"] > 0 and 0.9 < s["comm"]["compression_ratio"] < 1.0
    out = write_run_dir(res, tmp_path / "run")
    rows = list(csv.DictReader((out / "events.csv").open()))
    # compute time on the simulated clock = FLOPs of the job / the device's FLOP/s
    fleet = sim.fleet
    starts = {(r["round"], r["client"]): (float(r["time_s"]), float(r["detail"].split("=")[1]))
              for r in rows if r["kind"] == "train_start"}
    ends = {(r["round"], r["client"]): float(r["time_s"]) for r in rows if r["kind"] == "train_end"}
    assert starts and starts.keys() == ends.keys()
    for (rnd, c), (t0, flops) in starts.items():
        want = flops / fleet.flops_per_s[int(c)]
        assert ends[(rnd, c)] - t0 == pytest.approx(want, rel=1e-3)
    # the upload carries the real encoded payload: its length in bytes
    enc = [r for r in rows if r["kind"] == "encode"]
    assert enc and all(int(r["bytes"]) > 0 for r in enc)


def test_device_too_small_fails_with_oom():
    sc = tiny_scenario(clients=[
        {"profile": "mobile", "count": 2, "model": "tiny-bert",
         "overrides": {"mean_off_s": 0, "memory_gib": 1e-4}},  # 100 KiB: no model fits
        {"profile": "cloud", "count": 1, "model": "tiny-bert"},
    ], rounds=1)
    s = Simulation(sc).run().summary
    assert s["overload"]["oom_failures"] == 2
    assert s["counts"]["updates_accepted"] == 1


def test_same_seed_same_summary_and_events(tmp_path):
    from fedsim.metrics import write_run_dir

    outs = []
    for i in range(2):
        res = Simulation(tiny_scenario(rounds=1)).run()
        d = write_run_dir(res, tmp_path / f"r{i}")
        s = json.loads((d / "summary.json").read_text())
        s.pop("wall_time_s")
        outs.append(((d / "events.csv").read_bytes(), s))
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_quickstart_one_round_real_models(tmp_path):
    """The README's scenario with the real packaged minilm-l6, one round, end to end."""
    out = tmp_path / "qs"
    r = subprocess.run([sys.executable, "-m", "fedsim", "run", ROOT / "scenarios/quickstart.yaml",
                        "--set", "rounds=1", "--out", out], capture_output=True, text=True,
                       timeout=900, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["rounds_completed"] == 1
    assert s["counts"]["updates_accepted"] > 0
    assert 0 < s["quality"]["server_by_round"][0] <= 1

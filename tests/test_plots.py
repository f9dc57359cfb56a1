"""Figures: every run figure is a real PNG, its data agree with summary.json, sweep figures."""

import csv
import subprocess
import sys

import numpy as np
import pytest
from doubles import FixedWorkload

from fedsim.engine import Simulation, run
from fedsim.errors import FedsimError
from fedsim.metrics import write_run_dir
from fedsim.plots import (
    RUN_FIGURES,
    accuracy_vs_time,
    bytes_vs_accuracy,
    latency_breakdown,
    phase_durations,
    plot_run,
    plot_sweep,
    server_queue,
    sweep_metric,
    sweep_series,
    utilization_series,
)
from fedsim.scenario import load
from fedsim.sweep import run_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCENARIO = """\
name: tiny-plots
seed: 2
rounds: 3
workload: {name: synthetic, update_bytes: 200000, download_bytes: 100000, flops_per_step: 1.0e10}
clients:
  - {profile: mobile, count: 12, spread: {flops_per_s: 0.5}}
  - {profile: laptop, count: 6}
  - {profile: cloud, count: 3}
network:
  channel: {name: pathloss}
  cells: [{uplink_bandwidth_hz: 5.0e6}, {uplink_bandwidth_hz: 5.0e6}]
server: {workers: 1, flops_per_s: 1.0e12}
"""


def fedsim(*args):
    return subprocess.run([sys.executable, "-m", "fedsim", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def assert_png(path, min_bytes=5000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes
    assert path.parent.name == "plots"


@pytest.fixture(scope="module")
def scenario_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("plots") / "s.yaml"
    p.write_text(SCENARIO)
    return p


@pytest.fixture(scope="module")
def run_dir(scenario_path):
    """A run whose workload reports a server quality metric (accuracy) after every round."""
    sc = load(scenario_path)
    sim = Simulation(sc)
    sim.workload = FixedWorkload(sc, sim.fleet, download_bytes=100_000, upload_bytes=300_000,
                                 flops=2e11, server_flops=5e10)
    return write_run_dir(sim.run(), scenario_path.parent / "run")


@pytest.mark.parametrize("figure", RUN_FIGURES, ids=lambda f: f.__name__)
def test_every_run_figure_is_a_png(run_dir, figure):
    path = figure(run_dir)
    assert path == run_dir / "plots" / f"{figure.__name__}.png"
    assert_png(path)


def test_plot_run_writes_them_all(run_dir):
    paths = plot_run(run_dir)
    assert [p.stem for p in paths] == [f.__name__ for f in RUN_FIGURES]


def test_phase_durations_match_the_summary(run_dir):
    """Pairing start/end events per (round, client) gives the engine's own phase latencies."""
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    durations = phase_durations(run_dir)
    for phase, d in durations.items():
        expected = summary["latency_s"][phase]
        assert len(d) == expected["count"], phase
        p50, p95 = np.percentile(d, [50, 95])
        assert p50 == pytest.approx(expected["p50"], abs=1e-6), phase
        assert p95 == pytest.approx(expected["p95"], abs=1e-6), phase


def test_utilization_series_averages_to_the_summary(run_dir):
    import json

    util = json.loads((run_dir / "summary.json").read_text())["utilization"]
    u = utilization_series(run_dir, bins=37)
    assert len(u["time_s"]) == 37
    assert u["uplink_busy"].mean() == pytest.approx(util["uplink"], abs=1e-6)
    assert u["downlink_busy"].mean() == pytest.approx(util["downlink"], abs=1e-6)
    for profile in ("mobile", "laptop", "cloud"):
        assert u[f"compute.{profile}"].mean() == pytest.approx(util["compute"][profile], abs=1e-6)
    assert all(v.min() >= 0 and v.max() <= 1 + 1e-9 for k, v in u.items()
               if k.endswith("_busy") or k.startswith("compute."))


def test_no_quality_metric_no_quality_figures(scenario_path, tmp_path):
    d = write_run_dir(run(load(scenario_path)), tmp_path / "synthetic")
    assert bytes_vs_accuracy(d) is None and accuracy_vs_time(d) is None
    assert [p.stem for p in plot_run(d)] == [
        "latency_breakdown", "latency_cdf", "utilization_over_time", "server_queue", "energy"]


def test_without_events_only_the_queue_and_energy_figures(scenario_path, tmp_path):
    d = write_run_dir(run(load(scenario_path, ["output.events=false"])), tmp_path / "no-events")
    assert latency_breakdown(d) is None
    assert_png(server_queue(d))
    # the energy figure reads summary.json and rounds.csv, which events=false keeps
    assert [p.stem for p in plot_run(d)] == ["server_queue", "energy"]


@pytest.fixture(scope="module")
def sweep_dir(scenario_path):
    out = scenario_path.parent / "sweep"
    rows = run_sweep(scenario_path, {"network.cells.0.uplink_bandwidth_hz": ["2e6", "2e7"],
                                     "server.workers": [1, 2]}, seeds=2, out=out, progress=False)
    assert all(r["status"] == "ok" for r in rows)
    return out


def test_fedsim_plot_on_a_sweep_dir(sweep_dir):
    r = fedsim("plot", sweep_dir)
    assert r.returncode == 0, r.stderr
    written = sorted(p.name for p in (sweep_dir / "plots").glob("*.png"))
    assert written == sorted([
        "latency_s.round.p95_vs_network.cells.0.uplink_bandwidth_hz_by_server.workers.png",
        "overload.deadline_misses_vs_network.cells.0.uplink_bandwidth_hz_by_server.workers.png",
        "utilization.uplink_vs_network.cells.0.uplink_bandwidth_hz_by_server.workers.png"])
    for name in written:
        assert_png(sweep_dir / "plots" / name)
        assert name in r.stdout


def test_sweep_quality_figure_when_the_sweep_has_one(sweep_dir, tmp_path):
    with open(sweep_dir / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        row["quality.final"] = 0.5 + 0.01 * i
    d = tmp_path / "with-quality"
    d.mkdir()
    with open(d / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    paths = plot_sweep(d)
    assert len(paths) == 4 and paths[-1].name.startswith("quality.final_vs_")
    assert_png(paths[-1])
    # Lines by nothing: one series of means against a key.
    assert_png(sweep_metric(d, "comm.bytes_up", "server.workers"))
    with pytest.raises(FedsimError, match="not a column"):
        sweep_metric(d, "no.such.metric", "server.workers")


def test_sweep_error_bars_are_the_t_interval_over_seeds(sweep_dir):
    """Each point of a sweep figure: the mean of its seeds and t(0.975, n-1)·std/√n."""
    bw = "network.cells.0.uplink_bandwidth_hz"
    with open(sweep_dir / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    series = sweep_series(sweep_dir, "latency_s.round.p95", bw, "server.workers")
    assert sorted(series) == ["1", "2"] and all(sorted(g) == ["2e6", "2e7"]
                                                for g in series.values())
    for workers, by_x in series.items():
        for x, iv in by_x.items():
            vals = [float(r["latency_s.round.p95"]) for r in rows
                    if r[bw] == x and r["server.workers"] == workers]
            assert len(vals) == iv.n == 2
            mean, std = sum(vals) / 2, abs(vals[0] - vals[1]) / 2**0.5
            assert iv.mean == pytest.approx(mean)
            assert iv.half_width == pytest.approx(12.7062 * std / 2**0.5, rel=1e-4, abs=1e-12)


def test_a_sweep_of_seeds_alone_plots_against_the_seed(scenario_path, tmp_path):
    """``fedsim run --seeds`` writes a sweep over seeds alone: x is the seed, one run each."""
    out = tmp_path / "seeds"
    run_sweep(scenario_path, {}, seeds=3, out=out, progress=False)
    paths = plot_sweep(out)
    assert [p.name for p in paths] == [
        "latency_s.round.p95_vs_seed.png", "overload.deadline_misses_vs_seed.png",
        "utilization.uplink_vs_seed.png"]
    for p in paths:
        assert_png(p)
    by_seed = sweep_series(out, "utilization.uplink", "seed")[""]
    assert sorted(by_seed) == ["0", "1", "2"] and {iv.n for iv in by_seed.values()} == {1}


@pytest.mark.parametrize("make", ["empty", "missing"])
def test_fedsim_plot_on_a_non_run_dir_exits_2(tmp_path, make):
    d = tmp_path / "nothing"
    if make == "empty":
        d.mkdir()
    r = fedsim("plot", d)
    assert r.returncode == 2
    assert "neither a run directory" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr

"""Sweeps: grid x zip x seeds expansion, one run directory per point, resume, failures, workers."""

import csv
import shutil
import subprocess
import sys

import pytest

import fedsim.sweep as sweep_mod
from fedsim.errors import FedsimError
from fedsim.sweep import (
    MAX_NAME_CHARS,
    expand_points,
    flatten_summary,
    parse_assignments,
    point_name,
    run_sweep,
)

SCENARIO = """\
name: tiny-sweep
seed: 5
rounds: 2
workload: {name: synthetic, update_bytes: 50000, download_bytes: 50000, flops_per_step: 1.0e9}
clients:
  - {profile: mobile, count: 4}
  - {profile: laptop, count: 3}
network:
  channel: {name: pathloss}
"""
BW = "network.cells.0.uplink_bandwidth_hz"
GRID = {BW: ["5e6", "2e7"], "clients.0.count": [4, 8]}


@pytest.fixture
def scenario(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(SCENARIO)
    return p


@pytest.fixture
def counted(monkeypatch):
    """Count the points actually run (workers=1 runs them in this process)."""
    ran = []
    real = sweep_mod.run_point

    def run_point(path, overrides, run_dir):
        ran.append(run_dir.rsplit("/", 1)[-1])
        return real(path, overrides, run_dir)

    monkeypatch.setattr(sweep_mod, "run_point", run_point)
    return ran


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def strip_wall(rows):
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rows]


def fedsim(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fedsim", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


# --- expansion --------------------------------------------------------------------------------


def test_expand_grid_times_seeds_in_a_fixed_order():
    pts = expand_points(GRID, seeds=2)
    assert len(pts) == 8
    assert [p.overrides for p in pts[:3]] == [
        [f"{BW}=5e6", "clients.0.count=4", "seed=0"],
        [f"{BW}=5e6", "clients.0.count=4", "seed=1"],
        [f"{BW}=5e6", "clients.0.count=8", "seed=0"]]
    assert pts[0].name == f"{BW}=5e6__clients.0.count=4__seed=0"
    assert len({p.name for p in pts}) == 8


def test_expand_zip_varies_together_and_keeps_the_scenario_seed():
    pts = expand_points({"server.workers": [1, 2]},
                        {BW: ["5e6", "2e7", "4e7"],
                         "network.cells.0.sharing": ["ofdma", "tdma", "ofdma"]}, base_seed=7)
    assert len(pts) == 6
    assert dict(pts[1].values) == {"server.workers": "1", BW: "2e7",
                                   "network.cells.0.sharing": "tdma", "seed": "7"}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"grid": {"a": [1]}, "zip_": {"b": [1, 2], "c": [1]}}, "same number of values"),
    ({"grid": {"seed": [1, 2]}, "seeds": 2}, "give one of them"),
    ({"grid": {"a": [1, 1]}}, "value given twice"),
    ({"grid": {}, "zip_": {"a": [1, 1], "b": [2, 2]}}, "combination of values given twice"),
    ({"grid": {"a": []}}, "no values"),
    ({"grid": {"a": [1]}, "zip_": {"a": [2]}}, "in both --grid and --zip"),
    ({"grid": {"a": [1]}, "seeds": 0}, "--seeds must be >= 1"),
])
def test_expand_rejects_bad_sweeps(kwargs, message):
    with pytest.raises(FedsimError, match=message):
        expand_points(**kwargs)


def test_point_names_are_safe_and_bounded():
    assert point_name([("a.b", "1e6"), ("seed", "0")]) == "a.b=1e6__seed=0"
    odd = point_name([("training.lora.target_roles", "[q, v]")])
    assert "/" not in odd and " " not in odd and "[" not in odd
    assert odd != point_name([("training.lora.target_roles", "[q,_v]")])  # hash tells them apart
    long = point_name([(f"k{i}.{'x' * 20}", str(i)) for i in range(20)])
    assert len(long) <= MAX_NAME_CHARS


def test_parse_assignments_keeps_brackets_together():
    assert parse_assignments(["a.b=1,2", "c=[1,2],[3]"], "--grid") == {
        "a.b": ["1", "2"], "c": ["[1,2]", "[3]"]}
    for bad in (["nokey"], ["=1,2"], ["a=1,,2"], ["a=1", "a=2"]):
        with pytest.raises(FedsimError):
            parse_assignments(bad, "--grid")


def test_flatten_summary_dotted_numeric_and_final_quality():
    flat = flatten_summary({"scenario": "x", "seed": 1, "sim_time_s": 3.0,
                            "latency_s": {"round": {"p95": 2.0, "count": 3}},
                            "utilization": {"compute": {"mobile": 0.5}},
                            "quality": {"metric": "accuracy", "server_by_round": [0.1, None, 0.3],
                                        "clients_final": {"0": {"accuracy": 1.0}}}})
    assert flat == {"sim_time_s": 3.0, "latency_s.round.p95": 2.0, "latency_s.round.count": 3,
                    "utilization.compute.mobile": 0.5, "quality.final": 0.3}


# --- running ----------------------------------------------------------------------------------


def test_grid_runs_every_point_then_resumes(scenario, tmp_path, counted):
    out = tmp_path / "sweep"
    rows = run_sweep(scenario, GRID, seeds=2, out=out, progress=False)
    assert len(counted) == 8
    run_dirs = sorted(p for p in out.iterdir() if (p / "summary.json").is_file())
    assert len(run_dirs) == 8
    table = read_csv(out / "sweep.csv")
    assert len(table) == 8 and all(r["status"] == "ok" for r in table)
    for col in (BW, "clients.0.count", "seed", "run", "error", "latency_s.round.p95",
                "overload.deadline_misses", "utilization.uplink", "comm.bytes_up"):
        assert col in table[0]
    assert {(r[BW], r["clients.0.count"], r["seed"]) for r in table} == {
        (b, c, s) for b in ("5e6", "2e7") for c in ("4", "8") for s in ("0", "1")}
    assert [r["run"] for r in rows] == [r["run"] for r in table]
    assert float(table[0]["comm.bytes_up"]) > 0
    mtimes = {p.name: (p / "summary.json").stat().st_mtime_ns for p in run_dirs}

    # Rerunning skips every finished point and rebuilds the same rows.
    counted.clear()
    again = run_sweep(scenario, GRID, seeds=2, out=out, progress=False)
    assert counted == []
    assert again == rows
    assert {p.name: (p / "summary.json").stat().st_mtime_ns for p in run_dirs} == mtimes

    # A deleted run directory, and an interrupted write (a temp sibling only), rerun alone.
    victim = run_dirs[3].name
    shutil.rmtree(run_dirs[3])
    leftover = out / f".{victim}.tmp-abc123"
    (leftover / "plots").mkdir(parents=True)
    run_sweep(scenario, GRID, seeds=2, out=out, progress=False)
    assert counted == [victim]
    assert not leftover.exists()
    rerun = read_csv(out / "sweep.csv")
    assert [r["run"] for r in rerun] == [r["run"] for r in table]
    assert strip_wall(rerun) == strip_wall(table)  # the rerun point reproduces its numbers


def test_changed_scenario_reruns_its_points(scenario, tmp_path, counted):
    out = tmp_path / "sweep"
    run_sweep(scenario, {BW: ["5e6", "2e7"]}, out=out, progress=False)
    scenario.write_text(SCENARIO.replace("rounds: 2", "rounds: 1"))
    counted.clear()
    rows = run_sweep(scenario, {BW: ["5e6", "2e7"]}, out=out, progress=False)
    assert len(counted) == 2
    assert all(r["rounds_completed"] == 1 for r in rows)


def test_a_point_that_fails_to_run_is_a_failed_row_the_others_complete(scenario, tmp_path):
    """A trace file that exists (so the point validates) but is not a trace fails at run."""
    (tmp_path / "bad.csv").write_text("time_s,uplink_bps\n0,1e6\n")
    out, key = tmp_path / "sweep", "network.channel.name"
    r = fedsim("sweep", scenario, "--grid", f"{key}=trace,pathloss", "--seeds", "2",
               "--out", out, cwd=tmp_path)
    assert r.returncode == 2, r.stderr  # trace needs its file: refused before running
    assert "network.channel.trace_path: Field required" in r.stderr
    assert not out.exists()
    grid = "network.channel={name: trace, trace_path: bad.csv},{name: pathloss}"
    r = fedsim("sweep", scenario, "--grid", grid, "--seeds", "2", "--out", out, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert "2 of 4 points ok, 2 failed" in r.stdout
    table = read_csv(out / "sweep.csv")
    assert [t["status"] for t in table] == ["failed", "failed", "ok", "ok"]
    assert "needs columns" in table[0]["error"] and table[2]["error"] == ""
    assert table[0]["latency_s.round.p95"] == "" and float(table[2]["latency_s.round.p95"]) > 0
    assert len(list((out / "failed").iterdir())) == 2


def test_invalid_points_are_refused_before_any_runs(scenario, tmp_path):
    out = tmp_path / "sweep"
    r = fedsim("sweep", scenario, "--grid", f"{BW}=-1,2e7", "--grid",
               "compression.codec=none,zstd-magic", "--out", out)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    assert f"{BW}: Input should be greater than 0" in r.stderr
    assert "compression.codec: unknown codec 'zstd-magic'" in r.stderr
    assert not out.exists()


@pytest.mark.parametrize(("args", "expected"), [
    (["--grid", "clients.0.wings=1,2"], "clients.0.wings: no such key"),
    (["--grid", "clients.5.count=1,2"], "index 5 out of range"),
    (["--zip", f"{BW}=1e6,2e6", "--zip", "seed=1,2,3"], "same number of values"),
    (["--grid", "clients.0.count"], "expected key=v1,v2"),
    ([], "nothing to sweep"),
])
def test_bad_sweep_input_exits_2_before_running(scenario, tmp_path, args, expected):
    out = tmp_path / "sweep"
    r = fedsim("sweep", scenario, *args, "--out", out)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert expected in r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert not out.exists()


def test_results_do_not_depend_on_the_worker_count(scenario, tmp_path):
    one = run_sweep(scenario, GRID, seeds=2, workers=1, out=tmp_path / "w1", progress=False)
    two = run_sweep(scenario, GRID, seeds=2, workers=2, out=tmp_path / "w2", progress=False)

    assert strip_wall(one) == strip_wall(two)
    assert all(r["status"] == "ok" for r in two)
    csv1, csv2 = read_csv(tmp_path / "w1" / "sweep.csv"), read_csv(tmp_path / "w2" / "sweep.csv")
    assert strip_wall(csv1) == strip_wall(csv2)
    ev = f"{BW}=5e6__clients.0.count=8__seed=1/events.csv"
    assert (tmp_path / "w1" / ev).read_text() == (tmp_path / "w2" / ev).read_text()


@pytest.mark.slow
def test_a_ray_scenario_runs_its_points_as_ray_tasks(scenario, tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    local = run_sweep(scenario, GRID, workers=1, out=tmp_path / "local", progress=False)
    scenario.write_text(SCENARIO + "executor: {name: ray}\n")
    on_ray = run_sweep(scenario, GRID, workers=2, out=tmp_path / "ray", progress=False)
    assert all(r["status"] == "ok" for r in on_ray) and len(on_ray) == 4
    assert strip_wall(on_ray) == strip_wall(local)
    ev = f"{BW}=5e6__clients.0.count=8__seed=5/events.csv"
    assert (tmp_path / "ray" / ev).read_text() == (tmp_path / "local" / ev).read_text()
    # Resumable on Ray as well: nothing left to run, nothing rewritten.
    summaries = sorted((tmp_path / "ray").glob("*/summary.json"))
    stamps = [p.stat().st_mtime_ns for p in summaries]
    again = run_sweep(scenario, GRID, workers=2, out=tmp_path / "ray", progress=False)
    assert again == on_ray
    assert [p.stat().st_mtime_ns for p in summaries] == stamps


# --- fixed overrides (--set) ------------------------------------------------------------------


def test_set_applies_to_every_point_is_recorded_and_a_changed_set_reruns(scenario, tmp_path,
                                                                         counted):
    import json

    out = tmp_path / "sweep"
    rows = run_sweep(scenario, {BW: ["5e6", "2e7"]}, seeds=2, out=out, progress=False,
                     overrides=["rounds=1", "clients.1.count=1"])
    assert len(counted) == 4 and all(r["status"] == "ok" for r in rows)
    assert all(r["rounds_completed"] == 1 for r in rows)
    for r in rows:  # the name is the point's own values; the resolved scenario has the --set
        assert r["run"].startswith(f"{BW}=") and "rounds" not in r["run"]
        resolved = (out / r["run"] / "scenario.yaml").read_text()
        assert "rounds: 1\n" in resolved and "count: 1\n" in resolved
    assert json.loads((out / "sweep.json").read_text())["set"] == ["rounds=1",
                                                                   "clients.1.count=1"]
    # The same --set: nothing reruns. A different --set: no finished point is reused.
    counted.clear()
    run_sweep(scenario, {BW: ["5e6", "2e7"]}, seeds=2, out=out, progress=False,
              overrides=["rounds=1", "clients.1.count=1"])
    assert counted == []
    again = run_sweep(scenario, {BW: ["5e6", "2e7"]}, seeds=2, out=out, progress=False,
                      overrides=["clients.1.count=1"])
    assert len(counted) == 4
    assert all(r["rounds_completed"] == 2 for r in again)
    assert json.loads((out / "sweep.json").read_text())["set"] == ["clients.1.count=1"]


def test_set_comes_before_the_points_values(scenario, tmp_path):
    """A fixed plug-in switch makes the swept option valid at every point."""
    rows = run_sweep(scenario, {"aggregation.trim_ratio": [0.1, 0.2]}, out=tmp_path / "s",
                     progress=False, overrides=["aggregation.name=trimmed-mean"])
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert "trim_ratio: 0.2" in (tmp_path / "s" / rows[1]["run"] / "scenario.yaml").read_text()


@pytest.mark.parametrize(("args", "expected"), [
    (["--set", "clients.0.wings=1"], "clients.0.wings: no such key"),
    (["--set", f"{BW}=-1"], f"{BW}: Input should be greater than 0"),
    (["--set", "compression.codec=zstd-magic"], "compression.codec: unknown codec 'zstd-magic'"),
    (["--set", "clients.0.count=3"], "clients.0.count: given by --set and swept"),
    (["--set", "seed=3", "--seeds", "2"], "seed: given by --set and by --seeds"),
    (["--set", "compression.codec=qsgd", "--grid", "compression.bits=4,3"],
     "compression.bits=3"),  # valid alone, invalid at one point with the --set
])
def test_an_invalid_set_exits_2_before_anything_is_written(scenario, tmp_path, args, expected):
    out = tmp_path / "sweep"
    r = fedsim("sweep", scenario, *args, "--grid", "clients.0.count=1,2", "--out", out)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert expected in r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert not out.exists()


# --- intervals over seeds (sweep_summary.csv) --------------------------------------------------

T975_DF2 = 4.3027  # Student t(0.975, 2) from a printed table


def hand_interval(values):
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    return mean, std, mean - T975_DF2 * std / n**0.5, mean + T975_DF2 * std / n**0.5


def test_sweep_summary_has_one_row_per_grid_point_with_the_t_interval(scenario, tmp_path):
    out = tmp_path / "sweep"
    rows = run_sweep(scenario, {BW: ["5e6", "2e7"]}, seeds=3, out=out, progress=False)
    per_seed = read_csv(out / "sweep.csv")
    summary = read_csv(out / "sweep_summary.csv")
    assert len(per_seed) == 6 and len(summary) == 2
    assert list(summary[0])[:3] == [BW, "points", "failed"] and "seed" not in summary[0]
    for s in summary:
        assert (s["points"], s["failed"]) == ("3", "0")
        mine = [float(r["latency_s.round.p95"]) for r in per_seed if r[BW] == s[BW]]
        assert len(set(mine)) > 1  # the seeds differ here, so the interval has width
        mean, std, low, high = hand_interval(mine)
        assert float(s["latency_s.round.p95"]) == pytest.approx(mean, rel=1e-12)
        assert float(s["latency_s.round.p95.std"]) == pytest.approx(std, rel=1e-9)
        assert float(s["latency_s.round.p95.ci95_low"]) == pytest.approx(low, rel=1e-4)
        assert float(s["latency_s.round.p95.ci95_high"]) == pytest.approx(high, rel=1e-4)
        assert s["latency_s.round.p95.n"] == "3"
        # every seed completes both rounds: zero width, at the value
        assert [s[f"rounds_completed{x}"] for x in ("", ".std", ".ci95_low", ".ci95_high")] \
            == ["2.0", "0.0", "2.0", "2.0"]
    table = sweep_mod.format_table(rows, [BW])
    assert "±" in table and "mean ± 95% half-width" in table
    assert len([ln for ln in table.splitlines() if ln.startswith(("5e6", "2e7"))]) == 2


def test_one_seed_per_point_summary_is_the_value_with_nan_spread(scenario, tmp_path):
    out = tmp_path / "sweep"
    rows = run_sweep(scenario, {BW: ["5e6", "2e7"]}, out=out, progress=False)
    summary = read_csv(out / "sweep_summary.csv")
    per_point = read_csv(out / "sweep.csv")
    for s, r in zip(summary, per_point, strict=True):
        assert s["sim_time_s"] == r["sim_time_s"] and s["sim_time_s.n"] == "1"
        assert s["sim_time_s.std"] == s["sim_time_s.ci95_low"] == "nan"
    assert "±" not in sweep_mod.format_table(rows, [BW])


def test_a_failed_seed_is_counted_and_left_out_of_the_interval():
    rows = [{BW: "1", "seed": "0", "run": "a", "status": "ok", "m": 1.0},
            {BW: "1", "seed": "1", "run": "b", "status": "failed", "error": "boom"},
            {BW: "1", "seed": "2", "run": "c", "status": "ok", "m": 3.0}]
    (s,) = sweep_mod.summarize(rows, [BW, "seed"])
    assert (s["points"], s["failed"], s["m"], s["m.n"]) == (3, 1, 2.0, 2)
    assert "2/3" in sweep_mod.format_table(rows, [BW])

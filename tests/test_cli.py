"""The command line: exit codes, messages without tracebacks, the run directory."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The synthetic workload, made tiny: a multi-seed run in a few seconds.
NETWORK = ROOT / "scenarios" / "network-only.yaml"
TINY_NETWORK = ["--set", "rounds=1", "--set", "clients.0.count=20", "--set", "clients.1.count=8",
                "--set", "clients.2.count=2"]
T975_DF2 = 4.3027  # Student t(0.975, 2) from a printed table

GOOD = """\
name: tiny
rounds: 2
workload: {name: synthetic, update_bytes: 20000, download_bytes: 20000}
clients:
  - {profile: mobile, count: 4}
  - {profile: laptop, count: 2}
network:
  channel: {name: pathloss}
"""


def fedsim(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fedsim", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_validate_ok(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(GOOD)
    r = fedsim("validate", p)
    assert r.returncode == 0, r.stderr
    assert "valid" in r.stdout


@pytest.mark.parametrize(("text", "args", "expected"), [
    (GOOD + "bogus: 1\n", [], "bogus: unknown key"),
    (GOOD.replace("rounds: 2", "rounds: two"), [], "rounds: Input should be a valid integer"),
    (GOOD + "network:\n  cells: [{uplink_bandwidth_hz: -1}]\n", [],
     "network.cells.0.uplink_bandwidth_hz: Input should be greater than 0"),
    (GOOD.replace("count: 4", "count: 0"), [], "clients.0.count"),
    ("name: [oops\n", [], "malformed YAML"),
    (GOOD, ["--set", "clients.0.wings=2"], "clients.0.wings: no such key"),
    (GOOD, ["--set", "network.cells.0.sharing=cdma"], "network.cells.0.sharing"),
])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_input_exits_2_without_traceback(tmp_path, text, args, expected, command):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    out = ["--out", tmp_path / "out"] if command == "run" else []
    r = fedsim(command, p, *args, *out)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert expected in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "out").exists()


def test_missing_file_exits_2(tmp_path):
    r = fedsim("run", tmp_path / "absent.yaml")
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_run_writes_run_directory(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(GOOD)
    out = tmp_path / "run"
    r = fedsim("run", p, "--out", out, "--set", "seed=5")
    assert r.returncode == 0, r.stderr
    assert "latency (s)" in r.stdout and str(out) in r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["rounds_completed"] == 2 and s["seed"] == 5
    assert "seed: 5" in (out / "scenario.yaml").read_text()
    # the run's figures are drawn at the end, and named; --no-plots skips them
    drawn = sorted(f.name for f in (out / "plots").glob("*.png"))
    assert "latency_cdf.png" in drawn and "energy.png" in drawn
    assert f"plots in         {out / 'plots'}/" in r.stdout
    r = fedsim("run", p, "--out", tmp_path / "bare", "--no-plots")
    assert r.returncode == 0, r.stderr
    assert not list((tmp_path / "bare").glob("plots/*.png")) and "plots in" not in r.stdout


def test_the_summary_is_printed_before_the_figures_are_drawn(tmp_path, capsys, monkeypatch):
    """The figures take seconds: the user reads the summary meanwhile."""
    from fedsim import cli

    p = tmp_path / "s.yaml"
    p.write_text(GOOD)
    seen = []

    def plots(out):
        seen.append(capsys.readouterr().out)  # what was printed when drawing began
        return [out / "plots" / "x.png"]

    monkeypatch.setattr(cli, "_plots", plots)
    assert cli.main(["run", str(p), "--out", str(tmp_path / "run")]) == 0
    assert "latency (s)" in seen[0] and "plots in" not in seen[0]
    assert "plots in" in capsys.readouterr().out


def test_the_progress_bar_says_what_the_run_is_doing():
    import logging

    from fedsim.cli import status_on

    class Bar:
        def __init__(self):
            self.said = []

        def set_description_str(self, text):
            self.said.append(text)

    bar, log = Bar(), logging.getLogger("fedsim")
    level, handlers = log.level, list(log.handlers)
    with status_on(bar, "quickstart", quiet=False):
        log.info("loading %s (server %s)", "mpnet-base", "server")
    log.info("after the run: not shown")
    with status_on(bar, "quickstart", quiet=True):
        log.info("quiet: not shown")
    assert bar.said == ["quickstart: loading mpnet-base (server server)"]
    assert log.level == level and log.handlers == handlers


def test_the_bar_names_the_first_round_once_the_set_up_is_done(tmp_path, monkeypatch):
    """``fedsim run``'s bar: the engine says when the rounds begin, each round's close names
    the next one (here seen through a recording stand-in for tqdm)."""
    import fedsim.cli as cli

    said = []

    class Bar:
        n = 0

        def __init__(self, *args, **kwargs):
            pass

        def set_description_str(self, text):
            said.append(text)

        def update(self, k):
            self.n += k

        def close(self):
            pass

    monkeypatch.setattr("tqdm.tqdm", Bar)
    p = tmp_path / "s.yaml"
    p.write_text(GOOD)
    assert cli.main(["run", str(p), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    assert said == ["tiny: round 1 of 2", "tiny: round 2 of 2"]


def test_resume_without_a_checkpoint_exits_2(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(GOOD)
    r = fedsim("run", p, "--resume", tmp_path / "never-ran")
    assert r.returncode == 2, r.stderr
    assert "no checkpoint there" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "never-ran").exists()


def test_summary_names_the_faults_only_when_there_were_some(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(GOOD)
    r = fedsim("run", p, "--out", tmp_path / "calm")
    assert r.returncode == 0 and "faults " not in r.stdout
    p.write_text(GOOD + "faults: {client_crash_per_h: 3600000}\n")  # every update crashes
    r = fedsim("run", p, "--out", tmp_path / "stormy")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("faults "))
    summary = json.loads((tmp_path / "stormy" / "summary.json").read_text())
    assert f"crashes {summary['overload']['crashes']}" in line
    assert summary["overload"]["crashes"] == summary["counts"]["updates_started"] > 0


@pytest.mark.parametrize(("args", "expected"), [
    (["--set", "compression.codec=zstd-magic"], "compression.codec: unknown codec 'zstd-magic'"),
    (["--set", "aggregation.name=fedavgg"], "aggregation.name: unknown aggregator 'fedavgg'"),
    (["--set", "transfer.projector=lsq"], "transfer.projector.name: unknown projector 'lsq'"),
    (["--set", "aggregation.projector=lsq"], "transfer.projector.name: unknown projector 'lsq'"),
    (["--set", "task.dataset=imdb"], "task.dataset: unknown dataset 'imdb'"),
    (["--set", "task.partition.name=shards"], "task.partition.name: unknown partitioner"),
    (["--set", "clients.0.model=minilm-l7"], "clients.0.model: unknown model 'minilm-l7'"),
    (["--set", "server.model=mpnet"], "server.model: unknown model 'mpnet'"),
    (["--set", "network.channel.name=laser"], "network.channel.name: unknown channel 'laser'"),
    (["--set", "round_policy.name=fifo"], "round_policy.name: unknown round policy 'fifo'"),
    (["--set", "executor.name=spark"], "executor.name: unknown executor 'spark'"),
    (["--set", "workload.name=fake"], "workload.name: unknown workload 'fake'"),
    (["--set", "clients.0.attack={kind: flip}"], "clients.0.attack.kind: unknown attack 'flip'"),
    (["--set", "compression.codec=qsgd", "--set", "compression.rank=4"],
     "compression.rank: not an option of codec 'qsgd'; codecs that take it: lowrank"),
    (["--set", "aggregation.trim_ratio=0.2"],
     "aggregation.trim_ratio: not an option of aggregator 'fedavg'; aggregators that take it: "
     "trimmed-mean"),
    (["--set", "executor.workers=3"], "executor.workers: not an option of executor 'inline'"),
])
def test_validate_names_every_unknown_plugin_and_misplaced_option(tmp_path, capsys, args,
                                                                  expected):
    """The real workload (no `workload:` line): model names are checked too. In process (the
    CLI's exit code and message are main()'s; the subprocess tests above cover the rest)."""
    from fedsim.cli import main

    p = tmp_path / "s.yaml"
    p.write_text("name: real\nrounds: 1\nclients:\n  - {profile: laptop, count: 2}\n")
    assert main(["validate", str(p)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["validate", str(p), *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_validate_notes_a_hub_model(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: real\nrounds: 1\nclients:\n  - {profile: laptop, count: 2, "
                 "model: some-org/some-model}\n")
    r = fedsim("validate", p)
    assert r.returncode == 0, r.stderr
    assert "needs network access" in r.stdout


# --- repeated over seeds ----------------------------------------------------------------------


def test_run_seeds_gives_a_run_directory_per_seed_and_their_t_interval(tmp_path):
    out = tmp_path / "runs"
    r = fedsim("run", NETWORK, *TINY_NETWORK, "--seeds", 3, "--out", out)
    assert r.returncode == 0, r.stderr
    dirs = sorted(p.name for p in out.iterdir() if (p / "summary.json").is_file())
    assert dirs == ["seed=0", "seed=1", "seed=2"]
    summaries = [json.loads((out / d / "summary.json").read_text()) for d in dirs]
    assert [s["seed"] for s in summaries] == [0, 1, 2]
    with open(out / "sweep_summary.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["points"], row["failed"]) == ("3", "0")

    # The interval by hand over the per-seed values of each run directory's summary.json.
    p95 = [s["latency_s"]["round"]["p95"] for s in summaries]
    assert len(set(p95)) == 3  # the seeds differ
    mean = sum(p95) / 3
    std = (sum((v - mean) ** 2 for v in p95) / 2) ** 0.5
    half = T975_DF2 * std / 3**0.5
    assert float(row["latency_s.round.p95"]) == pytest.approx(mean, rel=1e-12)
    assert float(row["latency_s.round.p95.std"]) == pytest.approx(std, rel=1e-9)
    assert float(row["latency_s.round.p95.ci95_low"]) == pytest.approx(mean - half, rel=1e-4)
    assert float(row["latency_s.round.p95.ci95_high"]) == pytest.approx(mean + half, rel=1e-4)
    # Every seed completes its one round: zero width, at the value.
    assert [row[f"rounds_completed{x}"] for x in ("", ".std", ".ci95_low", ".ci95_high", ".n")] \
        == ["1.0", "0.0", "1.0", "1.0", "3"]

    # The one-screen summary says mean ± half-width and n.
    assert "mean ± 95% half-width (Student t, n=3)" in r.stdout
    line = next(x for x in r.stdout.splitlines() if "round p95 (s)" in x)
    assert line.split()[-3:] == [f"{mean:.3f}", "±", f"{half:.3f}"]
    assert "rounds completed       1.0 ± 0.0" in r.stdout

    # Seed K's directory is exactly the plain run with --set seed=K.
    single = tmp_path / "single"
    assert fedsim("run", NETWORK, *TINY_NETWORK, "--set", "seed=1", "--out", single,
                  "--quiet").returncode == 0
    assert (single / "events.csv").read_text() == (out / "seed=1" / "events.csv").read_text()


@pytest.mark.parametrize(("args", "expected"), [
    (["--seeds", 0], "--seeds must be >= 1, got 0"),
    (["--seeds", 2, "--set", "seed=4"], "seed: given by --set and by --seeds"),
    (["--seeds", 2, "--set", "clients.0.wings=1"], "clients.0.wings: no such key"),
])
@pytest.mark.parametrize("command", ["run", "compare"])
def test_bad_seeds_exit_2_before_anything_is_written(tmp_path, args, expected, command):
    r = fedsim(command, NETWORK, *args, "--out", tmp_path / "out")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert expected in r.stderr and "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "out").exists()


def test_run_seeds_with_resume_exits_2(tmp_path):
    r = fedsim("run", NETWORK, "--seeds", 2, "--resume", tmp_path / "old")
    assert r.returncode == 2 and "--resume: not with --seeds" in r.stderr
    assert not (tmp_path / "old").exists()


TINY_REAL = """\
name: tiny-real
rounds: 1
workload: {name: real}
clients:
  - {profile: cloud, count: 2, model: tiny-bert}
server: {model: tiny-mpnet}
network:
  channel: {name: static}
task: {dataset: bbc-news, kind: classification, max_train_examples: 64, eval_examples: 20,
       partition: {name: iid}}
training: {local_steps: 1, batch_size: 8, max_length: 16}
"""


@pytest.mark.slow
def test_compare_seeds_runs_once_per_seed_and_reports_the_interval(tmp_path):
    """Tiny real models, one projector, one round, two seeds then three (the two kept; about a
    minute on 2 cores; the files' contents are checked by hand in test_comparison.py)."""
    p = tmp_path / "s.yaml"
    p.write_text(TINY_REAL)
    out = tmp_path / "cmp"
    r = fedsim("compare", p, "--projectors", "pad", "--lars", "off", "--seeds", 2, "--out", out,
               "--references", "none")
    assert r.returncode == 0, r.stderr
    assert "mean ± 95% half-width over 2 seeds (0, 1" in r.stdout
    assert sorted(d.name for d in out.iterdir() if (d / "summary.json").is_file()) == [
        "seed=0", "seed=1"]
    by_seed = [row for row in csv.DictReader((out / "comparison_by_seed.csv").open())
               if row["variant"] == "pad"]
    per_seed = [float(row["accuracy"]) for row in by_seed]
    for seed, value in zip(("0", "1"), per_seed, strict=True):  # each seed's own run
        summary = json.loads((out / f"seed={seed}" / "summary.json").read_text())
        assert summary["seed"] == int(seed)
        assert summary["quality"]["server_by_round"] == pytest.approx([value])
    (pad,) = [row for row in csv.DictReader((out / "comparison.csv").open())
              if row["variant"] == "pad"]
    mean = sum(per_seed) / 2
    half = 12.7062 * abs(per_seed[0] - per_seed[1]) / 2  # t(0.975, 1) * std / sqrt(2)
    assert float(pad["accuracy"]) == pytest.approx(mean)
    assert float(pad["accuracy.ci95_high"]) - mean == pytest.approx(half, rel=1e-4, abs=1e-12)
    assert pad["accuracy.n"] == "2"
    assert (out / "plots" / "comparison.png").is_file()
    # A third seed: the two finished ones are kept (not rerun), the table spans all three.
    before = (out / "seed=0" / "events.csv").stat().st_mtime_ns
    r = fedsim("compare", p, "--projectors", "pad", "--lars", "off", "--seeds", 3, "--out", out,
               "--references", "none")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("kept from") == 2 and "seed=2/" not in r.stderr
    assert (out / "seed=0" / "events.csv").stat().st_mtime_ns == before
    assert "over 3 seeds (0, 1, 2" in r.stdout
    assert len([row for row in csv.DictReader((out / "comparison_by_seed.csv").open())
                if row["variant"] == "pad"]) == 3


def test_prepare_fits_the_projector_once_and_a_run_then_reads_it(tmp_path, monkeypatch):
    """``fedsim prepare``: the quickstart's set-up (tiny models) writes its lstsq maps to the
    projector cache; the workload a run builds afterwards loads them instead of fitting."""
    from fedsim.engine import Simulation
    from fedsim.models import cache_dir
    from fedsim.scenario import load

    home = tmp_path / "cache"
    home.mkdir()
    (home / "models").symlink_to(cache_dir())  # the installed models; projectors start empty
    quickstart = ROOT / "scenarios/quickstart.yaml"
    tiny = [f"clients.{g}.model=tiny-bert" for g in range(3)] + [
        "server.model=tiny-mpnet", "task.max_train_examples=200", "task.eval_examples=20",
        "server.probe_examples=20"]
    monkeypatch.setenv("FEDSIM_CACHE", str(home))
    r = fedsim("prepare", quickstart, *[a for kv in tiny for a in ("--set", kv)])
    assert r.returncode == 0, r.stderr
    assert "prepared in" in r.stdout
    assert len(list((home / "projectors").glob("*.safetensors"))) == 1  # one family, one server
    sim = Simulation(load(quickstart, tiny))  # what a run builds before its first round
    try:
        assert sim.workload.servers.primary.model.families["tiny-bert"].projector.cache_hit
    finally:
        sim.workload.close()
        sim.executor.close()


def test_prepare_bad_input_exits_2(tmp_path):
    r = fedsim("prepare", ROOT / "scenarios/quickstart.yaml", "--set", "rounds=0")
    assert r.returncode == 2
    assert "rounds" in r.stderr and "Traceback" not in r.stderr

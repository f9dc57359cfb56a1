"""The command line: exit codes, messages without tracebacks, the run directory."""

import json
import subprocess
import sys

import pytest

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

"""Checkpoints at round boundaries; a resumed run ends exactly as an uninterrupted one."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_scenarios import scenario_test_overrides

from fedsim import checkpoint
from fedsim.engine import run
from fedsim.errors import FedsimError
from fedsim.metrics import write_run_dir
from fedsim.scenario import load

ROOT = Path(__file__).resolve().parent.parent

SYNTHETIC = """\
name: ckpt
seed: 3
rounds: 6
workload: {name: synthetic, update_bytes: 2000000, download_bytes: 1000000,
           flops_per_step: 2.0e10, server_flops_per_update: 2.0e10}
clients:
  - {profile: mobile, count: 12, spread: {flops_per_s: 0.5}}
  - {profile: laptop, count: 4}
  - {profile: cloud, count: 2}
network:
  channel: {name: pathloss, fading: true, coherence_time_s: 0.5}
  cells: [{uplink_bandwidth_hz: 5.0e6}, {uplink_bandwidth_hz: 10.0e6}]
server: {workers: 2, flops_per_s: 1.0e10}
round_policy: {name: deadline, deadline_s: 15, clients_per_round: 14}
faults: {client_crash_per_h: 30, on_crash: retry, restart_s: 3, link_outage_per_h: 60,
         link_outage_s: 4, server_failure_per_h: 40, server_repair_s: 5}
output: {checkpoint_every: 1}
"""


def _outcome(result) -> tuple[dict, str]:
    summary = dict(result.summary)
    summary.pop("wall_time_s")
    return summary, result.recorder.events_csv()


def full_and_resumed(sc, tmp_path, index: int = 0):
    """Run ``sc`` writing its checkpoints, then resume a fresh directory from checkpoint
    ``index`` alone: (the full run's result, the resumed one's)."""
    full = run(sc, run_dir=tmp_path / "full")
    ckpt = sorted(checkpoint.checkpoint_dir(tmp_path / "full").iterdir())[index]
    one = tmp_path / f"from-{ckpt.name}"
    shutil.copytree(ckpt, checkpoint.checkpoint_dir(one) / ckpt.name)
    return full, run(sc, run_dir=one, resume=one)


def _resume_from_each(sc, tmp_path) -> int:
    """Run once writing every checkpoint, then resume from each one alone: all must end the
    same. Returns the number of checkpoints tried."""
    full_dir = tmp_path / "full"
    expected = _outcome(run(sc, run_dir=full_dir))
    found = sorted(checkpoint.checkpoint_dir(full_dir).iterdir())
    assert [p.name for p in found] == [f"round-{r:05d}" for r in range(sc.rounds - 1)]
    for ckpt in found:
        one = tmp_path / f"from-{ckpt.name}"
        shutil.copytree(ckpt, checkpoint.checkpoint_dir(one) / ckpt.name)
        resumed = _outcome(run(sc, run_dir=one, resume=one))
        assert resumed[1] == expected[1], f"events differ resuming from {ckpt.name}"
        assert resumed[0] == expected[0], f"summary differs resuming from {ckpt.name}"
    return len(found)


def test_synthetic_deadline_run_with_faults_resumes_identically(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SYNTHETIC)
    sc = load(path)
    assert _resume_from_each(sc, tmp_path) == 5
    s = run(sc).summary  # the faults did happen, so their state was exercised
    ov = s["overload"]
    assert ov["crashes"] and ov["link_outages"] and ov["server_failures"]
    assert ov["deadline_misses"]


ASYNC = SYNTHETIC.replace(
    "round_policy: {name: deadline, deadline_s: 15, clients_per_round: 14}",
    "round_policy: {name: async, buffer_size: 2, concurrency: 8}").replace(
    "server_failure_per_h: 40, server_repair_s: 5", "server_failure_per_h: 0").replace(
    "server: {workers: 2, flops_per_s: 1.0e10}", "server: {workers: 2, flops_per_s: 2.0e9}"
    ).replace("rounds: 6", "rounds: 12")


def _phases(run_dir) -> set[str]:
    """Where the updates in flight were at each checkpoint (ended*: ended, not yet taken)."""
    out = set()
    for path in checkpoint.checkpoint_dir(run_dir).iterdir():
        state = json.loads((path / checkpoint.STATE).read_text())
        out |= {f["phase"] + ("*" if f["ended"] else "") for f in state["policy"]["in_flight"]}
        out |= {"buffered"} if state["policy"]["buffer"] else set()
    return out


def test_async_run_resumes_identically_with_updates_in_flight(tmp_path):
    """FedBuff with crashes (retry) and cell outages: a checkpoint after every aggregation
    holds updates downloading, training, uploading, queued and in service (small and large
    downloads between them); resuming from each ends exactly as the uninterrupted run."""
    seen, faults = set(), {"crashes": 0, "link_outages": 0}
    for download_bytes in (1_000_000, 60_000_000):
        out = tmp_path / str(download_bytes)
        out.mkdir()
        path = out / "s.yaml"
        path.write_text(ASYNC.replace("download_bytes: 1000000",
                                      f"download_bytes: {download_bytes}"))
        sc = load(path)
        assert _resume_from_each(sc, out) == 11
        seen |= _phases(out / "full")
        ov = run(sc).summary["overload"]
        faults = {k: n + ov[k] for k, n in faults.items()}
    assert {"downlink", "train", "uplink", "queue", "service"} <= seen, seen
    assert all(faults.values()), faults  # their timers were restored too


def test_async_checkpoint_with_ended_updates_not_yet_taken_resumes_identically(tmp_path):
    """Updates that ended while the server aggregated (their service over, their workers
    given to the updates queued behind them) are in the checkpoint as ended, not yet taken
    by the policy's loop: resumed, the loop takes them as the uninterrupted run did."""
    doc = SYNTHETIC.replace("rounds: 6", "rounds: 2").replace(
        "clients:\n", "clients:\n  - {profile: mobile, count: 3000}\n").replace(
        "name: deadline, deadline_s: 15, clients_per_round: 14",
        "name: async, buffer_size: 100, concurrency: 300").replace(
        "server_failure_per_h: 40, server_repair_s: 5", "server_failure_per_h: 0")
    path = tmp_path / "s.yaml"
    path.write_text(doc)
    assert _resume_from_each(load(path), tmp_path) == 1
    state = json.loads((checkpoint.latest(tmp_path / "full") / checkpoint.STATE).read_text())
    flights = state["policy"]["in_flight"]
    assert any(f["ended"] and f["phase"] == "service" for f in flights)
    assert any(not f["ended"] and f["phase"] == "queue" for f in flights)


def test_async_real_run_resumes_identically(tmp_path):
    """Tiny real models: the uploads in flight (payload bytes, the adapter each trained from)
    and the adapters downloaded travel in the checkpoint."""
    sc = load(ROOT / "scenarios/async-fedbuff.yaml", [
        *scenario_test_overrides(ROOT / "scenarios/async-fedbuff.yaml"), "rounds=3",
        "output.checkpoint_every=1", "executor.name=inline"])
    assert _resume_from_each(sc, tmp_path) == 2
    assert _phases(tmp_path / "full")


def _tiny_real(extra=()):
    return load(ROOT / "scenarios/quickstart.yaml", [
        *scenario_test_overrides(ROOT / "scenarios/quickstart.yaml"), "rounds=3",
        "compression.codec=topk", "compression.ratio=0.2",
        "output.checkpoint_every=1", "executor.name=inline", *extra])


def test_real_sync_run_resumes_identically(tmp_path):
    """Tiny models: family adapters, top-k residuals, the server model's merged weights and
    each client's last update all travel through the checkpoint."""
    sc = _tiny_real(["aggregation.name=task-arithmetic"])
    assert _resume_from_each(sc, tmp_path) == 2
    _, tensors = checkpoint.load(checkpoint.latest(tmp_path / "full"))
    kinds = {k.split("/")[0] for k in tensors}
    # + the adapters clients downloaded: what updates in flight train from (async)
    assert kinds == {"family", "residual", "last", "server", "downloaded"}


def test_checkpoint_files_are_json_and_safetensors_never_pickle(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SYNTHETIC.replace("rounds: 6", "rounds: 2"))
    run(load(path), run_dir=tmp_path / "r")
    (ckpt,) = checkpoint.checkpoint_dir(tmp_path / "r").iterdir()
    assert sorted(p.name for p in ckpt.iterdir()) == ["state.json", "tensors.safetensors"]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["next_round"] == 1 and state["now"] > 0 and state["select_rng"]["state"]
    assert not list(checkpoint.checkpoint_dir(tmp_path / "r").glob(".*tmp*"))


def test_resume_errors_are_user_errors(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SYNTHETIC.replace("rounds: 6", "rounds: 3"))
    with pytest.raises(FedsimError, match="no checkpoint there"):
        run(load(path), resume=tmp_path / "nothing")
    run(load(path), run_dir=tmp_path / "r")
    with pytest.raises(FedsimError, match="another scenario"):
        run(load(path, ["seed=4"]), resume=tmp_path / "r")
    path.write_text(SYNTHETIC.replace("name: deadline, deadline_s: 15, clients_per_round: 14",
                                      "name: async"))
    with pytest.raises(FedsimError, match=r"output\.checkpoint_every: async runs with server "
                       "failures"):
        load(path)


def _fedsim(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "fedsim", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("policy", ["sync", "deadline", "async"])
def test_kill_9_then_resume_ends_as_the_uninterrupted_run(tmp_path, policy):
    """A real subprocess, killed with SIGKILL at a random moment after its first checkpoint,
    then resumed with ``fedsim run FILE --resume DIR``."""
    rounds = 8 if policy == "async" else 16
    doc = SYNTHETIC.replace("rounds: 6", f"rounds: {rounds}").replace(
        "clients:\n", "clients:\n  - {profile: mobile, count: 3000}\n").replace(
        "clients_per_round: 14", "clients_per_round: 600")
    if policy == "sync":
        doc = doc.replace("name: deadline, deadline_s: 15,", "name: sync,")
    if policy == "async":  # a checkpoint every aggregation; no server failures (see scenario)
        doc = doc.replace("name: deadline, deadline_s: 15, clients_per_round: 600",
                          "name: async, buffer_size: 100, concurrency: 300").replace(
            "server_failure_per_h: 40, server_repair_s: 5", "server_failure_per_h: 0")
    path = tmp_path / "s.yaml"
    path.write_text(doc)
    clean = tmp_path / "clean"
    t0 = time.perf_counter()
    write_run_dir(run(load(path)), clean)
    wall_s = time.perf_counter() - t0

    rng = random.Random(os.getpid())
    run_dir = tmp_path / "killed"
    proc = _fedsim("run", path, "--out", run_dir, "--quiet")
    deadline = time.monotonic() + 240
    while checkpoint.latest(run_dir) is None:
        assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr}"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.01)
    # A random moment in the next ~half of the run: mid-round, mid-checkpoint or between.
    time.sleep(rng.uniform(0.0, 0.5 * wall_s))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()  # never presented as complete
    last = checkpoint.latest(run_dir)
    assert last is not None

    resumed = _fedsim("run", path, "--resume", run_dir, "--quiet")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    a = json.loads((clean / "summary.json").read_text())
    b = json.loads((run_dir / "summary.json").read_text())
    a.pop("wall_time_s"), b.pop("wall_time_s")
    assert b == a
    assert (run_dir / "events.csv").read_bytes() == (clean / "events.csv").read_bytes()
    assert not checkpoint.checkpoint_dir(run_dir).exists()  # a complete run dir replaced them

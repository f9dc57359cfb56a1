"""Executors: jobs leave the process, workers that die are replaced, results match inline."""

import json
import os
import time
from pathlib import Path

import pytest
from doubles import CrashJob, EchoJob, RemoteFixedWorkload, RemoteGroupedWorkload, SleepJob
from test_scenarios import scenario_test_overrides

from fedsim.engine import Simulation
from fedsim.executors import EXECUTORS, JobFailed, make_executor
from fedsim.metrics import write_run_dir
from fedsim.plugins import EXECUTORS as EXECUTOR_CONFIGS
from fedsim.scenario import ScenarioError, load

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("executor", "error"), [
    ("{name: spark}", r"executor\.name: .*unknown executor 'spark'"),
    ("{name: process, address: auto}",
     r"executor\.address: not an option of executor 'process'; executors that take it: ray"),
    ("{name: process, workers: 0}", r"executor\.workers"),
    ("{name: process, batch_clients: 0}", r"executor\.batch_clients"),
    ("{name: process, allocator: tcmalloc}", r"executor\.allocator"),
    ("{name: inline, allocator: system}", r"executor\.allocator: not an option of executor "
                                          r"'inline'"),
])
def test_config_errors_name_the_key(tmp_path, executor, error):
    assert {"inline", "process", "ray"} <= set(EXECUTORS)
    doc = tmp_path / "s.yaml"
    doc.write_text(f"name: s\nexecutor: {executor}\n")
    with pytest.raises(ScenarioError, match=error):
        load(doc)


def test_inline_runs_a_job_only_when_collected():
    ex = make_executor(EXECUTOR_CONFIGS.parse({"name": "inline"}))
    job = ex.submit(EchoJob(3))
    value, pid, calls = job.result()
    assert (value, pid, calls) == (3, os.getpid(), 1)


@pytest.fixture(scope="module")
def pool():
    ex = make_executor(EXECUTOR_CONFIGS.parse(dict(name="process", workers=2,
                                      max_retries=1)))
    yield ex
    ex.close()


def test_process_jobs_run_in_workers_that_keep_their_cache(pool):
    jobs = [pool.submit(EchoJob(i)) for i in range(8)]
    out = [j.result() for j in jobs]
    assert [v for v, _, _ in out] == list(range(8))
    pids = {pid for _, pid, _ in out}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    # A worker's cache outlives its jobs: the counts per worker run 1, 2, 3...
    for pid in pids:
        counts = sorted(c for _, p, c in out if p == pid)
        assert counts == list(range(1, len(counts) + 1))
    assert set(pool.worker_peak_rss) == pids
    assert all(rss > 10 * 2**20 for rss in pool.worker_peak_rss.values())  # a real process


def test_a_dead_worker_is_replaced_and_the_job_retried(pool, tmp_path):
    marker = tmp_path / "crashes"
    marker.write_text("1")  # dies once, then succeeds on the retry
    assert pool.submit(CrashJob(str(marker), "survived")).result() == "survived"
    marker.write_text("5")  # dies every time: past max_retries it fails, it does not hang
    t0 = time.perf_counter()
    with pytest.raises(JobFailed, match="worker died 2 times"):
        pool.submit(CrashJob(str(marker))).result()
    assert time.perf_counter() - t0 < 60
    assert int(marker.read_text()) == 3  # exactly 1 + max_retries attempts
    assert pool.submit(EchoJob("after")).result()[0] == "after"  # the pool lives on


def test_a_hung_job_times_out(tmp_path):
    # 15 s: room for the first job's worker to start (spawn + import torch) on a slow machine.
    ex = make_executor(EXECUTOR_CONFIGS.parse(dict(name="process", workers=1, job_timeout_s=15)))
    try:
        assert ex.submit(SleepJob(0.1)).result() == 0.1
        t0 = time.perf_counter()
        with pytest.raises(JobFailed, match="job_timeout_s=15"):
            ex.submit(SleepJob(600)).result()
        assert time.perf_counter() - t0 < 60
        assert ex.submit(SleepJob(0.1)).result() == 0.1  # a fresh worker took over
    finally:
        ex.close()


def _crashing_run(scenario_factory, tmp_path, workload, **executor):
    """4 laptops, 2 rounds, client 1's job (or group) killing its worker on every try."""
    sc = scenario_factory(rounds=2, clients=[{"profile": "laptop", "count": 4,
                                              "overrides": {"mean_off_s": 0}}],
                          executor={"name": "process", "max_retries": 0, **executor})
    marker = tmp_path / "crashes"
    marker.write_text("100")
    sim = Simulation(sc)
    sim.workload = workload(sc, sim.fleet, marker=str(marker), crash_clients={1})
    s = sim.run().summary
    failed = [row.split(",")[1:3] for row in sim.rec.events_csv().splitlines()
              if ",job_failed," in row]
    return sim, s, failed


def test_engine_records_a_lost_job_and_goes_on(scenario_factory, tmp_path):
    _, s, failed = _crashing_run(scenario_factory, tmp_path, RemoteFixedWorkload, workers=1)
    assert s["rounds_completed"] == 2
    assert s["overload"]["failed_jobs"] == 2  # client 1, once per round
    assert s["counts"]["updates_accepted"] == 2 * 3
    assert failed == [["0", "1"], ["1", "1"]]  # (round, client)


def test_a_lost_group_job_fails_each_of_its_members(scenario_factory, tmp_path):
    """With ``batch_clients``, a group whose worker dies past the retries is a failed job for
    every client in it; the run goes on."""
    sim, s, failed = _crashing_run(scenario_factory, tmp_path, RemoteGroupedWorkload,
                                   workers=2, batch_clients=2)
    assert s["rounds_completed"] == 2
    assert sim.executor.groups == [2, 2, 2, 2]  # 4 clients, 2 workers: groups of 2
    assert len(failed) == 4 and {c for _, c in failed} >= {"1"}  # client 1 and its partner
    assert s["counts"]["updates_accepted"] == 2 * 2


def _tiny_quickstart(executor: list[str]) -> list[str]:
    """Tiny models with a (tiny-mpnet) server model: its evaluation runs in the background
    under process and ray, in step under inline; the numbers must not differ."""
    return [*scenario_test_overrides(ROOT / "scenarios/quickstart.yaml"), "rounds=3",
            "aggregation.name=task-arithmetic", "task.client_eval_examples=100", *executor]


def _run(tmp_path: Path, name: str, overrides: list[str]) -> tuple[dict, bytes]:
    sc = load(ROOT / "scenarios/quickstart.yaml", overrides)
    result = Simulation(sc).run()
    out = write_run_dir(result, tmp_path / name)
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("wall_time_s")
    return summary, (out / "events.csv").read_bytes()


@pytest.fixture(scope="module")
def inline_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("inline"), "inline",
                _tiny_quickstart(["executor.name=inline"]))


def test_process_matches_inline(inline_run, tmp_path):
    summary, events = _run(tmp_path, "process", _tiny_quickstart(
        ["executor.name=process", "executor.workers=2"]))
    assert summary["quality"]["server_by_round"][-1] is not None
    # Each client's own final model is scored on the workers (EvalJob), inline in this process.
    assert len(summary["quality"]["clients_final"]) == 5  # the clients that trained
    assert summary == inline_run[0]
    assert events == inline_run[1]


@pytest.mark.slow
def test_ray_matches_inline(inline_run, tmp_path):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary, events = _run(tmp_path, "ray", _tiny_quickstart(
            ["executor.name=ray", "executor.workers=2"]))
    finally:
        ray.shutdown()
    assert summary == inline_run[0]
    assert events == inline_run[1]


@pytest.mark.slow
def test_ray_replaces_a_dead_actor(tmp_path):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    import doubles

    ray.cloudpickle.register_pickle_by_value(doubles)  # the test's module, unknown to workers
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ex = make_executor(EXECUTOR_CONFIGS.parse(dict(name="ray", workers=2, max_retries=1)))
    try:
        marker = tmp_path / "crashes"
        marker.write_text("1")
        assert ex.submit(CrashJob(str(marker), "survived")).result() == "survived"
        marker.write_text("5")
        with pytest.raises(JobFailed, match="actor died 2 times"):
            ex.submit(CrashJob(str(marker))).result()
        assert [ex.submit(EchoJob(i)).result()[0] for i in range(4)] == [0, 1, 2, 3]
    finally:
        ex.close()
        ray.shutdown()


@pytest.mark.parametrize("executor", ["inline", "process",
                                      pytest.param("ray", marks=pytest.mark.slow)])
def test_batched_runs_train_families_together_close_to_one_by_one(inline_run, tmp_path,
                                                                   executor):
    """``batch_clients``: a family's pending jobs train in one pass (fedsim.batching) — inline
    when the first is collected, on the workers in groups (at least one per worker); the
    numbers are one-by-one training's within float tolerance, and the same on every run."""
    if executor == "ray":
        ray = pytest.importorskip("ray", reason="the ray extra is not installed")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        runs = _batched_runs(tmp_path, executor)
    finally:
        if executor == "ray":
            ray.shutdown()
    assert runs[0] == runs[1]
    batched, one_by_one = runs[0][0]["quality"], inline_run[0]["quality"]
    assert batched["server_by_round"] == pytest.approx(one_by_one["server_by_round"], rel=1e-3)
    assert runs[0][0]["rounds_completed"] == inline_run[0]["rounds_completed"]


def _batched_runs(tmp_path: Path, executor: str) -> list[tuple[dict, bytes]]:
    """Two runs of the tiny quickstart with ``batch_clients=4``: (summary, events.csv)."""
    runs = []
    for i in range(2):
        sc = load(ROOT / "scenarios/quickstart.yaml", _tiny_quickstart(
            [f"executor.name={executor}", "executor.batch_clients=4"]))
        sim = Simulation(sc)
        result = sim.run()
        assert max(sim.executor.groups) > 1 and max(sim.executor.groups) <= 4
        out = write_run_dir(result, tmp_path / f"batched{i}")
        summary = json.loads((out / "summary.json").read_text())
        summary.pop("wall_time_s")
        runs.append((summary, (out / "events.csv").read_bytes()))
    return runs

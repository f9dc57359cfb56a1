"""The SimPy engine against hand-computed schedules and queueing theory."""

import numpy as np
import pytest
from doubles import FixedWorkload

from fedsim.availability import Availability
from fedsim.clock import Clock
from fedsim.engine import Simulation
from fedsim.ingress import Ingress as Server
from fedsim.metrics import write_run_dir
from fedsim.plugins import ROUND_POLICIES


def _sim(sc, **kw):
    sim = Simulation(sc)
    sim.workload = FixedWorkload(sc, sim.fleet, **kw)
    return sim


def test_round_policy_registry():
    assert ROUND_POLICIES.names() == ["async", "deadline", "sync"]


def test_mm1_mean_wait_matches_theory():
    """Poisson arrivals (lambda) at one worker with Exp(mu) service: W_q = rho / (mu - lambda)."""
    lam, mu, n = 0.5, 1.0, 200_000
    env = Clock()
    server = Server(env, workers=1, queue_capacity=10**9)
    rng = np.random.default_rng(7)
    service = rng.exponential(1 / mu, size=n)
    gaps = rng.exponential(1 / lam, size=n)

    def job(i):
        yield from server.serve(lambda: float(service[i]))

    def arrivals():
        for i in range(n):
            yield env.timeout(float(gaps[i]))
            env.process(job(i))

    env.process(arrivals())
    env.run()
    rho = lam / mu
    theory = rho / (mu - lam)  # = 1.0 s
    assert np.mean(server.waits_s) == pytest.approx(theory, rel=0.05)
    assert server.busy_s / env.now == pytest.approx(rho, rel=0.02)
    assert server.dropped == 0


def test_bounded_queue_drops():
    env = Clock()
    server = Server(env, workers=1, queue_capacity=2)
    results = []

    def job():
        results.append((yield from server.serve(lambda: 1.0)))

    for _ in range(5):  # 1 served, 2 wait, 2 dropped
        env.process(job())
    env.run()
    assert server.dropped == 2
    assert sorted(r for r in results if r is not None) == [0.0, 1.0, 2.0]
    assert server.queue_max == 2


def test_utilization_on_a_hand_computed_schedule(scenario_factory):
    """One laptop (3e11 FLOP/s), static cell 8 Mbit/s up / 16 Mbit/s down, two sync rounds.

    Per round: download 2 MB at 16 Mbit/s = 1 s; train 6e11 FLOPs = 2 s; upload 1 MB at
    8 Mbit/s = 1 s; server 5e13 FLOPs at 5e13 FLOP/s = 1 s; aggregation 2.5e13 = 0.5 s.
    Round = 5.5 s, two rounds = 11 s. Uplink busy 2 s of 11, downlink 2, compute 4, server
    (2 x 1 s service + 2 x 0.5 s aggregation) = 3 s of 11.
    """
    sc = scenario_factory(rounds=2,
                          network__cells=[{"uplink_rate_bps": 8e6, "downlink_rate_bps": 16e6}],
                          server={"flops_per_s": 5e13})
    sim = _sim(sc, download_bytes=2_000_000, upload_bytes=1_000_000, flops=6e11,
               server_flops=5e13, aggregate_flops=2.5e13)
    s = sim.run().summary
    assert s["sim_time_s"] == pytest.approx(11.0, rel=1e-12)
    assert s["utilization"]["uplink"] == pytest.approx(2 / 11, rel=1e-9)
    assert s["utilization"]["downlink"] == pytest.approx(2 / 11, rel=1e-9)
    assert s["utilization"]["compute"]["laptop"] == pytest.approx(4 / 11, rel=1e-9)
    assert s["utilization"]["server"] == pytest.approx(3 / 11, rel=1e-9)
    lat = s["latency_s"]
    assert lat["download"]["max"] == pytest.approx(1.0)
    assert lat["compute"]["p50"] == pytest.approx(2.0)
    assert lat["upload"]["p95"] == pytest.approx(1.0)
    assert lat["server"]["max"] == pytest.approx(1.0)
    assert lat["round"]["p50"] == pytest.approx(5.5)
    assert s["comm"]["bytes_up"] == 2_000_000 and s["comm"]["bytes_down"] == 4_000_000
    assert s["comm"]["compression_ratio"] == pytest.approx(4.0)
    assert s["quality"]["server_by_round"] == [0.5, 0.51]


def _small_network(scenario_factory, seed=0, **extra):
    return scenario_factory(
        seed=seed, rounds=2,
        clients=[{"profile": "mobile", "count": 60, "spread": {"flops_per_s": 0.5}},
                 {"profile": "laptop", "count": 20}, {"profile": "cloud", "count": 5}],
        network={"channel": {"name": "pathloss", "coherence_time_s": 0.2},
                 "cells": [{}, {"sharing": "tdma"}]},
        round_policy={"name": "deadline", "deadline_s": 60, "clients_per_round": 50},
        **extra)


def test_same_seed_identical_events_other_seed_differs(scenario_factory, tmp_path):
    outs = []
    for i, seed in enumerate((3, 3, 4)):
        res = Simulation(_small_network(scenario_factory, seed)).run()
        outs.append((write_run_dir(res, tmp_path / f"r{i}") / "events.csv").read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]
    assert len(outs[0].splitlines()) > 100


def test_run_directory_contract(scenario_factory, tmp_path):
    import json

    res = Simulation(_small_network(scenario_factory)).run()
    out = write_run_dir(res, tmp_path / "run")
    names = {p.name for p in out.iterdir()}
    assert {"scenario.yaml", "events.csv", "rounds.csv", "clients.csv", "summary.json",
            "plots"} <= names
    assert (out / "events.csv").read_text().splitlines()[0] == "time_s,round,client,kind,bytes,detail"
    s = json.loads((out / "summary.json").read_text())
    for key in ("sim_time_s", "rounds_completed", "latency_s", "overload", "utilization", "comm",
                "quality", "wall_time_s"):
        assert key in s
    for phase in ("download", "compute", "queue", "upload", "server", "round"):
        assert set(s["latency_s"][phase]) >= {"p50", "p95", "max"}
    assert set(s["overload"]) >= {"server_queue_max", "server_wait_p95_s", "dropped_updates",
                                  "deadline_misses", "oom_failures"}
    assert set(s["utilization"]["compute"]) == {"mobile", "laptop", "cloud"}
    assert set(s["comm"]) >= {"bytes_up", "bytes_down", "bytes_up_accepted", "compression_ratio"}
    # one meaning: the bytes that crossed the links, as clients.csv counts them
    assert s["comm"]["bytes_up"] == sum(r["bytes_up"] for r in res.clients)
    assert s["comm"]["bytes_down"] == sum(r["bytes_down"] for r in res.clients)
    assert set(s["quality"]) >= {"metric", "server_by_round", "clients_final"}
    assert len((out / "clients.csv").read_text().splitlines()) == 86
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_deadline_drops_late_updates(scenario_factory):
    """Two laptops, one 10x slower: with a 5 s deadline its update is a deadline miss."""
    sc = scenario_factory(rounds=3, clients=[{"profile": "laptop", "count": 2,
                                              "overrides": {"mean_off_s": 0}}],
                          round_policy={"name": "deadline", "deadline_s": 5.0})
    sim = _sim(sc, flops=3e11, per_client_flops={1: 3e12})  # 1 s vs 10 s of compute
    s = sim.run().summary
    assert s["overload"]["deadline_misses"] == 3
    assert [len(a) for _, a in sim.workload.aggregated] == [1, 1, 1]
    assert s["latency_s"]["round"]["max"] == pytest.approx(5.0)
    # the slow client's interrupted job was never collected
    assert (1, 0) not in sim.workload.trained
    t_left = [tl for c, _, tl in sim.workload.encoded if c == 0]
    assert all(0 < tl < 5.0 for tl in t_left)


def test_sync_waits_for_the_slowest(scenario_factory):
    sc = scenario_factory(rounds=1, clients=[{"profile": "laptop", "count": 2,
                                              "overrides": {"mean_off_s": 0}}])
    sim = _sim(sc, flops=3e11, per_client_flops={1: 3e12}, download_bytes=0, upload_bytes=1)
    s = sim.run().summary
    assert s["latency_s"]["round"]["max"] == pytest.approx(10.0, rel=1e-3)
    assert s["overload"]["deadline_misses"] == 0


def test_async_aggregates_every_m_with_staleness(scenario_factory):
    sc = scenario_factory(rounds=4, clients=[{"profile": "laptop", "count": 6,
                                              "overrides": {"mean_off_s": 0}}],
                          round_policy={"name": "async", "buffer_size": 2, "concurrency": 3,
                                        "staleness_exponent": 1.0})
    flops = {c: 3e11 * (1 + c) for c in range(6)}
    sim = _sim(sc, per_client_flops=flops, download_bytes=0, upload_bytes=100)
    s = sim.run().summary
    assert s["rounds_completed"] == 4
    batches = [a for _, a in sim.workload.aggregated]
    assert all(len(b) == 2 for b in batches)
    stale = [a for b in batches for a in b if a.staleness > 0]
    assert stale, "slow clients started in an older version must arrive stale"
    for a in stale:
        assert a.weight == pytest.approx(1 / (1 + a.staleness))
    buffered = sim.rec.counts["buffered"]
    assert buffered >= 8  # every arrival records its staleness and weight


def test_oom_fails_the_job(scenario_factory):
    sc = scenario_factory(rounds=1, clients=[{"profile": "mobile", "count": 2,
                                              "overrides": {"mean_off_s": 0}},
                                             {"profile": "cloud", "count": 1}])
    sim = _sim(sc, memory_bytes=10 * 2**30)  # 10 GiB: too much for a 4 GiB phone
    s = sim.run().summary
    assert s["overload"]["oom_failures"] == 2
    assert [len(a) for _, a in sim.workload.aggregated] == [1]


def test_server_queue_overload_drops_updates(scenario_factory):
    sc = scenario_factory(rounds=1, clients=[{"profile": "cloud", "count": 10}],
                          server={"workers": 1, "queue_capacity": 3, "flops_per_s": 1e9})
    sim = _sim(sc, server_flops=1e9, upload_bytes=100)  # 1 s per update, all arrive together
    s = sim.run().summary
    assert s["overload"]["dropped_updates"] == 6
    assert s["overload"]["server_queue_max"] == 3
    assert s["overload"]["server_wait_p95_s"] == pytest.approx(3.0, abs=0.2)


def test_dropouts_mid_job(scenario_factory):
    sc = scenario_factory(rounds=3, clients=[{"profile": "mobile", "count": 40,
                                              "overrides": {"mean_on_s": 5.0, "mean_off_s": 5.0}}],
                          network={"channel": {"name": "static"}, "cells": [{}]})
    sim = _sim(sc, flops=5e11)  # 10 s of compute against 5 s mean on-time
    s = sim.run().summary
    assert s["overload"]["dropouts"] > 0
    assert s["counts"]["updates_accepted"] < s["counts"]["updates_started"]


def test_availability_stationary_fraction():
    from types import SimpleNamespace

    n = 20_000
    fleet = SimpleNamespace(size=n, mean_on_s=np.full(n, 30.0), mean_off_s=np.full(n, 10.0))
    av = Availability(fleet, 123)
    for t in (0.0, 50.0, 500.0):
        assert len(av.available(t)) / n == pytest.approx(0.75, abs=0.015)


def test_network_only_scenario_runs_small(tmp_path):
    from fedsim.scenario import load

    sc = load("scenarios/network-only.yaml",
              ["rounds=2", "clients.0.count=300", "clients.1.count=100", "clients.2.count=20"])
    s = Simulation(sc).run().summary
    assert s["rounds_completed"] == 2
    assert 0 < s["utilization"]["uplink"] <= 1


def test_network_only_two_rounds_give_the_recorded_summary():
    """scenarios/network-only.yaml, 2 rounds, seed 1 (10,000 clients): the summary recorded
    before the engine was split into rooms, unchanged (wall time aside)."""
    from pathlib import Path

    from test_scenarios import GOLDEN, assert_same_summary

    from fedsim.scenario import load

    root = Path(__file__).resolve().parent.parent
    sc = load(root / "scenarios" / "network-only.yaml", ["rounds=2", "seed=1"])
    assert_same_summary(Simulation(sc).run().summary, GOLDEN / "network-only-2r-s1.json")


def test_the_ingress_keeps_simpys_preemption_rules():
    """A failing worker takes the worker of the update that asked last (the largest key, as
    SimPy's PreemptiveResource); the preempted one, asking again, queues behind those that
    asked before it; releases serve the queue in the order asked."""
    env = Clock()
    server = Server(env, workers=2, queue_capacity=10)
    log = []

    def ask(name):
        return server.request(lambda: log.append(("granted", name, env.now)),
                              lambda: log.append(("preempted", name, env.now)))

    holds = {"a": ask("a")}
    env.run(until=1.0)
    holds["b"] = ask("b")  # both workers busy now
    env.run(until=2.0)
    holds["c"] = ask("c")  # queued
    failing = server.fail_worker()  # takes b's worker (b asked after a)
    assert failing.triggered and server.queued == 1
    assert log[-1] == ("preempted", "b", 2.0)
    holds["b"] = ask("b")  # asks again: behind c
    server.release(holds["a"])
    server.release(failing.hold)
    assert [e[1] for e in log if e[0] == "granted"] == ["a", "b", "c", "b"]
    assert server.queued == 0 and len(server.users) == 2

"""Engine throughput: network-only, 10,000 clients x 10 rounds, against a bare SimPy loop.

    python benchmarks/bench_engine.py [--clients 10000] [--rounds 10]

Prints simulated client-rounds per wall second, recorded events and SimPy events per second,
and the same number of SimPy events pushed through a bare loop of timeouts in this process,
as a ratio (target: >= 0.3 of bare SimPy's event rate; 10k x 10 in < 60 s on 2 cores).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import simpy

from fedsim.engine import Simulation
from fedsim.scenario import load

ROOT = Path(__file__).resolve().parent.parent


def bare_simpy(num_events: int, processes: int = 10_000) -> float:
    """Seconds to process ``num_events`` timeouts spread over ``processes`` processes."""
    env = simpy.Environment()
    per = max(num_events // processes, 1)

    def proc(i: int):
        for _ in range(per):
            yield env.timeout(1.0 + (i % 97) * 1e-3)

    for i in range(processes):
        env.process(proc(i))
    t0 = time.perf_counter()
    env.run()
    return time.perf_counter() - t0, per * processes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    scale = args.clients / 10_000
    sc = load(ROOT / "scenarios/network-only.yaml",
              [f"rounds={args.rounds}", f"clients.0.count={round(7000 * scale)}",
               f"clients.1.count={round(2500 * scale)}", f"clients.2.count={round(500 * scale)}"])
    t0 = time.perf_counter()
    sim = Simulation(sc)
    result = sim.run()
    wall = time.perf_counter() - t0
    s = result.summary
    n_sim = s["counts"]["sim_events"]
    client_rounds = s["counts"]["updates_started"]
    bare_s, bare_n = bare_simpy(n_sim)
    ours_rate, bare_rate = n_sim / wall, bare_n / bare_s
    print(f"network-only: {sc.num_clients} clients x {sc.rounds} rounds, "
          f"{s['sim_time_s']:.0f} s simulated")
    print(f"  wall time            {wall:8.2f} s")
    print(f"  client-rounds / s    {client_rounds / wall:10.0f}  ({client_rounds} updates)")
    print(f"  recorded events / s  {s['counts']['events'] / wall:10.0f}  ({s['counts']['events']})")
    print(f"  SimPy events / s     {ours_rate:10.0f}  ({n_sim})")
    print(f"  bare SimPy events / s{bare_rate:10.0f}  ({bare_n} timeouts in {bare_s:.2f} s)")
    print(f"  ratio to bare SimPy  {ours_rate / bare_rate:8.3f}  (target >= 0.3)")


if __name__ == "__main__":
    main()

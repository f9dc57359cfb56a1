"""Engine throughput: network-only, 10,000 clients x 10 rounds, against a bare SimPy loop.

    python benchmarks/bench_engine.py [--clients 10000] [--rounds 10] [--wireless]

Prints simulated client-rounds per wall second, recorded events and SimPy events per second,
and the same number of SimPy events pushed through a bare loop of timeouts in this process,
as a ratio (target: >= 0.3 of bare SimPy's event rate; 10k x 10 in < 60 s on 2 cores).
``--wireless`` then runs the same world with inter-cell interference (reuse 1), with
pedestrian mobility (random waypoint, handover) and with both, and prints each one's
client-rounds per second beside the plain run's (issue 17: the options cost only when on).
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


WIRELESS = {
    "interference (reuse 1)": ["network.interference={model: load, reuse: 1}"],
    "mobility (waypoint, handover)": [
        "network.mobility={model: random-waypoint, speed_mps: [0.5, 1.5], handover: true}"],
    "both": ["network.interference={model: load, reuse: 1}",
             "network.mobility={model: random-waypoint, speed_mps: [0.5, 1.5], handover: true}"],
}


def timed(sc) -> tuple[float, dict]:
    """Wall seconds of one run of ``sc`` (building the simulation included) and its summary."""
    t0 = time.perf_counter()
    result = Simulation(sc).run()
    return time.perf_counter() - t0, result.summary


def wireless(sizes: list[str], plain_rate: float) -> None:
    print("  option                         client-rounds / s   vs plain   deadline misses")
    for name, extra in WIRELESS.items():
        wall, s = timed(load(ROOT / "scenarios/network-only.yaml", [*sizes, *extra]))
        rate = s["counts"]["updates_started"] / wall
        print(f"  {name:30s} {rate:17.0f}   {rate / plain_rate:8.2f}   "
              f"{s['overload']['deadline_misses']:>15}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--wireless", action="store_true",
                    help="also time interference, mobility and both against the plain run")
    args = ap.parse_args()
    scale = args.clients / 10_000
    sizes = [f"rounds={args.rounds}", f"clients.0.count={round(7000 * scale)}",
             f"clients.1.count={round(2500 * scale)}", f"clients.2.count={round(500 * scale)}"]
    sc = load(ROOT / "scenarios/network-only.yaml", sizes)
    wall, s = timed(sc)
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
    if args.wireless:
        wireless(sizes, client_rounds / wall)


if __name__ == "__main__":
    main()

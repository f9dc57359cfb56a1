"""Engine throughput: network-only, 10,000 clients x 10 rounds, against a bare SimPy loop.

    python benchmarks/bench_engine.py [--clients 10000] [--rounds 10] [--wireless]
    python benchmarks/bench_engine.py --scaling [--sizes 1000,10000,100000,1000000] [--rounds 1]

Prints simulated client-rounds per wall second, recorded events and SimPy events per second,
and the same number of SimPy events pushed through a bare loop of timeouts in this process,
as a ratio; the engine makes fewer SimPy events than flow changes (an update is a state
machine on the clock's callbacks, a cell has one wake-up), so it also prints client-rounds per
second against a bare loop doing one timeout per client-round.
``--wireless`` then runs the same world with inter-cell interference (reuse 1), with
pedestrian mobility (random waypoint, handover) and with both, and prints each one's
client-rounds per second beside the plain run's (issue 17: the options cost only when on).
``--scaling`` runs each size in a fresh process of its own (so that each one's peak RSS is its
own) and prints clients, wall s, client-rounds/s, microseconds per client-round and its ratio to
the smallest size's (flat cost: 1.0), SimPy events per client-round and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
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


def sizes_for(clients: int, rounds: int) -> list[str]:
    """``--set`` values scaling network-only's three groups (70/25/5 %) to ``clients``."""
    scale = clients / 10_000
    return [f"rounds={rounds}", f"clients.0.count={round(7000 * scale)}",
            f"clients.1.count={round(2500 * scale)}", f"clients.2.count={round(500 * scale)}"]


def one(clients: int, rounds: int) -> None:
    """One size, in this process: a JSON line of its figures (the --scaling parent reads it)."""
    wall, s = timed(load(ROOT / "scenarios/network-only.yaml", sizes_for(clients, rounds)))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"clients": clients, "wall_s": wall, "updates": s["counts"]["updates_started"],
                      "sim_events": s["counts"]["sim_events"], "peak_rss_mib": peak_mib}))


def scaling(sizes: list[int], rounds: int) -> None:
    print(f"network-only scaling, {rounds} round(s), 10 cells; each size in its own process")
    print("   clients     wall s   client-rounds/s   us / client-round   vs smallest"
          "   SimPy ev / c-r   peak RSS MiB")
    base = None
    for n in sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--rounds", str(rounds)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        us = 1e6 * r["wall_s"] / r["updates"]
        base = base or us
        print(f"{n:10d} {r['wall_s']:10.2f} {r['updates'] / r['wall_s']:17.0f} {us:19.1f} "
              f"{us / base:13.2f} {r['sim_events'] / r['updates']:16.1f} "
              f"{r['peak_rss_mib']:14.0f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=None, help="10 (1 with --scaling)")
    ap.add_argument("--wireless", action="store_true",
                    help="also time interference, mobility and both against the plain run")
    ap.add_argument("--scaling", action="store_true",
                    help="a scaling table over --sizes, each size in a fresh process")
    ap.add_argument("--sizes", default="1000,10000,100000,1000000",
                    help="clients per --scaling row, comma-separated")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a --scaling child
    args = ap.parse_args()
    if args.one is not None:
        return one(args.one, args.rounds or 1)
    if args.scaling:
        return scaling([int(x) for x in args.sizes.split(",")], args.rounds or 1)
    args.rounds = args.rounds or 10
    sizes = sizes_for(args.clients, args.rounds)
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
    print(f"  ratio to bare SimPy  {ours_rate / bare_rate:8.3f}  (events per second)")
    print(f"  SimPy events / client-round {n_sim / client_rounds:6.2f}")
    one_s, one_n = bare_simpy(client_rounds)
    print(f"  client-rounds / s against a bare loop of one timeout each: "
          f"{(client_rounds / wall) / (one_n / one_s):.4f} ({one_n / one_s:.0f} / s bare)")
    if args.wireless:
        wireless(sizes, client_rounds / wall)


if __name__ == "__main__":
    main()

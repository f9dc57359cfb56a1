"""Executors: round wall time of the quickstart under inline, process and ray, as ratios to inline.

    python benchmarks/bench_executors.py [--rounds 2] [--workers 2] [--only inline,process,ray]
                                         [--set KEY=VALUE ...]

Each executor plays ``scenarios/quickstart.yaml`` (20 clients, minilm-l6, mpnet-base server) for
``--rounds`` rounds in this process, one after the other; the wall time of each round is taken
at its close. Round 1 includes starting the workers and loading their base model; later rounds
are the steady state, reported as the mean wall time of rounds 2.. and as a ratio of inline's
(speed-up: inline / executor; target >= 1.6 with 2 workers on a round of >= 8 clients). Also
printed: the peak RSS of each worker process, and that every executor produced the same
``summary.json`` (wall time aside) and events. ``inline-2t`` is inline with 2 torch threads per
job (``executor.threads_per_job=2``), the fastest a single process goes here; its deltas differ
from the others' in the last bits, so it is not part of the identity check.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedsim.engine import Simulation
from fedsim.scenario import load

ROOT = Path(__file__).resolve().parent.parent
# The quickstart at the size these figures were first measured at: 20 clients, every available
# one each round, 200 articles, each client's own model scored at the end.
TWENTY = ["clients.0.count=10", "clients.1.count=6", "clients.2.count=4",
          "round_policy.clients_per_round=null", "task.eval_examples=200",
          "task.client_eval_examples=100"]
SETTINGS = {
    "inline": ["executor.name=inline"],
    "inline-2t": ["executor.name=inline", "executor.threads_per_job=2"],
    "process": ["executor.name=process"],
    "ray": ["executor.name=ray"],
}


def play(name: str, args: argparse.Namespace) -> dict:
    overrides = [*TWENTY, f"rounds={args.rounds}", f"executor.workers={args.workers}",
                 *SETTINGS[name], *args.set]
    sc = load(ROOT / "scenarios/quickstart.yaml", overrides)
    t0 = time.perf_counter()
    sim = Simulation(sc)
    setup_s = time.perf_counter() - t0
    marks = [time.perf_counter()]
    result = sim.run(progress=lambda done: marks.append(time.perf_counter()))
    sim.workload.close()
    rounds_s = [b - a for a, b in itertools.pairwise(marks)]
    summary = dict(result.summary)
    summary.pop("wall_time_s")
    return {"setup_s": setup_s, "rounds_s": rounds_s, "summary": summary,
            "events": result.recorder.events_csv(), "workers": sim.executor.worker_peak_rss}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", default="inline,inline-2t,process,ray")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    names = args.only.split(",")
    out = {}
    for name in names:
        out[name] = r = play(name, args)
        print(f"{name:10s} setup {r['setup_s']:6.1f} s, rounds "
              + ", ".join(f"{s:.1f}" for s in r["rounds_s"]) + " s", flush=True)
    base = out.get("inline")
    print(f"\nquickstart, {args.workers} workers, {os.cpu_count()} cores; "
          "steady round = mean of rounds 2..")
    print(f"{'executor':10s} {'round 1 s':>10s} {'steady s':>9s} {'speed-up':>9s} "
          f"{'same result':>12s}  worker peak RSS")
    for name, r in out.items():
        steady = r["rounds_s"][1:] or r["rounds_s"]
        mean = sum(steady) / len(steady)
        ratio = ""
        if base is not None:
            b = base["rounds_s"][1:] or base["rounds_s"]
            ratio = f"{(sum(b) / len(b)) / mean:.2f}x"
        same = "-" if base is None or name == "inline-2t" else str(
            r["summary"] == base["summary"] and r["events"] == base["events"])
        rss = ", ".join(f"{v / 2**30:.2f} GiB" for v in r["workers"].values()) or "-"
        print(f"{name:10s} {r['rounds_s'][0]:10.1f} {mean:9.1f} {ratio:>9s} {same:>12s}  {rss}")


if __name__ == "__main__":
    main()

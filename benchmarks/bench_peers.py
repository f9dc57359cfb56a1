"""Peers: the quickstart's real client work under fedsim and under Flower's simulation engine.

    make bench-setup                      # once: .venv-bench, with the `bench` extra (Flower, pfl)
    .venv-bench/bin/python benchmarks/bench_peers.py [--rounds 3] [--only process,ray,flower,pfl]
                                                     [--workers 2] [--smoke]

The work (issue 16): ``scenarios/quickstart.yaml`` with ``server.model: null`` — 20 clients,
minilm-l6 LoRA r=8 on q/v, 5 local steps of 16 at length 64, FedAvg, 3 rounds, the federated
adapter scored on the same 200 articles after every round. Each peer plays it in a process of
its own, one after the other (never beside another job: the machine has 2 cores):

- ``process`` / ``ray``: ``fedsim`` with ``executor.name`` process or ray, ``--workers`` workers
  of 1 torch thread each (the SimPy network runs too: it is part of what fedsim does);
- ``flower`` (``benchmarks/flower_peer.py``): Flower's simulation engine
  (``flwr.simulation.run_simulation``, Ray backend, ``--workers`` ClientApps training at once,
  1 CPU and 1 torch thread each): a ``FedAvg`` strategy whose rounds go to the clients fedsim
  selected (a supernode per client: its own partition, batches and seed — the same ones, from
  fedsim's functions), Flower's own weighted average of the returned weights, and the same
  evaluation as a central ``evaluate_fn``;
- ``pfl`` (``benchmarks/pfl_peer.py``): Apple's pfl, ``--workers`` worker processes
  (torch.distributed, 1 torch thread each) sharing each round's cohort of fedsim's selected
  clients, pfl's ``FederatedAveraging`` whose ``train_one_user`` runs the client's fedsim job,
  pfl's central update, and the same evaluation on worker 0 after each round.

Before any time is compared the numbers must agree: every peer's evaluation loss after each
round within 1e-6 (relative) of the first peer's. Printed per peer: start-up (process start to
the end of round 1, less one steady round: imports, model loading, starting workers or Ray and
their first load of the base model), each round's wall time (dispatch to evaluation),
the steady round (mean of rounds 2..), peak PSS of the process tree (the driver, its workers,
Ray's daemons; sampled every 0.5 s), the final accuracy; then the ratios to Flower's and to
pfl's.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("process", "ray", "flower", "pfl")
PLAYBACK = ("flower", "pfl")  # peers that play fedsim's selection: a fedsim run goes first
AGREE_RTOL = 1e-6  # evaluation loss, relative: float sums in another order stay far inside


def scenario_doc(rounds: int, smoke: bool, sets: list[str] = ()) -> dict[str, Any]:
    """The quickstart as a plain document (``server.model: null``); ``smoke``: 1 round, 2
    tiny-bert clients on 200 examples; then ``sets`` (``--set`` overrides, e.g.
    ``executor.allocator=system``)."""
    import yaml

    from fedsim.scenario import apply_overrides
    doc = yaml.safe_load((ROOT / "scenarios/quickstart.yaml").read_text())
    # the work: 20 clients, every available one each round, the adapter scored on
    # 200 articles a round (and each client's own at the end, after the timed rounds)
    apply_overrides(doc, [f"rounds={rounds}", "server.model=null", "clients.0.count=10",
                          "clients.1.count=6", "clients.2.count=4",
                          "round_policy.clients_per_round=null", "task.eval_examples=200",
                          "task.client_eval_examples=100"])
    if smoke:
        doc["rounds"] = 1
        doc["clients"] = [{"name": "laptops", "profile": "laptop", "count": 2,
                           "model": "tiny-bert"}]
        apply_overrides(doc, ["task.max_train_examples=200", "task.eval_examples=20",
                              "training.local_steps=2", "training.batch_size=8",
                              "training.max_length=32"])
    apply_overrides(doc, list(sets))
    return doc


class PssSampler(threading.Thread):
    """Peak proportional set size of this process and all its descendants, bytes."""

    def __init__(self, period_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.period_s, self.peak, self._done = period_s, 0, threading.Event()

    def run(self) -> None:
        import psutil
        me = psutil.Process()
        while not self._done.wait(self.period_s):
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a process that just ended
                    total += p.memory_full_info().pss
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def process_start_s() -> float:
    """This process's start, on time.time()'s clock (start-up includes the imports)."""
    import psutil
    return psutil.Process().create_time()


# --- fedsim ---------------------------------------------------------------------------------------


def play_fedsim(executor: str, doc: dict[str, Any], workers: int) -> dict[str, Any]:
    from fedsim.engine import Simulation
    from fedsim.scenario import apply_overrides, validate
    doc = json.loads(json.dumps(doc))
    apply_overrides(doc, [f"executor.name={executor}", f"executor.workers={workers}",
                          "executor.threads_per_job=1"])
    sim = Simulation(validate(doc))
    selected: list[tuple[int, list[int]]] = []
    aggregate = sim.workload.aggregate

    def record(round_: int, arrivals: list[Any]) -> float:  # which clients FedAvg took
        selected.append((round_, sorted(a.client for a in arrivals)))
        return aggregate(round_, arrivals)

    sim.workload.aggregate = record
    marks: list[float] = []
    submit_train = sim.executor.submit_train

    def submit(*args: Any, **kwargs: Any) -> Any:  # the first dispatch: round 1 begins
        if not marks:
            marks.append(time.time())
        return submit_train(*args, **kwargs)

    sim.executor.submit_train = submit
    sim.run(progress=lambda done: marks.append(time.time()))
    sim.workload.close()
    losses = [q.get("loss") for q in sim.quality_by_round]
    acc = [q.get("accuracy") for q in sim.quality_by_round]
    return {"marks": marks, "selected": selected, "loss": losses, "accuracy": acc}


# --- the comparison -------------------------------------------------------------------------------


def one(args: argparse.Namespace) -> None:
    """A single peer, in this process (the parent starts one per peer)."""
    started = process_start_s()
    sampler = PssSampler()
    sampler.start()
    doc = json.loads(Path(args.doc).read_text())
    if args.one in PLAYBACK:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # the peers' torch: 1 thread each
        # Their sides live in modules of their own that their worker processes import
        # (benchmarks/flower_peer.py: Ray's workers import it, as `flwr run` imports an app; a
        # ClientApp defined in __main__ would be pickled by value and rebuild its trainer on
        # every message).
        here = str(Path(__file__).resolve().parent)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (here, os.environ.get("PYTHONPATH")) if p)
        selected = [(r, list(c)) for r, c in json.loads(Path(args.selected).read_text())]
        if args.one == "flower":
            from flower_peer import play_flower
            out = play_flower(doc, args.workers, selected)
        else:
            from pfl_peer import play_pfl
            out = play_pfl(doc, args.workers, selected)
    else:
        out = play_fedsim(args.one, doc, args.workers)
    out["pss_bytes"] = sampler.stop()
    out["started"] = started
    Path(args.result).write_text(json.dumps(out))


def run_peer(name: str, doc_path: Path, tmp: Path, args: argparse.Namespace,
             selected: Path | None) -> dict[str, Any]:
    result = tmp / f"{name}.json"
    cmd = [sys.executable, __file__, "--one", name, "--doc", str(doc_path), "--result",
           str(result), "--workers", str(args.workers)]
    if selected is not None:
        cmd += ["--selected", str(selected)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(result.read_text())
    marks = out["marks"]
    out["rounds_s"] = [b - a for a, b in itertools.pairwise(marks)]
    steady = out["rounds_s"][1:] or out["rounds_s"]
    out["steady_s"] = sum(steady) / len(steady)
    # Start-up: process start to round 1's end, less a steady round (imports, model loading,
    # starting workers or Ray, and each worker's first load of the base model).
    out["startup_s"] = marks[1] - out["started"] - out["steady_s"]
    return out


def installed(peer: str) -> bool:
    """Whether ``peer``'s packages are importable here (Ray, Flower, pfl: the bench extra)."""
    need = {"ray": "ray", "flower": "flwr", "pfl": "pfl"}.get(peer)
    return need is None or importlib.util.find_spec(need) is not None


def agree(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= AGREE_RTOL * max(abs(x), 1e-12)
                                    for x, y in zip(a, b, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", default=None,
                    help="peers to play (default: those whose packages are installed)")
    ap.add_argument("--smoke", action="store_true", help="1 round, 2 tiny-bert clients")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a scenario override for every peer (fedsim's executor.* for its own)")
    ap.add_argument("--one", choices=PEERS, help=argparse.SUPPRESS)
    ap.add_argument("--doc", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--selected", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args)
        return
    only = args.only.split(",") if args.only else [n for n in PEERS if installed(n)]
    names = [n for n in PEERS if n in only]
    if any(n in PLAYBACK for n in names) and not any(n in names for n in ("process", "ray")):
        names.insert(0, "process")  # Flower and pfl play fedsim's selection: fedsim runs first
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        doc_path = tmp / "scenario.json"
        doc_path.write_text(json.dumps(scenario_doc(args.rounds, args.smoke, args.set)))
        out: dict[str, dict[str, Any]] = {}
        for name in names:
            sel = None
            if name in PLAYBACK:
                sel = tmp / "selected.json"
                sel.write_text(json.dumps(next(iter(out.values()))["selected"]))
            out[name] = r = run_peer(name, doc_path, tmp, args, sel)
            print(f"{name:8s} start-up {r['startup_s']:6.1f} s ({r['marks'][0] - r['started']:.1f} "
                  "s to the first job), rounds "
                  + ", ".join(f"{s:.1f}" for s in r["rounds_s"]) + " s", flush=True)
    first = next(iter(out.values()))
    same = {n: agree(r["loss"], first["loss"]) for n, r in out.items()}
    print(f"\nquickstart's client work, server.model null, {args.workers} workers, "
          f"{os.cpu_count()} cores; steady round = mean of rounds 2..; same = evaluation loss "
          f"of every round within {AGREE_RTOL:g} of {next(iter(out))}'s")
    print(f"{'peer':8s} {'start-up s':>10s} {'round 1 s':>9s} {'steady s':>9s} "
          f"{'peak PSS GiB':>12s} {'accuracy':>9s} {'loss':>10s} {'same':>5s}")
    for name, r in out.items():
        print(f"{name:8s} {r['startup_s']:10.1f} {r['rounds_s'][0]:9.1f} {r['steady_s']:9.1f} "
              f"{r['pss_bytes'] / 2**30:12.2f} {r['accuracy'][-1]:9.3f} {r['loss'][-1]:10.6f} "
              f"{same[name]!s:>5s}")
    for ref in ("flower", "pfl"):
        base = out.get(ref)
        if base is None or not all(same.values()):
            continue
        for name, r in out.items():
            if name not in PLAYBACK:
                print(f"{name} / {ref}: steady round {r['steady_s'] / base['steady_s']:.2f}, "
                      f"start-up {r['startup_s'] / base['startup_s']:.2f}, "
                      f"PSS {r['pss_bytes'] / base['pss_bytes']:.2f}")
    if not all(same.values()):
        sys.exit("the peers disagree: " + ", ".join(
            f"{n}: {r['loss']}" for n, r in out.items()) + " (times not compared)")


if __name__ == "__main__":
    main()

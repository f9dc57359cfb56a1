"""The adaptive k against the channel estimate: exact vs realistic, and fixed k = 128.

    python benchmarks/bench_adaptive_k.py [--seeds 3] [--rounds 3]

``scenarios/distillation-generation.yaml`` with tiny-llama standing in for smollm2 (the k a
client picks depends only on its rate estimate and the payload's shape: smollm2's tokenizer and
vocabulary, which tiny-llama shares). Prints, per setting, the uploads, their mean k, how many
took longer than ``transfer.logits.time_budget_s`` and the bytes up per seed.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCENARIO = Path(__file__).resolve().parent.parent / "scenarios" / "distillation-generation.yaml"
TINY = ["clients.0.model=tiny-llama", "clients.1.model=tiny-llama", "server.model=tiny-llama",
        "task.eval_examples=4", "training.local_steps=1", "executor.name=inline"]
SETTINGS = {"adaptive, exact": ["transfer.logits.adaptive=true", "transfer.logits.estimate=exact"],
            "adaptive, realistic": ["transfer.logits.adaptive=true"],
            "fixed k = 128": []}


def main() -> None:
    from fedsim.engine import Simulation
    from fedsim.scenario import load

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for label, sets in SETTINGS.items():
        ks, over, up = [], 0, 0
        for seed in range(args.seeds):
            sim = Simulation(load(SCENARIO, [*TINY, *sets, f"rounds={args.rounds}",
                                             f"seed={seed}"]))
            res = sim.run()
            budget = sim.scenario.transfer.logits.time_budget_s
            start = {}
            for r in csv.DictReader(io.StringIO(res.recorder.events_csv())):
                key = (r["round"], r["client"])
                if r["kind"] == "encode":
                    ks.append(int(r["detail"].split("k=")[1].split(",")[0]))
                elif r["kind"] == "uplink_start":
                    start[key] = float(r["time_s"])
                elif r["kind"] == "uplink_end":
                    over += float(r["time_s"]) - start[key] > budget
            up += res.summary["comm"]["bytes_up"]
        print(f"{label:>20}: {len(ks)} uploads, mean k {statistics.mean(ks):.1f}, "
              f"{over} longer than the budget, {up / args.seeds / 1e3:.1f} kB up per seed")


if __name__ == "__main__":
    main()

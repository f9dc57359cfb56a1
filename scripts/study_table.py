"""A study's table from its run directories: mean ± 95% half-width over seeds per variant.

    python scripts/study_table.py OUT [VARIANT ...] [--target X]

``OUT/<variant>/seed=K/summary.json`` are the runs of ``fedsim run --seeds N --out
OUT/<variant>`` (one directory per variant). Columns: the server's primary metric after the
last round and after the first, the mean over clients of their own final model's metric
(``quality.clients_final``), bytes up and down per round (kB), simulated time of the run (s) and
wall time per run (s); with ``--target X``, the simulated time at the end of the first round
whose server metric reaches X (from ``rounds.csv``), over the seeds that reach it, and how many
do. Intervals: Student t over the seeds (:func:`fedsim.intervals.t_interval`).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from fedsim.intervals import t_interval


def _time_to(run_dir: Path, metric: str, target: float) -> float | None:
    """End of the first round whose server metric reaches ``target`` (s), or None."""
    with (run_dir / "rounds.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            if float(row[f"server_{metric}"]) >= target:
                return float(row["end_s"])
    return None


def _row(runs: list[dict], dirs: list[Path], target: float | None) -> dict[str, str]:
    metric = runs[0]["quality"]["metric"]

    def col(f, fmt: str = "{:.3f}") -> str:
        return t_interval([f(s) for s in runs]).text(fmt)

    def per_round(key: str):
        return lambda s: s["comm"][key] / 1e3 / s["rounds_completed"]

    out = {
        f"server {metric}": col(lambda s: s["quality"]["server_by_round"][-1]),
        "after round 1": col(lambda s: s["quality"]["server_by_round"][0]),
        f"clients' own {metric}": col(lambda s: float(np.mean(
            [m[metric] for m in s["quality"]["clients_final"].values()]))),
        "kB up / round": col(per_round("bytes_up"), "{:,.1f}"),
        "kB down / round": col(per_round("bytes_down"), "{:,.1f}"),
        "sim time (s)": col(lambda s: s["sim_time_s"], "{:.1f}"),
        "wall (s)": col(lambda s: s["wall_time_s"], "{:.0f}"),
    }
    if target is not None:
        times = [t for d in dirs if (t := _time_to(d, metric, target)) is not None]
        out[f"s to {metric} {target:g}"] = (
            f"{t_interval(times).text('{:.1f}')} ({len(times)}/{len(dirs)})")
    return out


def table(out: Path, variants: list[str], target: float | None = None) -> str:
    rows = {}
    for v in variants:
        paths = sorted((out / v).glob("seed=*/summary.json"))
        runs = [json.loads(p.read_text()) for p in paths]
        if runs:
            rows[f"{v} (n={len(runs)})"] = _row(runs, [p.parent for p in paths], target)
    if not rows:
        return f"no runs under {out}"
    heads = list(next(iter(rows.values())))
    lines = ["| variant | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    lines += [f"| {v} | " + " | ".join(r[h] for h in heads) + " |" for v, r in rows.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("variants", nargs="*")
    ap.add_argument("--target", type=float, default=None)
    args = ap.parse_args()
    names = args.variants or sorted(p.name for p in args.out.iterdir() if p.is_dir())
    print(table(args.out, names, args.target))

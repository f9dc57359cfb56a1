"""A study's table from its run directories: mean ± 95% half-width over seeds per variant.

    python scripts/study_table.py OUT [VARIANT ...]

``OUT/<variant>/seed=K/summary.json`` are the runs of ``fedsim run --seeds N --out
OUT/<variant>`` (one directory per variant). Columns: the server's primary metric after the
last round and after the first, the mean over clients of their own final model's metric
(``quality.clients_final``), bytes up and down per round (kB), simulated time of the run (s) and
wall time per run (s). Intervals: Student t over the seeds (:func:`fedsim.intervals.t_interval`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from fedsim.intervals import t_interval


def _row(runs: list[dict]) -> dict[str, str]:
    metric = runs[0]["quality"]["metric"]

    def col(f, fmt: str = "{:.3f}") -> str:
        return t_interval([f(s) for s in runs]).text(fmt)

    def per_round(key: str):
        return lambda s: s["comm"][key] / 1e3 / s["rounds_completed"]

    return {
        f"server {metric}": col(lambda s: s["quality"]["server_by_round"][-1]),
        "after round 1": col(lambda s: s["quality"]["server_by_round"][0]),
        f"clients' own {metric}": col(lambda s: float(np.mean(
            [m[metric] for m in s["quality"]["clients_final"].values()]))),
        "kB up / round": col(per_round("bytes_up"), "{:,.1f}"),
        "kB down / round": col(per_round("bytes_down"), "{:,.1f}"),
        "sim time (s)": col(lambda s: s["sim_time_s"], "{:.1f}"),
        "wall (s)": col(lambda s: s["wall_time_s"], "{:.0f}"),
    }


def table(out: Path, variants: list[str]) -> str:
    rows = {}
    for v in variants:
        runs = [json.loads(p.read_text()) for p in sorted((out / v).glob("seed=*/summary.json"))]
        if runs:
            rows[f"{v} (n={len(runs)})"] = _row(runs)
    if not rows:
        return f"no runs under {out}"
    heads = list(next(iter(rows.values())))
    lines = ["| variant | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    lines += [f"| {v} | " + " | ".join(r[h] for h in heads) + " |" for v, r in rows.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    root = Path(sys.argv[1])
    names = sys.argv[2:] or sorted(p.name for p in root.iterdir() if p.is_dir())
    print(table(root, names))

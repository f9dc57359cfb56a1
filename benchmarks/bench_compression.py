"""Compression study: what each way of encoding uploads costs in bytes, time and accuracy.

    python benchmarks/bench_compression.py [--small] [--rounds N] [--out DIR] [--target ACC]
                                           [--scenario YAML] [--only LABEL,...] [--threads N]

Runs ``scenarios/compression-study.yaml`` (20 phones and laptops sharing a 1.4 MHz uplink,
deadline rounds, a 2.66 MB fp32 LoRA update) once per codec setting, one after the other in
this process, with the same seed: ``none``, ``fp16``, fixed ``topk`` at ratios 0.25, 0.1 and
0.01 (fp32 values, error feedback), ``qsgd`` at 8 and 4 bits, and ``adaptive`` (each client picks
the least lossy setting whose payload fits 0.8 of the time left on its current uplink share).

For each setting it reports the bytes clients put on the uplink (every encoded payload, late
ones included) and the bytes of accepted updates (``comm.bytes_up_accepted``), the mean
payload, deadline misses, the compression ratio raw / encoded over accepted updates, the mean
relative L2 error of the encodings, the simulated time at which the server metric first
reaches the target, the final server metric and the mean final client metric
(``quality.clients_final``). Output in ``--out``
(default ``runs/compression-study``): one run directory per setting (a finished one is reused
when its resolved scenario is unchanged, so an interrupted study resumes), ``compression.csv``
(one row per setting), ``compression_rounds.csv`` (one row per setting and round),
``bytes_vs_accuracy.png`` and ``accuracy_vs_time.png`` (one line per setting).

The figure to reach (issue 4), checked and printed at the end:
  1. adaptive ends within 1 point of none's final accuracy with >= 10x fewer bytes sent up;
  2. adaptive reaches the target accuracy sooner in simulated time than every fixed setting of
     about the same average payload (within a factor of 2 of adaptive's; the nearest if none is).

The target (``--target``) defaults to 95% of the best final server metric of the study.
``--small`` swaps every client to tiny-bert on 200 examples, 2 local steps, 2 rounds and a
0.5 s deadline (the tiny adapter is 23x smaller, so the deadline shrinks with it): a smoke run
of the whole pipeline in well under a minute whose accuracies mean nothing.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "compression-study.yaml"

# label -> --set overrides; every label but "adaptive" is a fixed setting.
SETTINGS: dict[str, list[str]] = {
    "none": ["compression.codec=none"],
    "fp16": ["compression.codec=fp16"],
    "topk-0.25": ["compression.codec=topk", "compression.ratio=0.25"],
    "topk-0.1": ["compression.codec=topk", "compression.ratio=0.1"],
    "topk-0.01": ["compression.codec=topk", "compression.ratio=0.01"],
    "qsgd-8": ["compression.codec=qsgd", "compression.bits=8"],
    "qsgd-4": ["compression.codec=qsgd", "compression.bits=4"],
    "adaptive": ["compression.codec=adaptive"],
    # adaptive with a bits budget too: at most 1/BUDGET_DIVISOR of the fp32 update (computed
    # from the scenario's adapter, see budget_overrides), and the deadline's time budget.
    "adaptive-budget": ["compression.codec=adaptive"],
}
ADAPTIVE = "adaptive"
ADAPTIVES = ("adaptive", "adaptive-budget")  # the settings the claims are checked for
BUDGET_DIVISOR = 10
SMALL_ROUNDS = 2
SMALL_DEADLINE_S = 0.5
SMALL_OVERRIDES = ["task.max_train_examples=200",
                   "task.eval_examples=20", "training.local_steps=2", "training.batch_size=8",
                   "training.max_length=32", f"round_policy.deadline_s={SMALL_DEADLINE_S}"]
POINT = 0.01  # "within 1 point" of accuracy
BYTES_FACTOR = 10.0  # ">= 10x fewer bytes up"
SAME_PAYLOAD_FACTOR = 2.0  # fixed settings "of the same average payload size": within 2x
ENCODE_DETAIL = re.compile(r"^(?P<codec>\S+) raw=(?P<raw>\d+) err=(?P<err>\S+)$")


# --- running ---------------------------------------------------------------------------------


def study_overrides(scenario_path: str | Path = SCENARIO, small: bool = False,
                    rounds: int | None = None) -> list[str]:
    """The --set overrides every setting of the study shares (--small, --rounds)."""
    from fedsim.scenario import load

    out = []
    if small:
        groups = len(load(scenario_path).clients)
        out += [f"clients.{i}.model=tiny-bert" for i in range(groups)] + SMALL_OVERRIDES
        rounds = rounds or SMALL_ROUNDS
    if rounds is not None:
        out.append(f"rounds={rounds}")
    return out


def run_setting(scenario_path: str | Path, overrides: Sequence[str], run_dir: Path) -> bool:
    """Run one setting into ``run_dir``, unless a finished run of the same resolved scenario is
    there already. Returns True if it ran."""
    from fedsim.engine import run
    from fedsim.metrics import write_run_dir
    from fedsim.scenario import load

    scenario = load(scenario_path, list(overrides))
    done = run_dir / "summary.json"
    old = run_dir / "scenario.yaml"
    if done.exists() and old.exists() and old.read_text(encoding="utf-8") == scenario.to_yaml():
        return False
    write_run_dir(run(scenario), run_dir)
    return True


@dataclass
class SettingResult:
    """One setting's run, read back from its run directory."""

    label: str
    run_dir: Path
    summary: dict[str, Any]
    end_s: list[float]  # simulated time at the end of each round
    accuracy: list[float]  # server metric after each round
    bytes_sent_by_round: list[int]  # cumulative payload bytes encoded up to each round
    encodes: list[tuple[int, str, int, float, bool]] = field(default_factory=list)
    # (payload bytes, codec setting, raw bytes, relative error, accepted) per encoded update
    wall_s: float = 0.0

    @property
    def metric(self) -> str:
        return self.summary["quality"]["metric"]

    @property
    def bytes_sent(self) -> int:
        return sum(e[0] for e in self.encodes)

    @property
    def bytes_up(self) -> int:
        return int(self.summary["comm"]["bytes_up_accepted"])

    @property
    def mean_payload_bytes(self) -> float:
        return self.bytes_sent / len(self.encodes) if self.encodes else math.nan

    @property
    def compression_ratio(self) -> float:
        """raw / encoded bytes over the accepted updates (nan when none was accepted)."""
        ok = [e for e in self.encodes if e[4]]
        return sum(e[2] for e in ok) / sum(e[0] for e in ok) if ok else math.nan

    @property
    def mean_rel_error(self) -> float:
        return sum(e[3] for e in self.encodes) / len(self.encodes) if self.encodes else math.nan

    @property
    def final_accuracy(self) -> float:
        return self.accuracy[-1] if self.accuracy else math.nan

    @property
    def clients_final_accuracy(self) -> float:
        scores = [c[self.metric] for c in self.summary["quality"]["clients_final"].values()
                  if c.get(self.metric) is not None]
        return sum(scores) / len(scores) if scores else math.nan

    def codec_mix(self, top: int = 3) -> str:
        """The settings used, most frequent first: ``fp16 45%, qsgd(bits=8) 30%, ...``."""
        counts = collections.Counter(e[1] for e in self.encodes)
        n = sum(counts.values())
        shown = [f"{c} {k / n:.0%}" for c, k in counts.most_common(top)]
        return ", ".join(shown) + (", ..." if len(counts) > top else "")

    def time_to(self, target: float) -> float:
        """Simulated time of the first round end whose server metric is >= target (inf: never)."""
        return next((t for t, a in zip(self.end_s, self.accuracy, strict=True) if a >= target),
                    math.inf)


def read_setting(label: str, run_dir: Path, wall_s: float = 0.0) -> SettingResult:
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    metric = summary["quality"]["metric"]
    with (run_dir / "rounds.csv").open(encoding="utf-8", newline="") as f:
        rounds = list(csv.DictReader(f))
    with (run_dir / "events.csv").open(encoding="utf-8", newline="") as f:
        events = list(csv.DictReader(f))
    ok = {(e["round"], e["client"]) for e in events if e["kind"] == "ingest_end"}
    encodes, sent_in_round = [], collections.Counter()
    for e in events:
        if e["kind"] != "encode":
            continue
        m = ENCODE_DETAIL.match(e["detail"])
        if m is None:
            raise ValueError(f"{run_dir}/events.csv: unexpected encode detail {e['detail']!r}")
        encodes.append((int(e["bytes"]), m["codec"], int(m["raw"]), float(m["err"]),
                        (e["round"], e["client"]) in ok))
        sent_in_round[int(e["round"])] += int(e["bytes"])
    cumulative, total = [], 0
    for r in rounds:
        total += sent_in_round[int(r["round"])]
        cumulative.append(total)
    return SettingResult(label, run_dir, summary, [float(r["end_s"]) for r in rounds],
                         [float(r[f"server_{metric}"]) for r in rounds], cumulative, encodes,
                         wall_s)


def run_study(scenario_path: str | Path = SCENARIO, out: str | Path = "runs/compression-study",
              small: bool = False, rounds: int | None = None,
              settings: dict[str, list[str]] | None = None,
              log: Callable[[str], None] | None = print) -> list[SettingResult]:
    """Run (or reuse) every setting, sequentially, and read the results back."""
    settings = SETTINGS if settings is None else settings
    shared = study_overrides(scenario_path, small, rounds)
    out = Path(out)
    results = []
    for label, overrides in settings.items():
        if label == "adaptive-budget":
            overrides = [*overrides, *budget_overrides(scenario_path, shared)]
        t0 = time.perf_counter()
        ran = run_setting(scenario_path, [*shared, *overrides], out / label)
        wall = time.perf_counter() - t0
        result = read_setting(label, out / label, wall if ran else 0.0)
        if log:
            how = f"{wall:.1f} s" if ran else "reused"
            log(f"{label:>10}: final {result.metric} {result.final_accuracy:.3f}, "
                f"{result.bytes_sent / 1e6:.2f} MB sent, "
                f"{result.summary['overload']['deadline_misses']} deadline misses ({how})")
        results.append(result)
    return results


def budget_overrides(scenario_path: str | Path, shared: Sequence[str]) -> list[str]:
    """``compression.max_bytes`` = the scenario's fp32 adapter bytes / BUDGET_DIVISOR."""
    from fedsim import codecs
    from fedsim.federation import local_config
    from fedsim.scenario import load
    from fedsim.training import FamilyTrainer

    sc = load(scenario_path, list(shared))
    adapter = FamilyTrainer(sc.clients[0].model, sc.task.kind, 5, local_config(sc),
                            sc.seed).initial_adapter()
    return [f"compression.max_bytes={codecs.raw_bytes(adapter) // BUDGET_DIVISOR}"]


# --- analysis --------------------------------------------------------------------------------


def default_target(results: Sequence[SettingResult], fraction: float = 0.95) -> float:
    """``fraction`` of the best final server metric of the study."""
    finals = [r.final_accuracy for r in results if not math.isnan(r.final_accuracy)]
    return fraction * max(finals) if finals else math.nan


def table(results: Sequence[SettingResult], target: float) -> list[dict[str, Any]]:
    """One row per setting (the CSV's columns)."""
    return [{
        "setting": r.label,
        "codecs_used": r.codec_mix(),
        "updates": len(r.encodes),
        "accepted": r.summary["counts"]["updates_accepted"],
        "deadline_misses": r.summary["overload"]["deadline_misses"],
        "bytes_sent": r.bytes_sent,
        "bytes_up": r.bytes_up,
        "mean_payload_bytes": round(r.mean_payload_bytes, 1),
        "compression_ratio": round(r.compression_ratio, 3),
        "mean_rel_error": round(r.mean_rel_error, 4),
        "sim_time_s": round(r.summary["sim_time_s"], 3),
        "target": round(target, 4),
        "time_to_target_s": round(r.time_to(target), 3),
        "final_accuracy": round(r.final_accuracy, 4),
        "clients_final_accuracy": round(r.clients_final_accuracy, 4),
        "wall_s": round(r.wall_s, 1),
    } for r in results]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    cols = [("setting", "setting", "{}"), ("deadline_misses", "misses", "{}"),
            ("bytes_sent", "MB sent", "{:.2f}"), ("bytes_up", "MB up (acc.)", "{:.2f}"),
            ("mean_payload_bytes", "kB/update", "{:.1f}"), ("compression_ratio", "ratio", "{:.1f}"),
            ("mean_rel_error", "rel err", "{:.3f}"), ("time_to_target_s", "t target (s)", "{:.1f}"),
            ("final_accuracy", "server acc", "{:.3f}"),
            ("clients_final_accuracy", "client acc", "{:.3f}")]
    scale = {"bytes_sent": 1e6, "bytes_up": 1e6, "mean_payload_bytes": 1e3}

    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        v = row[key]
        if isinstance(v, float) and math.isinf(v):
            return "never"
        return fmt.format(v / scale[key] if key in scale else v)

    body = [[cell(r, k, f) for k, _, f in cols] for r in rows]
    head = [h for _, h, _ in cols]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    lines += [f"  {r['setting']}: {r['codecs_used']}" for r in rows if r["setting"] in ADAPTIVES]
    return "\n".join(lines)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return path


def write_rounds_csv(results: Sequence[SettingResult], path: Path) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["setting", "round", "end_s", "bytes_sent_cumulative", "server_accuracy"])
        for r in results:
            for i, row in enumerate(zip(r.end_s, r.bytes_sent_by_round, r.accuracy, strict=True)):
                w.writerow([r.label, i, *row])
    return path


def comparable(results: Sequence[SettingResult], to: SettingResult) -> list[SettingResult]:
    """Fixed settings whose mean payload is within SAME_PAYLOAD_FACTOR of ``to``'s (else the
    nearest one, in log scale)."""
    fixed = [r for r in results if r.label not in ADAPTIVES and r.encodes]
    if not fixed or not to.encodes:
        return []

    def distance(r: SettingResult) -> float:
        return abs(math.log(r.mean_payload_bytes / to.mean_payload_bytes))

    near = [r for r in fixed if distance(r) <= math.log(SAME_PAYLOAD_FACTOR)]
    return near or [min(fixed, key=distance)]


@dataclass(frozen=True)
class Claim:
    text: str
    holds: bool | None  # None: cannot be checked (a setting is missing)
    detail: str


def claims(results: Sequence[SettingResult], target: float) -> list[Claim]:
    """The issue's figure to reach, checked for each adaptive setting of the study."""
    labels = [r.label for r in results if r.label in ADAPTIVES] or [ADAPTIVE]
    return [c for label in labels for c in claims_for(results, target, label)]


def claims_for(results: Sequence[SettingResult], target: float, label: str) -> list[Claim]:
    by = {r.label: r for r in results}
    a, n = by.get(label), by.get("none")
    out = []
    text1 = (f"{label} within {POINT * 100:.0f} point of none's final accuracy with "
             f">= {BYTES_FACTOR:.0f}x fewer bytes sent up")
    if a is None or n is None:
        out.append(Claim(text1, None, f"needs the none and {label} settings"))
    else:
        gap = n.final_accuracy - a.final_accuracy
        factor = n.bytes_sent / a.bytes_sent if a.bytes_sent else math.inf
        holds = gap <= POINT + 1e-12 and factor >= BYTES_FACTOR
        out.append(Claim(text1, holds,
                         f"accuracy {a.final_accuracy:.3f} vs none {n.final_accuracy:.3f} "
                         f"({-gap * 100:+.1f} points); bytes sent {factor:.1f}x fewer "
                         f"({a.bytes_sent / 1e6:.2f} MB vs {n.bytes_sent / 1e6:.2f} MB)"))
    text2 = (f"{label} reaches the target accuracy sooner (simulated time) than every fixed "
             "setting of about its average payload size")
    peers = comparable(results, a) if a is not None else []
    if a is None or not peers:
        out.append(Claim(text2, None, f"needs {label} and at least one fixed setting"))
    else:
        t_a = a.time_to(target)
        holds = t_a < min(p.time_to(target) for p in peers)

        def show(t: float) -> str:
            return "never" if math.isinf(t) else f"{t:.1f} s"

        peer_text = ", ".join(f"{p.label} ({p.mean_payload_bytes / 1e3:.1f} kB/update) "
                              f"{show(p.time_to(target))}" for p in peers)
        out.append(Claim(text2, holds,
                         f"target {target:.3f}: {label} ({a.mean_payload_bytes / 1e3:.1f} "
                         f"kB/update) {show(t_a)}; {peer_text}"))
    return out


def format_claims(found: Sequence[Claim]) -> str:
    word = {True: "HOLDS", False: "DOES NOT HOLD", None: "NOT CHECKED"}
    return "\n".join(f"[{word[c.holds]}] {c.text}\n    {c.detail}" for c in found)


# --- figures ---------------------------------------------------------------------------------


def _axes(width: float = 8.0, height: float = 5.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots()


def _style(label: str) -> dict[str, Any]:
    if label in ADAPTIVES:
        return {"color": "black" if label == ADAPTIVE else "dimgray", "linewidth": 2.5,
                "marker": "o", "zorder": 3}
    return {"linewidth": 1.3, "marker": ".", "alpha": 0.85}


def plot_bytes_vs_accuracy(results: Sequence[SettingResult], path: Path) -> Path:
    """Server metric after each round against the payload bytes sent up so far (log x)."""
    fig, ax = _axes()
    for r in results:
        if r.accuracy:
            ax.plot([b / 1e6 for b in r.bytes_sent_by_round], r.accuracy, label=r.label,
                    **_style(r.label))
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes sent up (MB, log scale)")
    ax.set_ylabel(f"server {results[0].metric}" if results else "server metric")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncols=2)
    ax.set_title("Communication efficiency: accuracy vs bytes up, one line per codec")
    fig.savefig(path, dpi=120)
    return path


def plot_accuracy_vs_time(results: Sequence[SettingResult], path: Path,
                          target: float | None = None) -> Path:
    """Server metric at the end of each round against simulated time."""
    fig, ax = _axes()
    for r in results:
        if r.accuracy:
            ax.plot(r.end_s, r.accuracy, label=r.label, **_style(r.label))
    if target is not None and math.isfinite(target):
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target")
    ax.set_xlabel("simulated time at the end of the round (s)")
    ax.set_ylabel(f"server {results[0].metric}" if results else "server metric")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2)
    ax.set_title("Accuracy vs simulated time, one line per codec")
    fig.savefig(path, dpi=120)
    return path


def report(results: Sequence[SettingResult], out: Path, target: float | None = None
           ) -> tuple[list[dict[str, Any]], list[Claim], float]:
    """Write the CSVs and figures; return (rows, claims, target)."""
    target = default_target(results) if target is None else target
    rows = table(results, target)
    write_csv(rows, out / "compression.csv")
    write_rounds_csv(results, out / "compression_rounds.csv")
    plot_bytes_vs_accuracy(results, out / "bytes_vs_accuracy.png")
    plot_accuracy_vs_time(results, out / "accuracy_vs_time.png", target)
    return rows, claims(results, target), target


# --- command line ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true",
                   help="tiny-bert, 2 rounds, 0.5 s deadline: a smoke run (< 1 min)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default: the scenario's)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default runs/compression-study[-small])")
    p.add_argument("--target", type=float, default=None,
                   help="target server accuracy (default 95%% of the best final accuracy)")
    p.add_argument("--scenario", type=Path, default=SCENARIO)
    p.add_argument("--only", default=None,
                   help=f"comma-separated subset of {','.join(SETTINGS)}")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: 1 with --small, else torch's default)")
    args = p.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.only:
        unknown = sorted(set(args.only.split(",")) - set(SETTINGS))
        if unknown:
            p.error(f"--only: unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path("runs") / ("compression-study-small" if args.small
                                      else "compression-study")
    out.mkdir(parents=True, exist_ok=True)
    settings = SETTINGS if not args.only else {k: SETTINGS[k] for k in args.only.split(",")}
    threads = args.threads or (1 if args.small else None)
    if threads:
        # Tiny models gain nothing from threads, and on a busy machine spinning threads
        # slow tiny-bert's steps down by an order of magnitude.
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    results = run_study(args.scenario, out, args.small, args.rounds, settings)
    rows, found, target = report(results, out, args.target)
    print()
    print(f"compression study: {args.scenario.name}{' (--small)' if args.small else ''}, "
          f"{len(results[0].end_s)} rounds, target {results[0].metric} {target:.3f}, "
          f"{time.perf_counter() - t0:.0f} s wall")
    print(format_table(rows))
    print()
    print(format_claims(found))
    print(f"\nwritten to {out}/: compression.csv, compression_rounds.csv, "
          "bytes_vs_accuracy.png, accuracy_vs_time.png, one run directory per setting")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Figures from a run directory or a sweep directory: PNGs written into ``<dir>/plots/``.

Everything is read back from the files of the run directory (``events.csv``, ``rounds.csv``,
``clients.csv``, ``timeseries.csv``, ``summary.json``), so a figure can be redrawn from any run
without rerunning it. Per-update phase durations come from pairing events per (round, client):
download = downlink_start -> downlink_end, compute = train_start -> train_end, upload =
uplink_start -> uplink_end, queue = uplink_end -> ingest_start, server = ingest_start ->
ingest_end (or rejected). An interruption (outage, dropout, deadline miss, cancel) ends the
activity in progress: it counts for utilization, not for latency.

Figures are drawn on matplotlib's Agg canvas explicitly (``FigureCanvasAgg``): no pyplot, no
display, no global backend switch. A function whose data the run does not have (no quality
metric, ``output.events: false``) writes nothing and returns None.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator

from fedsim.atomic import atomic_file
from fedsim.devices import PROFILES
from fedsim.errors import FedsimError
from fedsim.intervals import Interval, t_interval

LIFE = ("download", "compute", "upload", "queue", "server")  # phases in the order they happen
PHASE_COLORS = {"download": "#4C72B0", "compute": "#DD8452", "upload": "#55A868",
                "queue": "#C44E52", "server": "#8172B3", "round": "#333333"}
_STARTS = {"downlink_start": "download", "train_start": "compute", "uplink_start": "upload",
           "ingest_start": "server"}
_ENDS = {"downlink_end": "download", "train_end": "compute", "uplink_end": "upload",
         "ingest_end": "server", "rejected": "server"}
_INTERRUPTS = {"outage", "dropout", "deadline_miss", "cancelled", "job_failed", "crash",
               "over_selected"}
DPI = 120


# --- reading a run directory -------------------------------------------------------------------


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except FileNotFoundError:
        raise FedsimError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FedsimError(f"{path}: cannot read: {e}") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise FedsimError(f"{path}: missing column(s) {', '.join(missing)}")
    return rows


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedsimError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise FedsimError(f"{path}: cannot read: {e}") from None


@dataclass(frozen=True)
class Intervals:
    """One activity's intervals: start/end times (s), client, and whether it completed."""

    start_s: np.ndarray
    end_s: np.ndarray
    client: np.ndarray
    done: np.ndarray

    @property
    def duration_s(self) -> np.ndarray:
        return (self.end_s - self.start_s)[self.done]


@dataclass(frozen=True)
class Run:
    """What the figures need from one run directory."""

    dir: Path
    summary: dict[str, Any]
    sim_time_s: float
    profile: np.ndarray  # per client
    cell: np.ndarray  # per client (-1: wired)
    num_cells: int
    workers: int
    queue_capacity: int
    rounds: list[dict[str, str]]
    has_events: bool
    activity: dict[str, Intervals]  # download, compute, upload, queue, server
    uplink_end: tuple[np.ndarray, np.ndarray]  # times (s), bytes of finished uploads
    queue: tuple[np.ndarray, np.ndarray]  # server queue series: times (s), length


def _pair_events(rows: list[dict[str, str]], sim_time_s: float
                 ) -> tuple[dict[str, Intervals], tuple[np.ndarray, np.ndarray]]:
    """One pass over events.csv: the intervals of every activity, keyed by (round, client)."""
    open_: dict[tuple[int, int], dict[str, float]] = defaultdict(dict)
    out: dict[str, list[tuple[float, float, int, bool]]] = {a: [] for a in LIFE}
    up_t, up_b = [], []
    for r in rows:
        kind = r["kind"]
        t, key = float(r["time_s"]), (int(r["round"]), int(r["client"]))
        if kind in _ENDS:
            phase = _ENDS[kind]
            start = open_[key].pop(phase, None)
            if start is not None:
                out[phase].append((start, t, key[1], True))
            if kind == "uplink_end":
                open_[key]["queue"] = t
                up_t.append(t)
                up_b.append(int(r["bytes"]))
        elif kind in _STARTS:
            if kind == "ingest_start" and "queue" in open_[key]:
                out["queue"].append((open_[key].pop("queue"), t, key[1], True))
            open_[key][_STARTS[kind]] = t
        elif kind == "queue_drop":
            start = open_[key].pop("queue", None)
            if start is not None:
                out["queue"].append((start, t, key[1], False))
        elif kind in _INTERRUPTS:
            for phase, start in open_.pop(key, {}).items():
                out[phase].append((start, t, key[1], False))
    for key, phases in open_.items():  # still running when the simulation ended
        for phase, start in phases.items():
            out[phase].append((start, sim_time_s, key[1], False))
    acts = {}
    for phase, items in out.items():
        a = np.array(items, dtype=float).reshape(-1, 4)
        acts[phase] = Intervals(a[:, 0], a[:, 1], a[:, 2].astype(int), a[:, 3].astype(bool))
    return acts, (np.array(up_t, dtype=float), np.array(up_b, dtype=float))


@lru_cache(maxsize=4)
def _load_run(run_dir: Path, stamp: tuple[int, ...]) -> Run:
    summary = _read_json(run_dir / "summary.json")
    sim_time_s = float(summary.get("sim_time_s") or 0.0)
    clients = _read_csv(run_dir / "clients.csv", ("client", "profile", "cell"))
    clients.sort(key=lambda c: int(c["client"]))
    try:
        scenario = yaml.safe_load((run_dir / "scenario.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        scenario = {}
    server = scenario.get("server") or {}
    events = _read_csv(run_dir / "events.csv", ("time_s", "round", "client", "kind", "bytes"))
    activity, uplink_end = _pair_events(events, sim_time_s)
    ts = _read_csv(run_dir / "timeseries.csv", ("time_s", "series", "value"))
    q = [(float(r["time_s"]), float(r["value"])) for r in ts if r["series"] == "server_queue"]
    qa = np.array(q, dtype=float).reshape(-1, 2)
    return Run(
        dir=run_dir, summary=summary, sim_time_s=sim_time_s,
        profile=np.array([c["profile"] for c in clients]),
        cell=np.array([int(c["cell"]) for c in clients], dtype=int),
        num_cells=len((scenario.get("network") or {}).get("cells") or [None]),
        workers=int(server.get("workers") or 1),
        queue_capacity=int(server.get("queue_capacity") or 0),
        rounds=_read_csv(run_dir / "rounds.csv", ("round", "end_s")),
        has_events=bool(events), activity=activity, uplink_end=uplink_end,
        queue=(qa[:, 0], qa[:, 1]))


def load_run(run_dir: str | Path) -> Run:
    """The run directory's data (cached while its files are unchanged)."""
    d = Path(run_dir).resolve()
    if not (d / "summary.json").is_file():
        raise FedsimError(f"{run_dir}: not a run directory (no summary.json)")
    stamp = tuple(int(p.stat().st_mtime_ns) if p.exists() else 0 for p in
                  (d / n for n in ("summary.json", "events.csv", "timeseries.csv")))
    return _load_run(d, stamp)


def phase_durations(run_dir: str | Path) -> dict[str, np.ndarray]:
    """Durations (s) of every completed phase of every update, by phase (see module doc)."""
    run = load_run(run_dir)
    return {ph: run.activity[ph].duration_s for ph in LIFE}


# --- drawing helpers ---------------------------------------------------------------------------


def _figure(width: float = 8.0, height: float = 5.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, directory: Path, name: str) -> Path:
    """Write ``directory/plots/name`` atomically (temp file + rename); return its path."""
    path = directory / "plots" / name
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _title(run: Run, what: str) -> str:
    s = run.summary
    return f"{what}\n{s.get('scenario', run.dir.name)} (seed {s.get('seed', '?')})"


def _profiles(run: Run) -> list[str]:
    present = set(run.profile.tolist())
    return [p for p in PROFILES if p in present] + sorted(present - set(PROFILES))


def _bin_average(t: np.ndarray, v: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Time average in each bin of the step function equal to v[i] on [t[i], t[i+1]).

    ``t`` is sorted; the function is 0 before t[0] and v[-1] after the last breakpoint.
    """
    if not len(t):
        return np.zeros(len(edges) - 1)
    t = np.concatenate([[min(edges[0], t[0])], t])
    v = np.concatenate([[0.0], v])
    cum = np.concatenate([[0.0], np.cumsum(v[:-1] * np.diff(t))])
    j = np.searchsorted(t, edges, side="right") - 1
    area = cum[j] + v[j] * (edges - t[j])
    return np.diff(area) / np.diff(edges)


def _active_count(iv: Intervals, mask: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The number of intervals in progress as a step function (breakpoints, values)."""
    s, e = (iv.start_s, iv.end_s) if mask is None else (iv.start_s[mask], iv.end_s[mask])
    t = np.concatenate([s, e])
    d = np.concatenate([np.ones(len(s)), -np.ones(len(e))])
    order = np.argsort(t, kind="stable")
    return t[order], np.cumsum(d[order])


def _bytes_unit(max_bytes: float) -> tuple[float, str]:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if max_bytes >= scale:
            return scale, unit
    return 1.0, "B"


# --- run figures -------------------------------------------------------------------------------


def latency_breakdown(run_dir: str | Path) -> Path | None:
    """Stacked bars per device class: mean download/compute/upload/queue/server time per update.

    A second panel shows the same means on a log scale, where phases that differ by orders of
    magnitude (ms uploads next to minutes of training) stay visible.
    """
    run = load_run(run_dir)
    if not run.has_events:
        return None
    profiles = _profiles(run)
    means = {ph: [] for ph in LIFE}
    counts = []
    for p in profiles:
        members = np.flatnonzero(run.profile == p)
        for ph in LIFE:
            iv = run.activity[ph]
            sel = iv.done & np.isin(iv.client, members)
            d = iv.end_s[sel] - iv.start_s[sel]
            means[ph].append(float(d.mean()) if len(d) else 0.0)
        counts.append(int((run.activity["server"].done
                           & np.isin(run.activity["server"].client, members)).sum()))
    fig = _figure(11, 5)
    ax, axl = fig.subplots(1, 2, width_ratios=[1, 1.3])
    x = np.arange(len(profiles))
    bottom = np.zeros(len(profiles))
    for ph in LIFE:
        vals = np.array(means[ph])
        ax.bar(x, vals, 0.6, bottom=bottom, label=ph, color=PHASE_COLORS[ph])
        bottom += vals
    top = bottom.max() if len(bottom) else 0.0
    for xi, total in zip(x, bottom, strict=True):
        ax.annotate(f"{total:.3g} s", (xi, total), ha="center", va="bottom",
                    xytext=(0, 2), textcoords="offset points", fontsize=9)
    ax.set_ylim(0, top * 1.12 if top > 0 else 1)
    labels = [f"{p}\n({n} updates)" for p, n in zip(profiles, counts, strict=True)]
    ax.set_xticks(x, labels)
    ax.set_ylabel("mean time per update (s)")
    ax.set_title("Stacked (linear scale)")
    width = 0.8 / len(LIFE)
    for i, ph in enumerate(LIFE):
        vals = np.array(means[ph])
        axl.bar(x + (i - (len(LIFE) - 1) / 2) * width, np.where(vals > 0, vals, np.nan), width,
                label=ph, color=PHASE_COLORS[ph])
    axl.set_yscale("log")
    axl.set_xticks(x, labels)
    axl.set_ylabel("mean time per update (s, log scale)")
    axl.set_title("Per phase (log scale; no bar = 0 s)")
    axl.grid(axis="y", which="major", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=len(LIFE),
               title="phase (in the order an update goes through them)", fontsize=9)
    fig.suptitle(_title(run, "Where an update's time goes, per device class"))
    return _save(fig, run.dir, "latency_breakdown.png")


def latency_cdf(run_dir: str | Path) -> Path | None:
    """Empirical CDF of each phase's duration over all updates, and of round durations."""
    run = load_run(run_dir)
    if not run.has_events:
        return None
    data = {ph: run.activity[ph].duration_s for ph in LIFE}
    data["round"] = np.array([float(r["duration_s"]) for r in run.rounds
                              if r.get("duration_s")], dtype=float)
    data = {k: v for k, v in data.items() if len(v)}
    if not data:
        return None
    positive = np.concatenate([v[v > 0] for v in data.values()])
    log = len(positive) > 0 and positive.max() / positive.min() > 100
    fig = _figure(9.5, 5)
    ax = fig.subplots()
    # The x range reaches ``left``: 0 s on a linear axis; on a log axis, half the shortest
    # positive duration, the edge where the curves enter at their fraction of zero durations
    # (the zeros' own jump lies off it, at log 0).
    left = positive.min() / 2 if log else 0.0
    ax.update_datalim([(left, 0.0)])
    for ph, v in data.items():
        n, zeros = len(v), int((v <= 0).sum())
        label = f"{ph} (n={n}" + (f", {zeros / n:.0%} zero" if zeros else "") + ")"
        ax.ecdf(v, label=label, color=PHASE_COLORS[ph], lw=1.8)
    if log:
        ax.set_xscale("log")
        ax.set_xlim(left=left)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("duration (s" + (", log scale; zeros at the left edge)" if log else ")"))
    ax.set_ylabel("fraction of updates (rounds) ≤ duration")
    ax.grid(alpha=0.3, which="major")
    ax.legend(title="phase", fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(_title(run, "Latency CDF per phase"))
    return _save(fig, run.dir, "latency_cdf.png")


def utilization_series(run_dir: str | Path, bins: int = 100) -> dict[str, np.ndarray]:
    """Per-resource utilization, time-averaged in ``bins`` equal bins of simulated time.

    ``time_s``: bin centres. ``uplink_busy``/``downlink_busy``: fraction of time a cell has at
    least one active flow, averaged over cells (their mean over bins is summary
    ``utilization.uplink``/``downlink``). ``uplink_flows``/``downlink_flows``: mean active flows
    per cell. ``server_busy``: fraction of server workers ingesting (aggregation not included).
    ``compute.<profile>``: fraction of that class's clients training. ``server_queue``: mean
    updates waiting. Interrupted activities count up to their interruption. Empty without events.
    """
    run = load_run(run_dir)
    if not run.has_events or run.sim_time_s <= 0:
        return {}
    edges = np.linspace(0.0, run.sim_time_s, bins + 1)
    out = {"time_s": (edges[:-1] + edges[1:]) / 2}
    for ph, name in (("upload", "uplink"), ("download", "downlink")):
        iv = run.activity[ph]
        cell_of = run.cell[iv.client]
        busy, flows = np.zeros(bins), np.zeros(bins)
        for c in range(run.num_cells):
            t, n = _active_count(iv, cell_of == c)
            busy += _bin_average(t, (n >= 1).astype(float), edges)
            flows += _bin_average(t, n, edges)
        out[f"{name}_busy"] = busy / run.num_cells
        out[f"{name}_flows"] = flows / run.num_cells
    t, n = _active_count(run.activity["server"])
    out["server_busy"] = _bin_average(t, n, edges) / run.workers
    iv = run.activity["compute"]
    for p in _profiles(run):
        members = np.flatnonzero(run.profile == p)
        t, n = _active_count(iv, np.isin(iv.client, members))
        out[f"compute.{p}"] = _bin_average(t, n, edges) / len(members)
    qt, qv = run.queue
    order = np.argsort(qt, kind="stable")
    out["server_queue"] = _bin_average(qt[order], qv[order], edges)
    return out


def utilization_over_time(run_dir: str | Path, bins: int = 100) -> Path | None:
    """Four panels over simulated time (see :func:`utilization_series`): cell links and server
    workers busy, compute per device class, flows per cell, server queue."""
    run = load_run(run_dir)
    u = utilization_series(run_dir, bins)
    if not u:
        return None
    T, mid = run.sim_time_s, u["time_s"]
    fig = _figure(10, 10)
    ax_busy, ax_comp, ax_flows, ax_q = fig.subplots(4, 1, sharex=True)
    for ph, name in (("upload", "uplink"), ("download", "downlink")):
        ax_busy.plot(mid, u[f"{name}_busy"], label=f"{name} (cells busy)",
                     color=PHASE_COLORS[ph])
        ax_flows.plot(mid, u[f"{name}_flows"], label=name, color=PHASE_COLORS[ph])
    ax_busy.plot(mid, u["server_busy"], label="server workers", color=PHASE_COLORS["server"])
    ax_busy.set_ylabel("fraction busy")
    ax_busy.set_ylim(-0.02, 1.05)
    ax_busy.set_title("Cell links (≥1 active flow, mean over cells) and server workers")
    for p in _profiles(run):
        n = int((run.profile == p).sum())
        ax_comp.plot(mid, u[f"compute.{p}"], label=f"{p} ({n} clients)")
    ax_comp.set_ylabel("fraction training")
    ax_comp.set_ylim(-0.02, 1.05)
    ax_comp.set_title("Compute: fraction of each device class's clients training")
    ax_flows.set_ylabel("active flows per cell")
    ax_flows.set_title("Concurrent flows sharing a cell (mean over cells)")
    ax_q.plot(mid, u["server_queue"], color=PHASE_COLORS["queue"], label="server queue")
    ax_q.set_ylabel("updates waiting")
    ax_q.set_title("Server ingress queue (mean over bin)")
    ax_q.set_xlabel(f"simulated time (s; {bins} bins of {T / bins:.3g} s)")
    for ax in (ax_busy, ax_comp, ax_flows, ax_q):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
        ax.set_ylim(bottom=min(ax.get_ylim()[0], 0))
    what = "Utilization over time"
    if len(run.rounds) <= 50:  # round boundaries, when few enough to read
        what += " (dotted lines: round ends)"
        for r in run.rounds:
            for ax in (ax_busy, ax_comp, ax_flows, ax_q):
                ax.axvline(float(r["end_s"]), color="0.7", lw=0.6, ls=":", zorder=0)
    ax_q.set_xlim(0, T)
    fig.suptitle(_title(run, what))
    return _save(fig, run.dir, "utilization_over_time.png")


def server_queue(run_dir: str | Path) -> Path:
    """The server's ingress queue length over time (a step plot of timeseries.csv)."""
    run = load_run(run_dir)
    qt, qv = run.queue
    order = np.argsort(qt, kind="stable")
    qt, qv = qt[order], qv[order]
    end = max(run.sim_time_s, qt[-1] if len(qt) else 0.0)
    xs = np.concatenate([[0.0], qt, [end]])
    ys = np.concatenate([[0.0], qv, [qv[-1] if len(qv) else 0.0]])
    fig = _figure(9, 4.5)
    ax = fig.subplots()
    ax.step(xs, ys, where="post", color=PHASE_COLORS["queue"], lw=1.2,
            label=f"queue (max {int(ys.max())})")
    cap = run.queue_capacity
    if 0 < cap <= 1.5 * max(ys.max(), 1):
        ax.axhline(cap, color="k", ls="--", lw=1, label=f"capacity {cap} (beyond: dropped)")
    ax.set_xlim(-0.01 * end, end * 1.01 if end > 0 else 1)  # a burst at t=0 stays visible
    ax.set_ylim(bottom=0, top=max(ys.max() * 1.1, cap * 1.05 if 0 < cap <= 1.5 * max(
        ys.max(), 1) else 0, 1))
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("updates waiting for a server worker")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    ax.set_title(_title(run, f"Server ingress queue ({run.workers} workers)"))
    return _save(fig, run.dir, "server_queue.png")


def _quality(run: Run) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(metric, round end times, values) of the server metric, or None when not measured."""
    q = run.summary.get("quality") or {}
    metric = q.get("metric")
    if not metric:
        return None
    col = f"server_{metric}"
    if run.rounds and col in run.rounds[0]:
        pairs = [(float(r["end_s"]), float(r[col])) for r in run.rounds if r.get(col)]
    else:
        values = q.get("server_by_round") or []
        pairs = [(float(r["end_s"]), float(v)) for r, v in zip(run.rounds, values, strict=False)
                 if v is not None]
    if not pairs:
        return None
    a = np.array(pairs)
    return metric, a[:, 0], a[:, 1]


def bytes_vs_accuracy(run_dir: str | Path) -> Path | None:
    """Server metric after each round against the uplink bytes transmitted so far."""
    run = load_run(run_dir)
    quality = _quality(run)
    if quality is None or not run.has_events:
        return None
    metric, end_s, values = quality
    up_t, up_b = run.uplink_end
    order = np.argsort(up_t, kind="stable")
    cum = np.concatenate([[0.0], np.cumsum(up_b[order])])
    sent = cum[np.searchsorted(up_t[order], end_s, side="right")]
    scale, unit = _bytes_unit(float(sent.max()) if len(sent) else 0.0)
    fig = _figure(8, 5)
    ax = fig.subplots()
    ax.plot(sent / scale, values, marker="o", color=PHASE_COLORS["upload"])
    for i in (0, len(values) - 1):
        ax.annotate(f"round {i}", (sent[i] / scale, values[i]), xytext=(4, -12),
                    textcoords="offset points", fontsize=8)
    ax.set_xlabel(f"cumulative uplink bytes transmitted ({unit})")
    ax.set_ylabel(f"server {metric}")
    ax.grid(alpha=0.3)
    ax.set_title(_title(run, f"Communication efficiency: server {metric} vs bytes up"))
    return _save(fig, run.dir, "bytes_vs_accuracy.png")


def accuracy_vs_time(run_dir: str | Path) -> Path | None:
    """Server metric at the end of each round against simulated time."""
    run = load_run(run_dir)
    quality = _quality(run)
    if quality is None:
        return None
    metric, end_s, values = quality
    fig = _figure(8, 5)
    ax = fig.subplots()
    ax.plot(end_s, values, marker="o", color=PHASE_COLORS["round"])
    ax.set_xlabel("simulated time at the end of the round (s)")
    ax.set_ylabel(f"server {metric}")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.set_title(_title(run, f"Server {metric} vs simulated time"))
    return _save(fig, run.dir, "accuracy_vs_time.png")


ENERGY_PHASES = (("compute", "compute"), ("uplink", "upload"), ("downlink", "download"))


def energy(run_dir: str | Path) -> Path | None:
    """Left: median energy per update of each phase per device class (bars, p95 as whiskers;
    log scale: a phone's joules and a GPU's differ by orders of magnitude). Right: the server
    metric after each round against the joules all clients have spent so far."""
    run = load_run(run_dir)
    by_class = run.summary.get("energy_j")
    if not by_class:
        return None
    fig = _figure(12, 5)
    left, right = fig.subplots(1, 2)
    profiles = [p for p in _profiles(run) if p in by_class]
    x = np.arange(len(profiles))
    width = 0.8 / len(ENERGY_PHASES)
    for i, (phase, color) in enumerate(ENERGY_PHASES):
        p50 = np.array([by_class[p][phase]["p50"] for p in profiles])
        p95 = np.array([by_class[p][phase]["p95"] for p in profiles])
        shown = p50 > 0  # wired clients spend no radio energy; nothing to draw on a log axis
        left.bar(x[shown] + (i - 1) * width, p50[shown], width, color=PHASE_COLORS[color],
                 label=phase, yerr=[np.zeros(shown.sum()), (p95 - p50)[shown]], capsize=3)
    left.set_xticks(x, profiles)
    left.set_yscale("log")
    left.set_ylabel("energy per update (J; bar p50, whisker p95)")
    left.legend()
    left.grid(alpha=0.3, axis="y")
    quality = _quality(run)
    rows = [r for r in run.rounds if r.get("energy_j")]
    if quality is not None and rows:
        metric, end_s, values = quality
        spent = np.interp(end_s, [float(r["end_s"]) for r in rows],
                          [float(r["energy_j"]) for r in rows])
        right.plot(spent / 1e3, values, marker="o", color=PHASE_COLORS["compute"])
        right.set_xlabel("energy spent by all clients so far (kJ)")
        right.set_ylabel(f"server {metric}")
        right.grid(alpha=0.3)
    else:
        right.set_axis_off()
        right.text(0.5, 0.5, "no server metric measured", ha="center", va="center")
    fig.suptitle(_title(run, "Energy per update by device class, and what it bought"))
    return _save(fig, run.dir, "energy.png")


RUN_FIGURES = (latency_breakdown, latency_cdf, utilization_over_time, server_queue,
               bytes_vs_accuracy, accuracy_vs_time, energy)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Every run figure the run has data for; their paths."""
    return [p for fn in RUN_FIGURES if (p := fn(run_dir)) is not None]


# --- sweep figures -----------------------------------------------------------------------------

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_COUNT_WORDS = ("misses", "dropped", "failures", "dropouts", "outages", "updates", "rejected",
                "rounds_completed", "events", "queue_max", "started", "accepted")


def axis_label(key: str, metric_name: str | None = None) -> str:
    """A dotted key with its unit, for an axis (``utilization.uplink (fraction of time)``)."""
    last = key.split(".")[-1]
    if key == "quality.final":
        return f"final server {metric_name or 'metric'}"
    if key.startswith("clients.") and last == "count":
        return f"{key} (clients)"
    if key.startswith("latency_s.") or last.endswith("_s"):
        unit = "s"
    elif key.startswith("utilization."):
        unit = "fraction of time"
    elif last.endswith("_hz"):
        unit = "Hz"
    elif last.endswith("_bps"):
        unit = "bit/s"
    elif last.endswith("_dbm"):
        unit = "dBm"
    elif last.endswith("_db"):
        unit = "dB"
    elif last.endswith("_gib"):
        unit = "GiB"
    elif last.endswith("_m"):
        unit = "m"
    elif "bytes" in last:
        unit = "bytes"
    elif last == "compression_ratio":
        unit = "raw / encoded"
    elif key.startswith(("overload.", "counts.", "rounds_completed")) and any(
            w in last for w in _COUNT_WORDS):
        unit = "count"
    else:
        unit = ""
    return f"{key} ({unit})" if unit else key


def _floats(texts: Sequence[str]) -> list[float] | None:
    try:
        return [float(t) for t in texts]
    except ValueError:
        return None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)


def _sweep_def(sweep_dir: Path, rows: list[dict[str, str]]) -> tuple[list[str], list[str]]:
    """(grid keys, zip keys) from sweep.json, else the columns before ``seed``."""
    try:
        d = json.loads((sweep_dir / "sweep.json").read_text(encoding="utf-8"))
        return list(d.get("grid") or {}), list(d.get("zip") or {})
    except (OSError, ValueError):
        cols = list(rows[0]) if rows else []
        return cols[: cols.index("seed")] if "seed" in cols else [], []


def _metric_name(sweep_dir: Path, rows: list[dict[str, str]]) -> str | None:
    for r in rows:
        if r.get("status") == "ok" and r.get("run"):
            try:
                s = json.loads((sweep_dir / r["run"] / "summary.json").read_text("utf-8"))
                return (s.get("quality") or {}).get("metric")
            except (OSError, ValueError):
                continue
    return None


def _engformat(key: str) -> EngFormatter | None:
    last = key.split(".")[-1]
    return EngFormatter(sep="") if last.endswith(("_hz", "_bps")) or "bytes" in last else None


def _sweep_rows(d: Path, *keys: str | None) -> list[dict[str, str]]:
    rows = _read_csv(d / "sweep.csv", ("status",))
    cols = list(rows[0]) if rows else []
    for k in keys:
        if k is not None and k not in cols:
            raise FedsimError(f"{k}: not a column of {d / 'sweep.csv'}")
    return rows


def sweep_series(sweep_dir: str | Path, metric: str, x_key: str,
                 line_key: str | None = None) -> dict[str, dict[str, Interval]]:
    """What ``sweep_metric`` draws: per value of ``line_key`` (``""`` without one), per value of
    ``x_key`` (override text), the interval of ``metric`` over the ok runs there."""
    rows = _sweep_rows(Path(sweep_dir), metric, x_key, line_key)
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["status"] == "ok" and r.get(metric) not in (None, ""):
            groups[r[line_key] if line_key else ""][r[x_key]].append(float(r[metric]))
    return {lt: {xt: t_interval(v) for xt, v in g.items()} for lt, g in groups.items()}


def sweep_metric(sweep_dir: str | Path, metric: str, x_key: str,
                 line_key: str | None = None) -> Path | None:
    """``metric`` against swept ``x_key``, one line per value of ``line_key``.

    Each point is the mean over seeds (and over any other swept key, which the title names),
    with error bars of its 95% t-interval (``fedsim.intervals``; none for a single run).
    With the seed itself as the x axis (a sweep of seeds alone, ``fedsim run --seeds``), a
    dotted line and a band show the mean and 95% interval over all seeds. Failed points are
    left out. Returns None when no point has the metric.
    """
    d = Path(sweep_dir)
    rows = _sweep_rows(d, metric, x_key, line_key)
    groups = sweep_series(d, metric, x_key, line_key)
    if not groups:
        return None
    ok = [r for r in rows if r["status"] == "ok" and r.get(metric) not in (None, "")]
    x_texts = list(dict.fromkeys(r[x_key] for r in rows))
    x_num = _floats(x_texts)
    if x_num is not None:
        pos = dict(zip(x_texts, x_num, strict=True))
        x_texts.sort(key=pos.__getitem__)
    else:
        pos = {t: float(i) for i, t in enumerate(x_texts)}
    line_texts = list(groups)
    if line_key and (ln := _floats(line_texts)) is not None:
        line_texts = [t for _, t in sorted(zip(ln, line_texts, strict=True))]
    n_seeds = max(iv.n for g in groups.values() for iv in g.values())
    log_x = (x_num is not None and min(x_num) > 0 and max(x_num) / min(x_num) >= 20)
    fig = _figure(9, 5)
    ax = fig.subplots()
    # Lines are dodged sideways by a few % of the axis so that coinciding ones stay visible.
    span = (math.log10(max(x_num) / min(x_num)) if log_x else
            (max(pos.values()) - min(pos.values())) or 1.0)
    for i, lt in enumerate(line_texts):
        shift = (i - (len(line_texts) - 1) / 2) * 0.012 * span if len(line_texts) > 1 else 0.0
        xs, ys, err = [], [], []
        for xt in x_texts:
            iv = groups[lt].get(xt)
            if iv is not None:
                xs.append(pos[xt] * 10**shift if log_x else pos[xt] + shift)
                ys.append(iv.mean)
                err.append(iv.half_width if iv.n > 1 else 0.0)
        label = lt if line_key else None
        ax.errorbar(xs, ys, yerr=err, marker=_MARKERS[i % len(_MARKERS)], capsize=4,
                    label=label, color=f"C{i % 10}", lw=1.5, ms=6,
                    ls="none" if x_key == "seed" else "-")  # seeds have no order to join
        if x_key == "seed" and len(ys) > 1:
            band = t_interval(ys)
            ax.axhline(band.mean, color=f"C{i % 10}", ls=":", lw=1,
                       label=f"mean {band.text('{:.4g}', with_n=True)}")
            if band.high > band.low:
                ax.axhspan(band.low, band.high, color=f"C{i % 10}", alpha=0.1, lw=0)
    if log_x:
        ax.set_xscale("log")
    fmt = _engformat(x_key) if x_num is not None else None
    ax.set_xticks([pos[t] for t in x_texts],
                  [fmt.format_eng(pos[t]) for t in x_texts] if fmt else x_texts)
    ax.minorticks_off()
    if axis_label(metric).endswith("(count)"):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if (yfmt := _engformat(metric)) is not None:
        ax.yaxis.set_major_formatter(yfmt)
    if metric.startswith("utilization.") or metric.startswith("quality."):
        ax.set_ylim(bottom=0)
    ax.set_xlabel(axis_label(x_key))
    ax.set_ylabel(axis_label(metric, _metric_name(d, rows)))
    ax.grid(alpha=0.3)
    if line_key:
        ax.legend(fontsize=9, title=axis_label(line_key), loc="center left",
                  bbox_to_anchor=(1.01, 0.5))
    elif x_key == "seed":
        ax.legend(fontsize=9, title="over seeds: mean ± 95% half-width", loc="best")
    grid, zip_ = _sweep_def(d, rows)
    mixed = [k for k in [*grid, *zip_] if k not in (x_key, line_key, "seed")
             and len({r.get(k) for r in ok}) > 1]
    over = "seeds" + "".join(f" and {k}" for k in mixed)
    if n_seeds > 1:
        spread = f"mean over {n_seeds} runs ({over}), bars 95% interval (Student t)"
    elif x_key == "seed":
        spread = "one run per seed; dotted: mean, band: its 95% interval (Student t)"
    else:
        spread = "one run per point"
    ax.set_title(f"{metric} vs {x_key}\n{d.name}: {spread}")
    name = f"{_safe(metric)}_vs_{_safe(x_key)}" + (f"_by_{_safe(line_key)}" if line_key else "")
    return _save(fig, d, f"{name}.png")


SWEEP_METRICS = ("latency_s.round.p95", "overload.deadline_misses", "utilization.uplink",
                 "quality.final")


def plot_sweep(sweep_dir: str | Path) -> list[Path]:
    """The default sweep figures: SWEEP_METRICS against the first swept key, lines by the second.

    Swept keys are the ``--grid`` keys in order, then the first ``--zip`` key; keys swept over a
    single value are skipped. With no swept key the x axis is the seed.
    """
    d = Path(sweep_dir)
    rows = _read_csv(d / "sweep.csv", ("status",))
    grid, zip_ = _sweep_def(d, rows)
    # A zip group is one dimension (its first key); a key swept over one value is no dimension.
    keys = [k for k in [*grid, *zip_[:1]] if len({r.get(k) for r in rows}) > 1]
    x_key = keys[0] if keys else "seed"
    line_key = keys[1] if len(keys) > 1 else None
    cols = set(rows[0]) if rows else set()
    out = []
    for metric in SWEEP_METRICS:
        if metric in cols and (p := sweep_metric(d, metric, x_key, line_key)) is not None:
            out.append(p)
    return out


# --- comparison figure (``fedsim compare``) ------------------------------------------------------


def comparison(comparison_dir: str | Path) -> Path:
    """Server metric per round, one line per variant (``comparison.csv``); the ``start`` server
    (no update) as a dotted horizontal line. Projectors share a colour, LARS is dashed. Over
    several seeds the line is the mean and a band of the same colour the 95% interval."""
    d = Path(comparison_dir)
    rows = _read_csv(d / "comparison.csv", ("variant", "round"))
    metric = next(c for c in rows[0] if c not in ("variant", "round")) if rows else "metric"
    by: dict[str, list[Interval]] = defaultdict(list)
    rounds: dict[str, list[int]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: int(r["round"])):
        iv = Interval.from_columns(r, metric)
        by[r["variant"]].append(iv if iv.n else Interval(float(r[metric]), *[math.nan] * 3, 1))
        rounds[r["variant"]].append(int(r["round"]))
    n = max((iv.n for ivs in by.values() for iv in ivs), default=1)
    fig = _figure(8, 5)
    ax = fig.subplots()
    colors: dict[str, str] = {}
    for name, ivs in by.items():
        y = np.array([iv.mean for iv in ivs])
        lo, hi = np.array([iv.low for iv in ivs]), np.array([iv.high for iv in ivs])
        if name == "start":
            ax.axhline(y[0], color="#333333", ls=":", label="start (no update)")
            if np.isfinite(lo[0]) and hi[0] > lo[0]:
                ax.axhspan(lo[0], hi[0], color="#333333", alpha=0.08, lw=0)
            continue
        projector = name.removesuffix("+lars")
        color = colors.setdefault(projector, f"C{len(colors)}")
        x = np.array(rounds[name])
        ax.plot(x, y, color=color, ls="--" if name.endswith("+lars") else "-",
                marker=_MARKERS[(len(colors) - 1) % len(_MARKERS)], label=name)
        if np.isfinite(lo).any():
            ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
    ax.set_xlabel("round")
    ax.set_ylabel(f"server {metric}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    spread = f"\nmean over {n} seeds, bands: 95% interval (Student t)" if n > 1 else ""
    ax.set_title(f"Server {metric} per round by projector (dashed: with LARS){spread}\n{d.name}")
    return _save(fig, d, "comparison.png")


def plot_dir(path: str | Path) -> list[Path]:
    """``fedsim plot DIR``: sweep figures for a sweep directory, the comparison figure for a
    ``fedsim compare`` directory, run figures for a run one."""
    d = Path(path)
    if (d / "sweep.csv").is_file():
        return plot_sweep(d)
    if (d / "comparison.csv").is_file():
        return [comparison(d)]
    if (d / "summary.json").is_file():
        return plot_run(d)
    raise FedsimError(f"{path}: neither a run directory (summary.json) nor a sweep directory "
                      "(sweep.csv)")

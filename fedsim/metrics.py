"""The event recorder, run summaries, and the run directory.

Every step of an update emits one event (``time_s, round, client, kind, bytes, detail``). Phase
latencies, per-round and per-client rows are kept beside the events; ``summarize`` turns them
into the ``summary.json`` of DESIGN.md "Contracts", and ``write_run_dir`` writes the run
directory atomically: everything goes to a temporary sibling directory that is renamed into
place only once complete, so a run directory that exists is a finished one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from array import array
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from fedsim.atomic import atomic_dir
from fedsim.errors import FedsimError

PHASES = ("download", "compute", "queue", "upload", "server", "round")
EVENT_COLUMNS = ("time_s", "round", "client", "kind", "bytes", "detail")
CLIENT_COLUMNS = ("client", "group", "profile", "model", "cell", "distance_m", "flops_per_s",
                  "updates_sent", "updates_accepted", "failures", "bytes_up", "bytes_down",
                  "compute_s", "energy_compute_j", "energy_uplink_j", "energy_downlink_j",
                  "battery_charge")


def _empty_columns() -> tuple[Any, ...]:
    """The event columns: time (s), round, client and bytes as typed arrays (8 bytes an
    entry, not a Python object each: a million clients' round records ~10^7 events), kind and
    detail as lists of strings (the kinds are interned)."""
    return (array("d"), array("q"), array("q"), [], array("q"), [])


class Recorder:
    """Columnar store of events plus the phase latencies and per-round rows."""

    def __init__(self, keep_events: bool = True) -> None:
        self.keep_events = keep_events
        self._cols = _empty_columns()
        self._counts: dict[str, int] = defaultdict(int)
        self._counted = 0  # kept events already in _counts
        self.latency_s: dict[str, list[float]] = {p: [] for p in PHASES}
        self.rounds: list[dict[str, Any]] = []
        # Bytes that crossed the links (every completed transfer, accepted at ingest or not):
        self.bytes_up = 0
        self.bytes_down = 0
        # ... and of the updates the server accepted: their bytes and their size before
        # compression (fp32), so that compression_ratio compares the same updates.
        self.bytes_up_accepted = 0
        self.bytes_up_raw = 0
        if keep_events:  # counted from the kinds when asked, not at every event
            self.emit = self._keep  # type: ignore[method-assign]

    def emit(self, time_s: float, round_: int, client: int, kind: str, nbytes: int = 0,
             detail: str = "") -> None:
        self._counts[kind] += 1

    def _keep(self, time_s: float, round_: int, client: int, kind: str, nbytes: int = 0,
              detail: str = "") -> None:
        t, r, c, k, b, d = self._cols
        t.append(time_s)
        r.append(round_)
        c.append(client)
        k.append(kind)
        b.append(nbytes)
        d.append(detail)

    @property
    def counts(self) -> dict[str, int]:
        """Events of each kind so far (0 for a kind never seen)."""
        kinds = self._cols[3]
        if self.keep_events and self._counted < len(kinds):
            for kind, n in Counter(kinds[self._counted:]).items():
                self._counts[kind] += n
            self._counted = len(kinds)
        return self._counts

    def emit_many(self, time_s: float, round_: int, clients: list[int], kind: str,
                  nbytes: list[int] | None = None, details: list[str] | None = None) -> None:
        """One event of ``kind`` for each of ``clients`` at one instant (a round's start)."""
        n = len(clients)
        if not self.keep_events:
            self._counts[kind] += n
        else:
            t, r, c, k, b, d = self._cols
            t.extend([time_s] * n)
            r.extend([round_] * n)
            c.extend(clients)
            k.extend([kind] * n)
            b.extend(nbytes if nbytes is not None else [0] * n)
            d.extend(details if details is not None else [""] * n)

    _SCALARS = ("bytes_up", "bytes_down", "bytes_up_accepted", "bytes_up_raw")

    def state(self) -> dict[str, Any]:
        """Everything recorded so far, as JSON (checkpoints)."""
        return {"cols": [list(c) for c in self._cols], "counts": dict(self.counts),
                "latency_s": self.latency_s, "rounds": self.rounds,
                **{k: getattr(self, k) for k in self._SCALARS}}

    def restore(self, doc: dict[str, Any]) -> None:
        self._cols = _empty_columns()
        for col, values in zip(self._cols, doc["cols"], strict=True):
            col.extend(values)
        self._counts = defaultdict(int, doc["counts"])
        self._counted = len(self._cols[3])
        self.latency_s = {p: list(v) for p, v in doc["latency_s"].items()}
        self.rounds = [dict(r) for r in doc["rounds"]]
        for k in self._SCALARS:
            setattr(self, k, doc[k])

    def latency(self, phase: str, seconds: float) -> None:
        self.latency_s[phase].append(seconds)

    @property
    def num_events(self) -> int:
        return sum(self.counts.values())

    def events_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(EVENT_COLUMNS)
        t, r, c, k, b, d = self._cols
        w.writerows(zip((f"{x:.9f}" for x in t), r, c, k, b, d, strict=True))
        return buf.getvalue()


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p95 and max of a phase's latencies (0 when the phase never happened)."""
    if not values:
        return {"p50": 0.0, "p95": 0.0, "max": 0.0, "count": 0}
    a = np.asarray(values, dtype=float)
    p50, p95 = np.percentile(a, [50, 95])
    return {"p50": float(p50), "p95": float(p95), "max": float(a.max()), "count": len(a)}


class Rows(Sequence[dict[str, Any]]):
    """A table kept as equal-length columns and read as rows (dicts), made on demand: a
    million clients' rows would otherwise cost a dict each."""

    def __init__(self, columns: dict[str, list[Any]]) -> None:
        self.columns = columns
        self._n = len(next(iter(columns.values()))) if columns else 0

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, i: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, i: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return {k: col[i] for k, col in self.columns.items()}


@dataclass
class RunResult:
    """Everything a run produced, in memory; ``write_run_dir`` puts it on disk."""

    scenario_yaml: str
    summary: dict[str, Any]
    recorder: Recorder
    clients: Sequence[dict[str, Any]] = field(default_factory=list)
    timeseries: list[tuple[float, str, float]] = field(default_factory=list)


def _csv(rows: Sequence[dict[str, Any]], columns: list[str] | tuple[str, ...]) -> str:
    buf = io.StringIO()
    if isinstance(rows, Rows):  # straight from the columns
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        w.writerows(zip(*(rows.columns.get(c, [""] * len(rows)) for c in columns), strict=True))
        return buf.getvalue()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def round_columns(rows: list[dict[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    return list(cols)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def summary_json(summary: dict[str, Any]) -> str:
    return json.dumps(_jsonable(summary), indent=2, sort_keys=False) + "\n"


def write_run_dir(result: RunResult, out_dir: str | Path) -> Path:
    """Write the run directory atomically; an existing one is replaced only once complete."""
    out = Path(out_dir)
    # Entered apart from the body so that only a directory we cannot create is a user error
    # (the ExitStack idiom for catching exceptions from __enter__ alone).
    stack = contextlib.ExitStack()
    try:
        tmp = stack.enter_context(atomic_dir(out))
    except OSError as e:
        raise FedsimError(f"--out: cannot create {out}: {e}") from None
    with stack:
        (tmp / "plots").mkdir()
        files = {
            "scenario.yaml": result.scenario_yaml,
            "events.csv": result.recorder.events_csv(),
            "rounds.csv": _csv(result.recorder.rounds, round_columns(result.recorder.rounds)),
            "clients.csv": _csv(result.clients, CLIENT_COLUMNS),
            "timeseries.csv": "time_s,series,value\n"
            + "".join(f"{t:.9f},{s},{v:.9g}\n" for t, s, v in result.timeseries),
            "summary.json": summary_json(result.summary),  # last: its presence marks completion
        }
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
    return out


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))

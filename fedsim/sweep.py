"""Sweeps: a grid of scenario overrides times seeds, one run directory per point, resumable.

A sweep is the cartesian product of every ``--grid key=v1,v2`` (values read as YAML scalars,
exactly like ``--set``), times one ``--zip`` group (keys whose values vary together), times seeds
``0..N-1`` (``--seeds N`` replaces ``seed``; without it the scenario's own seed). Each point is a
list of ``--set`` overrides applied by ``fedsim.scenario.load``: the sweep's fixed ``--set``
overrides first (the same at every point, so a point's switch of plug-in can rely on them), then
the point's own values. A key both fixed and swept (or ``seed`` fixed beside ``--seeds``) is a
user error: one of the two would be silently dead.

The sweep directory holds one run directory per point, named from its overrides
(``network.cells.0.uplink_bandwidth_hz=5e6__seed=1``; the fixed overrides are not in the
name), ``sweep.json`` (the sweep's definition: scenario, ``set``, grid, zip, seeds, points),
``sweep.csv``: one row per point with the swept values, ``seed``, ``run``, ``status``
(ok/failed), ``error`` and the numeric summary flattened to dotted names
(``latency_s.round.p95``, ``overload.deadline_misses``, ``quality.final``...), and
``sweep_summary.csv``: one row per grid point with the seeds collapsed, its swept values but
``seed``, ``points`` and ``failed`` (how many of its runs there are and how many failed), and per
numeric metric ``m`` of the ok runs ``m`` (the mean), ``m.std``, ``m.ci95_low``, ``m.ci95_high``
and ``m.n`` (``fedsim.intervals``: Student t, 95%, ddof=1; NaN spread for one seed). Both are
rewritten atomically after every point, so an interrupted sweep keeps what finished.

Resuming is rerunning the same command: a point whose run directory holds ``summary.json`` (run
directories are written atomically, so that means complete) and the same resolved scenario is
not run again; a changed scenario file or changed ``--set`` changes the resolved scenario, so
those points run again rather than being reused. Every point is validated before anything runs:
a swept key that does not exist, an unknown plug-in name or a bad option at any point is a user
error listing each such point (finding it in milliseconds beats finding it hours into a sweep).
A point whose run raises is a failed row (its message in ``error``, and with the traceback in
``failed/<point>.txt``); the other points complete.

Points run in a ``ProcessPoolExecutor`` (``--workers``; 1 runs them in this process), or, when
the scenario names ``executor.name: ray``, as Ray tasks (one CPU each) on the cluster at
``executor.address`` or on a local Ray of ``--workers`` CPUs; a point then runs its own
training jobs inside its task. Every point is a whole run seeded by its own scenario, so its
results depend neither on the worker count nor on where it ran.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import re
import shutil
import sys
import traceback
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedsim.atomic import atomic_file
from fedsim.errors import FedsimError
from fedsim.intervals import Interval, t_interval
from fedsim.scenario import MOVED, ScenarioError, apply_override, apply_overrides, load

SWEEP_CSV = "sweep.csv"
SUMMARY_CSV = "sweep_summary.csv"
SWEEP_JSON = "sweep.json"
FAILED_DIR = "failed"
MAX_NAME_CHARS = 120  # run directory names stay well under the 255-byte filename limit
FIXED_COLUMNS = ("seed", "run", "status", "error")
HEADLINE = (("latency_s.round.p95", "round p95 (s)", "{:.3f}"),
            ("overload.deadline_misses", "deadline misses", "{:.0f}"),
            ("utilization.uplink", "uplink util", "{:.1%}"),
            ("quality.final", "quality", "{:.4f}"))


# --- points -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One run of a sweep: ``values`` are (key, override text) pairs, ``seed`` last;
    ``fixed`` the sweep's own ``--set`` overrides, applied before them."""

    index: int
    values: tuple[tuple[str, str], ...]
    name: str
    fixed: tuple[str, ...] = ()

    @property
    def overrides(self) -> list[str]:
        return [*self.fixed, *(f"{k}={v}" for k, v in self.values)]


def value_text(value: Any) -> str:
    """An override value as ``--set`` text (strings as given; other scalars as YAML reads them)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, separators=(",", ":"))  # lists and mappings: JSON is YAML flow


def split_values(text: str) -> list[str]:
    """``v1,v2,[1,2]`` -> ``['v1', 'v2', '[1,2]']``: commas inside brackets/braces stay."""
    out, depth, current = [], 0, []
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    out.append("".join(current).strip())
    return out


def parse_assignments(items: Sequence[str], flag: str) -> dict[str, list[str]]:
    """``['a.b=1,2', 'c=x,y']`` (the ``--grid``/``--zip`` flags) -> ``{'a.b': ['1','2'], ...}``."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise FedsimError(f"{flag} {item!r}: expected key=v1,v2,...")
        values = split_values(text)
        if any(not v for v in values):
            raise FedsimError(f"{flag} {key}: empty value in {text!r}")
        if key in out:
            raise FedsimError(f"{flag} {key}: given twice")
        out[key] = values
    return out


def point_name(values: Iterable[tuple[str, str]]) -> str:
    """A readable, filesystem-safe, deterministic directory name for a point.

    ``key=value`` pairs joined by ``__``; characters outside ``[A-Za-z0-9._=+-]`` become ``_``.
    When that changed anything, or the name is longer than MAX_NAME_CHARS, a short hash of the
    exact text is appended so that two points never share a directory.
    """
    raw = "__".join(f"{k}={v}" for k, v in values)
    safe = re.sub(r"[^A-Za-z0-9._=+-]", "_", raw)
    if safe == raw and len(safe) <= MAX_NAME_CHARS:
        return safe
    digest = hashlib.sha1(raw.encode()).hexdigest()[:10]
    return f"{safe[: MAX_NAME_CHARS - 11]}-{digest}"


def _texts(name: str, spec: dict[str, Sequence[Any]] | None) -> dict[str, list[str]]:
    out = {}
    for key, values in (spec or {}).items():
        if isinstance(values, str | bytes) or not isinstance(values, Sequence):
            raise FedsimError(f"{name} {key}: expected a list of values, got {values!r}")
        texts = [value_text(v) for v in values]
        if not texts:
            raise FedsimError(f"{name} {key}: no values")
        dup = sorted({t for t in texts if texts.count(t) > 1})
        if dup and name == "--grid":  # in a zip group, a value may repeat beside others
            raise FedsimError(f"{name} {key}: value given twice: {', '.join(dup)}")
        out[key] = texts
    return out


def expand_points(grid: dict[str, Sequence[Any]], zip_: dict[str, Sequence[Any]] | None = None,
                  seeds: int | None = None, base_seed: int = 0,
                  fixed: Sequence[str] = ()) -> list[Point]:
    """Every point of the sweep, in a fixed order: grid (first key slowest), zip, then seed;
    ``fixed``: ``--set`` overrides of every point (refused for a key that is also swept)."""
    g, z = _texts("--grid", grid), _texts("--zip", zip_)
    both = sorted(set(g) & set(z))
    if both:
        raise FedsimError(f"{', '.join(both)}: in both --grid and --zip")
    if seeds is not None and seeds < 1:
        raise FedsimError(f"--seeds must be >= 1, got {seeds}")
    swept_seed = "seed" in g or "seed" in z
    if swept_seed and seeds is not None:
        raise FedsimError("seed: swept by --grid/--zip and by --seeds; give one of them")
    _check_fixed(fixed, [*g, *z], seeds)
    lengths = {k: len(v) for k, v in z.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{k} has {n}" for k, n in lengths.items())
        raise FedsimError(f"--zip keys must have the same number of values: {shown}")
    zip_rows = list(zip(*z.values(), strict=True)) if z else [()]
    if len(set(zip_rows)) < len(zip_rows):
        raise FedsimError(f"--zip {', '.join(z)}: the same combination of values given twice")
    seed_values = ([] if swept_seed else
                   [str(s) for s in (range(seeds) if seeds is not None else [base_seed])])
    points = []
    for combo in itertools.product(*g.values()):
        for zrow in zip_rows:
            for seed in seed_values or [None]:
                values = [*zip(g, combo, strict=True), *zip(z, zrow, strict=True)]
                if seed is not None:
                    values.append(("seed", seed))
                values_t = tuple(values)
                points.append(Point(len(points), values_t, point_name(values_t), tuple(fixed)))
    return points


def _check_fixed(fixed: Sequence[str], swept: Sequence[str], seeds: int | None) -> None:
    """A key given by ``--set`` and also swept is refused: the swept values would hide it."""
    keys = {MOVED.get(k, k) for k in (a.partition("=")[0].strip() for a in fixed)}
    errors = [f"{k}: given by --set and swept by --grid/--zip; give one of them"
              for k in swept if MOVED.get(k, k) in keys]
    if seeds is not None and "seed" in keys:
        errors.append("seed: given by --set and by --seeds; give one of them")
    if errors:
        raise FedsimError("\n".join(errors))


# --- one point --------------------------------------------------------------------------------


def one_line(message: str) -> str:
    """A multi-line error (ScenarioError lists one problem a line) as one csv-friendly line."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def run_point(scenario_path: str, overrides: list[str], run_dir: str,
              jobs_here: bool = False) -> dict[str, Any]:
    """Load, run and write one point (in a worker process). Never raises: returns the outcome.

    ``jobs_here``: run the point's training jobs in this process whatever its executor (a
    point that is itself a Ray task must not wait for Ray actors the sweep's tasks hold the
    CPUs of). Results do not depend on the executor, so the run directory is the same.
    """
    from fedsim.engine import run
    from fedsim.executors import InlineExecutor
    from fedsim.metrics import read_summary, write_run_dir

    try:
        scenario = load(scenario_path, overrides)
        executor = InlineExecutor(scenario.executor) if jobs_here else None
        result = run(scenario, executor=executor)
        write_run_dir(result, run_dir)
        # The row comes from the file, so a fresh row and a resumed one are identical.
        return {"status": "ok", "summary": read_summary(run_dir)}
    except FedsimError as e:
        return {"status": "failed", "error": one_line(str(e)), "detail": str(e)}
    except Exception as e:  # a bug in a run: record it, finish the other points
        return {"status": "failed", "error": one_line(f"{type(e).__name__}: {e}"),
                "detail": traceback.format_exc()}


def flatten_summary(summary: dict[str, Any]) -> dict[str, float | int]:
    """The numeric leaves of summary.json as dotted names; ``quality.final`` = last server value.

    Strings, lists and per-client quality are left out (they are in the run directory).
    """
    out: dict[str, float | int] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, bool):
            out[prefix] = int(node)
        elif isinstance(node, int | float) and math.isfinite(node):
            out[prefix] = node

    walk("", {k: v for k, v in summary.items() if k not in ("scenario", "seed", "quality")})
    by_round = [v for v in summary.get("quality", {}).get("server_by_round", []) if v is not None]
    if by_round:
        out["quality.final"] = by_round[-1]
    return out


# --- the sweep directory ----------------------------------------------------------------------


def _atomic_write(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


def csv_columns(rows: Sequence[dict[str, Any]], swept: Sequence[str]) -> list[str]:
    cols = dict.fromkeys([*swept, *FIXED_COLUMNS])
    for row in rows:
        cols.update(dict.fromkeys(row))
    return list(cols)


def write_sweep_csv(path: Path, rows: Sequence[dict[str, Any]], swept: Sequence[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=csv_columns(rows, swept), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    _atomic_write(path, buf.getvalue())


def _number(v: Any) -> float | None:
    """A metric value as a float: numbers as they are, csv text parsed; else None."""
    if isinstance(v, bool) or v is None or v == "":
        return None
    if isinstance(v, int | float):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def summarize(rows: Sequence[dict[str, Any]], swept: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of sweep_summary.csv: one per grid point, seeds collapsed (module docstring).

    Grid points keep their order of first appearance; a metric is every column that is not a
    swept key or one of FIXED_COLUMNS and holds a number in some ok row. Works on the rows of
    ``run_sweep`` (numbers) and on those read back from sweep.csv (text) alike.
    """
    keys = [k for k in swept if k != "seed"]
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(str(r.get(k, "")) for k in keys), []).append(r)
    ok_rows = [r for r in rows if r.get("status") == "ok"]
    skip = {*swept, *FIXED_COLUMNS}
    metrics = [c for c in dict.fromkeys(c for r in ok_rows for c in r)
               if c not in skip and any(_number(r.get(c)) is not None for r in ok_rows)]
    out = []
    for values, members in groups.items():
        ok = [r for r in members if r.get("status") == "ok"]
        row: dict[str, Any] = dict(zip(keys, values, strict=True))
        row.update(points=len(members), failed=len(members) - len(ok))
        for m in metrics:
            row.update(t_interval(x for r in ok if (x := _number(r.get(m))) is not None
                                  ).columns(m))
        out.append(row)
    return out


def write_summary_csv(path: Path, rows: Sequence[dict[str, Any]], swept: Sequence[str]) -> None:
    summary = summarize(rows, swept)
    keys = [k for k in swept if k != "seed"]
    cols = dict.fromkeys([*keys, "points", "failed"])
    for row in summary:
        cols.update(dict.fromkeys(row))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(cols), lineterminator="\n")
    w.writeheader()
    w.writerows(summary)
    _atomic_write(path, buf.getvalue())


def read_sweep_csv(sweep_dir: str | Path) -> list[dict[str, str]]:
    path = Path(sweep_dir) / SWEEP_CSV
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _clean_leftovers(out: Path) -> None:
    """Remove the temporary siblings an interrupted write_run_dir or csv write left behind."""
    for p in out.glob(".*"):
        if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".tmp"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _check_keys(scenario_path: Path, flag: str, spec: dict[str, list[str]],
                fixed: Sequence[str] = ()) -> None:
    """A swept key that does not exist (or a list index out of range) is a user error; the
    fixed overrides apply first, as they do at every point."""
    doc = yaml.safe_load(scenario_path.read_text(encoding="utf-8"))
    apply_overrides(doc, list(fixed))
    errors = []
    for key, values in spec.items():
        for text in values:
            try:
                apply_override(copy.deepcopy(doc), f"{key}={text}")
            except ScenarioError as e:
                errors.extend(e.errors)
                break
    if errors:
        raise ScenarioError(errors, flag)


def _check_points(scenario_path: Path, points: Sequence[Point]) -> None:
    """Every point validates, or a user error naming each point and what is wrong there."""
    errors = []
    for p in points:
        try:
            load(scenario_path, p.overrides)
        except ScenarioError as e:
            errors.extend(f"{p.name}: {err}" for err in e.errors)
    if errors:
        raise ScenarioError(errors, "sweep points")


def _resolved_yaml(scenario_path: Path, point: Point) -> str | None:
    try:
        return load(scenario_path, point.overrides).to_yaml()
    except FedsimError:
        return None


def _finished(out: Path, scenario_path: Path, point: Point) -> dict[str, Any] | None:
    """The summary of a point already run with the same resolved scenario, else None."""
    run_dir = out / point.name
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        resolved = (run_dir / "scenario.yaml").read_text(encoding="utf-8")
    except (OSError, ValueError):
        return None
    return summary if resolved == _resolved_yaml(scenario_path, point) else None


def _row(point: Point, outcome: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = dict(point.values)
    row.update(run=point.name, status=outcome["status"], error=outcome.get("error", ""))
    if outcome["status"] == "ok":
        row.update(flatten_summary(outcome["summary"]))
    return row


def _note_failure(out: Path, point: Point, outcome: dict[str, Any]) -> None:
    note = out / FAILED_DIR / f"{point.name}.txt"
    if outcome["status"] == "ok":
        if note.exists():
            note.unlink()
            if not any(note.parent.iterdir()):
                note.parent.rmdir()
        return
    note.parent.mkdir(exist_ok=True)
    note.write_text("overrides: " + " ".join(point.overrides) + "\n\n"
                    + outcome.get("detail", outcome["error"]) + "\n", encoding="utf-8")


def run_sweep(scenario_path: str | Path, grid: dict[str, Sequence[Any]],
              zip_: dict[str, Sequence[Any]] | None = None, seeds: int | None = None,
              workers: int = 1, out: str | Path | None = None,
              progress: bool = True, overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Run every point not already finished; return the rows of sweep.csv (in point order).

    ``overrides``: ``--set`` assignments applied at every point before its own values.
    Swept values in the rows are their override text (``'5e6'``); metrics are numbers.
    Raises FedsimError for bad input (an invalid base scenario or fixed override, a swept key
    that does not exist, a key both fixed and swept, mismatched --zip lengths) before running
    anything or creating the sweep directory.
    """
    from tqdm import tqdm

    path = Path(scenario_path)
    fixed = list(overrides)
    base = load(path, fixed)
    if workers < 1:
        raise FedsimError(f"--workers must be >= 1, got {workers}")
    points = expand_points(grid, zip_, seeds, base.seed, fixed)
    g, z = _texts("--grid", grid), _texts("--zip", zip_)
    _check_keys(path, "--grid", g, fixed)
    _check_keys(path, "--zip", z, fixed)
    _check_points(path, points)
    swept = [*g, *z]
    sweep_dir = Path(out) if out is not None else Path("sweeps") / base.name
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FedsimError(f"--out: cannot create {sweep_dir}: {e}") from None
    _clean_leftovers(sweep_dir)
    definition = {"scenario": str(path), "set": fixed, "grid": g, "zip": z, "seeds": seeds,
                  "points": len(points)}
    _atomic_write(sweep_dir / SWEEP_JSON, json.dumps(definition, indent=2) + "\n")

    rows: list[dict[str, Any] | None] = [None] * len(points)
    todo = []
    for p in points:
        summary = _finished(sweep_dir, path, p)
        if summary is None:
            todo.append(p)
        else:
            rows[p.index] = _row(p, {"status": "ok", "summary": summary})
    csv_path = sweep_dir / SWEEP_CSV

    def write() -> None:
        finished = [r for r in rows if r is not None]
        write_sweep_csv(csv_path, finished, swept)
        write_summary_csv(sweep_dir / SUMMARY_CSV, finished, swept)

    def done(point: Point, outcome: dict[str, Any]) -> None:
        rows[point.index] = _row(point, outcome)
        _note_failure(sweep_dir, point, outcome)
        write()
        bar.update(1)
        failed = sum(1 for r in rows if r is not None and r["status"] != "ok")
        if failed:
            bar.set_postfix(failed=failed)

    bar = tqdm(total=len(points), initial=len(points) - len(todo), unit="point",
               desc=base.name, file=sys.stderr, disable=not progress or None)
    try:
        write()
        if base.executor.runs_sweep_points and todo:
            _run_ray(path, sweep_dir, todo, workers, base.executor, done)
        elif workers == 1 or len(todo) <= 1:
            for p in todo:
                done(p, run_point(str(path), p.overrides, str(sweep_dir / p.name)))
        else:
            _run_pool(path, sweep_dir, todo, workers, done)
    finally:
        bar.close()
    return [r for r in rows if r is not None]


def _run_pool(path: Path, sweep_dir: Path, todo: list[Point], workers: int, done: Any) -> None:
    # spawn, not fork: the parent may hold torch/OpenMP threads that a forked child would
    # inherit in a locked state.
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx)
    try:
        pending: dict[Future, Point] = {
            pool.submit(run_point, str(path), p.overrides, str(sweep_dir / p.name)): p
            for p in todo}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in sorted(finished, key=lambda f: pending[f].index):
                p = pending.pop(fut)
                try:
                    outcome = fut.result()
                except Exception as e:  # the worker process died (killed, out of memory)
                    outcome = {"status": "failed",
                               "error": one_line(f"worker died: {type(e).__name__}: {e}")}
                done(p, outcome)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _run_ray(path: Path, sweep_dir: Path, todo: list[Point], workers: int, cfg: Any,
             done: Any) -> None:
    """One Ray task (one CPU) per point, on the cluster at ``executor.address`` or a local Ray
    of ``--workers`` CPUs. Run directories are written by the tasks: on a cluster, ``--out``
    must be a directory every node sees (a shared file system)."""
    from fedsim.executors import import_ray

    ray = import_ray()
    owns = not ray.is_initialized()
    if owns:
        ray.init(address=cfg.address, num_cpus=None if cfg.address else workers,
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        task = ray.remote(num_cpus=1, max_retries=1)(run_point)
        pending = {task.remote(str(path.resolve()), p.overrides,
                               str((sweep_dir / p.name).resolve()), True): p for p in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            p = pending.pop(ready[0])
            try:
                outcome = ray.get(ready[0])
            except Exception as e:  # the task's worker died past its retry
                outcome = {"status": "failed",
                           "error": one_line(f"worker died: {type(e).__name__}: {e}")}
            done(p, outcome)
    finally:
        if owns:
            ray.shutdown()


# --- the final table --------------------------------------------------------------------------


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """The last segment of each dotted key, or more segments where that is ambiguous."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            short = ".".join(parts[-n:])
            if sum(1 for k in keys if k.endswith(short)) == 1:
                break
        out[key] = short
    return out


def _grid(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return lines


def _cell(v: Any, fmt: str) -> str:
    x = _number(v)
    return "-" if x is None else fmt.format(x)


def format_table(rows: Sequence[dict[str, Any]], swept: Sequence[str], max_rows: int = 40) -> str:
    """One screen: the headline metrics, then the failures.

    When a grid point has several runs (seeds), one line per grid point with each metric as
    ``mean ± half-width`` of its 95% t-interval and ``n`` the ok runs of the point's runs;
    otherwise one line per point with its swept values and status.
    """
    metrics = [(k, label, fmt) for k, label, fmt in HEADLINE
               if any(r.get(k) not in (None, "") for r in rows)]
    summary = summarize(rows, swept)
    repeated = any(g["points"] > 1 for g in summary)
    keys = [k for k in swept if k != "seed"] if repeated else list(dict.fromkeys([*swept, "seed"]))
    short = _short_names(keys)
    if repeated:
        header = [short[k] for k in keys] + ["n"] + [m[1] for m in metrics]
        shown = summary if len(summary) <= max_rows else summary[: max_rows - 10]
        body = [[str(g[k]) for k in keys] + [_n_cell(g)]
                + [Interval.from_columns(g, k).text(fmt) for k, _, fmt in metrics] for g in shown]
        lines = _grid(header, body)
        if len(shown) < len(summary):
            lines.append(f"... {len(summary) - len(shown)} more grid points in {SUMMARY_CSV}")
    else:
        header = [short[k] for k in keys] + ["status"] + [m[1] for m in metrics]
        shown = rows if len(rows) <= max_rows else rows[: max_rows - 10]
        body = [[str(r.get(k, "")) for k in keys] + [r["status"]]
                + [_cell(r.get(k), fmt) for k, _, fmt in metrics] for r in shown]
        lines = _grid(header, body)
        if len(shown) < len(rows):
            lines.append(f"... {len(rows) - len(shown)} more points in {SWEEP_CSV}")
    failed = [r for r in rows if r["status"] != "ok"]
    lines.append(f"{len(rows) - len(failed)} of {len(rows)} points ok"
                 + (f", {len(failed)} failed:" if failed else ""))
    for r in failed[:20]:
        err = r["error"] if len(r["error"]) <= 200 else r["error"][:197] + "..."
        lines.append(f"  {r['run']}: {err}")
    if len(failed) > 20:
        lines.append(f"  ... {len(failed) - 20} more failures in {SWEEP_CSV}")
    if repeated:
        lines.append("cells: mean ± 95% half-width over seeds (Student t); n: ok runs of the "
                     f"grid point (of all where some failed); in {SUMMARY_CSV}")
    return "\n".join(lines)


def _n_cell(group: dict[str, Any]) -> str:
    ok = group["points"] - group["failed"]
    return str(ok) if not group["failed"] else f"{ok}/{group['points']}"

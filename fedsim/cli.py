"""``fedsim run | sweep | compare | validate | plot | models``: the command line.

Bad input of any kind exits 2 with one clear message and no traceback; a bug still shows its
traceback (exit 1), because hiding it would hide the bug.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedsim.errors import FedsimError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedsim", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a scenario and write its run directory")
    run.add_argument("scenario", help="scenario YAML file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a scenario key, e.g. --set clients.0.count=50 (repeatable)")
    run.add_argument("--out", help="run directory (default: <output.dir>/<name>, or the "
                     "--resume directory)")
    run.add_argument("--resume", metavar="DIR", help="continue the interrupted run whose "
                     "directory is DIR from its last checkpoint (output.checkpoint_every)")
    run.add_argument("--seeds", type=int, metavar="N", help="run seeds 0..N-1 (replacing "
                     "`seed`), one run directory <out>/seed=K each, and report mean, std and "
                     "95%% interval per metric (sweep.csv, sweep_summary.csv); rerunning keeps "
                     "the seeds already finished")
    run.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    run.add_argument("--no-plots", action="store_true",
                     help="do not draw the run's figures into its plots/ at the end")

    val = sub.add_parser("validate", help="check a scenario; exit 0 if valid, 2 if not")
    val.add_argument("scenario")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    prep = sub.add_parser("prepare", help="load a scenario's data and models and fit its "
                          "projectors and server probe, so that its first run starts from "
                          "warm caches")
    prep.add_argument("scenario")
    prep.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE")
    prep.add_argument("--quiet", action="store_true", help="no progress line")

    sw = sub.add_parser("sweep", help="run a grid of overrides x seeds, one run directory each",
                        description="Run every point of a grid of overrides times seeds; "
                        "resumable (rerun the same command). Exit 0 if every point ran, 1 if "
                        "some failed, 2 for bad input.")
    sw.add_argument("scenario", help="scenario YAML file")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a scenario key at every point, before the point's own "
                    "values (repeatable; a key may not be both set and swept)")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="sweep a key over values (cartesian product with other --grid flags; "
                    "values as for --set, commas inside [..] kept); repeatable")
    sw.add_argument("--zip", dest="zip_", action="append", default=[], metavar="KEY=V1,V2",
                    help="keys that vary together (all --zip keys need the same number of "
                    "values); repeatable")
    sw.add_argument("--seeds", type=int, help="run seeds 0..N-1 at each point "
                    "(default: the scenario's seed); sweep_summary.csv gives mean, std and "
                    "95%% interval over them per grid point")
    sw.add_argument("--workers", type=int, default=1,
                    help="points run in parallel processes (default 1: in this process)")
    sw.add_argument("--out", help="sweep directory (default: sweeps/<name>)")
    sw.add_argument("--quiet", action="store_true", help="no progress bar or table")

    cmp_ = sub.add_parser(
        "compare", help="one run, one server model per projector (x LARS): the server metric "
        "per round of each", description="Train the clients once and merge the same updates "
        "into one server model per variant (projector x LARS); write comparison.csv, "
        "comparison.md, plots/comparison.png and the shared run directory run/.")
    cmp_.add_argument("scenario", help="scenario YAML file (workload real, with a server.model)")
    cmp_.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE", help="override a scenario key (repeatable)")
    cmp_.add_argument("--projectors", default="pad,orthogonal,lstsq",
                      help="comma-separated projectors, each optionally +lars (that one "
                      "variant with LARS whatever --lars says; default: pad,orthogonal,lstsq)")
    cmp_.add_argument("--lars", default="both", choices=("off", "on", "both"),
                      help="variants without LARS, with it, or both (default)")
    cmp_.add_argument("--lars-eta", type=float, default=0.01,
                      help="eta of the LARS variants: each tensor's step is eta*||W|| "
                      "(default 0.01)")
    cmp_.add_argument("--references", default="standalone,centralized,homogeneous",
                      help="references beside the variants (start is always there): "
                      "standalone (clients alone), centralized (the server model trained on "
                      "the union of the clients' data), homogeneous (every client on the "
                      "server's model, FedAvg); comma-separated or none (default: all three)")
    cmp_.add_argument("--seeds", type=int, metavar="N", help="run the comparison once per "
                      "seed 0..N-1 (replacing `seed`; run directories seed=K/); comparison.csv "
                      "then holds mean, std and 95%% interval over seeds")
    cmp_.add_argument("--out", help="output directory (default: <output.dir>/<name>-compare)")
    cmp_.add_argument("--quiet", action="store_true", help="no progress bar or table")

    pl = sub.add_parser("plot", help="write PNG figures of a run or sweep directory")
    pl.add_argument("dir", help="a run directory (summary.json) or sweep directory (sweep.csv)")

    sub.add_parser("models", help="list the model registry and which models are installed")
    return p


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _fmt_joules(j: float) -> str:
    for scale, unit in ((1e6, "MJ"), (1e3, "kJ")):
        if j >= scale:
            return f"{j / scale:.1f} {unit}"
    return f"{j:.1f} J"


def format_summary(s: dict[str, Any], run_dir: Path) -> str:
    """The one-screen summary printed at the end of a run."""
    lat, ov, ut, comm = s["latency_s"], s["overload"], s["utilization"], s["comm"]
    lines = [
        f"run {s['scenario']} (seed {s['seed']}): {s['rounds_completed']} rounds, "
        f"{s['sim_time_s']:.1f} s simulated in {s['wall_time_s']:.1f} s wall",
        "latency (s)      p50        p95        max",
    ]
    for phase in ("download", "compute", "queue", "upload", "server", "round"):
        v = lat[phase]
        lines.append(f"  {phase:<10} {v['p50']:>10.3f} {v['p95']:>10.3f} {v['max']:>10.3f}")
    comp = ", ".join(f"{k} {v:.1%}" for k, v in ut["compute"].items())
    lines += [
        f"utilization      uplink {ut['uplink']:.1%}, downlink {ut['downlink']:.1%}, "
        f"server {ut['server']:.1%}; compute {comp}",
        f"overload         queue max {ov['server_queue_max']}, dropped {ov['dropped_updates']}, "
        f"deadline misses {ov['deadline_misses']}, oom {ov['oom_failures']}, "
        f"dropouts {ov['dropouts']}, outages {ov['outages']}",
        f"communication    up {_fmt_bytes(comm['bytes_up'])}, down {_fmt_bytes(comm['bytes_down'])}"
        f", compression x{comm['compression_ratio']:.2f}",
    ]
    faults = {"rejected": ov.get("rejected_updates", 0), "crashes": ov.get("crashes", 0),
              "cell outages": ov.get("link_outages", 0),
              "server failures": ov.get("server_failures", 0),
              "failed jobs": ov.get("failed_jobs", 0)}
    if any(faults.values()):  # only when something went wrong: the line names what
        lines.insert(-1, "faults           " + ", ".join(f"{k} {v}" for k, v in faults.items()))
    energy = s.get("energy_j") or {}
    if energy:  # joules per device class, all phases, and the median per update
        lines.append("energy           " + ", ".join(
            f"{cls} {_fmt_joules(sum(p['total'] for p in ph.values()))} "
            f"(p50/update {_fmt_joules(sum(p['p50'] for p in ph.values()))})"
            for cls, ph in energy.items()))
    sel = s.get("selection")
    if sel and sel.get("uploads"):
        lines.append(f"selection        {sel['name']}: expected {sel['expected_s']['p50']:.3f} s, "
                     f"actual {sel['actual_s']['p50']:.3f} s per update (p50), "
                     f"|error| p50 {sel['abs_error_s']['p50']:.3f} s")
    q = s["quality"]
    if q["metric"] and q["server_by_round"]:
        vals = " ".join("-" if v is None else f"{v:.3f}" for v in q["server_by_round"])
        lines.append(f"server {q['metric']:<9} {vals}")
    lines.append(f"results in       {run_dir}/ (summary.json, events.csv, rounds.csv, clients.csv)")
    return "\n".join(lines)


# Headline metrics of a run repeated over seeds: (sweep.csv column, label, format).
SEED_METRICS = (("sim_time_s", "simulated time (s)", "{:.1f}"),
                ("rounds_completed", "rounds completed", "{:.1f}"),
                ("latency_s.round.p95", "round p95 (s)", "{:.3f}"),
                ("latency_s.upload.p95", "upload p95 (s)", "{:.3f}"),
                ("overload.deadline_misses", "deadline misses", "{:.1f}"),
                ("overload.dropped_updates", "dropped updates", "{:.1f}"),
                ("utilization.uplink", "uplink utilization", "{:.1%}"),
                ("comm.bytes_up", "bytes up", "{:,.0f}"),
                ("quality.final", "final server metric", "{:.4f}"))


def format_seeds_summary(name: str, rows: list[dict[str, Any]], out: Path) -> str:
    """The one-screen summary of ``fedsim run --seeds``: mean ± 95% half-width per metric."""
    from fedsim.intervals import Interval
    from fedsim.metrics import read_summary
    from fedsim.sweep import SUMMARY_CSV, SWEEP_CSV, summarize

    (group,) = summarize(rows, [])
    ok = group["points"] - group["failed"]
    seeds = [r["seed"] for r in rows]
    lines = [f"run {name} over seeds {', '.join(seeds)}: mean ± 95% half-width "
             f"(Student t, n={ok}" + (f" ok of {group['points']})" if group["failed"] else ")")]
    metric = next((read_summary(out / r["run"])["quality"]["metric"] for r in rows
                   if r["status"] == "ok"), None)
    for key, label, fmt in SEED_METRICS:
        iv = Interval.from_columns(group, key)
        if iv.n:
            if key == "quality.final" and metric:
                label = f"final server {metric}"
            lines.append(f"  {label:<22} {iv.text(fmt)}")
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"  seed {r['seed']} failed: {r['error']}")
    runs = [r["run"] for r in rows]
    shown = ", ".join(runs) if len(runs) <= 3 else f"{runs[0]} ... {runs[-1]}"
    lines.append(f"results in       {out}/ ({shown}; {SWEEP_CSV}: "
                 f"one row per seed; {SUMMARY_CSV}: mean, std, 95% interval per metric)")
    return "\n".join(lines)


def _study(out: Path, call: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]] | int:
    """Run a sweep-like study; an exit code instead of its rows when the user stopped it."""
    from fedsim.sweep import SWEEP_CSV

    try:
        return call()
    except BrokenPipeError:  # `fedsim ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"fedsim: interrupted; finished points are in {out / SWEEP_CSV}; rerun the same "
              "command to resume", file=sys.stderr)
        return 130


def _seed_overrides(overrides: list[str], seeds: int | None) -> None:
    """``--seeds`` replaces ``seed``: both given is a user error, as a bad count is."""
    if seeds is None:
        return
    if seeds < 1:
        raise FedsimError(f"--seeds must be >= 1, got {seeds}")
    if any(o.partition("=")[0].strip() == "seed" for o in overrides):
        raise FedsimError("seed: given by --set and by --seeds; give one of them")


def cmd_validate(args: argparse.Namespace) -> int:
    from fedsim.scenario import load

    sc = load(args.scenario, args.overrides)
    print(f"{args.scenario}: valid ({sc.num_clients} clients, {sc.rounds} rounds)")
    for note in sc.notes():
        print(f"note: {note}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fedsim.engine import prepare
    from fedsim.models import cache_dir
    from fedsim.scenario import load

    sc = load(args.scenario, args.overrides)
    t0 = time.perf_counter()
    bar = tqdm(total=0, desc=sc.name, disable=args.quiet or None, file=sys.stderr,
               bar_format="{desc}")
    try:
        with status_on(bar, sc.name, quiet=args.quiet):
            prepare(sc)
    finally:
        bar.close()
    if not args.quiet:
        print(f"{args.scenario}: prepared in {time.perf_counter() - t0:.1f} s "
              f"(caches under {cache_dir().parent})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fedsim.engine import run
    from fedsim.metrics import write_run_dir
    from fedsim.scenario import load

    sc = load(args.scenario, args.overrides)
    if args.seeds is not None:
        return _run_seeds(args, sc)
    if args.out:
        out = Path(args.out)
    else:
        out = Path(args.resume) if args.resume else Path(sc.output.dir) / sc.name
    bar = tqdm(total=sc.rounds, unit="round", desc=sc.name, disable=args.quiet or None,
               file=sys.stderr)

    def on_round(done: int) -> None:
        bar.update(done - bar.n)  # the bar counts the rounds done; its text names the next
        if done < sc.rounds:
            bar.set_description_str(f"{sc.name}: round {done + 1} of {sc.rounds}")

    try:
        with status_on(bar, sc.name, quiet=args.quiet):
            result = run(sc, progress=on_round, run_dir=out, resume=args.resume)
    finally:
        bar.close()
    write_run_dir(result, out)
    if not args.quiet:  # the summary first: the figures take a few seconds more (~4 s here)
        print(format_summary(result.summary, out), flush=True)
    plotted = [] if args.no_plots else _plots(out)
    if plotted and not args.quiet:
        print(f"plots in         {out / 'plots'}/ ({', '.join(p.name for p in plotted)})")
    return 0


class _BarStatus(logging.Handler):
    """Shows the library's progress messages (logger ``fedsim``) as the bar's description."""

    def __init__(self, bar: Any, name: str) -> None:
        super().__init__(logging.INFO)
        self.bar, self.name = bar, name

    def emit(self, record: logging.LogRecord) -> None:
        self.bar.set_description_str(f"{self.name}: {record.getMessage()}")


@contextlib.contextmanager
def status_on(bar: Any, name: str, quiet: bool) -> Iterator[None]:
    """While the block runs, the ``fedsim`` logger's INFO messages go to ``bar``."""
    if quiet:
        yield
        return
    logger, handler = logging.getLogger("fedsim"), _BarStatus(bar, name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _plots(out: Path) -> list[Path]:
    """The run's figures (``fedsim plot``) into ``out/plots``; one that cannot be drawn (a
    file it cannot write, data it cannot read) is reported, not fatal: the run directory is
    complete already."""
    from fedsim.plots import plot_run

    try:
        return plot_run(out)
    except (FedsimError, OSError, ValueError) as e:
        print(f"note: plots not drawn ({type(e).__name__}: {e}); run `fedsim plot {out}`",
              file=sys.stderr)
        return []


def _run_seeds(args: argparse.Namespace, sc: Any) -> int:
    """``fedsim run --seeds N``: a sweep over seeds alone (same directory layout and files)."""
    from fedsim.sweep import run_sweep

    if args.resume:
        raise FedsimError("--resume: not with --seeds; rerun the same command instead (seeds "
                          "already finished with the same resolved scenario are kept)")
    _seed_overrides(args.overrides, args.seeds)
    out = Path(args.out) if args.out else Path(sc.output.dir) / sc.name
    rows = _study(out, lambda: run_sweep(args.scenario, {}, None, args.seeds, 1, out,
                                         progress=not args.quiet, overrides=args.overrides))
    if isinstance(rows, int):
        return rows
    if not args.quiet:
        print(format_seeds_summary(sc.name, rows, out))
    failed = [r for r in rows if r["status"] != "ok"]
    if failed and args.quiet:
        for r in failed:
            print(f"fedsim: seed {r['seed']} failed: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from fedsim.scenario import load
    from fedsim.sweep import SUMMARY_CSV, SWEEP_CSV, format_table, parse_assignments, run_sweep

    grid = parse_assignments(args.grid, "--grid")
    zip_ = parse_assignments(args.zip_, "--zip")
    if not grid and not zip_ and args.seeds is None:
        raise FedsimError("nothing to sweep: give --grid, --zip or --seeds")
    out = (Path(args.out) if args.out else
           Path("sweeps") / load(args.scenario, args.overrides).name)
    rows = _study(out, lambda: run_sweep(args.scenario, grid, zip_, args.seeds, args.workers,
                                         out, progress=not args.quiet,
                                         overrides=args.overrides))
    if isinstance(rows, int):
        return rows
    if not args.quiet:
        print(format_table(rows, [*grid, *zip_]))
        print(f"results in       {out}/ ({SWEEP_CSV}, {SUMMARY_CSV}, one run directory per "
              "point)")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed and args.quiet:
        for r in failed:
            print(f"fedsim: point {r['run']} failed: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fedsim import comparison
    from fedsim.references import parse_references
    from fedsim.scenario import load

    sc = load(args.scenario, args.overrides)
    chosen = comparison.variants([p.strip() for p in args.projectors.split(",") if p.strip()],
                                 args.lars)
    refs = parse_references(args.references)
    if not args.lars_eta > 0:
        raise FedsimError(f"--lars-eta: must be > 0, got {args.lars_eta}")
    _seed_overrides(args.overrides, args.seeds)
    # Every seed's scenario is validated before the first one runs.
    scenarios = ([sc] if args.seeds is None else
                 [load(args.scenario, [*args.overrides, f"seed={k}"]) for k in range(args.seeds)])
    out = Path(args.out) if args.out else Path(sc.output.dir) / f"{sc.name}-compare"
    runs = []
    for s in scenarios:
        desc = f"{s.name} x{len(chosen)} servers" + (f" seed {s.seed}" if args.seeds else "")
        bar = tqdm(total=s.rounds, unit="round", desc=desc, disable=args.quiet or None,
                   file=sys.stderr)
        try:
            comp, kept = comparison.compare_kept(
                s, chosen, args.lars_eta, refs,
                comparison.seed_dir(out, None if args.seeds is None else s.seed),
                progress=lambda done, bar=bar: bar.update(done - bar.n))
        finally:
            bar.close()
        if kept and not args.quiet:
            print(f"{desc}: kept from "
                  f"{comparison.seed_dir(out, None if args.seeds is None else s.seed)}/ "
                  "(same scenario, variants and references)", file=sys.stderr)
        runs.append(comp)
    rep = comparison.RepeatedComparison(runs)
    paths = comparison.write_comparison(runs[0] if args.seeds is None else rep, out)
    if not args.quiet:
        print(rep.caption())
        print(rep.markdown())
        dirs = "run/" if args.seeds is None else ", ".join(f"seed={k}/" for k in rep.seeds)
        print(f"results in       {out}/ ({', '.join(p.name for p in paths)}, {dirs})")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from fedsim.plots import plot_dir

    for path in plot_dir(args.dir):
        print(path)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from fedsim.models import list_models

    cols = ("name", "architecture", "kind", "parameters", "hidden_size", "layers", "installed")
    rows = [[_cell(m.get(c)) for c in cols] for m in list_models()]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    missing = [m for m in list_models() if not m.get("installed")]
    for m in missing:
        print(f"  {m['name']}: not installed; {m.get('package')}")
    return 0


def _cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int) and v >= 1_000_000:
        return f"{v / 1e6:.1f}M"
    return str(v)


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "compare": cmd_compare,
            "validate": cmd_validate, "prepare": cmd_prepare,
            "plot": cmd_plot, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except FedsimError as e:
        print(f"fedsim: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fedsim: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

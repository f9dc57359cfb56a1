"""Server variants compared on the very same client updates: which projector, LARS or not.

One simulation trains the clients once; every round, each accepted client update is projected
by every projector under study and merged into one server model per variant (projector x LARS),
all starting from the same model (the scenario's server with its linear-probe head). A variant
is named ``<projector>`` or ``<projector>+lars``; ``start`` is the server before any update
(the "no update" baseline). Only the first variant's work counts in simulated time.
``--references standalone,centralized,homogeneous`` (the default: all) adds the rows of
:mod:`fedsim.references` to read the variants against: clients alone, the server model trained
on the union of the clients' data (the upper bound), every client on the server's model.

``fedsim compare FILE --projectors pad,orthogonal,lstsq --lars both`` writes
``comparison.csv``, ``comparison_by_seed.csv``, ``comparison.md`` (the table) and
``plots/comparison.png`` next to the run directory of the shared simulation (``run/``).
With ``--seeds N`` the comparison runs once per seed (a ``RepeatedComparison``), each seed's
run directory is ``seed=K/`` (the sweeps' naming), and the numbers are intervals over seeds:

- ``comparison.csv``: ``variant, round, <metric>, <metric>.std, <metric>.ci95_low,
  <metric>.ci95_high, <metric>.n`` -- per variant and round the mean over seeds, the sample
  standard deviation and the 95% t-interval of the mean (``fedsim.intervals``; with one seed
  the value, NaN spread);
- ``comparison_by_seed.csv``: ``seed, variant, round, <metric>``, every seed's own value;
- ``comparison.md``: ``mean ± half-width`` per cell (the value alone for one seed).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedsim import references
from fedsim.atomic import atomic_file
from fedsim.engine import RunResult, Simulation
from fedsim.errors import FedsimError
from fedsim.federation import LoraWorkload
from fedsim.intervals import SUFFIXES, Interval, t_interval
from fedsim.plugins import AGGREGATORS, PROJECTORS
from fedsim.scenario import Scenario

START = "start"  # the variant name of the server before any update


@dataclass(frozen=True)
class Variant:
    projector: str
    lars: bool

    @property
    def name(self) -> str:
        return self.projector + ("+lars" if self.lars else "")


@dataclass
class Comparison:
    """The metric of each variant after each round (``START``: one value, before round 0)."""

    metric: str
    by_variant: dict[str, list[float]]
    result: RunResult

    @property
    def seed(self) -> int:
        return int(self.result.summary["seed"])

    def rows(self) -> list[dict[str, object]]:
        """The rows of comparison_by_seed.csv: ``seed, variant, round, <metric>``."""
        return [{"seed": self.seed, "variant": v, "round": r, self.metric: x}
                for v, xs in self.by_variant.items() for r, x in enumerate(xs)]

    def markdown(self) -> str:
        """One row per variant, one column per round (``start`` fills every column)."""
        return RepeatedComparison([self]).markdown()


@dataclass
class RepeatedComparison:
    """The same comparison run once per seed; per variant and round, the interval over them."""

    runs: list[Comparison]

    def __post_init__(self) -> None:
        if not self.runs:
            raise FedsimError("compare: no seeds to compare")
        metrics = {c.metric for c in self.runs}
        if len(metrics) > 1:
            raise FedsimError(f"compare: the seeds measured different metrics: {sorted(metrics)}")

    @property
    def metric(self) -> str:
        return self.runs[0].metric

    @property
    def seeds(self) -> list[int]:
        return [c.seed for c in self.runs]

    def intervals(self) -> dict[str, list[Interval]]:
        """Per variant, per round: the t-interval over the seeds that have that round."""
        out: dict[str, list[Interval]] = {}
        for v in dict.fromkeys(v for c in self.runs for v in c.by_variant):
            series = [c.by_variant.get(v, []) for c in self.runs]
            rounds = max(len(xs) for xs in series)
            out[v] = [t_interval(xs[r] for xs in series if r < len(xs)) for r in range(rounds)]
        return out

    def rows(self) -> list[dict[str, object]]:
        """The rows of comparison.csv: ``variant, round`` and the metric's interval columns."""
        return [{"variant": v, "round": r, **iv.columns(self.metric)}
                for v, ivs in self.intervals().items() for r, iv in enumerate(ivs)]

    def seed_rows(self) -> list[dict[str, object]]:
        """The rows of comparison_by_seed.csv, seed by seed."""
        return [row for c in self.runs for row in c.rows()]

    def markdown(self) -> str:
        """One row per variant, one column per round, each cell ``mean ± half-width`` (the
        value alone for one seed); ``start`` fills every column."""
        ivs = self.intervals()
        rounds = max(len(xs) for xs in ivs.values())
        head = ["variant"] + [f"round {r}" for r in range(rounds)]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for v, xs in ivs.items():
            cells = [iv.text("{:.3f}") for iv in (xs * rounds if v == START else xs)]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def caption(self) -> str:
        """What the table's numbers are, for the line above it."""
        what = f"server {self.metric} per round (start: before any update)"
        if len(self.runs) == 1:
            return f"{what}, seed {self.seeds[0]}"
        return (f"{what}: mean ± 95% half-width over {len(self.runs)} seeds "
                f"({', '.join(map(str, self.seeds))}; Student t, n={len(self.runs)})")


def variants(projectors: Sequence[str], lars: str) -> list[Variant]:
    """``lars``: ``off``, ``on`` or ``both`` (each projector without, then with)."""
    unknown = [p for p in projectors if p not in PROJECTORS]
    if unknown:
        raise FedsimError(f"--projectors: unknown {', '.join(unknown)}; known: "
                          f"{', '.join(PROJECTORS.names())}")
    flags = {"off": (False,), "on": (True,), "both": (False, True)}
    if lars not in flags:
        raise FedsimError(f"--lars: expected off, on or both, got {lars!r}")
    return [Variant(p, f) for p in projectors for f in flags[lars]]


def compare(scenario: Scenario, chosen: Sequence[Variant], lars_eta: float = 0.01,
            progress: Callable[[int], None] | None = None,
            refs: Sequence[str] = ()) -> Comparison:
    """Run ``scenario`` once with one server model per variant; see the module docstring.

    ``lars_eta``: η of the LARS variants (each tensor's step has norm η·||W||, so η must be
    small); the others use ``scenario.aggregation.eta``. ``refs``: the references of
    :mod:`fedsim.references` to compute beside them (``start`` is always there).
    """
    if not scenario.workload.trains_models or scenario.server.model is None:
        raise FedsimError("compare needs workload.name=real and a server.model")
    if not chosen:
        raise FedsimError("compare: no variants to compare")
    sim = Simulation(scenario)
    wl = sim.workload
    assert isinstance(wl, LoraWorkload)
    wl.servers.clear()  # the scenario's own server is replaced by the variants
    agg, transfer = scenario.aggregation, scenario.transfer
    own = transfer.projector
    if any(v.lars for v in chosen) and "lars" not in type(agg).model_fields:
        raise FedsimError(f"--lars: aggregator {agg.name!r} has no LARS; use --lars off or "
                          f"--set aggregation.name={', '.join(AGGREGATORS.taking('lars'))}")
    for v in chosen:
        # A variant of the scenario's own projector keeps its options; others their defaults.
        projector = own if v.projector == own.name else PROJECTORS.parse({"name": v.projector})
        cfg = agg.model_copy(update={"lars": v.lars, "eta": lars_eta if v.lars else agg.eta}
                             ) if v.lars else agg
        wl.add_server(v.name, transfer.model_copy(update={"projector": projector}), cfg)
    metric = wl.primary_metric()
    start = wl.evaluate_servers()[metric]  # every variant starts from the same model
    head = references.start_head(wl)
    by_variant = {START: [start]}
    try:
        result = sim.run(progress)
        for v in chosen:
            by_variant[v.name] = [q[f"{v.name}/{metric}"] for q in sim.quality_by_round]
        if "standalone" in refs:
            by_variant["standalone"] = references.standalone(wl, scenario.rounds, metric)
        if "centralized" in refs:
            per_round = references.examples_by_round(
                [r["aggregated"] for r in sim.rec.rounds], references.steps_per_update(wl),
                scenario.training.batch_size)
            by_variant["centralized"] = references.centralized(wl, head, per_round, metric)
    finally:
        wl.close()
    if "homogeneous" in refs:
        by_variant["homogeneous"] = references.homogeneous(scenario)
    return Comparison(metric, by_variant, result)


def _csv_text(rows: Sequence[dict[str, object]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_comparison(comp: Comparison | RepeatedComparison, out: Path) -> list[Path]:
    """``comparison.csv``, ``comparison_by_seed.csv``, ``comparison.md`` and
    ``plots/comparison.png`` under ``out`` (each written atomically), beside the run
    directories: ``run/`` for one Comparison, ``seed=K/`` per seed of a RepeatedComparison."""
    from fedsim.metrics import write_run_dir
    from fedsim.plots import comparison

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(comp, Comparison):
        write_run_dir(comp.result, out / "run")
        rep = RepeatedComparison([comp])
    else:
        rep = comp
        for c in rep.runs:
            write_run_dir(c.result, out / f"seed={c.seed}")
    files = {
        "comparison.csv": _csv_text(rep.rows(), ["variant", "round",
                                                 *(rep.metric + s for s in SUFFIXES)]),
        "comparison_by_seed.csv": _csv_text(rep.seed_rows(),
                                            ["seed", "variant", "round", rep.metric]),
        # The caption only for several seeds: a one-seed file stays the bare table.
        "comparison.md": ("" if len(rep.runs) == 1 else rep.caption() + "\n\n")
        + rep.markdown() + "\n",
    }
    paths = []
    for name, text in files.items():
        with atomic_file(out / name) as tmp:
            tmp.write_text(text, encoding="utf-8", newline="")
        paths.append(out / name)
    return [*paths, comparison(out)]

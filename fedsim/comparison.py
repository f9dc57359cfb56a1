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
- ``comparison.md``: ``mean ± half-width`` per cell (the value alone for one seed), and per row
  the bytes its federation sent up and the simulated time to its final round (``-`` where the
  row moves no bytes: ``start``, ``standalone``, ``centralized``), and the paired interval of
  its final value minus start over seeds (the difference that says whether it gained).

Each seed's comparison is kept beside its run directory (``seed=K/comparison.json``, written
after the run directory, so its presence means complete); a rerun of the same command keeps the
seeds already finished with the same resolved scenario, variants and references, as sweeps do.
"""

from __future__ import annotations

import csv
import io
import json
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


COST_KEYS = ("bytes_up", "sim_time_s")  # per row: what its federation cost, to the last round


def run_cost(summary: dict) -> dict[str, float]:
    """Bytes up (all rounds) and simulated time to the final round of one run's summary."""
    return {"bytes_up": float(summary["comm"]["bytes_up"]),
            "sim_time_s": float(summary["sim_time_s"])}


@dataclass
class Comparison:
    """The metric of each variant after each round (``START``: one value, before round 0).

    ``costs``: per row that runs a federation, :data:`COST_KEYS` (the projector variants share
    one run's; ``homogeneous`` has its own). ``result``: the shared run (None when the
    comparison was read back from ``comparison.json``)."""

    metric: str
    by_variant: dict[str, list[float]]
    seed: int
    costs: dict[str, dict[str, float]]
    result: RunResult | None = None

    def to_json(self, key: dict) -> str:
        """The comparison and the ``key`` it answers (see :func:`comparison_key`)."""
        return json.dumps({"key": key, "metric": self.metric, "seed": self.seed,
                           "by_variant": self.by_variant, "order": list(self.by_variant),
                           "costs": self.costs}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: Path, key: dict) -> Comparison | None:
        """The comparison kept at ``path`` if it answers ``key``, else None."""
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if d.get("key") != key:
            return None
        rows = d["by_variant"]  # in the table's order (JSON keys are sorted)
        return cls(d["metric"], {v: rows[v] for v in d.get("order", rows)}, int(d["seed"]),
                   d["costs"])

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

    def cost_intervals(self, scale: dict[str, float] | None = None
                       ) -> dict[str, dict[str, Interval]]:
        """Per row with a federation: the interval over seeds of each of :data:`COST_KEYS`
        (each value times ``scale[key]``, default 1)."""
        scale = scale or {}
        names = dict.fromkeys(v for c in self.runs for v in c.costs)
        return {v: {k: t_interval(c.costs[v][k] * scale.get(k, 1.0)
                                  for c in self.runs if v in c.costs)
                    for k in COST_KEYS} for v in names}

    def gains(self) -> dict[str, Interval]:
        """Per variant, the paired interval over seeds of (its final value − start): each
        seed's start, probe and evaluation set cancel out, which the per-round intervals keep
        (their width is mostly the seeds' different starts)."""
        names = [v for v in dict.fromkeys(v for c in self.runs for v in c.by_variant)
                 if v != START]
        return {v: t_interval(c.by_variant[v][-1] - c.by_variant[START][0] for c in self.runs
                              if c.by_variant.get(v) and c.by_variant.get(START))
                for v in names}

    def markdown(self) -> str:
        """One row per variant, one column per round, each cell ``mean ± half-width`` (the
        value alone for one seed); ``start`` fills every column. Then MB up and the simulated
        seconds to the final round (``-``: the row runs no federation), and the paired gain of
        the final round over start (:meth:`gains`)."""
        ivs, costs = self.intervals(), self.cost_intervals({"bytes_up": 1e-6})
        gains = self.gains()
        rounds = max(len(xs) for xs in ivs.values())
        head = (["variant"] + [f"round {r}" for r in range(rounds)]
                + ["MB up", "sim time s", "final − start (paired)"])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for v, xs in ivs.items():
            cells = [iv.text("{:.3f}") for iv in (xs * rounds if v == START else xs)]
            c = costs.get(v)
            cells += ([c["bytes_up"].text("{:.2f}"), c["sim_time_s"].text("{:.1f}")]
                      if c else ["-", "-"])
            cells.append(_signed(gains[v]) if v in gains else "-")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def caption(self) -> str:
        """What the table's numbers are, for the line above it."""
        what = f"server {self.metric} per round (start: before any update)"
        if len(self.runs) == 1:
            return f"{what}, seed {self.seeds[0]}"
        return (f"{what}: mean ± 95% half-width over {len(self.runs)} seeds "
                f"({', '.join(map(str, self.seeds))}; Student t, n={len(self.runs)})")


def _signed(iv: Interval) -> str:
    """``+0.012 ± 0.034``: a difference's sign on its mean only."""
    text = iv.text("{:.3f}")
    return text if text == "-" or iv.mean < 0 else "+" + text


def variants(projectors: Sequence[str], lars: str) -> list[Variant]:
    """``lars``: ``off``, ``on`` or ``both`` (each projector without, then with). A name
    ``<projector>+lars`` is that one variant with LARS whatever ``lars`` says, so a study can
    name its rows: ``pad,orthogonal,lstsq,lstsq+lars`` with ``off``."""
    flags = {"off": (False,), "on": (True,), "both": (False, True)}
    if lars not in flags:
        raise FedsimError(f"--lars: expected off, on or both, got {lars!r}")
    out: list[Variant] = []
    for name in projectors:
        base, plus, suffix = name.partition("+")
        if base not in PROJECTORS or (plus and suffix != "lars"):
            raise FedsimError(f"--projectors: unknown {name}; known: "
                              f"{', '.join(PROJECTORS.names())} (each optionally +lars)")
        out += [Variant(base, True)] if plus else [Variant(base, f) for f in flags[lars]]
    return list(dict.fromkeys(out))


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
    if scenario.transfer.name != "projection":
        raise FedsimError(f"transfer.name: compare's variants are projectors; a "
                          f"{scenario.transfer.name} run is compared by `fedsim run --seeds N` "
                          "with --set on its options (see README, Distillation)")
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
    # Every variant starts from the same model: one evaluation stands for all of them.
    start = wl.servers.primary.model.evaluate(wl.eval_examples)[metric]
    head = references.start_head(wl)
    by_variant = {START: [start]}
    costs: dict[str, dict[str, float]] = {}
    try:
        result = sim.run(progress)
        for v in chosen:
            by_variant[v.name] = [q[f"{v.name}/{metric}"] for q in sim.quality_by_round]
            costs[v.name] = run_cost(result.summary)
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
        by_variant["homogeneous"], summary = references.homogeneous(scenario)
        costs["homogeneous"] = run_cost(summary)
    return Comparison(metric, by_variant, scenario.seed, costs, result)


def comparison_key(scenario: Scenario, chosen: Sequence[Variant], lars_eta: float,
                   refs: Sequence[str]) -> dict:
    """What one seed's comparison answers: a kept one is reused only for the same key."""
    return {"scenario": scenario.to_yaml(), "variants": [v.name for v in chosen],
            "lars_eta": lars_eta, "references": list(refs)}


def seed_dir(out: Path, seed: int | None) -> Path:
    """The run directory of one comparison: ``run/`` alone, ``seed=K/`` with ``--seeds``."""
    return Path(out) / ("run" if seed is None else f"seed={seed}")


def compare_kept(scenario: Scenario, chosen: Sequence[Variant], lars_eta: float,
                 refs: Sequence[str], run_dir: Path,
                 progress: Callable[[int], None] | None = None) -> tuple[Comparison, bool]:
    """:func:`compare`, unless ``run_dir`` already holds the same comparison: then that one
    (and True). A new one is written there at once: its run directory, then comparison.json."""
    from fedsim.metrics import write_run_dir

    key = comparison_key(scenario, chosen, lars_eta, refs)
    kept = Comparison.read(run_dir / "comparison.json", key)
    if kept is not None and (run_dir / "summary.json").exists():
        return kept, True
    comp = compare(scenario, chosen, lars_eta, progress, refs)
    assert comp.result is not None
    write_run_dir(comp.result, run_dir)
    with atomic_file(run_dir / "comparison.json") as tmp:
        tmp.write_text(comp.to_json(key), encoding="utf-8")
    return comp, False


def _csv_text(rows: Sequence[dict[str, object]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_comparison(comp: Comparison | RepeatedComparison, out: Path) -> list[Path]:
    """``comparison.csv``, ``comparison_by_seed.csv``, ``comparison.md`` and
    ``plots/comparison.png`` under ``out`` (each written atomically), beside the run
    directories (:func:`compare_kept` writes them): ``run/`` for one Comparison, ``seed=K/``
    per seed of a RepeatedComparison."""
    from fedsim.plots import comparison

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep = RepeatedComparison([comp]) if isinstance(comp, Comparison) else comp
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

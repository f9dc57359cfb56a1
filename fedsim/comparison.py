"""Server variants compared on the very same client updates: which projector, LARS or not.

One simulation trains the clients once; every round, each accepted client update is projected
by every projector under study and merged into one server model per variant (projector x LARS),
all starting from the same model (the scenario's server with its linear-probe head). A variant
is named ``<projector>`` or ``<projector>+lars``; ``start`` is the server before any update
(the "no update" baseline). Only the first variant's work counts in simulated time.

``fedsim compare FILE --projectors pad,orthogonal,lstsq --lars both`` writes
``comparison.csv`` (variant, round, metric), ``comparison.md`` (the table) and
``plots/comparison.png`` next to the run directory of the shared simulation (``run/``).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedsim.engine import RunResult, Simulation
from fedsim.errors import FedsimError
from fedsim.federation import LoraWorkload
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

    def rows(self) -> list[dict[str, object]]:
        return [{"variant": v, "round": r, self.metric: x}
                for v, xs in self.by_variant.items() for r, x in enumerate(xs)]

    def markdown(self) -> str:
        """One row per variant, one column per round (``start`` fills every column)."""
        rounds = max(len(xs) for xs in self.by_variant.values())
        head = ["variant"] + [f"round {r}" for r in range(rounds)]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for v, xs in self.by_variant.items():
            cells = [f"{x:.3f}" for x in (xs * rounds if v == START else xs)]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


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
            progress: Callable[[int], None] | None = None) -> Comparison:
    """Run ``scenario`` once with one server model per variant; see the module docstring.

    ``lars_eta``: η of the LARS variants (each tensor's step has norm η·||W||, so η must be
    small); the others use ``scenario.aggregation.eta``.
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
    try:
        result = sim.run(progress)
    finally:
        wl.close()
    by_variant = {START: [start]}
    for v in chosen:
        by_variant[v.name] = [q[f"{v.name}/{metric}"] for q in sim.quality_by_round]
    return Comparison(metric, by_variant, result)


def write_comparison(comp: Comparison, out: Path) -> list[Path]:
    """``comparison.csv``, ``comparison.md``, ``plots/comparison.png`` and ``run/`` under
    ``out``."""
    from fedsim.metrics import write_run_dir
    from fedsim.plots import comparison

    out.mkdir(parents=True, exist_ok=True)
    write_run_dir(comp.result, out / "run")
    csv_path = out / "comparison.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["variant", "round", comp.metric])
        w.writeheader()
        w.writerows(comp.rows())
    md = out / "comparison.md"
    md.write_text(comp.markdown() + "\n")
    return [csv_path, md, comparison(out)]

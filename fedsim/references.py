"""References to read a federated server's metric against, computed on the same task, data,
evaluation examples and seed as the comparison's shared run (``fedsim compare --references``).

- ``start``: the server before any update (its linear probe, or its zero head without
  labelled server data); one value.
- ``centralized`` (the upper bound): the server model fine-tuned with LoRA (the scenario's
  rank, roles, lr, batch size) on the union of the clients' training data, from the same start,
  for as many examples as the federation's aggregated updates trained on up to each round
  (aggregated updates x local steps x batch size), evaluated after each round's share.
- ``standalone`` (no federation): clients of each family train alone on their own partition,
  ``local_steps`` per round from the family's initial adapter, never aggregated; after each round
  the mean metric over those clients (at most ``STANDALONE_CLIENTS`` per family, the first by id,
  for cost) on the evaluation examples. It reads against the family adapters
  (``<model>/<metric>``), what federation gave the same small models.
- ``homogeneous``: every client runs the server's model and the federation is plain FedAvg of
  those adapters (no projection): what the server reaches when size is no obstacle. A second
  simulation, the same clients, network and seed; its primary metric per round.

Each returns one value per round (``start``: one), as ``Comparison.by_variant`` holds them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedsim.errors import FedsimError
from fedsim.training import FamilyTrainer

if TYPE_CHECKING:
    from fedsim.federation import LoraWorkload
    from fedsim.scenario import Scenario

REFERENCES = ("start", "standalone", "centralized", "homogeneous")
STANDALONE_CLIENTS = 8  # clients per family trained alone (each costs rounds x its training)


def parse_references(text: str) -> list[str]:
    """``--references`` as a list (``none``: no references but ``start``)."""
    names = [] if text.strip() in ("", "none") else [x.strip() for x in text.split(",")]
    unknown = [n for n in names if n not in REFERENCES]
    if unknown:
        raise FedsimError(f"--references: unknown {', '.join(unknown)}; known: "
                          f"{', '.join(REFERENCES)} (or none)")
    return names


def examples_by_round(aggregated: Sequence[int], local_steps: int, batch_size: int) -> list[int]:
    """Training examples the federation's aggregated updates processed in each round."""
    return [n * local_steps * batch_size for n in aggregated]


def steps_per_update(wl: LoraWorkload) -> int:
    """Optimizer steps of one client update: ``local_steps``, or with ``local_epochs`` the
    full batches of a mean-sized partition times the epochs."""
    t = wl.scenario.training
    if t.local_epochs is None:
        return t.local_steps
    mean_n = sum(len(p) for p in wl.parts) / max(len(wl.parts), 1)
    return t.local_epochs * max(int(mean_n) // t.batch_size, 1)


def _head_keys(adapter: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in adapter if ".lora_" not in k]


def start_head(wl: LoraWorkload) -> dict[str, torch.Tensor]:
    """The server's head before any update (take it before the run merges into it)."""
    adapter = wl.servers.primary.model.adapter
    return {k: adapter[k].clone() for k in _head_keys(adapter)}


def centralized(wl: LoraWorkload, head: dict[str, torch.Tensor], per_round: Sequence[int],
                metric: str, progress: Callable[[str], None] | None = None) -> list[float]:
    """The server model with LoRA on the union of the clients' data, from the server's start
    ``head`` (:func:`start_head`); see the module text."""
    sc = wl.scenario
    num_labels = len(wl.task.label_names) if wl.task.label_names else None
    trainer = FamilyTrainer(sc.server.model, wl.task.task, num_labels, wl.cfg, sc.seed,
                            wl.task.name)
    adapter = trainer.initial_adapter()
    for k in _head_keys(adapter):  # the server's start head (probe or zero), as every variant
        if k in head:
            adapter[k] = head[k].clone()
    union = [wl.task.train[int(i)] for i in np.sort(np.concatenate(wl.parts))]
    out = []
    for r, n in enumerate(per_round):
        steps = max(n // wl.cfg.batch_size, 1)
        trainer.cfg = replace(wl.cfg, local_steps=steps, local_epochs=None)
        seed = int(np.random.SeedSequence([sc.seed, 7, r]).generate_state(1)[0])
        delta = trainer.train(adapter, union, trainer.plan(union, seed), seed).delta
        adapter = {k: v + delta[k] for k, v in adapter.items()}
        out.append(trainer.evaluate(adapter, wl.eval_examples)[metric])
        if progress:
            progress(f"centralized round {r}: {out[-1]:.4f}")
    trainer.cfg = wl.cfg
    return out


def standalone(wl: LoraWorkload, rounds: int, metric: str,
               progress: Callable[[str], None] | None = None) -> list[float]:
    """Clients trained alone on their own data (see the module text): the mean per round."""
    sc = wl.scenario
    per_client: list[list[float]] = []
    for fam in wl.families.values():
        for client in fam.clients[:STANDALONE_CLIENTS]:
            examples = [wl.task.train[int(i)] for i in wl.parts[client]]
            if not examples:
                continue
            adapter, values = fam.trainer.initial_adapter(), []
            for r in range(rounds):
                seed = int(np.random.SeedSequence([sc.seed, client, r, 11]).generate_state(1)[0])
                plan = fam.trainer.plan(examples, seed)
                delta = fam.trainer.train(adapter, examples, plan, seed).delta
                adapter = {k: v + delta[k] for k, v in adapter.items()}
                values.append(fam.trainer.evaluate(adapter, wl.eval_examples)[metric])
            per_client.append(values)
            if progress:
                progress(f"standalone client {client}: {values[-1]:.4f}")
    if not per_client:
        raise FedsimError("standalone: no client has training examples")
    return [float(np.mean([v[r] for v in per_client])) for r in range(rounds)]


def homogeneous_scenario(sc: Scenario) -> Scenario:
    """Every client group on the server's model, no server model, FedAvg."""
    from fedsim.plugins import AGGREGATORS

    groups = [g.model_copy(update={"model": sc.server.model}) for g in sc.clients]
    return sc.model_copy(update={
        "clients": groups, "server": sc.server.model_copy(update={"model": None}),
        "aggregation": AGGREGATORS.parse({"name": "fedavg"})})


def homogeneous(sc: Scenario, progress: Callable[[int], None] | None = None
                ) -> tuple[list[float], dict]:
    """The primary metric per round of the all-server-model FedAvg federation, and that run's
    summary (its bytes and simulated time: the server's model is bigger on every link)."""
    from fedsim.engine import Simulation

    sim = Simulation(homogeneous_scenario(sc))
    try:
        result = sim.run(progress)
    finally:
        sim.workload.close()
    metric = result.summary["quality"]["metric"]
    return [q[metric] for q in sim.quality_by_round], result.summary


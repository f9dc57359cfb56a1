"""fedsim's own workload of a scenario, for the peers of benchmarks/bench_peers.py (Flower's
ClientApps, pfl's worker processes): the same partitions, batch plans, validation splits,
seeds and evaluation examples as the engine's, so a peer trains the updates fedsim computes."""

from __future__ import annotations

import json
from typing import Any

_STATE: dict[str, Any] = {}  # per process: scenario JSON -> its fedsim workload


def workload(doc_json: str) -> Any:
    """fedsim's own workload of the scenario (its fleet, partitions, validation splits,
    evaluation examples and the family's trainer, base model loaded once), built as the engine
    builds it, on first use in this process."""
    if doc_json not in _STATE:
        from fedsim.devices import build_fleet
        from fedsim.rng import stream
        from fedsim.scenario import validate
        from fedsim.workload import make_workload
        sc = validate(json.loads(doc_json))
        _STATE[doc_json] = make_workload(sc, build_fleet(sc, stream(sc.seed, "fleet")))
    return _STATE[doc_json]


def train_client(doc_json: str, client: int, round_: int,
                 start: dict[str, Any]) -> tuple[Any, int]:
    """Client ``client``'s job of fedsim round ``round_`` from ``start`` (fedsim's plan, seed
    and examples): its ``TrainResult`` and its data set size (FedAvg's weight)."""
    from fedsim.federation import job_seed
    wl = workload(doc_json)
    examples = [wl.task.train[i] for i in wl.parts[client]]
    plan = wl.plan(client, round_).context
    trainer = wl.families[wl.fleet.model[client]].trainer
    res = trainer.train(start, examples, plan, job_seed(wl.scenario.seed, client, round_))
    return res, len(wl.parts[client])

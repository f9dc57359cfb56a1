"""Aggregation rules (registry ``AGGREGATORS``), Flower-style: ``aggregate(round, results,
failures)`` returns the update to add to the global state.

The math lives in pure, typed functions beside the classes (as peft's ``merge_utils``):
``weighted_average`` is the one every rule starts from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from fedsim.errors import FedsimError
from fedsim.registry import Registry
from fedsim.scenario import AggregationConfig

Delta = dict[str, torch.Tensor]

AGGREGATORS: Registry[type[Aggregator]] = Registry("aggregator")


@dataclass(frozen=True)
class ClientResult:
    """One accepted client update, as an aggregation rule sees it."""

    client: int
    delta: Delta
    num_samples: int
    weight: float = 1.0  # the round policy's weight (async staleness discount)
    quality: float = 0.0  # e.g. local loss improvement (loss before - loss after)
    heterogeneity: float = 1.0  # e.g. label-distribution entropy of the client's data


def normalize(weights: torch.Tensor) -> torch.Tensor:
    """Non-negative weights summing to one (uniform when they are all zero)."""
    w = torch.clamp(weights.to(torch.float64), min=0.0)
    total = float(w.sum())
    return w / total if total > 0 else torch.full_like(w, 1.0 / max(len(w), 1))


def weighted_average(deltas: list[Delta], weights: torch.Tensor) -> Delta:
    """Σ wᵢ·Δᵢ / Σ wᵢ, tensor by tensor (every delta has the same keys and shapes)."""
    if not deltas:
        return {}
    w = normalize(weights)
    return {name: sum(float(wi) * d[name] for wi, d in zip(w, deltas, strict=True))
            for name in deltas[0]}


class Aggregator(ABC):
    name: str

    def __init__(self, cfg: AggregationConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def aggregate(self, round_: int, results: list[ClientResult], failures: int) -> Delta:
        """The update to add to the global state this round ({} when there is nothing)."""


@AGGREGATORS.register("fedavg")
class FedAvg(Aggregator):
    """McMahan et al. 2017: average of same-family updates weighted by sample count."""

    def aggregate(self, round_: int, results: list[ClientResult], failures: int) -> Delta:
        weights = torch.tensor([r.num_samples * r.weight for r in results], dtype=torch.float64)
        return weighted_average([r.delta for r in results], weights)


def make_aggregator(cfg: AggregationConfig) -> Aggregator:
    if cfg.name not in AGGREGATORS:
        raise FedsimError(f"aggregation.name: unknown aggregator {cfg.name!r}; "
                          f"known: {', '.join(AGGREGATORS.names())}")
    return AGGREGATORS.get(cfg.name)(cfg)

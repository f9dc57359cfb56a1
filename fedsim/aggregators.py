"""Aggregation rules (registry ``AGGREGATORS``), Flower-style: ``aggregate(round, results,
failures)`` returns the update to add to the global state.

The math lives in pure, typed functions beside the classes (as peft's ``merge_utils``):
``weighted_average`` is the one every weighted rule starts from. Rules:

- ``fedavg``: Σ nᵢ·wᵢ·Δᵢ / Σ nᵢ·wᵢ (samples × the round policy's weight).
- ``task-arithmetic``: η·Σ αᵢ·τᵢ / Σ αᵢ with αᵢ = quality × heterogeneity × policy weight
  (``cfg.quality``, ``cfg.heterogeneity``, ``cfg.eta``); optional LARS (``cfg.lars``) first
  scales each tensor of Σ αᵢ·τᵢ / Σ αᵢ by the trust ratio ||W|| / ||update||, W the current
  weights that the caller supplies with :meth:`Aggregator.set_reference`, then by η: each
  tensor's step has norm η·||W||.
- ``norm-clip``: each client's update clipped to ``cfg.clip_norm`` (L2 over all its tensors),
  then FedAvg's weighted mean.
- ``trimmed-mean``: per coordinate, drop the floor(``cfg.trim_ratio``·n) largest and smallest
  values, mean the rest (unweighted). With n < 1/trim_ratio nothing is dropped.
- ``median``: the coordinate-wise median (unweighted; mean of the two middle values for even n).

Every rule returns {} for no results; every delta of one call has the same keys and shapes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from fedsim.errors import FedsimError
from fedsim.plugins import AGGREGATORS, AggregatorConfig

Delta = dict[str, torch.Tensor]



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


# ---------------------------------------------------------------------------------------------
# Weights: pure functions

QUALITY_EPS = 1e-3  # α's floor for clients whose loss did not improve: no client weighs zero


def loss_improvement(r: ClientResult) -> float:
    """max(quality, 0) + ε; a non-finite quality counts as no improvement."""
    return (max(r.quality, 0.0) if math.isfinite(r.quality) else 0.0) + QUALITY_EPS


# The α factors by config value (cfg.quality, cfg.heterogeneity).
QUALITY: dict[str, Callable[[ClientResult], float]] = {
    "none": lambda r: 1.0,
    "loss-improvement": loss_improvement,
}
HETEROGENEITY: dict[str, Callable[[ClientResult], float]] = {
    "none": lambda r: 1.0,
    "samples": lambda r: float(r.num_samples),
    "label-entropy": lambda r: r.heterogeneity,
}


def sample_weights(results: list[ClientResult]) -> torch.Tensor:
    """FedAvg's unnormalized weights: samples × the round policy's weight."""
    return torch.tensor([r.num_samples * r.weight for r in results], dtype=torch.float64)


def alpha_weights(results: list[ClientResult], quality: str, heterogeneity: str) -> torch.Tensor:
    """Unnormalized αᵢ = quality(rᵢ) × heterogeneity(rᵢ) × rᵢ.weight (the policy weight)."""
    q, h = QUALITY[quality], HETEROGENEITY[heterogeneity]
    return torch.tensor([q(r) * h(r) * r.weight for r in results], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Update rules: pure functions


def task_arithmetic(deltas: list[Delta], alphas: torch.Tensor, eta: float) -> Delta:
    """η·Σ αᵢ·τᵢ / Σ αᵢ."""
    return {k: eta * v for k, v in weighted_average(deltas, alphas).items()}


def tensor_norm(t: torch.Tensor) -> float:
    """L2 (Frobenius) norm, accumulated in float64."""
    return float(torch.linalg.vector_norm(t.to(torch.float64)))


def global_norm(delta: Delta) -> float:
    """L2 norm over all tensors of ``delta``."""
    return math.sqrt(sum(tensor_norm(t) ** 2 for t in delta.values()))


def lars_scale(update: Delta, reference: Mapping[str, torch.Tensor]) -> Delta:
    """Each tensor scaled by the trust ratio ||W|| / ||update|| (You et al. 2017, LARS), so its
    norm becomes ||W||: η then sets the update's size relative to the weights it changes.

    A tensor with no reference, a zero reference (a fresh LoRA B, a zero bias) or a zero update
    keeps its scale (ratio 1): a zero weight would otherwise freeze it forever.
    """
    out = {}
    for key, u in update.items():
        w_norm = tensor_norm(reference[key]) if key in reference else 0.0
        u_norm = tensor_norm(u)
        out[key] = u * (w_norm / u_norm) if w_norm > 0 and u_norm > 0 else u
    return out


def clip_by_norm(delta: Delta, max_norm: float) -> Delta:
    """``delta`` scaled down to L2 norm ``max_norm`` over all its tensors (unchanged if under)."""
    norm = global_norm(delta)
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {k: v * factor for k, v in delta.items()}


def trimmed_mean(deltas: list[Delta], trim_ratio: float) -> Delta:
    """Per coordinate, the mean after dropping the k = floor(trim_ratio·n) largest and k
    smallest values (Yin et al. 2018); trim_ratio in [0, 0.5)."""
    if not deltas:
        return {}
    if not 0 <= trim_ratio < 0.5:
        raise FedsimError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
    n = len(deltas)
    k = math.floor(trim_ratio * n)
    out = {}
    for key in deltas[0]:
        stacked, _ = torch.sort(torch.stack([d[key] for d in deltas]), dim=0)
        out[key] = stacked[k:n - k].mean(dim=0)
    return out


def coordinate_median(deltas: list[Delta]) -> Delta:
    """The coordinate-wise median; for even n the mean of the two middle values."""
    if not deltas:
        return {}
    n = len(deltas)
    out = {}
    for key in deltas[0]:
        stacked, _ = torch.sort(torch.stack([d[key] for d in deltas]), dim=0)
        out[key] = (stacked[(n - 1) // 2] + stacked[n // 2]) / 2
    return out


class Aggregator(ABC):
    name: str

    def __init__(self, cfg: AggregatorConfig) -> None:
        self.cfg = cfg
        self.reference: Mapping[str, torch.Tensor] | None = None

    def set_reference(self, weights: Mapping[str, torch.Tensor] | None) -> None:
        """The current global weights, by the same keys as the deltas (for LARS trust ratios);
        kept by reference, not copied: set it again before each aggregation."""
        self.reference = weights

    def weights(self, results: list[ClientResult]) -> torch.Tensor:
        """Each client's normalized weight in this rule (uniform unless a rule weighs)."""
        return normalize(torch.ones(len(results), dtype=torch.float64))

    @abstractmethod
    def aggregate(self, round_: int, results: list[ClientResult], failures: int) -> Delta:
        """The update to add to the global state this round ({} when there is nothing)."""


@AGGREGATORS.register("fedavg")
class FedAvg(Aggregator):
    """McMahan et al. 2017: average of same-family updates weighted by sample count."""

    def aggregate(self, round_: int, results: list[ClientResult], failures: int) -> Delta:
        weights = torch.tensor([r.num_samples * r.weight for r in results], dtype=torch.float64)
        return weighted_average([r.delta for r in results], weights)

    def weights(self, results: list[ClientResult]) -> torch.Tensor:
        return normalize(sample_weights(results))


@AGGREGATORS.register("task-arithmetic")
class TaskArithmetic(Aggregator):
    """Task arithmetic (Ilharco et al. 2023) with per-client α: η·Σ αᵢ·τᵢ / Σ αᵢ, optional LARS.

    With ``cfg.lars`` the caller must :meth:`set_reference` the current weights first; each
    tensor's update then has norm η·||W|| (η acts as LARS's trust coefficient: keep it small).
    """

    def weights(self, results: list[ClientResult]) -> torch.Tensor:
        return normalize(alpha_weights(results, self.cfg.quality, self.cfg.heterogeneity))

    def aggregate(self, round_: int, results: list[ClientResult], failures: int) -> Delta:
        if not results:
            return {}
        alphas = alpha_weights(results, self.cfg.quality, self.cfg.heterogeneity)
        deltas = [r.delta for r in results]
        if not self.cfg.lars:
            return task_arithmetic(deltas, alphas, self.cfg.eta)
        if self.reference is None:
            raise FedsimError("aggregation.lars needs the current weights: call "
                              "set_reference(weights) before aggregate")
        # The trust ratio applies to the combined update; η scales after it (else it cancels).
        scaled = lars_scale(task_arithmetic(deltas, alphas, 1.0), self.reference)
        return {k: self.cfg.eta * v for k, v in scaled.items()}


@AGGREGATORS.register("norm-clip")
class NormClip(Aggregator):
    """Each update clipped to L2 norm ``cfg.clip_norm`` over all its tensors, then FedAvg's
    weighted mean (Sun et al. 2019, "Can you really backdoor federated learning?")."""

    def weights(self, results: list[ClientResult]) -> torch.Tensor:
        return normalize(sample_weights(results))

    def aggregate(self, round_: int, results: list[ClientResult], failures: int) -> Delta:
        clipped = [clip_by_norm(r.delta, self.cfg.clip_norm) for r in results]
        return weighted_average(clipped, sample_weights(results))


@AGGREGATORS.register("trimmed-mean")
class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (``cfg.trim_ratio`` from each end), unweighted."""

    def aggregate(self, round_: int, results: list[ClientResult], failures: int) -> Delta:
        return trimmed_mean([r.delta for r in results], self.cfg.trim_ratio)


@AGGREGATORS.register("median")
class Median(Aggregator):
    """Coordinate-wise median, unweighted."""

    def aggregate(self, round_: int, results: list[ClientResult], failures: int) -> Delta:
        return coordinate_median([r.delta for r in results])


def make_aggregator(cfg: AggregatorConfig) -> Aggregator:
    return AGGREGATORS.get(cfg.name)(cfg)

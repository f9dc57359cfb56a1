"""Aggregation rules (registry ``AGGREGATORS``), Flower-style: ``aggregate(round, results,
failures)`` returns the update to add to the global state.

The math lives in pure, typed functions beside the classes (as peft's ``merge_utils``):
``weighted_average`` is the one every weighted rule starts from. Rules:

- ``fedavg``: Σ nᵢ·wᵢ·Δᵢ / Σ nᵢ·wᵢ (samples × the round policy's weight).
- ``task-arithmetic``: η·Σ αᵢ·τᵢ / Σ αᵢ with αᵢ = quality × heterogeneity × policy weight
  (``cfg.quality``, ``cfg.heterogeneity``, ``cfg.eta``); optional LARS (``cfg.lars``, You et
  al. 2017) scales each tensor u of Σ αᵢ·τᵢ / Σ αᵢ by its trust ratio
  λ = c·||W|| / (||u|| + ε) (``cfg.lars_coefficient``, ``cfg.lars_eps``), W that tensor of
  the current weights (the caller supplies them with :meth:`Aggregator.set_reference`), then
  by η: each tensor's step has norm ≈ η·c·||W||. A tensor whose W is zero takes the plain
  step η·u (λ = 1: there is no scale to be relative to).
- ``norm-clip``: each client's update clipped to ``cfg.clip_norm`` (L2 over all its tensors),
  then FedAvg's weighted mean.
- ``trimmed-mean``: per coordinate, drop the floor(``cfg.trim_ratio``·n) largest and smallest
  values, mean the rest (unweighted). With n < 1/trim_ratio nothing is dropped.
- ``median``: the coordinate-wise median (unweighted; mean of the two middle values for even n).

Every rule returns {} for no results; every delta of one call has the same keys and shapes.

LoRA spaces (``cfg.lora``, registry ``LORA_SPACES``): what a family's rule combines.
``factors`` combines the A and B deltas of each module separately (avg(B)·avg(A), not
avg(B·A)); ``exact`` combines each client's product update (B₀+ΔB)(A₀+ΔA) − B₀A₀ and
re-factors the new product to rank r by truncated SVD.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedsim.errors import FedsimError
from fedsim.plugins import AGGREGATORS, AggregatorConfig

Delta = dict[str, torch.Tensor]
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"  # adapter key tails (FamilyTrainer's)
LORA_PRODUCT = ".lora_BA"  # a module's dense product B·A, in the ``exact`` LoRA space


@dataclass(frozen=True)
class ClientResult:
    """One accepted client update, as an aggregation rule sees it."""

    client: int
    delta: Delta
    num_samples: int  # examples the job trained on
    weight: float = 1.0  # the round policy's weight (async staleness discount)
    # Loss improvement, nats: mean loss on the client's validation split before − after
    # training (the first − last step loss where there is no split; NaN: not measured).
    quality: float = 0.0
    # The client's data against the federation's, by measure (fedsim.heterogeneity.MEASURES),
    # each in [0, 1]; a measure not given counts 1 (neutral).
    heterogeneity: Mapping[str, float] = field(default_factory=dict)
    dataset_size: int | None = None  # n_k, the client's local data set; None: num_samples
    start: Mapping[str, torch.Tensor] | None = None  # the adapter it trained from (LoRA spaces)


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
def local_samples(r: ClientResult) -> float:
    """n_k, the client's local data set size (examples; the job's own where unknown)."""
    return float(r.num_samples if r.dataset_size is None else r.dataset_size)


def measure(name: str) -> Callable[[ClientResult], float]:
    """The heterogeneity measure ``name`` as reported in ``ClientResult.heterogeneity``."""
    return lambda r: float(r.heterogeneity.get(name, 1.0))


HETEROGENEITY: dict[str, Callable[[ClientResult], float]] = {
    "none": lambda r: 1.0,
    "samples": local_samples,
    "label-entropy": measure("label-entropy"),  # H(p_k) / log2 K
    "js-similarity": measure("js-similarity"),  # 1 − JSD(p_k ‖ p_federation), bits
}


def sample_weights(results: list[ClientResult]) -> torch.Tensor:
    """FedAvg's unnormalized weights: n_k (the client's local data set, McMahan et al. 2017's
    n_k/n; the job's examples where unknown) × the round policy's weight."""
    return torch.tensor([local_samples(r) * r.weight for r in results], dtype=torch.float64)


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


ZERO_REFERENCE_RATIO = 1.0  # LARS's λ for a tensor whose reference norm is zero: plain step


def lars_trust_ratios(update: Delta, reference: Mapping[str, torch.Tensor],
                      coefficient: float, eps: float) -> dict[str, float]:
    """Per tensor (layer) the LARS trust ratio λ = c·||W|| / (||u|| + ε) (You et al. 2017,
    "Large Batch Training of Convolutional Networks", eq. 6 without weight decay), W the
    tensor's reference weights and u its update.

    A tensor whose reference is zero (a zero bias, a fresh LoRA B) has no scale to be relative
    to: it gets ``ZERO_REFERENCE_RATIO`` = 1, the plain step, rather than λ = 0, which would
    freeze it at zero forever. A tensor without a reference is the caller's error.
    """
    missing = sorted(update.keys() - reference.keys())
    if missing:
        raise FedsimError(f"LARS: no reference weights for {missing[:3]}")
    ratios = {}
    for key, u in update.items():
        w_norm = tensor_norm(reference[key])
        ratios[key] = (coefficient * w_norm / (tensor_norm(u) + eps) if w_norm > 0
                       else ZERO_REFERENCE_RATIO)
    return ratios


def lars_scale(update: Delta, reference: Mapping[str, torch.Tensor], coefficient: float = 1.0,
               eps: float = 1e-8) -> Delta:
    """Each tensor of ``update`` times its trust ratio (:func:`lars_trust_ratios`)."""
    ratios = lars_trust_ratios(update, reference, coefficient, eps)
    return {k: u * ratios[k] for k, u in update.items()}


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
    """McMahan et al. 2017: average of same-family updates weighted by n_k, the clients' local
    data set sizes."""

    def aggregate(self, round_: int, results: list[ClientResult], failures: int) -> Delta:
        return weighted_average([r.delta for r in results], sample_weights(results))

    def weights(self, results: list[ClientResult]) -> torch.Tensor:
        return normalize(sample_weights(results))


@AGGREGATORS.register("task-arithmetic")
class TaskArithmetic(Aggregator):
    """Task arithmetic (Ilharco et al. 2023) with per-client α: η·Σ αᵢ·τᵢ / Σ αᵢ, optional LARS.

    With ``cfg.lars`` the caller must :meth:`set_reference` the current weights first; each
    tensor's step then has norm ≈ η·c·||W|| (η the global rate, c LARS's trust coefficient).
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
        scaled = lars_scale(task_arithmetic(deltas, alphas, 1.0), self.reference,
                            self.cfg.lars_coefficient, self.cfg.lars_eps)
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


# ---------------------------------------------------------------------------------------------
# LoRA spaces: what a family's rule combines (``cfg.lora``)


def lora_modules(adapter: Mapping[str, torch.Tensor]) -> list[str]:
    """The module prefixes of ``adapter`` that have both LoRA factors (sorted)."""
    return sorted(k.removesuffix(LORA_A) for k in adapter
                  if k.endswith(LORA_A) and k.removesuffix(LORA_A) + LORA_B in adapter)


def factor_keys(modules: Sequence[str]) -> set[str]:
    """The A and B keys of ``modules``."""
    return {module + tail for module in modules for tail in (LORA_A, LORA_B)}


def svd_flops(m: int, n: int) -> float:
    """FLOPs of a thin SVD of an m×n matrix (U, Σ, V): 6·m·k² + 11·k³ with k = min(m, n),
    after k ≤ max(m, n) (Golub & Van Loan, "Matrix Computations", R-SVD)."""
    big, k = max(m, n), min(m, n)
    return 6.0 * big * k * k + 11.0 * k ** 3


def refactor(product: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``rank`` factors (B, A) of ``product`` in Frobenius norm (Eckart–Young):
    ``torch.linalg.svd`` in float64, the singular values split as √σ into both factors,
    B = U_r·diag(√σ_r), A = diag(√σ_r)·V_rᵀ. Also returns the truncation error
    ||product − B·A||_F = sqrt(Σ_{i>r} σᵢ²)."""
    u, s, vh = torch.linalg.svd(product.to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    b, a = u[:, :rank] * root, root[:, None] * vh[:rank]
    if b.shape[1] < rank:  # a matrix thinner than the rank: zero columns/rows keep the shape
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])], dim=0)
    error = float(s[rank:].pow(2).sum().sqrt())
    return b.to(product.dtype), a.to(product.dtype), error


def product_update(start: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> Delta:
    """A client's update in the ``exact`` space: per LoRA module the change of its product,
    (B₀+ΔB)(A₀+ΔA) − B₀A₀ (LoRA's scale α/r multiplies both sides alike: left out), keyed
    ``<module>.lora_BA``; other keys (the head) as they are."""
    out: Delta = {}
    modules = lora_modules(start)
    for module in modules:
        a0, b0 = start[module + LORA_A], start[module + LORA_B]
        a1, b1 = a0 + delta[module + LORA_A], b0 + delta[module + LORA_B]
        out[module + LORA_PRODUCT] = b1 @ a1 - b0 @ a0
    factors = factor_keys(modules)
    out.update({k: v for k, v in delta.items() if k not in factors})
    return out


class LoraSpace(ABC):
    """How a family's updates are combined by its rule: ``updates`` turns each client's factor
    delta into what the rule combines, ``reference`` the adapter into the weights of the same
    keys (LARS), ``apply`` the rule's step into the next adapter (and its FLOPs)."""

    name: str

    @abstractmethod
    def updates(self, results: Sequence[ClientResult]) -> list[Delta]: ...

    @abstractmethod
    def reference(self, adapter: Mapping[str, torch.Tensor]) -> Delta: ...

    @abstractmethod
    def apply(self, adapter: Mapping[str, torch.Tensor], step: Delta,
              clients: int) -> tuple[Delta, float]: ...


class FactorSpace(LoraSpace):
    """A and B deltas combined tensor by tensor (avg(B)·avg(A) ≠ avg(B·A)): cheap, and the
    adapter's gauge (A's random start, B's zero start) is kept."""

    name = "factors"

    def updates(self, results: Sequence[ClientResult]) -> list[Delta]:
        return [r.delta for r in results]

    def reference(self, adapter: Mapping[str, torch.Tensor]) -> Delta:
        return dict(adapter)

    def apply(self, adapter: Mapping[str, torch.Tensor], step: Delta,
              clients: int) -> tuple[Delta, float]:
        new = {k: v + step[k] if k in step else v for k, v in adapter.items()}
        # a weighted sum: 2 FLOPs per element per client
        return new, 2.0 * clients * sum(t.numel() for t in step.values())


class ExactSpace(LoraSpace):
    """Each client's product update combined per module (as the rule weighs), added to the
    adapter's product, re-factored to the adapter's rank by truncated SVD:
    B'A' = trunc_r(B·A + step). Exact (B'A' = B·A + step) whenever that sum has rank ≤ r."""

    name = "exact"

    def updates(self, results: Sequence[ClientResult]) -> list[Delta]:
        out = []
        for r in results:
            if r.start is None:
                raise FedsimError("aggregation.lora: exact needs each update's start adapter "
                                  "(ClientResult.start)")
            out.append(product_update(r.start, r.delta))
        return out

    def reference(self, adapter: Mapping[str, torch.Tensor]) -> Delta:
        modules = lora_modules(adapter)
        factors = factor_keys(modules)
        return {k: v for k, v in adapter.items() if k not in factors} | {
            m + LORA_PRODUCT: adapter[m + LORA_B] @ adapter[m + LORA_A] for m in modules}

    def apply(self, adapter: Mapping[str, torch.Tensor], step: Delta,
              clients: int) -> tuple[Delta, float]:
        new = dict(adapter)
        flops = 0.0
        for key, value in step.items():
            if not key.endswith(LORA_PRODUCT):
                new[key] = adapter[key] + value
                flops += 2.0 * clients * value.numel()
                continue
            module = key.removesuffix(LORA_PRODUCT)
            a, b = adapter[module + LORA_A], adapter[module + LORA_B]
            m, rank, n = b.shape[0], a.shape[0], a.shape[1]
            new[module + LORA_B], new[module + LORA_A], _ = refactor(b @ a + value, rank)
            # products B·A (each client's start and end, and the adapter's), the weighted sum,
            # the SVD
            flops += (2 * clients + 1) * 2.0 * m * n * rank + 2.0 * clients * m * n
            flops += svd_flops(m, n)
        return new, flops


LORA_SPACES: dict[str, type[LoraSpace]] = {"factors": FactorSpace, "exact": ExactSpace}


def make_lora_space(name: str) -> LoraSpace:
    if name not in LORA_SPACES:
        raise FedsimError(f"aggregation.lora: unknown {name!r}; known: {', '.join(LORA_SPACES)}")
    return LORA_SPACES[name]()

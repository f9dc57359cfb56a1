"""Aggregation rules: the registry contract, task arithmetic and LARS against hand computations,
and the robust rules against one outlier."""

import math

import pytest
import torch

from fedsim.aggregators import (
    AGGREGATORS,
    QUALITY_EPS,
    ClientResult,
    alpha_weights,
    clip_by_norm,
    coordinate_median,
    global_norm,
    make_aggregator,
    normalize,
    trimmed_mean,
)
from fedsim.errors import FedsimError
from fedsim.plugins import AGGREGATORS as AGGREGATOR_CONFIGS


def make(name: str, **cfg):
    """Rule ``name`` with those of ``cfg``'s options it takes (one call serves every rule)."""
    takes = AGGREGATOR_CONFIGS.config(name).model_fields
    return make_aggregator(AGGREGATOR_CONFIGS.parse(
        {"name": name, **{k: v for k, v in cfg.items() if k in takes}}))


def delta(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer.weight": scale * torch.randn(4, 3, generator=g),
            "layer.bias": scale * torch.randn(4, generator=g)}


def result(client: int, d, num_samples: int = 10, weight: float = 1.0, quality: float = 0.1,
           heterogeneity: float = 1.0) -> ClientResult:
    return ClientResult(client, d, num_samples, weight, quality, heterogeneity)


def distance(a, b) -> float:
    return global_norm({k: a[k] - b[k] for k in a})


def close(a, b, tol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=tol) for k in a)


# ---------------------------------------------------------------------------------------------
# Contract: every registry entry


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_no_results_give_no_update(name):
    assert make(name).aggregate(0, [], failures=3) == {}


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_weights_normalize_and_identical_updates_come_back(name):
    agg = make(name, clip_norm=1e6)
    d = delta(0)
    results = [result(i, d, num_samples=5 + 10 * i, weight=0.5 + i, quality=0.3 * i - 0.2,
                      heterogeneity=0.1 + i) for i in range(4)]
    w = agg.weights(results)
    assert w.shape == (4,) and (w >= 0).all() and math.isclose(float(w.sum()), 1.0)
    assert close(agg.aggregate(1, results, failures=0), d)  # a mean of equal updates


def test_alpha_weights_follow_the_config():
    rs = [result(0, {}, num_samples=10, weight=1.0, quality=0.2, heterogeneity=0.5),
          result(1, {}, num_samples=30, weight=0.5, quality=-1.0, heterogeneity=2.0),
          result(2, {}, num_samples=20, weight=1.0, quality=float("nan"), heterogeneity=1.0)]
    eps = QUALITY_EPS
    cases = {("none", "none"): [1.0, 0.5, 1.0],
             ("loss-improvement", "none"): [0.2 + eps, 0.5 * eps, eps],
             ("none", "samples"): [10.0, 15.0, 20.0],
             ("none", "label-entropy"): [0.5, 1.0, 1.0],
             ("loss-improvement", "samples"): [10 * (0.2 + eps), 15 * eps, 20 * eps]}
    for (quality, heterogeneity), expected in cases.items():
        alphas = alpha_weights(rs, quality, heterogeneity)
        torch.testing.assert_close(alphas, torch.tensor(expected, dtype=torch.float64))
        assert math.isclose(float(normalize(alphas).sum()), 1.0)


# ---------------------------------------------------------------------------------------------
# Task arithmetic and LARS


def test_task_arithmetic_is_the_weighted_formula():
    agg = make("task-arithmetic", eta=0.5, quality="loss-improvement", heterogeneity="samples")
    taus = [delta(1), delta(2), delta(3)]
    spec = [(10, 1.0, 0.2), (20, 1.0, -0.1), (30, 0.5, 0.5)]  # samples, policy weight, quality
    rs = [result(i, t, n, w, q) for i, (t, (n, w, q)) in enumerate(zip(taus, spec, strict=True))]
    alphas = [(max(q, 0) + QUALITY_EPS) * n * w for n, w, q in spec]
    expected = {k: 0.5 * sum(a * t[k] for a, t in zip(alphas, taus, strict=True)) / sum(alphas)
                for k in taus[0]}
    assert close(agg.aggregate(0, rs, failures=0), expected)
    torch.testing.assert_close(agg.weights(rs), torch.tensor(alphas, dtype=torch.float64)
                               / sum(alphas))


def test_lars_scales_each_tensor_by_its_trust_ratio():
    agg = make("task-arithmetic", eta=0.1, lars=True, quality="none", heterogeneity="none")
    taus = [delta(1), delta(2)]
    mean = {k: (taus[0][k] + taus[1][k]) / 2 for k in taus[0]}
    with pytest.raises(FedsimError, match="set_reference"):
        agg.aggregate(0, [result(0, taus[0]), result(1, taus[1])], failures=0)
    w = torch.full((4, 3), 2.0)  # ||W|| = 2·sqrt(12)
    agg.set_reference({"layer.weight": w, "layer.bias": torch.zeros(4)})
    out = agg.aggregate(0, [result(0, taus[0]), result(1, taus[1])], failures=0)
    ratio = 2 * math.sqrt(12) / float(mean["layer.weight"].norm())
    torch.testing.assert_close(out["layer.weight"], 0.1 * ratio * mean["layer.weight"])
    assert math.isclose(float(out["layer.weight"].norm()), 0.1 * float(w.norm()), rel_tol=1e-5)
    # A zero reference (a zero bias, a fresh LoRA B) keeps the plain η·update.
    torch.testing.assert_close(out["layer.bias"], 0.1 * mean["layer.bias"])


# ---------------------------------------------------------------------------------------------
# Robust rules


def test_trimmed_mean_and_median_by_hand():
    values = [1.0, 2.0, 3.0, 100.0, -50.0]
    ds = [{"x": torch.tensor([v, -v])} for v in values]
    assert torch.equal(trimmed_mean(ds, 0.2)["x"], torch.tensor([2.0, -2.0]))
    assert torch.equal(trimmed_mean(ds, 0.1)["x"], torch.tensor([11.2, -11.2]))  # k = 0
    assert torch.equal(coordinate_median(ds)["x"], torch.tensor([2.0, -2.0]))
    assert torch.equal(coordinate_median(ds[:4])["x"], torch.tensor([2.5, -2.5]))  # even n


def test_clip_by_norm_clips_over_all_tensors():
    d = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[0.0, 4.0]])}  # norm 5
    clipped = clip_by_norm(d, 1.0)
    assert math.isclose(global_norm(clipped), 1.0, rel_tol=1e-6)
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0]))
    assert close(clip_by_norm(d, 10.0), d)


@pytest.mark.parametrize("name", ["norm-clip", "trimmed-mean", "median"])
def test_robust_rules_hold_off_an_outlier_that_moves_task_arithmetic(name):
    g = torch.Generator().manual_seed(0)
    mu = {"w": torch.randn(8, 8, generator=g), "b": torch.randn(8, generator=g)}
    normal = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in mu.items()}
              for _ in range(4)]
    outlier = {k: 100.0 * v for k, v in normal[0].items()}
    clean = {k: sum(d[k] for d in normal) / 4 for k in mu}
    results = [result(i, d) for i, d in enumerate([*normal, outlier])]
    size = global_norm(clean)
    undefended = make("task-arithmetic", quality="none", heterogeneity="none")
    assert distance(undefended.aggregate(0, results, failures=0), clean) > 5 * size
    robust = make(name, trim_ratio=0.2, clip_norm=1.2 * size)
    assert distance(robust.aggregate(0, results, failures=0), clean) < 0.15 * size

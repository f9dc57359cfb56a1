"""Aggregation rules: the registry contract, α, task arithmetic and LARS against hand
computations, exact LoRA aggregation against the weighted mean of B·A, and the robust rules
against one outlier."""

import math

import numpy as np
import pytest
import torch

from fedsim.aggregators import (
    AGGREGATORS,
    LORA_PRODUCT,
    QUALITY_EPS,
    ClientResult,
    alpha_weights,
    clip_by_norm,
    coordinate_median,
    global_norm,
    lars_trust_ratios,
    make_aggregator,
    make_lora_space,
    normalize,
    refactor,
    trimmed_mean,
)
from fedsim.data import Example
from fedsim.errors import FedsimError
from fedsim.heterogeneity import heterogeneity, length_bins
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
           similarity: float = 1.0, **kw) -> ClientResult:
    """A client result whose heterogeneity measures are all ``similarity``."""
    return ClientResult(client, d, num_samples, weight, quality,
                        {"js-similarity": similarity, "label-entropy": similarity}, **kw)


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
                      similarity=0.1 + 0.2 * i, dataset_size=50 + i, start=d)
               for i in range(4)]
    w = agg.weights(results)
    assert w.shape == (4,) and (w >= 0).all() and math.isclose(float(w.sum()), 1.0)
    assert close(agg.aggregate(1, results, failures=0), d)  # a mean of equal updates


def test_alpha_weights_follow_the_config():
    rs = [result(0, {}, num_samples=10, weight=1.0, quality=0.2, similarity=0.5,
                 dataset_size=40),
          result(1, {}, num_samples=30, weight=0.5, quality=-1.0, similarity=0.25,
                 dataset_size=30),
          ClientResult(2, {}, num_samples=20, weight=1.0, quality=float("nan"))]  # none given
    eps = QUALITY_EPS
    cases = {("none", "none"): [1.0, 0.5, 1.0],
             ("loss-improvement", "none"): [0.2 + eps, 0.5 * eps, eps],
             ("none", "samples"): [40.0, 15.0, 20.0],  # n_k; the job's examples where unknown
             ("none", "label-entropy"): [0.5, 0.125, 1.0],  # a measure not given counts 1
             ("none", "js-similarity"): [0.5, 0.125, 1.0],
             ("loss-improvement", "samples"): [40 * (0.2 + eps), 15 * eps, 20 * eps]}
    for (quality, het), expected in cases.items():
        alphas = alpha_weights(rs, quality, het)
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


def entropy_bits(p) -> float:
    p = np.asarray(p, dtype=float)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def test_alpha_of_a_hand_built_pair_orders_and_normalizes():
    """Client 0 has the federation's label mix and improved its validation loss; client 1 has a
    single label and did not improve. Federation: clients 0, 1 and 2 (2 holds the rest, so the
    global mix is uniform over 4 classes). α = (max(q, 0) + ε) × heterogeneity, normalized."""
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 0, 1, 1, 2, 2, 3, 3])  # clients 0 | 1 | 2
    parts = [np.arange(0, 8), np.arange(8, 10), np.arange(10, 16)]
    examples = [Example("x", label=int(y)) for y in labels]
    measures = heterogeneity(examples, labels, 4, parts)
    # JSD([1,0,0,0] ‖ uniform) = H(M) − (H(P) + H(Q))/2, M the mixture, in bits
    jsd_single = entropy_bits([0.625, 0.125, 0.125, 0.125]) - (0 + 2) / 2
    assert measures["js-similarity"][:2] == pytest.approx([1.0, 1 - jsd_single])
    assert measures["label-entropy"][:2] == pytest.approx([1.0, 0.0])
    improved, flat = 0.3, -0.05  # validation loss before − after, nats
    pair = [ClientResult(c, {}, num_samples=8, quality=q, dataset_size=len(parts[c]),
                         heterogeneity={m: v[c] for m, v in measures.items()})
            for c, q in [(0, improved), (1, flat)]]
    eps = QUALITY_EPS
    expected = {"js-similarity": [improved + eps, eps * (1 - jsd_single)],
                "label-entropy": [improved + eps, 0.0],
                "samples": [8 * (improved + eps), 2 * eps],
                "none": [improved + eps, eps]}
    for het, want in expected.items():
        agg = make("task-arithmetic", heterogeneity=het)
        w = agg.weights(pair)
        torch.testing.assert_close(w, torch.tensor(want, dtype=torch.float64) / sum(want))
        assert float(w.sum()) == pytest.approx(1.0) and w[0] > w[1]
    # The default weighs the federation's mix: js-similarity.
    assert make("task-arithmetic").cfg.heterogeneity == "js-similarity"


def test_heterogeneity_without_classes_uses_target_lengths():
    """Generation: histograms of the target's word count in fixed bins; a client whose targets
    are all of one length is far from a federation of mixed lengths."""
    lengths = [1, 3, 6, 10] * 2 + [3] * 4
    examples = [Example("text", target=" ".join(["w"] * k)) for k in lengths]
    assert length_bins(examples[:4]).tolist() == [0, 2, 4, 6]  # [1,2) [3,4) [5,7) [9,13)
    parts = [np.arange(0, 8), np.arange(8, 12)]
    sims = heterogeneity(examples, None, 0, parts)["js-similarity"]
    assert 0 <= sims[1] < sims[0] <= 1


def test_lars_trust_ratio_per_layer_is_the_closed_form():
    """Two layers and a zero-norm reference: λ_l = c·||W_l|| / (||u_l|| + ε) per tensor, the
    zero reference takes λ = 1 (the plain η·u step), and the step is η·λ_l·u_l."""
    c, eps, eta = 0.02, 1e-3, 0.5
    agg = make("task-arithmetic", eta=eta, lars=True, lars_coefficient=c, lars_eps=eps,
               quality="none", heterogeneity="none")
    u = {"l1.weight": torch.tensor([[3.0, 4.0]]),  # ||u|| = 5
         "l2.weight": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),  # ||u|| = sqrt(2)
         "l2.bias": torch.tensor([0.5, -0.5])}
    ref = {"l1.weight": torch.tensor([[6.0, 8.0]]),  # ||W|| = 10
           "l2.weight": torch.full((2, 2), 3.0),  # ||W|| = 6
           "l2.bias": torch.zeros(2)}  # zero reference
    want = {"l1.weight": c * 10 / (5 + eps), "l2.weight": c * 6 / (math.sqrt(2) + eps),
            "l2.bias": 1.0}
    assert lars_trust_ratios(u, ref, c, eps) == pytest.approx(want, rel=1e-12)
    with pytest.raises(FedsimError, match="set_reference"):
        agg.aggregate(0, [result(0, u)], failures=0)
    agg.set_reference(ref)
    out = agg.aggregate(0, [result(0, u), result(1, u)], failures=0)  # the mean is u
    for k in u:
        torch.testing.assert_close(out[k], eta * want[k] * u[k])
    agg.set_reference({"l1.weight": ref["l1.weight"]})
    with pytest.raises(FedsimError, match="no reference"):
        agg.aggregate(0, [result(0, u)], failures=0)


# ---------------------------------------------------------------------------------------------
# LoRA spaces: factors and exact products


def lora_client(g, start, out, rank, inp, scale=0.3, head=True):
    d = {"m.lora_A.weight": scale * torch.randn(rank, inp, generator=g, dtype=torch.float64),
         "m.lora_B.weight": scale * torch.randn(out, rank, generator=g, dtype=torch.float64)}
    if head:
        d["classifier.weight"] = torch.randn(2, 3, generator=g, dtype=torch.float64)
    return d


def lora_start(g, out, rank, inp):
    return {"m.lora_A.weight": torch.randn(rank, inp, generator=g, dtype=torch.float64),
            "m.lora_B.weight": torch.randn(out, rank, generator=g, dtype=torch.float64),
            "classifier.weight": torch.randn(2, 3, generator=g, dtype=torch.float64)}


def product(adapter):
    return adapter["m.lora_B.weight"] @ adapter["m.lora_A.weight"]


def family_step(space_name, rule, start, deltas, sizes):
    space = make_lora_space(space_name)
    results = [result(i, d, num_samples=n, start=start) for i, (d, n) in
               enumerate(zip(deltas, sizes, strict=True))]
    updates = space.updates(results)
    rs = [ClientResult(r.client, u, r.num_samples) for r, u in zip(results, updates, strict=True)]
    new, flops = space.apply(start, make(rule).aggregate(0, rs, failures=0), len(rs))
    assert flops > 0
    return new


def test_exact_lora_aggregation_is_the_weighted_mean_of_products_when_rank_permits():
    """out 6, in 5, rank 5 ≥ min(out, in): any product fits. The merged B'A' equals
    B0A0 + Σ wᵢ (BᵢAᵢ − B0A0), wᵢ FedAvg's nᵢ/Σn; the head is the weighted mean as before;
    averaging the factors does not give that product."""
    g = torch.Generator().manual_seed(0)
    start = lora_start(g, 6, 5, 5)
    deltas = [lora_client(g, start, 6, 5, 5) for _ in range(3)]
    sizes = [10, 30, 60]
    w = [n / sum(sizes) for n in sizes]
    clients = [{k: start[k] + d[k] for k in start} for d in deltas]
    want = product(start) + sum(wi * (product(c) - product(start))
                                for wi, c in zip(w, clients, strict=True))
    new = family_step("exact", "fedavg", start, deltas, sizes)
    assert new["m.lora_A.weight"].shape == (5, 5) and new["m.lora_B.weight"].shape == (6, 5)
    torch.testing.assert_close(product(new), want, rtol=1e-9, atol=1e-9)
    head = start["classifier.weight"] + sum(wi * d["classifier.weight"]
                                            for wi, d in zip(w, deltas, strict=True))
    torch.testing.assert_close(new["classifier.weight"], head)
    factors = family_step("factors", "fedavg", start, deltas, sizes)
    assert float((product(factors) - want).norm()) > 1e-3 * float(want.norm())


def test_exact_lora_aggregation_truncates_to_rank_by_svd():
    """Rank 2 on 8×7 with three clients: the sum exceeds rank 2; the merged product is the best
    rank-2 approximation (Eckart–Young), its error sqrt(Σ_{i>2} σᵢ²) of the exact sum."""
    g = torch.Generator().manual_seed(1)
    start = lora_start(g, 8, 2, 7)
    deltas = [lora_client(g, start, 8, 2, 7, head=False) for _ in range(3)]
    start = {k: v for k, v in start.items() if k.startswith("m.")}
    clients = [{k: start[k] + d[k] for k in start} for d in deltas]
    exact = product(start) + sum(product(c) - product(start) for c in clients) / 3
    new = family_step("exact", "trimmed-mean", start, deltas, [1, 1, 1])  # k = 0: the mean
    sigma = np.linalg.svd(exact.numpy(), compute_uv=False)
    assert sigma[2] > 1e-3  # the rank did not permit
    error = float((product(new) - exact).norm())
    assert error == pytest.approx(float(np.sqrt((sigma[2:] ** 2).sum())), rel=1e-9)
    b, a, reported = refactor(exact, 2)
    assert reported == pytest.approx(error, rel=1e-9)
    # √σ in both factors: B and A carry the same singular values
    torch.testing.assert_close(torch.linalg.svdvals(b), torch.linalg.svdvals(a))


def test_exact_space_needs_the_start_and_names_products():
    space = make_lora_space("exact")
    g = torch.Generator().manual_seed(2)
    start = lora_start(g, 3, 1, 2)
    d = lora_client(g, start, 3, 1, 2)
    (u,) = space.updates([result(0, d, start=start)])
    assert set(u) == {"m" + LORA_PRODUCT, "classifier.weight"}
    assert set(space.reference(start)) == set(u)
    with pytest.raises(FedsimError, match="start adapter"):
        space.updates([result(0, d)])
    with pytest.raises(FedsimError, match="unknown"):
        make_lora_space("stacked")


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

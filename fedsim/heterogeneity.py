"""How far a client's data is from the federation's: the ``heterogeneity`` factor of α.

A client's data is summarized as a histogram: of its class labels where the task has classes,
otherwise of the length in words of what each example asks the model to produce (the target of
a generation task; the text where there is no target), in the fixed bins ``LENGTH_BINS``. The
federation's histogram is that of all clients' training data together. Measures (each in
[0, 1], dimensionless; larger = closer to the federation):

- ``js-similarity``: 1 − JSD(p_client ‖ p_global), the Jensen–Shannon divergence in bits
  (Lin 1991, "Divergence measures based on the Shannon entropy"), which lies in [0, 1]:
  1 for the federation's own mix, 0 for a client whose support is disjoint from it.
- ``label-entropy``: H(p_client) / log2 K, the Shannon entropy normalized by its maximum over
  the K classes (or bins): 1 for a uniform mix, 0 for a single class. It measures the mix
  itself, not its distance to the federation's (a skewed federation scores below 1 everywhere).

Pure numpy/scipy (no torch): the numbers are fixed by the partition, before any training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.spatial.distance import jensenshannon

from fedsim.data import Example

# Word-count bin edges for tasks without classes: [1, 2), [2, 3), ... [33, inf); empty texts
# fall in the first bin. Fixed, so every client's histogram has the same support.
LENGTH_BINS = (1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33)


def histogram(values: np.ndarray, num_bins: int) -> np.ndarray:
    """Shares of each bin index in ``values`` (uniform for no values: nothing to skew)."""
    counts = np.bincount(np.asarray(values, dtype=np.int64), minlength=num_bins)
    counts = counts.astype(np.float64)
    total = counts.sum()
    return counts / total if total > 0 else np.full(num_bins, 1.0 / num_bins)


def length_bins(examples: Sequence[Example]) -> np.ndarray:
    """Each example's ``LENGTH_BINS`` index, by the word count of its target (else its text)."""
    words = [len((e.target if e.target is not None else e.text).split()) for e in examples]
    return np.maximum(np.searchsorted(LENGTH_BINS, words, side="right") - 1, 0)


def js_similarity(p: np.ndarray, q: np.ndarray) -> float:
    """1 − JSD(p ‖ q) in bits, in [0, 1]. scipy's ``jensenshannon`` returns the Jensen–Shannon
    *distance*, the square root of the divergence: squared here."""
    jsd = float(jensenshannon(p, q, base=2)) ** 2
    return float(np.clip(1.0 - jsd, 0.0, 1.0))


def normalized_entropy(p: np.ndarray, q: np.ndarray | None = None) -> float:
    """H(p) / log2 K for K = len(p) bins, in [0, 1] (1 for a single bin: nothing to mix).
    ``q`` (the federation's histogram) is not used: the measure is the client's mix alone."""
    k = len(p)
    if k < 2:
        return 1.0
    nz = p[p > 0]
    return float(np.clip(-(nz * np.log2(nz)).sum() / np.log2(k), 0.0, 1.0))


# The heterogeneity measures by config value (``aggregation.heterogeneity``).
MEASURES: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "js-similarity": js_similarity,
    "label-entropy": normalized_entropy,
}


def client_histograms(examples: Sequence[Example], labels: np.ndarray | None,
                      num_classes: int, parts: Sequence[np.ndarray]
                      ) -> tuple[list[np.ndarray], np.ndarray]:
    """Each client's histogram and the federation's (all clients' data together): of class
    labels when ``labels`` is given (``num_classes`` bins), else of ``length_bins``."""
    if labels is None:
        values, bins = length_bins(examples), len(LENGTH_BINS)
    else:
        values, bins = np.asarray(labels), num_classes
    everyone = np.concatenate([np.asarray(idx, dtype=np.int64) for idx in parts]) if parts else (
        np.zeros(0, dtype=np.int64))
    return [histogram(values[np.asarray(idx, dtype=np.int64)], bins) for idx in parts], (
        histogram(values[everyone], bins))


def heterogeneity(examples: Sequence[Example], labels: np.ndarray | None, num_classes: int,
                  parts: Sequence[np.ndarray]) -> dict[str, list[float]]:
    """Every measure of ``MEASURES`` for every client (``parts[i]``: client i's indices into
    ``examples``), by measure name."""
    hists, everyone = client_histograms(examples, labels, num_classes, parts)
    return {name: [f(h, everyone) for h in hists] for name, f in MEASURES.items()}

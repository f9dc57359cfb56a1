"""The task registry: every entry's head loads on a tiny model, a batch collates, the loss is
finite, evaluation returns exactly the declared metrics; the trainer asks the registry, never the
task's name."""

import math

import numpy as np
import pytest
import torch

from fedsim.data import DOCUMENTED_COUNTS, Example, load_dataset
from fedsim.errors import FedsimError
from fedsim.models import load_model
from fedsim.plugins import DATASETS, TASKS
from fedsim.tasks import Classification, Generation, Task, macro_f1
from fedsim.training import FamilyTrainer, LocalTrainingConfig

# A tiny model and a dataset per task: (model, num_labels, dataset).
SETUPS = {
    "classification": ("tiny-bert", 5, "bbc-news"),
    "multiple-choice": ("tiny-bert", None, "wordnet-mc"),
    "generation": ("tiny-llama", None, "freedict-en-de"),
}
CFG = LocalTrainingConfig(lr=1e-2, local_steps=2, batch_size=4, max_length=32, max_new_tokens=4)
PRIMARY = {  # the run's quality metric of every dataset's task
    ("bbc-news", "classification"): "accuracy", ("bbc-news", "generation"): "rougeL",
    ("rotten-tomatoes", "classification"): "accuracy",
    ("wordnet-mc", "multiple-choice"): "accuracy", ("freedict-en-de", "generation"): "chrf",
}

_TRAINERS: dict[str, FamilyTrainer] = {}


def trainer(name: str) -> FamilyTrainer:
    """One trainer per task for the module (loading costs seconds)."""
    if name not in _TRAINERS:
        model, num_labels, dataset = SETUPS[name]
        _TRAINERS[name] = FamilyTrainer(model, name, num_labels, CFG, seed=0, dataset=dataset)
    return _TRAINERS[name]


def examples(name: str, n: int = 4) -> list[Example]:
    return list(load_dataset(SETUPS[name][2], name).train[:n])


def test_every_task_has_a_setup_here():
    assert sorted(SETUPS) == TASKS.names()


# ---------------------------------------------------------------------------------------------
# The contract, over every entry


@pytest.mark.parametrize("name", TASKS.names())
def test_entry_declares_its_facts(name):
    cls = TASKS.get(name)
    assert issubclass(cls, Task) and cls.name == name
    assert isinstance(cls.head, str) and cls.metrics and len(set(cls.metrics)) == len(cls.metrics)
    assert "loss" not in cls.metrics  # the trainer adds it


@pytest.mark.parametrize("name", TASKS.names())
def test_head_loads_on_a_tiny_model(name):
    model, num_labels, _ = SETUPS[name]
    loaded = load_model(model, TASKS.get(name).head, num_labels)
    assert sum(p.numel() for p in loaded.model.parameters()) > 0


@pytest.mark.parametrize("name", TASKS.names())
def test_a_batch_collates_and_its_loss_is_finite(name):
    t, batch_examples = trainer(name), examples(name)
    encoded = [t.task.encode(t.tokenizer, e, CFG.max_length) for e in batch_examples]
    assert all(rows and all(len(r.ids) <= CFG.max_length + 8 for r in rows) for rows in encoded)
    batch, targets = t.task.collate(batch_examples, encoded, t.tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == len(batch_examples)
    assert targets.shape[0] == len(batch_examples) and targets.dtype == torch.long
    t.apply(t.initial_adapter())
    with torch.no_grad():
        loss = t.task.loss(t.model(**batch).logits, targets)
    assert loss.ndim == 0 and math.isfinite(loss.item()) and loss.item() > 0


@pytest.mark.parametrize("name", TASKS.names())
def test_evaluate_returns_exactly_the_declared_metrics(name):
    t = trainer(name)
    test = load_dataset(SETUPS[name][2], name).test[:4]
    metrics = t.evaluate(t.initial_adapter(), test)
    assert list(metrics) == ["loss", *TASKS.get(name).metrics]
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("name", TASKS.names())
def test_labels_and_num_labels_follow_has_classes(name):
    cls, train = TASKS.get(name), examples(name, 20)
    labels = cls.partition_labels(train)
    if cls.has_classes:
        assert labels.dtype == np.int64 and labels.tolist() == [e.label for e in train]
        with pytest.raises(FedsimError, match="num_labels"):
            cls.check_num_labels(None)
        assert trainer(name).num_classes == SETUPS[name][1]
    else:
        assert labels is None
        cls.check_num_labels(None)
        assert trainer(name).num_classes is None


@pytest.mark.parametrize(("dataset", "name"), sorted(DOCUMENTED_COUNTS))
def test_primary_metric_is_one_the_task_reports(dataset, name):
    cls = TASKS.get(name)
    primary = cls.primary_metric(load_dataset(dataset, name))
    assert primary == PRIMARY[(dataset, name)] and primary in cls.metrics


# ---------------------------------------------------------------------------------------------
# The trainer uses the registry


def test_the_trainer_asks_the_registry(monkeypatch):
    """A spy registered under ``classification`` is what the trainer builds and calls."""
    calls: list[str] = []

    class Spy(Classification):
        def encode(self, *args):
            calls.append("encode")
            return super().encode(*args)

        def collate(self, *args):
            calls.append("collate")
            return super().collate(*args)

        def loss(self, *args):
            calls.append("loss")
            return super().loss(*args)

        def evaluate(self, *args):
            calls.append("evaluate")
            return super().evaluate(*args)

    monkeypatch.setitem(TASKS._entries, "classification", Spy)
    t = FamilyTrainer("tiny-bert", "classification", 5, CFG, seed=0, dataset="bbc-news")
    assert type(t.task) is Spy
    data = examples("classification", 8)
    t.train(t.initial_adapter(), data, t.plan(data, seed=0), seed=0)
    t.evaluate(t.initial_adapter(), data, limit=4)
    assert {"encode", "collate", "loss", "evaluate"} <= set(calls)


def test_unknown_task_is_rejected_by_name():
    with pytest.raises(FedsimError, match="unknown task 'regression'"):
        FamilyTrainer("tiny-bert", "regression", None, CFG, seed=0)


def test_generation_prompt_comes_from_the_dataset():
    assert Generation("freedict-en-de").prompt == DATASETS.get("freedict-en-de").prompt
    assert Generation("bbc-news").prompt == "{text}\nHeadline:"
    assert Generation().prompt == Generation("wordnet-mc").prompt == Generation.default_prompt
    t = trainer("generation")
    ids = t.task.prompt_ids(t.tokenizer, "a house", room=32)
    assert t.tokenizer.decode(ids, skip_special_tokens=True).startswith("Translate to German:")


# ---------------------------------------------------------------------------------------------
# Macro-F1


def test_macro_f1_hand_computed():
    # classes: 0 (F1 = 4/5), 1 (F1 = 2/4), 2 predicted once but never true (F1 = 0);
    # class 3 is neither true nor predicted and is left out.
    truth, predicted = [0, 0, 0, 1, 1], [0, 0, 1, 1, 2]
    assert macro_f1(truth, predicted) == pytest.approx((0.8 + 0.5 + 0.0) / 3)
    assert macro_f1([1, 0], [1, 0]) == 1.0
    assert macro_f1([3, 3], [3, 0]) == pytest.approx((0.0 + 2 / 3) / 2)  # 1, 2 left out


def _macro_f1_from_counts(truth, predicted, num_classes):
    """fedsim's own formula before scikit-learn: F1 = 2TP / (2TP + FP + FN), classes that are
    neither true nor predicted left out."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    tp = np.diag(confusion).astype(np.float64)
    fp, fn = confusion.sum(axis=0) - tp, confusion.sum(axis=1) - tp
    present = (tp + fp + fn) > 0
    return float(np.mean(2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])))


def test_macro_f1_is_bit_identical_to_the_count_formula():
    rng = np.random.default_rng(0)
    for _ in range(500):
        n, k = int(rng.integers(2, 20)), int(rng.integers(1, 200))
        truth = rng.integers(0, int(rng.integers(1, n + 1)), k)  # some classes never true
        predicted = np.where(rng.random(k) < 0.6, truth, rng.integers(0, n, k))
        assert macro_f1(truth, predicted) == _macro_f1_from_counts(truth, predicted, n)

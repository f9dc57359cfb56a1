"""Several clients trained in one batched pass give what training them one by one gives (float
tolerance), dropout included; the model is left as it was."""

import math

import pytest
import torch

from fedsim.batching import ATTENTION, Request, train_together
from fedsim.data import load_dataset
from fedsim.training import FamilyTrainer, LocalTrainingConfig

FAST = {"lr": 1e-2, "local_steps": 4, "batch_size": 8, "max_length": 32}
_TRAINERS: dict[tuple, FamilyTrainer] = {}


def trainer(model: str, task: str, num_labels: int | None, dataset: str, **cfg) -> FamilyTrainer:
    key = (model, task, num_labels, dataset, tuple(sorted(cfg.items())))
    if key not in _TRAINERS:
        _TRAINERS[key] = FamilyTrainer(model, task, num_labels,
                                       LocalTrainingConfig(**(FAST | cfg)), seed=0,
                                       dataset=dataset)
    return _TRAINERS[key]


def requests(t: FamilyTrainer, dataset: str, task: str, sizes=(20, 12, 5),
             validation: int = 0) -> list[Request]:
    """Clients with different data (one smaller than a batch: fewer rows), starts and seeds."""
    train = load_dataset(dataset, task).train
    out, offset = [], 0
    for k, n in enumerate(sizes):
        examples = list(train[offset:offset + n])
        offset += n
        start = {key: v + 0.01 * k * torch.randn(v.shape, generator=torch.Generator()
                                                   .manual_seed(k))
                 for key, v in t.initial_adapter().items()}
        held = tuple(range(min(validation, n - 1)))
        out.append(Request(start, examples, t.plan(examples, seed=10 + k, validation=held),
                           seed=100 + k))
    return out


def assert_same(batched, solo, multiple_choice=False):
    for b, s in zip(batched, solo, strict=True):
        assert b.delta.keys() == s.delta.keys()
        # Relative to the whole delta: Adam divides by √v, so where an element's gradient is
        # float noise a different rounding moves it by up to lr — on a few elements, not all.
        # A multiple-choice head's bias shifts every choice's score alike: its exact gradient
        # is 0, so both runs move it by rounding noise over its own √v — not compared.
        keys = [k for k in s.delta if not (multiple_choice and k == "classifier.bias")]
        gap = math.sqrt(sum(float((b.delta[k] - s.delta[k]).double().pow(2).sum())
                            for k in keys))
        assert gap <= 1e-4 * s.metrics["delta_norm"], (gap, s.metrics["delta_norm"])
        assert b.losses == pytest.approx(s.losses, rel=1e-5, abs=1e-6)
        for x, y in ((b.loss_before, s.loss_before), (b.loss_after, s.loss_after)):
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-5)
        assert (b.tokens, b.flops, b.peak_memory_bytes, b.num_samples) == \
               (s.tokens, s.flops, s.peak_memory_bytes, s.num_samples)


CASES = [
    pytest.param("tiny-bert", "classification", 5, "bbc-news", {}, id="bert-classification"),
    pytest.param("tiny-bert", "classification", 5, "bbc-news", {"lora_dropout": 0.2},
                 id="bert-lora-dropout"),
    pytest.param("tiny-mpnet", "classification", 5, "bbc-news", {}, id="mpnet-classification"),
    pytest.param("tiny-bert", "multiple-choice", None, "wordnet-mc", {}, id="bert-mc"),
    pytest.param("tiny-llama", "generation", None, "freedict-en-de",
                 {"target_roles": ("q", "k", "v", "o")}, id="llama-generation"),
]


@pytest.mark.parametrize(("model", "task", "num_labels", "dataset", "cfg"), CASES)
def test_a_batched_pass_trains_each_client_as_alone(model, task, num_labels, dataset, cfg):
    t = trainer(model, task, num_labels, dataset, **cfg)
    reqs = requests(t, dataset, task, validation=3)
    solo = [t.train(r.adapter, r.examples, r.plan, r.seed) for r in reqs]
    batched = train_together(t, reqs)
    assert_same(batched, solo, multiple_choice=task == "multiple-choice")
    assert all(r.metrics["delta_norm"] > 0 for r in batched)


def test_dropout_masks_are_each_clients_own():
    """With the clients' seeds swapped among them, every client's result changes: each one's
    masks come from its own seed, not from a shared draw."""
    t = trainer("tiny-bert", "classification", 5, "bbc-news")
    assert t.model.config.hidden_dropout_prob > 0
    reqs = requests(t, "bbc-news", "classification", sizes=(16, 16))
    batched = train_together(t, reqs)
    swapped = train_together(t, [Request(r.adapter, r.examples, r.plan, o.seed)
                                 for r, o in zip(reqs, reversed(reqs), strict=True)])
    for a, b in zip(batched, swapped, strict=True):
        key = next(iter(a.delta))
        assert not torch.allclose(a.delta[key], b.delta[key], rtol=1e-3, atol=1e-5)


def test_groups_by_steps_and_leaves_the_model_as_it_was():
    t = trainer("tiny-bert", "classification", 5, "bbc-news", local_epochs=1)
    reqs = requests(t, "bbc-news", "classification", sizes=(24, 8, 16, 17))  # 3, 1, 2, 2 steps
    assert [len(r.plan.batches) for r in reqs] == [3, 1, 2, 2]
    before = t.train(reqs[0].adapter, reqs[0].examples, reqs[0].plan, reqs[0].seed)
    batched = train_together(t, reqs)
    assert_same(batched, [t.train(r.adapter, r.examples, r.plan, r.seed) for r in reqs])
    after = t.train(reqs[0].adapter, reqs[0].examples, reqs[0].plan, reqs[0].seed)
    assert all(torch.equal(before.delta[k], after.delta[k]) for k in before.delta)
    assert t.model.config._attn_implementation != ATTENTION
    assert not any("forward" in vars(m) for m in t.model.modules())
    assert not t.model.training

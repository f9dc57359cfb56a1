"""The server model end to end on tiny models: client LoRA deltas of two families (BERT and
Llama) projected into a tiny MPNet, merged with an aggregation rule; the linear-probe head; and
one slow run on the packaged minilm-l6 -> mpnet-base pair."""

import time

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from fedsim.aggregators import ClientResult, make_aggregator
from fedsim.data import load_dataset
from fedsim.errors import FedsimError
from fedsim.models import LoadedModel, ModelSpec, load_model
from fedsim.plugins import TaskArithmeticConfig
from fedsim.projection import HEAD, LORA_A, LORA_B, projection_flops
from fedsim.server import ServerModel, fit_logistic_regression
from fedsim.training import FamilyTrainer, LocalTrainingConfig

CFG = LocalTrainingConfig(lora_r=4, lora_alpha=8, target_roles=("q", "v"), lr=1e-2,
                          local_steps=2, batch_size=8, max_length=32)
FAMILIES = ("tiny-bert", "tiny-llama")


def bbc():
    return load_dataset("bbc-news", "classification")


@pytest.fixture(scope="module")
def setup():
    data = bbc()
    server = ServerModel("tiny-mpnet", "classification", 5, seed=0, probe_examples=data.train[:40],
                         max_length=32, projector_options={"use_cache": False, "max_length": 32})
    probe_accuracy = server.evaluate(data.train[:40])["accuracy"]  # before any update
    probe = [e.text for e in data.train[200:212]]
    trainers = {}
    for name in FAMILIES:
        trainers[name] = FamilyTrainer(name, "classification", 5, CFG, seed=0)
        server.add_family(name, trainers[name], roles=CFG.target_roles,
                          lora_scale=CFG.lora_alpha / CFG.lora_r, probe_texts=probe)
    return server, trainers, data, probe_accuracy


def client_update(trainer, data, offset: int):
    """One client's start adapter (B ≠ 0: a later round) and its trained delta."""
    examples = data.train[offset:offset + 8]
    start = trainer.initial_adapter()
    warm = trainer.train(start, examples, trainer.plan(examples, seed=1), seed=1).delta
    start = {k: v + warm[k] for k, v in start.items()}
    return start, trainer.train(start, examples, trainer.plan(examples, seed=2), seed=2).delta


def test_projected_updates_are_low_rank_factors_of_the_server_modules(setup):
    server, trainers, data, _ = setup
    start, delta = client_update(trainers["tiny-bert"], data, 0)
    projected = server.project("tiny-bert", start, delta)
    weights = server.weights()
    modules = {k.removesuffix(LORA_A) for k in projected if k.endswith(LORA_A)}
    assert len(modules) == 4  # q and v of both layers
    for m in modules:
        b, a = projected[m + LORA_B], projected[m + LORA_A]
        assert b.shape[1] == a.shape[0] == 2 * CFG.lora_r  # B0 ≠ 0: the rank-2r form
        assert (b @ a).shape == weights[m + ".weight"].shape
    assert projected["classifier.out_proj.weight"].shape == (5, 64)
    assert projected["classifier.out_proj.bias"].shape == (5,)
    projector = server.families["tiny-bert"].projector
    expected = sum(projection_flops(p, 2 * CFG.lora_r) for p in projector.pairs if p.role != HEAD)
    expected += 2.0 * (5 * 5 * 64 + 5 * 64 * 64)  # the head's P·D·Q
    assert server.flops_of_projection("tiny-bert", start, delta) == expected


def test_apply_changes_only_the_targeted_weights(setup):
    server, trainers, data, _ = setup
    results = []
    for i, name in enumerate(FAMILIES):
        start, delta = client_update(trainers[name], data, 8 * i)
        results.append(ClientResult(i, server.project(name, start, delta), num_samples=8,
                                    quality=0.1 * (i + 1)))
    before = {k: v.clone() for k, v in server.weights().items()}
    flops = server.apply(results, make_aggregator(TaskArithmeticConfig()))
    after = server.weights()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    targeted = {f"mpnet.encoder.layer.{i}.attention.attn.{r}.weight" for i in (0, 1)
                for r in ("q", "v")} | {"classifier.out_proj.weight", "classifier.out_proj.bias"}
    assert changed == targeted
    assert flops > 0
    metrics = server.evaluate(data.test[:24])
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] > 0
    # The merged weights are what evaluation sees: the adapter carries the current head.
    assert torch.equal(server.adapter["classifier.out_proj.weight"],
                       after["classifier.out_proj.weight"])


def test_small_layers_that_share_a_large_layer_add_up(setup):
    """A 3-layer small model on the 2-layer server: small layers 1 and 2 both land in large
    layer 1, their factors concatenated along the rank, i.e. their updates summed."""
    server, _, data, _ = setup
    bert = load_model("tiny-bert", "sequence-classification", 5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        deep = BertForSequenceClassification(BertConfig(
            vocab_size=bert.model.config.vocab_size, hidden_size=48, num_hidden_layers=3,
            num_attention_heads=4, intermediate_size=96, num_labels=5)).eval()
    small = LoadedModel(deep, bert.tokenizer, ModelSpec("deep-bert", "bert", "encoder", "", ""))
    projector = server.add_family("deep-bert", small, roles=["q"], lora_scale=1.0,
                                  probe_texts=[e.text for e in data.train[300:306]])
    assert [p.large_layer for p in projector.pairs if p.role != HEAD] == [0, 1, 1]
    g = torch.Generator().manual_seed(0)
    start, delta = {}, {}
    for p in projector.pairs:
        if p.role != HEAD:
            start[p.small_name + LORA_A] = torch.randn(2, 48, generator=g)
            start[p.small_name + LORA_B] = torch.zeros(48, 2)
            delta[p.small_name + LORA_A] = torch.zeros(2, 48)
            delta[p.small_name + LORA_B] = torch.randn(48, 2, generator=g)
    projected = server.project("deep-bert", start, delta)
    shared = "mpnet.encoder.layer.1.attention.attn.q"
    assert projected[shared + LORA_B].shape == (64, 4)  # two rank-2 updates
    expected = sum(torch.matmul(*projector.project(p, delta[p.small_name + LORA_B],
                                                   start[p.small_name + LORA_A]))
                   for p in projector.pairs if p.large_layer == 1)
    torch.testing.assert_close(projected[shared + LORA_B] @ projected[shared + LORA_A], expected)


def test_the_linear_probe_fits_its_examples():
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(3, 6, generator=g)
    labels = torch.arange(60) % 3
    features = centers[labels] + 0.3 * torch.randn(60, 6, generator=g) + 10.0
    w, b = fit_logistic_regression(features, labels, 3)
    assert ((features @ w.T + b).argmax(1) == labels).all()


def test_the_server_head_starts_as_a_probe(setup):
    # 40 labelled examples, 64 random features: the probe separates its own examples.
    assert setup[3] > 0.6


def test_multiple_choice_through_lstsq_into_the_server():
    """A multiple-choice head takes (batch, choices, tokens): the lstsq fit runs the probe texts
    through both heads as one-choice questions, the head's map is fitted, and a projected
    update changes the server's head and scored choices."""
    data = load_dataset("wordnet-mc", "multiple-choice")
    server = ServerModel("tiny-mpnet", "multiple-choice", None, seed=0, max_length=32,
                         projector_options={"use_cache": False, "max_length": 32})
    trainer = FamilyTrainer("tiny-bert", "multiple-choice", None, CFG, seed=0)
    projector = server.add_family("tiny-bert", trainer, roles=CFG.target_roles,
                                  lora_scale=CFG.lora_alpha / CFG.lora_r,
                                  probe_texts=[e.text for e in data.train[:12]])
    assert HEAD in {p.role for p in projector.pairs}  # the choice scorer is paired too
    start, delta = client_update(trainer, data, 0)
    projected = server.project("tiny-bert", start, delta)
    assert projected["classifier.weight"].shape == (1, 64)
    before = server.evaluate(data.test[:16])
    server.apply([ClientResult(0, projected, num_samples=8, quality=0.1)],
                 make_aggregator(TaskArithmeticConfig()))
    after = server.evaluate(data.test[:16])
    assert after["loss"] != before["loss"] and 0.0 <= after["accuracy"] <= 1.0


def test_unknown_family_is_an_error(setup):
    server, trainers, _, _ = setup
    adapter = trainers["tiny-bert"].initial_adapter()
    with pytest.raises(FedsimError, match="add_family"):
        server.project("tiny-mpnet", adapter, adapter)


@pytest.mark.slow
def test_minilm_to_mpnet_base_end_to_end(tmp_path, monkeypatch):
    """Packaged models: an lstsq projector fitted on 50 bbc-news texts, cached, applied."""
    data = bbc()
    timings = {}
    t = time.perf_counter()
    server = ServerModel("mpnet-base", "classification", 5, seed=0,
                         probe_examples=data.train[:100], max_length=64)
    timings["server+probe_s"] = time.perf_counter() - t
    cfg = LocalTrainingConfig(lora_r=8, lora_alpha=16, target_roles=("q", "v"), lr=5e-4,
                              local_steps=2, batch_size=8, max_length=64)
    family = FamilyTrainer("minilm-l6", "classification", 5, cfg, seed=0)
    baseline = server.evaluate(data.test[:100])
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path))  # the models are loaded: cache maps only
    probe = [e.text for e in data.train[500:550]]
    for attempt in ("fit_s", "cached_fit_s"):
        t = time.perf_counter()
        projector = server.add_family("minilm-l6", family, roles=("q", "v"), lora_scale=2.0,
                                      probe_texts=probe)
        timings[attempt] = time.perf_counter() - t
        assert projector.cache_hit == (attempt == "cached_fit_s")
    assert sorted({p.large_layer for p in projector.pairs if p.role != HEAD}) == [0, 2, 4, 7, 9, 11]
    start = family.initial_adapter()
    examples = data.train[:16]
    delta = family.train(start, examples, family.plan(examples, 0), 0).delta
    t = time.perf_counter()
    projected = server.project("minilm-l6", start, delta)
    timings["project_s"] = time.perf_counter() - t
    flops = server.apply([ClientResult(0, projected, 16, quality=0.1)],
                         make_aggregator(TaskArithmeticConfig()))
    after = server.evaluate(data.test[:100])
    print(f"\nminilm-l6 -> mpnet-base: {timings}, apply {flops:.3g} FLOPs, "
          f"accuracy {baseline['accuracy']:.3f} -> {after['accuracy']:.3f}")
    assert baseline["accuracy"] > 0.4  # the probe beats chance (0.2) well
    assert 0.0 <= after["accuracy"] <= 1.0


def test_without_labelled_server_data_the_head_starts_at_zero_and_learns_from_clients():
    """``server.linear_probe: false``: the start scores every class alike (no probe, no random
    draw), and the merged head is the clients' projected head update alone."""
    data = bbc()
    server = ServerModel("tiny-mpnet", "classification", 5, seed=0, max_length=32,
                         projector_options={"use_cache": False, "max_length": 32}, zero_head=True)
    head = server.weights()["classifier.out_proj.weight"]
    assert not head.any() and not server.weights()["classifier.out_proj.bias"].any()
    trainer = FamilyTrainer("tiny-bert", "classification", 5, CFG, seed=0)
    server.add_family("tiny-bert", trainer, roles=CFG.target_roles,
                      lora_scale=CFG.lora_alpha / CFG.lora_r,
                      probe_texts=[e.text for e in data.train[200:212]])
    start, delta = client_update(trainer, data, 0)
    projected = server.project("tiny-bert", start, delta)
    server.apply([ClientResult(0, projected, num_samples=8, quality=0.1)],
                 make_aggregator(TaskArithmeticConfig()))
    torch.testing.assert_close(server.weights()["classifier.out_proj.weight"],
                               projected["classifier.out_proj.weight"])


def test_a_fitted_probe_is_kept_and_read_back(tmp_path, monkeypatch):
    """The probe's head is cached by model, data and settings: the same server reads it back
    without computing features; other examples are fitted anew."""
    import fedsim.server as server_module

    monkeypatch.setattr(server_module, "probe_cache_dir", lambda: tmp_path)
    data = bbc()

    def build(examples):
        return ServerModel("tiny-mpnet", "classification", 5, seed=0, probe_examples=examples,
                           max_length=32, projector_options={"use_cache": False})

    first = build(data.train[:40])
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    def no_features(*args, **kwargs):
        raise AssertionError("features computed although the probe is cached")

    monkeypatch.setattr(server_module, "head_inputs", no_features)
    second = build(data.train[:40])
    for key in first.adapter:
        assert torch.equal(first.adapter[key], second.adapter[key])
    with pytest.raises(AssertionError, match="features computed"):
        build(data.train[40:80])

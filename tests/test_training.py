"""Local LoRA training on tiny random models: losses fall, jobs are deterministic and isolated,
FLOPs and memory follow their formulas, LoRA sits on exactly the requested modules."""

import math

import numpy as np
import pytest
import torch

from fedsim.data import Example, load_dataset
from fedsim.errors import FedsimError
from fedsim.models import load_model, non_embedding_parameters
from fedsim.plugins import TASKS
from fedsim.roles import ROLE_MODULES, role_of, target_modules
from fedsim.training import (
    FamilyTrainer,
    LocalTrainingConfig,
    adapter_bytes,
    forward_flops,
    full_finetune_flops,
    lora_step_flops,
    peak_memory_bytes,
    validation_split,
)

# Fast settings: short sequences, a high learning rate so a few steps show learning.
FAST = {"lr": 1e-2, "local_steps": 20, "batch_size": 16, "max_length": 32, "max_new_tokens": 6}
ALL_ROLES = {arch: tuple(roles) for arch, roles in ROLE_MODULES.items()}
# Gemma-3's 262k-word output layer makes each step slow: fewer, smaller steps.
GEMMA = {"target_roles": ALL_ROLES["gemma3"], "local_steps": 8, "batch_size": 8}

_TRAINERS: dict[tuple, FamilyTrainer] = {}


def trainer(model: str, task: str, num_labels: int | None = None, dataset: str | None = None,
            **cfg) -> FamilyTrainer:
    """A trainer per distinct argument set, kept for the whole module (loading costs seconds)."""
    key = (model, task, num_labels, dataset, tuple(sorted(cfg.items())))
    if key not in _TRAINERS:
        config = LocalTrainingConfig(**(FAST | cfg))
        _TRAINERS[key] = FamilyTrainer(model, task, num_labels, config, seed=0, dataset=dataset)
    return _TRAINERS[key]


def bert_cls(**cfg) -> FamilyTrainer:
    return trainer("tiny-bert", "classification", 5, "bbc-news", **cfg)


def bbc(n: int = 24, offset: int = 0) -> list[Example]:
    return list(load_dataset("bbc-news", "classification").train[offset:offset + n])


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Learning: the loss falls over the local steps, for every task type


LEARNING = [
    pytest.param("tiny-bert", "classification", 5, "bbc-news", {}, id="bert-classification"),
    pytest.param("tiny-mpnet", "classification", 5, "bbc-news", {}, id="mpnet-classification"),
    pytest.param("tiny-llama", "classification", 5, "bbc-news", {}, id="llama-classification"),
    pytest.param("tiny-bert", "multiple-choice", None, "wordnet-mc", {}, id="bert-mc"),
    pytest.param("tiny-llama", "generation", None, "freedict-en-de",
                 {"target_roles": ALL_ROLES["llama"]}, id="llama-generation"),
    pytest.param("tiny-gemma3", "generation", None, "freedict-en-de", GEMMA,
                 id="gemma3-generation"),
]


@pytest.mark.parametrize(("model", "task", "num_labels", "dataset", "cfg"), LEARNING)
def test_loss_falls_over_local_steps(model, task, num_labels, dataset, cfg):
    t = trainer(model, task, num_labels, dataset, **cfg)
    examples = load_dataset(dataset, task).train[:t.cfg.batch_size]  # one batch: plain descent
    plan = t.plan(examples, seed=0)
    result = t.train(t.initial_adapter(), examples, plan, seed=0)
    assert len(result.losses) == t.cfg.local_steps
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    assert result.loss_after < result.loss_before


# ---------------------------------------------------------------------------------------------
# Determinism and isolation


def test_same_seed_same_delta_and_other_plan_seed_other_delta():
    t, examples = bert_cls(batch_size=8, local_steps=4), bbc(24)
    start = t.initial_adapter()
    plan = t.plan(examples, seed=1)
    assert plan == t.plan(examples, seed=1)
    first = t.train(start, examples, plan, seed=7)
    again = t.train(start, examples, t.plan(examples, seed=1), seed=7)
    assert equal(first.delta, again.delta)
    assert first.losses == again.losses
    other = t.train(start, examples, t.plan(examples, seed=2), seed=7)
    assert not equal(first.delta, other.delta)


def test_dropout_is_seeded_inside_the_job_and_leaves_global_rng_alone():
    t, examples = bert_cls(batch_size=8, local_steps=3, lora_dropout=0.3), bbc(24)
    plan, start = t.plan(examples, seed=0), t.initial_adapter()
    state = torch.get_rng_state()
    a = t.train(start, examples, plan, seed=1)
    assert torch.equal(state, torch.get_rng_state())  # no global seeding leaks out
    assert equal(a.delta, t.train(start, examples, plan, seed=1).delta)
    assert not equal(a.delta, t.train(start, examples, plan, seed=2).delta)


def test_adapters_are_per_client_and_the_base_stays_frozen():
    t = bert_cls(batch_size=8, local_steps=3)
    base = {n: p.detach().clone() for n, p in t.model.named_parameters() if not p.requires_grad}
    data_a, data_b = bbc(16), bbc(16, offset=100)
    adapter_a = t.initial_adapter()
    kept = {k: v.clone() for k, v in adapter_a.items()}
    first = t.train(adapter_a, data_a, t.plan(data_a, 0), seed=0)
    # Client B starts from another adapter (A's trained one) on other data.
    adapter_b = {k: adapter_a[k] + first.delta[k] for k in adapter_a}
    t.train(adapter_b, data_b, t.plan(data_b, 1), seed=1)
    again = t.train(adapter_a, data_a, t.plan(data_a, 0), seed=0)
    assert equal(first.delta, again.delta)  # nothing of B's job stayed in the model
    assert equal(adapter_a, kept)  # the caller's adapter is not modified
    assert equal(t.initial_adapter(), kept)
    after = {n: p for n, p in t.model.named_parameters() if not p.requires_grad}
    assert all(torch.equal(base[n], after[n]) for n in base)


def test_adapter_keys_are_readable_and_deltas_are_detached_fp32_cpu():
    t = bert_cls()
    adapter = t.initial_adapter()
    assert all(".default" not in k and "modules_to_save" not in k for k in adapter)
    lora = [k for k in adapter if ".lora_" in k]
    assert len(lora) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert {"classifier.weight", "classifier.bias"} <= adapter.keys()
    assert "bert.encoder.layer.0.attention.self.query.lora_A.weight" in adapter
    assert all(torch.count_nonzero(v) == 0 for k, v in adapter.items() if "lora_B" in k)
    assert adapter_bytes(adapter) == 4 * t.trainable_params
    result = t.train(adapter, bbc(8), t.plan(bbc(8), 0), seed=0)
    assert result.delta.keys() == adapter.keys()
    for d in result.delta.values():
        assert d.dtype == torch.float32 and d.device.type == "cpu" and not d.requires_grad
    # Two trainers of the same family and seed start from the same adapter.
    twin = FamilyTrainer("tiny-bert", "classification", 5, t.cfg, seed=0)
    assert equal(twin.initial_adapter(), adapter)
    with pytest.raises(FedsimError, match="does not fit"):
        t.apply({"x": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------
# Plans: batches, tokens, FLOPs, memory


def test_plan_batches_cover_epochs_and_small_clients_use_everything():
    t = bert_cls(batch_size=4, local_steps=5)
    examples = bbc(10)
    plan = t.plan(examples, seed=3)
    assert len(plan.batches) == 5 and all(len(set(b)) == 4 for b in plan.batches)
    epoch = plan.batches[0] + plan.batches[1]  # 2 full batches per epoch of 10
    assert len(set(epoch)) == 8
    assert plan.num_samples == len({i for b in plan.batches for i in b})
    small = t.plan(bbc(3), seed=0)
    assert all(sorted(b) == [0, 1, 2] for b in small.batches) and small.num_samples == 3
    with pytest.raises(FedsimError, match="at least one example"):
        t.plan([], seed=0)


def test_flops_are_four_n_tokens_with_dynamic_padding():
    t = bert_cls(batch_size=2, local_steps=3)
    # "a a a" is k word pieces plus [CLS] and [SEP]: lengths 3..8, cut at max_length 32.
    words = [1, 6, 2, 3, 40, 4]
    examples = [Example("a " * k, label=0) for k in words]
    assert [len(t.tokenizer(e.text).input_ids) for e in examples[:4]] == [3, 8, 4, 5]
    plan = t.plan(examples, seed=0)
    expected = sum(len(b) * min(max(words[i] for i in b) + 2, 32) for b in plan.batches)
    assert plan.tokens == expected
    n = non_embedding_parameters(load_model("tiny-bert", TASKS.get("classification").head, 5).model)
    assert n == t.non_embedding_params
    assert plan.flops == lora_step_flops(n, expected) == 4 * n * expected
    assert full_finetune_flops(n, expected) == 6 * n * expected


def test_multiple_choice_tokens_count_every_choice():
    t = trainer("tiny-bert", "multiple-choice", None, "wordnet-mc", batch_size=4, local_steps=2)
    examples = load_dataset("wordnet-mc", "multiple-choice").train[:8]
    plan = t.plan(examples, seed=0)
    tok = t.tokenizer
    expected = 0
    for batch in plan.batches:
        longest = max(len(tok(examples[i].text, c, truncation=True, max_length=32).input_ids)
                      for i in batch for c in examples[i].choices)
        expected += len(batch) * 4 * longest
    assert plan.tokens == expected
    assert plan.flops == 4 * t.non_embedding_params * expected


def test_generation_tokens_are_prompt_plus_target():
    t = trainer("tiny-llama", "generation", None, "freedict-en-de",
                target_roles=ALL_ROLES["llama"])
    examples = load_dataset("freedict-en-de", "generation").train[:4]
    row = t._encode(examples[0])[0]
    target = [x for x in row.labels if x != -100]
    assert t.tokenizer.decode(target[:-1]).strip() == examples[0].target
    assert target[-1] == t.tokenizer.eos_token_id
    plan = t.plan(examples, seed=0)
    assert plan.tokens == 4 * max(len(t._encode(e)[0].ids) for e in examples) * t.cfg.local_steps


def test_peak_memory_formula_hand_computed():
    # weights 4·1000 + (grad 4 + AdamW 8)·10 = 4120 bytes; activations per layer (16-bit)
    # s·b·h·(34 + 5·a·s/h) = 8·2·4·(34 + 20) = 3456, ×3 layers ×2 for fp32 = 20736.
    assert peak_memory_bytes(1000, 10, batch=2, seq_len=8, hidden=4, layers=3, heads=2) == 24856
    # logits and their gradient: 2·b·s·V·4 = 2·2·8·10·4 = 1280
    assert peak_memory_bytes(1000, 10, 2, 8, 4, 3, 2, vocab_size=10) == 24856 + 1280
    assert peak_memory_bytes(1000, 10, 2, 8, 4, 3, 2, vocab_size=10, logit_len=3) == 24856 + 480
    base = peak_memory_bytes(10**6, 10**4, 8, 64, 384, 6, 12)
    assert peak_memory_bytes(10**6, 10**4, 16, 64, 384, 6, 12) > base
    assert peak_memory_bytes(10**6, 10**4, 8, 128, 384, 6, 12) > base


def test_plan_memory_grows_with_batch_and_length():
    examples = bbc(32)
    small = bert_cls(batch_size=4, max_length=16).plan(examples, 0).peak_memory_bytes
    assert bert_cls(batch_size=16, max_length=16).plan(examples, 0).peak_memory_bytes > small
    assert bert_cls(batch_size=4, max_length=32).plan(examples, 0).peak_memory_bytes > small


# ---------------------------------------------------------------------------------------------
# Evaluation


def test_evaluate_classification_and_multiple_choice():
    t = bert_cls()
    test = load_dataset("bbc-news", "classification").test
    metrics = t.evaluate(t.initial_adapter(), test, limit=20)
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["macro_f1"] <= 1
    assert metrics["loss"] > 0
    mc = trainer("tiny-bert", "multiple-choice", None, "wordnet-mc")
    metrics = mc.evaluate(mc.initial_adapter(), load_dataset("wordnet-mc").test, limit=8)
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["macro_f1"] <= 1


def test_evaluate_generation_metrics():
    t = trainer("tiny-llama", "generation", None, "freedict-en-de",
                target_roles=ALL_ROLES["llama"])
    test = load_dataset("freedict-en-de", "generation").test
    metrics = t.evaluate(t.initial_adapter(), test, limit=4)
    assert set(metrics) == {"loss", "rougeL", "chrf", "bleu"}
    assert 0 <= metrics["rougeL"] <= 1
    assert 0 <= metrics["chrf"] <= 100 and 0 <= metrics["bleu"] <= 100


# ---------------------------------------------------------------------------------------------
# Module roles and LoRA placement


ROLE_CASES = [  # (the same trainers as the learning tests where they exist)
    pytest.param("bert", "tiny-bert", "classification", 5, "bbc-news", {}, id="bert"),
    pytest.param("mpnet", "tiny-mpnet", "classification", 5, "bbc-news", {}, id="mpnet"),
    pytest.param("llama", "tiny-llama", "generation", None, "freedict-en-de", {}, id="llama"),
    pytest.param("gemma3", "tiny-gemma3", "generation", None, "freedict-en-de", GEMMA,
                 id="gemma3"),
]


@pytest.mark.parametrize(("arch", "model", "task", "num_labels", "dataset", "cfg"), ROLE_CASES)
def test_every_role_names_one_module_per_layer_and_gets_lora(arch, model, task, num_labels,
                                                             dataset, cfg):
    t = trainer(model, task, num_labels, dataset, **(cfg | {"target_roles": ALL_ROLES[arch]}))
    assert t.spec.architecture == arch
    layers = t.model.config.num_hidden_layers
    base = t.model.base_model.model
    names = [n for n, _ in base.named_modules()]
    for role in ALL_ROLES[arch]:
        matched = [n for n in names if role_of(arch, n) == role]
        assert len(matched) == layers, (role, matched)
        assert all(hasattr(base.get_submodule(n), "lora_A") for n in matched)
    lora = {n for n, m in base.named_modules() if hasattr(m, "lora_A")}
    assert {role_of(arch, n) for n in lora} == set(ALL_ROLES[arch])


@pytest.mark.parametrize(("model", "task", "roles"), [
    ("tiny-bert", "classification", ("o", "down")),  # BERT's two kinds of output.dense
    ("tiny-bert", "classification", ("up",)),
    ("tiny-llama", "generation", ("k", "gate")),
])
def test_lora_sits_on_exactly_the_requested_roles(model, task, roles):
    t = trainer(model, task, 5 if task == "classification" else None, target_roles=roles)
    arch = t.spec.architecture
    lora = [n for n, m in t.model.base_model.model.named_modules() if hasattr(m, "lora_A")]
    assert len(lora) == len(roles) * t.model.config.num_hidden_layers
    assert {role_of(arch, n) for n in lora} == set(roles)


def test_target_modules_rejects_unknown_roles_and_architectures():
    assert target_modules("llama", ["q", "v"]) == r".*\.(?:q_proj|v_proj)"
    with pytest.raises(FedsimError, match="gate"):
        target_modules("bert", ["q", "gate"])
    with pytest.raises(FedsimError, match="architecture"):
        target_modules("t5", ["q"])


@pytest.mark.parametrize(("key", "value"), [
    ("lr", -1.0), ("lora_r", 0), ("local_steps", 0), ("lora_dropout", 1.0),
    ("target_roles", ("q", "x")), ("max_length", 2), ("weight_decay", -0.1),
])
def test_config_rejects_bad_values_by_name(key, value):
    with pytest.raises(FedsimError, match=key):
        LocalTrainingConfig(**{key: value})


def test_trainer_rejects_bad_task_and_missing_labels():
    with pytest.raises(FedsimError, match="task"):
        FamilyTrainer("tiny-bert", "regression", None, LocalTrainingConfig(), seed=0)
    with pytest.raises(FedsimError, match="num_labels"):
        FamilyTrainer("tiny-bert", "classification", None, LocalTrainingConfig(), seed=0)


def test_validation_split_is_held_out_measured_and_costed():
    """A plan's validation split is never trained on; its loss is measured before and after (the
    same examples, eval mode) and the two forward passes are in the FLOPs, 2·N·tokens each;
    without a split the first and last step losses stand in, and training is the same."""
    examples = load_dataset("bbc-news", "classification").train[:40]
    t = bert_cls(local_steps=6, batch_size=8)
    held = validation_split(len(examples), 8, np.random.default_rng(0))
    assert len(held) == 8 and len(set(held.tolist())) == 8
    plan = t.plan(examples, seed=1, validation=held)
    trained = {i for b in plan.batches for i in b}
    assert plan.validation == tuple(sorted(held.tolist()))
    assert trained and not trained & set(plan.validation)  # disjoint
    held_out = [examples[i] for i in plan.validation]
    tokens = len(held_out) * max(len(t._encode(e)[0].ids) for e in held_out)  # one batch of 8
    assert plan.validation_tokens == tokens
    bare = lora_step_flops(t.non_embedding_params, plan.tokens)
    assert plan.flops == pytest.approx(bare + 2 * forward_flops(t.non_embedding_params, tokens))
    assert forward_flops(10, 3) == 2 * 10 * 3
    r = t.train(t.initial_adapter(), examples, plan, seed=1)
    assert r.loss_before == pytest.approx(t.evaluate(t.initial_adapter(), held_out)["loss"])
    trained_adapter = {k: v + r.delta[k] for k, v in t.initial_adapter().items()}
    assert r.loss_after == pytest.approx(t.evaluate(trained_adapter, held_out)["loss"])
    assert r.loss_before != r.losses[0]
    # No split: first and last step losses; the same batches train the same way.
    pool = [i for i in range(len(examples)) if i not in plan.validation]
    rest = [examples[i] for i in pool]
    off = t.plan(rest, seed=1)
    assert [tuple(pool[i] for i in b) for b in off.batches] == list(plan.batches)
    r_off = t.train(t.initial_adapter(), rest, off, seed=1)
    assert r_off.loss_before == r_off.losses[0] and r_off.loss_after == r_off.losses[-1]
    assert r_off.losses == r.losses  # measuring does not change the training itself
    assert off.flops == lora_step_flops(t.non_embedding_params, off.tokens)
    with pytest.raises(FedsimError, match="validation positions"):
        t.plan(examples, seed=1, validation=[40])


def test_validation_split_leaves_one_example_to_train_on():
    rng = np.random.default_rng(0)
    assert len(validation_split(5, 8, rng)) == 4  # at most all but one
    assert len(validation_split(1, 8, rng)) == 0 and len(validation_split(9, 0, rng)) == 0
    a, b = (validation_split(30, 8, np.random.default_rng(7)) for _ in range(2))
    assert a.tolist() == b.tolist()  # deterministic from the generator's seed


def test_generation_validation_flops_count_the_output_layer_forward():
    from fedsim.tasks import logit_positions
    from fedsim.training import lm_head_flops

    t = trainer("tiny-llama", "generation", None, "freedict-en-de",
                target_roles=ALL_ROLES["llama"])
    examples = load_dataset("freedict-en-de", "generation").train[:12]
    plan = t.plan(examples, seed=0, validation=[0, 1, 2])
    bare = t.plan([e for i, e in enumerate(examples) if i > 2], seed=0)
    held = [t._encode(examples[i])[0] for i in range(3)]
    cfg = t.model.config
    head = lm_head_flops(cfg.vocab_size, cfg.hidden_size, 3 * logit_positions(held)) / 2
    extra = 2 * (forward_flops(t.non_embedding_params, plan.validation_tokens) + head)
    assert plan.flops - bare.flops == pytest.approx(extra, rel=1e-9)


def test_local_epochs_plan_full_passes():
    examples = load_dataset("bbc-news", "classification").train[:40]
    t = bert_cls(batch_size=8, local_epochs=2)
    plan = t.plan(examples, seed=0)
    assert len(plan.batches) == 2 * (40 // 8)
    first, second = plan.batches[:5], plan.batches[5:]
    assert sorted(i for b in first for i in b) == list(range(40))  # each pass sees every example
    assert sorted(i for b in second for i in b) == list(range(40))


def test_generation_flops_count_the_output_layer_on_logit_positions():
    from fedsim.tasks import logit_positions
    from fedsim.training import lm_head_flops

    t = trainer("tiny-llama", "generation", None, "freedict-en-de",
                target_roles=ALL_ROLES["llama"])
    examples = load_dataset("freedict-en-de", "generation").train[:4]
    plan = t.plan(examples, seed=0)
    cfg = t.model.config
    positions = sum(len(b) * logit_positions([t._encode(examples[i])[0] for i in b])
                    for b in plan.batches)
    want = 4 * t.non_embedding_params * plan.tokens + 4 * cfg.vocab_size * cfg.hidden_size * positions
    assert plan.flops == pytest.approx(want, rel=1e-12)
    assert lm_head_flops(10, 4, 3) == 4 * 10 * 4 * 3


def test_scenario_quality_eval_names_its_replacement():
    from conftest import make_scenario

    from fedsim.scenario import ScenarioError

    with pytest.raises(ScenarioError, match=r"set training\.validation_examples"):
        make_scenario(training={"quality_eval": True})
    assert make_scenario().training.validation_examples == 8
    with pytest.raises(ScenarioError, match="validation_examples"):
        make_scenario(training={"validation_examples": -1})


def test_bf16_training_is_its_own_deterministic_result_at_the_same_modelled_cost():
    from fedsim.data import load_dataset
    from fedsim.training import FamilyTrainer, LocalTrainingConfig

    examples = list(load_dataset("bbc-news", "classification").train[:40])

    def job(precision):
        cfg = LocalTrainingConfig(local_steps=3, batch_size=8, max_length=32, lr=5e-3,
                                  precision=precision)
        trainer = FamilyTrainer("tiny-bert", "classification", 5, cfg, seed=0)
        plan = trainer.plan(examples, seed=1)
        return plan, trainer.train(trainer.initial_adapter(), examples, plan, seed=1)

    p32, r32 = job("fp32")
    p16, r16 = job("bf16")
    _, again = job("bf16")
    assert p16.flops == p32.flops and p16.tokens == p32.tokens  # the timeline's inputs
    assert all(torch.equal(r16.delta[k], again.delta[k]) for k in r16.delta)
    assert any(not torch.equal(r16.delta[k], r32.delta[k]) for k in r16.delta)
    assert all(math.isfinite(x) for x in r16.losses)
    assert all(v.dtype == torch.float32 for v in r16.delta.values())
    # bf16 keeps about 3 significant digits: the steps agree with fp32's to that.
    assert r16.losses == pytest.approx(r32.losses, rel=0.05)

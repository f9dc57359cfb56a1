"""Projection of LoRA task vectors from small to large models: role maps across widths, depths
and grouped-query attention; the projectors' maps; the lstsq cache; task vectors in factor form.

The tiny models all have hidden 64 and 2 layers, so the large side is a wider, deeper model of
the same architecture built here from a config (hidden 96, 3 layers)."""

import pytest
import torch
from transformers import (
    Gemma3TextConfig,
    Gemma3TextForSequenceClassification,
    MPNetConfig,
    MPNetForSequenceClassification,
)

from fedsim.data import load_dataset
from fedsim.errors import FedsimError
from fedsim.models import LoadedModel, ModelSpec, load_model
from fedsim.projection import (
    HEAD,
    LORA_A,
    LORA_B,
    PROJECTORS,
    LeastSquares,
    capture,
    fit_linear_map,
    make_projector,
    map_layer,
    module_pairs,
    named_modules,
    task_vector,
    token_word_ids,
)

NUM_LABELS = 5
ALL = {"bert": ("q", "k", "v", "o", "up", "down", HEAD),
       "llama": ("q", "k", "v", "o", "up", "gate", "down", HEAD)}


def texts(n: int = 8, offset: int = 0) -> list[str]:
    return [e.text for e in load_dataset("bbc-news", "classification").train[offset:offset + n]]


def _wide(name: str, arch: str, kind: str, donor: str, build) -> LoadedModel:
    """A random-init model of ``donor``'s architecture and tokenizer, 96 wide and 3 deep."""
    small = load_model(donor, "sequence-classification", NUM_LABELS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build(small.model.config.vocab_size, small.tokenizer.pad_token_id)
    return LoadedModel(model.eval(), small.tokenizer, ModelSpec(name, arch, kind, "", "test"))


@pytest.fixture(scope="module")
def models():
    bert = load_model("tiny-bert", "sequence-classification", NUM_LABELS)
    llama = load_model("tiny-llama", "sequence-classification", NUM_LABELS)
    mpnet = _wide("wide-mpnet", "mpnet", "encoder", "tiny-mpnet", lambda vocab, pad: (
        MPNetForSequenceClassification(MPNetConfig(
            vocab_size=vocab, hidden_size=96, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=192, max_position_embeddings=514, pad_token_id=pad,
            num_labels=NUM_LABELS))))
    # Grouped-query attention with a head_dim that is not hidden/heads: q out 128, k/v out 32.
    gemma = _wide("wide-gemma3", "gemma3", "causal", "tiny-gemma3", lambda vocab, pad: (
        Gemma3TextForSequenceClassification(Gemma3TextConfig(
            vocab_size=vocab, hidden_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=1, head_dim=32, intermediate_size=192,
            query_pre_attn_scalar=32, sliding_window=64,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            max_position_embeddings=2048, pad_token_id=pad, num_labels=NUM_LABELS))))
    return {"bert": bert, "llama": llama, "mpnet": mpnet, "gemma3": gemma}


PAIRS = [pytest.param("bert", "mpnet", id="bert-to-wide-mpnet"),
         pytest.param("llama", "gemma3", id="llama-to-wide-gemma3")]


def weight_of(model, name: str) -> torch.Tensor:
    return named_modules(model)[name].weight


# ---------------------------------------------------------------------------------------------
# Role maps


def test_layers_map_by_relative_depth():
    assert [map_layer(i, 6, 12) for i in range(6)] == [0, 2, 4, 7, 9, 11]
    assert [map_layer(i, 2, 3) for i in range(2)] == [0, 2]
    assert [map_layer(i, 4, 2) for i in range(4)] == [0, 0, 1, 1]  # 1/3 -> 0, 2/3 -> 1
    assert map_layer(0, 1, 12) == 0  # a one-layer model's layer is the first
    with pytest.raises(FedsimError):
        map_layer(2, 2, 3)


@pytest.mark.parametrize(("small", "large"), PAIRS)
def test_module_pairs_shapes_are_the_large_models(models, small, large):
    s, big = models[small], models[large]
    pairs = module_pairs(s.model, small, big.model, large, ALL[small])
    layered = [p for p in pairs if p.role != HEAD]
    assert len(layered) == 2 * (len(ALL[small]) - 1)  # every role of both small layers
    assert {(p.small_layer, p.large_layer) for p in layered} == {(0, 0), (1, 2)}
    for p in pairs:
        assert p.small_shape == tuple(weight_of(s.model, p.small_name).shape)
        assert p.large_shape == tuple(weight_of(big.model, p.large_name).shape)
        assert p.role == HEAD or f".{p.large_layer}." in p.large_name
    head = next(p for p in pairs if p.role == HEAD)
    assert head.small_shape[0] == head.large_shape[0] == NUM_LABELS


def test_grouped_query_widths_come_from_the_modules(models):
    pairs = {p.small_name: p for p in module_pairs(
        models["llama"].model, "llama", models["gemma3"].model, "gemma3", ALL["llama"])}
    by_role = {p.role: p for p in pairs.values() if p.small_layer in (0, None)}
    assert by_role["q"].small_shape == (64, 64) and by_role["q"].large_shape == (128, 96)
    assert by_role["k"].small_shape == (32, 64) and by_role["k"].large_shape == (32, 96)
    assert by_role["o"].large_shape == (96, 128)
    assert by_role[HEAD].small_name == "score" == by_role[HEAD].large_name


def test_mpnet_head_maps_its_final_linear(models):
    pairs = module_pairs(models["bert"].model, "bert", models["mpnet"].model, "mpnet", [HEAD])
    assert [(p.small_name, p.large_name) for p in pairs] == [("classifier", "classifier.out_proj")]


def test_roles_without_modules_are_errors(models):
    bert, mpnet = models["bert"].model, models["mpnet"].model
    with pytest.raises(FedsimError, match="gate"):
        module_pairs(bert, "bert", mpnet, "mpnet", ["gate"])
    with pytest.raises(FedsimError, match="roles"):
        module_pairs(bert, "bert", mpnet, "mpnet", ["attention"])


# ---------------------------------------------------------------------------------------------
# Task vectors


def lora_state(pairs, rank: int, seed: int, zero_b: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for p in pairs:
        if p.role == HEAD:
            state[p.small_name + ".weight"] = torch.randn(p.small_shape, generator=g)
            continue
        out_dim, in_dim = p.small_shape
        state[p.small_name + LORA_A] = torch.randn(rank, in_dim, generator=g)
        b = torch.randn(out_dim, rank, generator=g)
        state[p.small_name + LORA_B] = torch.zeros_like(b) if zero_b else b
    return state


def test_task_vector_factor_form_equals_the_dense_update(models):
    pairs = module_pairs(models["bert"].model, "bert", models["mpnet"].model, "mpnet",
                         ["q", "v", HEAD])
    start, delta, s, r = lora_state(pairs, 4, 0), lora_state(pairs, 4, 1), 2.0, 4
    tv = task_vector(start, delta, s)
    assert tv.dense.keys() == {"classifier.weight"}
    assert torch.equal(tv.dense["classifier.weight"], delta["classifier.weight"])
    for module, f in tv.factors.items():
        a0, b0 = start[module + LORA_A], start[module + LORA_B]
        a1, b1 = a0 + delta[module + LORA_A], b0 + delta[module + LORA_B]
        assert f.rank == 2 * r
        torch.testing.assert_close(f.dense(), s * (b1 @ a1 - b0 @ a0), rtol=1e-5, atol=1e-4)
    fresh = lora_state(pairs, 4, 0, zero_b=True)  # round one: B0 = 0, the update is rank r
    tv = task_vector(fresh, delta, s)
    for module, f in tv.factors.items():
        assert f.rank == r
        b1, a1 = delta[module + LORA_B], fresh[module + LORA_A] + delta[module + LORA_A]
        torch.testing.assert_close(f.dense(), s * b1 @ a1)


# ---------------------------------------------------------------------------------------------
# Projectors


def fitted(name: str, small, large, roles, **options):
    projector = make_projector(name, roles, seed=0, **options)
    projector.fit(small, large, texts(8))
    return projector


@pytest.mark.parametrize(("small", "large"), PAIRS)
@pytest.mark.parametrize("name", PROJECTORS.names())
def test_projection_keeps_the_rank_and_fits_the_large_modules(models, name, small, large):
    options = {"use_cache": False, "max_length": 32} if name == "lstsq" else {}
    s, big = models[small], models[large]
    projector = fitted(name, s, big, ALL[small], **options)
    r = 3
    tv = task_vector(lora_state(projector.pairs, r, 0), lora_state(projector.pairs, r, 1), 2.0)
    for module, f in tv.factors.items():
        pair = projector.pair_of(module)
        b, a = projector.project(pair, f.B, f.A)
        assert b.shape == (pair.large_shape[0], 2 * r) and a.shape == (2 * r, pair.large_shape[1])
        update = b @ a
        assert update.shape == weight_of(big.model, pair.large_name).shape
        assert torch.linalg.matrix_rank(update) <= 2 * r
        assert torch.isfinite(update).all()
    head = projector.head_pair
    assert projector.project_dense(head, tv.dense[head.small_name + ".weight"]).shape == \
        weight_of(big.model, head.large_name).shape


def test_lstsq_recovers_a_known_linear_map():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(20, 12, generator=g, dtype=torch.float64)
    x = torch.randn(4000, 12, generator=g, dtype=torch.float64)
    noise = 0.01 * torch.randn(4000, 20, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fit_linear_map(x, x @ m.T + noise), m, rtol=0, atol=2e-3)
    # Centered: an offset between the spaces is absorbed, the map stays M.
    offset = torch.randn(20, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fit_linear_map(x + 3.0, (x + 3.0) @ m.T + offset + noise,
                                              center=True), m, rtol=0, atol=2e-3)


def test_lstsq_between_a_model_and_itself_reproduces_its_activations(models):
    """The whole path (hooks, word pooling, alignment, ridge) on identical models: on held-out
    text, Q_in·x = x and P_out·(y − ȳ) = y − ȳ (the identity wherever the activations live;
    LayerNorm keeps them off some directions, where ridge rightly learns nothing)."""
    bert = models["bert"]
    projector = fitted("lstsq", bert, bert, ["q", "v"], ridge=1e-7, use_cache=False,
                       max_length=48)
    held_out = capture(bert, texts(4, offset=50), [p.small_name for p in projector.pairs], 48,
                       with_head=False)
    real = held_out.mask.bool()
    for pair in projector.pairs:
        p_out, q_in = projector.maps(pair)
        x, y = (t[real] for t in held_out.acts[pair.small_name])
        y = y - y.mean(0)
        assert (x @ q_in.T - x).norm() < 1e-3 * x.norm()
        assert (y @ p_out.T - y).norm() < 1e-3 * y.norm()


def test_lstsq_maps_are_cached_and_a_new_corpus_refits(models, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path))
    small, large = models["llama"], models["gemma3"]

    def fit(corpus):
        projector = LeastSquares(["q", "v", HEAD], max_length=32)
        projector.fit(small, large, corpus)
        return projector

    first, again = fit(texts(6)), fit(texts(6))
    assert not first.cache_hit and again.cache_hit
    files = list((tmp_path / "projectors").glob("*.safetensors"))
    assert len(files) == 1 and not list((tmp_path / "projectors").glob("*.tmp"))
    for pair in first.pairs:
        for fresh, cached in zip(first.maps(pair), again.maps(pair), strict=True):
            assert torch.equal(fresh, cached)
    other = fit(texts(6, offset=6))
    assert not other.cache_hit
    assert len(list((tmp_path / "projectors").glob("*.safetensors"))) == 2


def semi_orthonormal(m: torch.Tensor) -> bool:
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    return torch.allclose(gram, torch.eye(gram.shape[0]), atol=1e-5)


@pytest.mark.parametrize(("small", "large"), PAIRS)
def test_orthogonal_maps_have_orthonormal_columns_or_rows(models, small, large):
    projector = fitted("orthogonal", models[small], models[large], ALL[small])
    for pair in projector.pairs:
        p_out, q_in = projector.maps(pair)
        assert semi_orthonormal(p_out) and semi_orthonormal(q_in)
    same = fitted("orthogonal", models[small], models[large], ALL[small])
    other = make_projector("orthogonal", ALL[small], seed=1)
    other.fit(models[small], models[large], [])
    pair = projector.pairs[0]
    assert torch.equal(projector.maps(pair)[0], same.maps(pair)[0])
    assert not torch.equal(projector.maps(pair)[0], other.maps(pair)[0])


def test_pad_is_an_identity_embedding(models):
    """Widening: P_out·v = [v; 0] and A·Q_in = [A, 0]; equal widths: the factors as they are."""
    projector = fitted("pad", models["bert"], models["mpnet"], ["q", "up", "down", HEAD])
    for pair in projector.pairs:
        p_out, q_in = projector.maps(pair)
        (out_s, in_s), (out_l, in_l) = pair.small_shape, pair.large_shape
        v, a = torch.randn(out_s), torch.randn(2, in_s)
        assert torch.equal(p_out @ v, torch.cat([v, torch.zeros(out_l - out_s)]))
        assert torch.equal(a @ q_in, torch.cat([a, torch.zeros(2, in_l - in_s)], dim=1))
    same = fitted("pad", models["bert"], models["bert"], ["q"])
    b, a = torch.randn(64, 2), torch.randn(2, 64)
    pb, pa = same.project(same.pairs[0], b, a)
    assert torch.equal(pb, b) and torch.equal(pa, a)


def test_tokens_are_grouped_into_whitespace_words(models):
    text = "Hello worldly  friends, ok."
    for name in ("bert", "llama"):
        tok = models[name].tokenizer
        enc = tok([text], return_offsets_mapping=True, return_tensors="pt")
        ids = token_word_ids([text], enc["offset_mapping"], enc["attention_mask"])[0].tolist()
        words = [w for w in ids if w >= 0]
        assert words == sorted(words) and set(words) == {0, 1, 2, 3}, (name, ids)
    bert = models["bert"].tokenizer([text], return_offsets_mapping=True, return_tensors="pt")
    assert token_word_ids([text], bert["offset_mapping"], bert["attention_mask"])[0, 0] == -1


def test_projecting_before_fit_or_a_wrong_shape_is_an_error(models):
    projector = make_projector("pad", ["q"])
    with pytest.raises(FedsimError, match="fit"):
        projector.pair_of("bert.encoder.layer.0.attention.self.query")
    projector.fit(models["bert"], models["mpnet"], [])
    with pytest.raises(FedsimError, match="do not fit"):
        projector.project(projector.pairs[0], torch.zeros(32, 2), torch.zeros(2, 64))
    with pytest.raises(FedsimError, match="probe corpus"):
        LeastSquares(["q"]).fit(models["bert"], models["mpnet"], [])

"""Codecs: exact sizes, round trips, unbiasedness, top-k, error feedback, low rank, the adaptive
policy, corruption and determinism — parametrized over every registry entry where it applies."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from fedsim.codecs import (
    CODECS,
    QSGD,
    Adaptive,
    ClientCodecState,
    Codec,
    LowRank,
    Payload,
    PayloadError,
    TensorCodec,
    TopK,
    TopKQSGD,
    decode,
    from_config,
    index_bits,
    raw_bytes,
    relative_error,
    shapes_of,
)
from fedsim.errors import FedsimError
from fedsim.plugins import CODECS as CODEC_CONFIGS

NAMES = CODECS.names()
SETTINGS = [n for n in NAMES if issubclass(CODECS.get(n), TensorCodec)]

# Shape sets: a LoRA pair, odd sizes (numel not divisible by 8), 1-D and 0-D tensors, a
# 3-D tensor, a lone head matrix, and a pair with no lora_ names.
SHAPE_SETS = {
    "lora": {"enc.0.q.lora_A.weight": (8, 48), "enc.0.q.lora_B.weight": (40, 8)},
    "odd": {"x.lora_A.weight": (3, 13), "x.lora_B.weight": (11, 3), "bias": (7,), "s": ()},
    "mixed": {"head.weight": (5, 33), "conv": (2, 3, 5), "one": (1,)},
    "plain": {"a": (64, 31), "b": (9,)},
}


def make_delta(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def encode(codec: Codec, delta, seed: int = 0, state=None) -> Payload:
    return codec.encode(delta, state, np.random.default_rng(seed))


def test_registry_holds_every_codec():
    assert set(NAMES) == {"none", "fp16", "qsgd", "topk", "lowrank", "topk-qsgd", "adaptive"}


@pytest.mark.parametrize("shape_set", SHAPE_SETS)
@pytest.mark.parametrize("name", NAMES)
def test_length_is_size_formula_and_layout_round_trips(name, shape_set):
    shapes = SHAPE_SETS[shape_set]
    codec = CODECS.get(name)()
    delta = make_delta(shapes)
    payload = encode(codec, delta)
    assert len(payload) == codec.size_bytes(shapes) == len(payload.data)
    out = codec.decode(payload)
    assert list(out) == list(delta)
    assert all(out[n].shape == delta[n].shape and out[n].dtype == torch.float32 for n in out)
    assert all(torch.isfinite(t).all() for t in out.values())


@pytest.mark.parametrize("codec", [QSGD(2), QSGD(4, block_size=0), TopK(0.3), TopK(0.02, "fp16"),
                                   TopKQSGD(0.1, bits=2), LowRank(1), LowRank(5)],
                         ids=lambda c: c.describe())
def test_size_formula_for_non_default_settings(codec):
    for shapes in SHAPE_SETS.values():
        assert len(encode(codec, make_delta(shapes))) == codec.size_bytes(shapes)


def test_none_round_trip_is_exact_and_keeps_dtype():
    delta = make_delta(SHAPE_SETS["odd"])
    delta["half"] = torch.randn(6).half()
    out = decode(encode(CODECS.get("none")(), delta))
    assert all(torch.equal(out[n], delta[n]) for n in delta)
    assert out["half"].dtype == torch.float16


def test_fp16_within_rounding():
    x = make_delta({"w": (50, 40)})["w"] * 3
    out = decode(encode(CODECS.get("fp16")(), {"w": x}))["w"]
    assert torch.all((out - x).abs() <= x.abs() * 2.0**-11 + 2.0**-25)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_qsgd_is_unbiased(bits):
    x = make_delta({"w": (12, 10)})["w"]
    codec = QSGD(bits)
    rng = np.random.default_rng(7)
    trials = 2000
    mean = sum(codec.decode(codec.encode({"w": x}, None, rng))["w"] for _ in range(trials))
    mean = mean / trials
    # Each draw is x ± at most one step δ = scale/s; its variance is <= δ²/4, so the mean of
    # `trials` draws has standard deviation <= δ / (2 √trials). Allow 6 of them.
    step = x.abs().max() / (2 ** (bits - 1) - 1)
    assert torch.all((mean - x).abs() <= 6 * step / (2 * math.sqrt(trials)))


@pytest.mark.parametrize("block_size", [0, 16, 512])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_qsgd_error_is_below_one_step_per_element(bits, block_size):
    x = make_delta({"w": (37, 11)}, seed=bits)["w"]
    out = decode(encode(QSGD(bits, block_size), {"w": x}))["w"].reshape(-1)
    flat = x.reshape(-1)
    width = block_size or flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % width)).reshape(-1, width)
    scale = blocks.abs().amax(dim=1).repeat_interleave(width)[: flat.numel()]
    assert torch.all((out - flat).abs() <= scale / (2 ** (bits - 1) - 1) * (1 + 1e-6))


@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1, 0.3, 0.9, 1.0])
def test_topk_keeps_exactly_the_k_largest(ratio):
    x = make_delta({"w": (40, 61)}, seed=3)["w"]
    out = decode(encode(TopK(ratio), {"w": x}))["w"]
    k = math.ceil(ratio * x.numel())
    kept = torch.nonzero(out.reshape(-1)).reshape(-1)
    largest = torch.topk(x.abs().reshape(-1), k).indices.sort().values
    assert torch.equal(kept, largest)
    assert torch.equal(out.reshape(-1)[kept], x.reshape(-1)[kept])


def test_topk_indices_are_compact():
    n = 64 * 384
    for k in (1, 25, 246, 2458, 6144, n):  # Elias-Fano: <= 2 + log2(n/k) bits per index
        assert index_bits(n, k) <= min(k * (2 + math.ceil(math.log2(n / k))), n)
    assert index_bits(n, 246) < 246 * 9
    assert TopK(0.01).tensor_bytes((64, 384)) < 246 * 6  # vs 246·12 as int64 + fp32


@pytest.mark.parametrize("codec", [TopK(0.05), TopK(0.2, "fp16"), TopKQSGD(0.05, bits=4)],
                         ids=lambda c: c.describe())
def test_error_feedback_loses_nothing(codec):
    state, rng = ClientCodecState(), np.random.default_rng(0)
    shapes = SHAPE_SETS["odd"]
    true_sum = {n: torch.zeros(s) for n, s in shapes.items()}
    sent_sum = {n: torch.zeros(s) for n, s in shapes.items()}
    for t in range(20):
        delta = make_delta(shapes, seed=t)
        sent = codec.decode(codec.encode(delta, state, rng))
        for n in shapes:
            true_sum[n] += delta[n]
            sent_sum[n] += sent[n]
    for n in shapes:
        torch.testing.assert_close(sent_sum[n] + state.residuals[n], true_sum[n],
                                   atol=1e-5, rtol=1e-5)


def test_dense_codecs_keep_no_residual():
    state = ClientCodecState()
    encode(QSGD(4), make_delta(SHAPE_SETS["lora"]), state=state)
    assert state.residuals == {}


def lora_pair(out: int, inp: int, r: int, true_rank: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(out, true_rank, generator=g) @ torch.randn(true_rank, r, generator=g)
    a = torch.randn(r, inp, generator=g)
    return {"m.lora_A.default.weight": a, "m.lora_B.default.weight": b}


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_lowrank_rebuilds_an_exact_low_rank_product(rank):
    delta = lora_pair(96, 80, 8, rank)
    out = decode(encode(LowRank(rank), delta))
    a, b = "m.lora_A.default.weight", "m.lora_B.default.weight"
    product, rebuilt = delta[b] @ delta[a], out[b] @ out[a]
    assert out[a].shape == delta[a].shape and out[b].shape == delta[b].shape
    assert relative_error({"w": product}, {"w": rebuilt}) < 1e-5


def test_lowrank_is_the_best_approximation_and_shrinks_with_rank():
    delta = lora_pair(64, 48, 8, 8)
    a, b = "m.lora_A.default.weight", "m.lora_B.default.weight"
    product = (delta[b] @ delta[a]).double()
    s = torch.linalg.svdvals(product)
    sizes = []
    for rank in (1, 2, 4, 8):
        out = decode(encode(LowRank(rank), delta))
        err = torch.linalg.norm(product - (out[b] @ out[a]).double())
        assert err == pytest.approx(float(s[rank:].square().sum().sqrt()), rel=1e-4, abs=1e-3)
        sizes.append(LowRank(rank).size_bytes(shapes_of(delta)))
    assert sizes == sorted(sizes) and len(set(sizes)) == 4


def test_lowrank_power_iteration_and_vectors():
    g = torch.Generator().manual_seed(1)
    head = torch.randn(30, 2, generator=g) @ torch.randn(2, 50, generator=g)
    delta = {"head.weight": head, "bias": torch.randn(9, generator=g)}
    out = decode(encode(LowRank(2), delta))
    assert relative_error({"w": head}, {"w": out["head.weight"]}) < 1e-5
    assert torch.equal(out["bias"], delta["bias"].half().float())


def test_adaptive_gets_more_compressed_as_the_channel_worsens():
    policy = Adaptive(safety_margin=0.8)
    shapes = {"q.lora_A.weight": (16, 384), "q.lora_B.weight": (384, 16), "head": (5, 384)}
    sizes = [s.size_bytes(shapes) for s in policy.ladder]
    index = {id(s): i for i, s in enumerate(policy.ladder)}
    assert policy.choose(shapes, 1e12, 10.0).describe() == "none"
    for vary in ("rate", "time"):
        last_index, last_size = -1, math.inf
        for x in np.geomspace(1e9, 1.0, 60):
            rate, left = (x, 2.0) if vary == "rate" else (1e6, x * 1e-6)
            chosen = policy.choose(shapes, rate, left)
            size = chosen.size_bytes(shapes)
            assert index[id(chosen)] >= last_index and size <= last_size
            assert size * 8 / rate <= 0.8 * left or size == min(sizes)
            last_index, last_size = index[id(chosen)], size
        assert last_size == min(sizes)


def test_adaptive_bytes_budget_without_deadline():
    shapes = SHAPE_SETS["lora"]
    assert Adaptive().choose(shapes, 1e3, None).describe() == "none"  # no limit at all
    budget = 2_000
    chosen = Adaptive(max_bytes=budget).choose(shapes, 1e3, None)
    assert chosen.size_bytes(shapes) <= budget < Adaptive().ladder[0].size_bytes(shapes)


def test_adaptive_with_a_deadline_and_a_bytes_budget_fits_the_smaller():
    shapes = SHAPE_SETS["lora"]
    fast = (1e9, 10.0)  # the time budget alone allows fp32
    assert Adaptive().choose(shapes, *fast).describe() == "none"
    budget = 2_000
    capped = Adaptive(max_bytes=budget).choose(shapes, *fast)
    assert capped.size_bytes(shapes) <= budget
    slow = (2e3, 1.0)  # 250 bytes of time budget: tighter than the cap
    tight = Adaptive(max_bytes=budget).choose(shapes, *slow)
    assert tight.describe() == Adaptive().choose(shapes, *slow).describe()


def test_adaptive_payload_names_the_chosen_setting_and_keeps_residuals():
    policy, state = Adaptive(), ClientCodecState()
    delta = make_delta(SHAPE_SETS["lora"])
    rng = np.random.default_rng(0)
    slow = policy.encode(delta, state, rng, rate_bps=2e3, time_left_s=1.0)
    chosen = policy.choose(shapes_of(delta), 2e3, 1.0)
    assert chosen.sparsifying and slow.describe() == chosen.describe() != "none"
    assert len(slow) == policy.size_bytes(shapes_of(delta), 2e3, 1.0) <= 200
    assert set(state.residuals) == set(delta)
    fast = policy.encode(delta, state, rng, rate_bps=1e12, time_left_s=1.0)
    assert fast.describe() == "none"
    total = {n: delta[n] * 2 for n in delta}
    both = {n: decode(slow)[n] + decode(fast)[n] for n in delta}
    assert relative_error(total, both) < 1e-6  # the dense round flushed the residual
    assert state.residuals == {}


@pytest.mark.parametrize("name", NAMES)
def test_any_corruption_raises(name):
    codec = CODECS.get(name)()
    payload = encode(codec, make_delta(SHAPE_SETS["odd"])).data
    positions = sorted({*range(0, len(payload), max(1, len(payload) // 150)),
                        *range(24), *range(len(payload) - 8, len(payload))})
    for pos in positions:
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(payload)
            bad[pos] ^= flip
            with pytest.raises(PayloadError):
                decode(bytes(bad))
    for cut in sorted({0, 1, 5, 12, len(payload) // 2, len(payload) - 4, len(payload) - 1}):
        with pytest.raises(PayloadError):
            decode(payload[:cut])
    with pytest.raises(PayloadError):
        decode(payload + b"\x00")


def test_consistent_crc_with_bad_header_still_raises():
    import struct
    import zlib

    payload = encode(CODECS.get("topk")(), make_delta(SHAPE_SETS["lora"])).data
    spec_len = struct.unpack_from("<H", payload, 9)[0]
    for spec in (b'{"codec":"nope"}', b'{"codec":"adaptive"}', b'{"codec":"qsgd","bits":3}',
                 b"[1, 2]", b'{"codec":"none"}'):
        body = payload[:11] + spec + payload[11 + spec_len:-4]
        body = body[:5] + struct.pack("<I", len(body) + 4) + body[9:11 - 2] + \
            struct.pack("<H", len(spec)) + body[11:]
        with pytest.raises(PayloadError):
            decode(body + struct.pack("<I", zlib.crc32(body)))


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_bytes(name):
    delta = make_delta(SHAPE_SETS["mixed"])
    codec = CODECS.get(name)()
    assert encode(codec, delta, seed=5).data == encode(codec, delta, seed=5).data


@pytest.mark.parametrize("codec", [QSGD(8), QSGD(2), TopKQSGD(0.5, bits=4)],
                         ids=lambda c: c.describe())
def test_different_seed_different_bytes(codec):
    delta = make_delta(SHAPE_SETS["lora"])
    assert encode(codec, delta, seed=1).data != encode(codec, delta, seed=2).data


@pytest.mark.parametrize(("name", "kwargs", "key"), [
    ("qsgd", {"bits": 3}, "bits"), ("qsgd", {"block_size": -1}, "block_size"),
    ("topk", {"ratio": 0.0}, "ratio"), ("topk", {"ratio": 1.5}, "ratio"),
    ("topk", {"values": "int8"}, "values"), ("topk-qsgd", {"bits": 16}, "bits"),
    ("lowrank", {"rank": 0}, "rank"), ("adaptive", {"safety_margin": 0}, "safety_margin"),
    ("adaptive", {"max_bytes": 0}, "max_bytes"),
])
def test_bad_settings_name_the_key_and_value(name, kwargs, key):
    """e.g. ``qsgd: bits must be one of 2, 4, 8, got 3``."""
    value = re.escape(repr(next(iter(kwargs.values()))))
    with pytest.raises(FedsimError, match=rf": {key} must be .*, got {value}$"):
        CODECS.get(name)(**kwargs)


def test_from_config_builds_the_named_codec_with_its_options():
    cfg = CODEC_CONFIGS.parse({"codec": "topk-qsgd", "bits": 4, "ratio": 0.05})
    assert from_config(cfg).describe() == "topk(ratio=0.05)+qsgd(bits=4)"
    assert isinstance(from_config(CODEC_CONFIGS.parse({"codec": "adaptive"})), Adaptive)


@pytest.mark.parametrize("name", NAMES)
def test_every_codec_config_builds_its_codec(name):
    codec = from_config(CODEC_CONFIGS.parse({"codec": name}))
    assert codec.name == name


def test_raw_bytes_and_relative_error():
    delta = make_delta(SHAPE_SETS["odd"])
    assert raw_bytes(delta) == 4 * (39 + 33 + 7 + 1)
    assert relative_error(delta, delta) == 0.0
    halved = {n: t / 2 for n, t in delta.items()}
    assert relative_error(delta, halved) == pytest.approx(0.5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shapes", ["lora", "odd"])
def test_the_reconstruction_is_what_decode_returns(name, shapes):
    """encode_update's reconstruction equals decoding its payload, bit for bit, error feedback
    included (the client measures its error without decoding its own bytes)."""
    delta = make_delta(SHAPE_SETS[shapes])
    state = ClientCodecState()
    codec = CODECS.get(name)()
    for seed in (0, 1):  # the second round carries the first one's residual
        enc = codec.encode_update(delta, state, np.random.default_rng(seed))
        dec = decode(enc.payload)
        assert dec.keys() == enc.reconstruction.keys()
        for k in dec:
            assert dec[k].dtype == enc.reconstruction[k].dtype
            assert torch.equal(dec[k], enc.reconstruction[k]), k

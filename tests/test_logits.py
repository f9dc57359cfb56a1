"""Top-k logits payload and adaptive k: round trips, exact sizes, the value bound, the index
codes' bits by hand, corruption, the adaptive choice on a worked example, config validation."""

from __future__ import annotations

import itertools
import math
import struct
import zlib

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fedsim import codecs
from fedsim.errors import FedsimError
from fedsim.logits import (
    INDEX_CODES,
    LogitsPayload,
    TopKLogitsConfig,
    budget_bytes,
    choose_k,
    decode,
    encode,
    index_code,
    size_bytes,
    top_k,
    value_error_bound,
)

HEADER = 27  # fixed header bytes before the segment lengths


def make_logits(positions: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(positions, vocab, generator=g) * scale


def increasing(xs, strict: bool = False) -> bool:
    return all(a < b if strict else a <= b for a, b in itertools.pairwise(xs))


def with_crc(data: bytes) -> bytes:
    """``data`` (trailer included) with its CRC32 recomputed: a consistent-looking payload."""
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


# --- round trip ------------------------------------------------------------------------------

# (positions, k, vocab, value bits), covering every index code and k = 1, k = V.
CASES = [
    (1, 1, 1, 16),  # V = 1: the one logit
    (5, 1, 1000, 16),  # k = 1: fixed
    (7, 1, 2, 8),
    (3, 2, 16, 8),  # fixed
    (33, 50, 300, 8),  # Elias-Fano
    (64, 128, 49152, 16),  # FATE-LLM's k on SmolLM2's vocabulary: Elias-Fano
    (64, 128, 49152, 8),
    (9, 250, 256, 16),  # near-full: bitmap
    (10, 300, 300, 16),  # full logits
    (4, 4, 4, 8),  # a 4-label classifier, full
]


@pytest.mark.parametrize(("positions", "k", "vocab", "value_bits"), CASES)
def test_round_trip_indices_exact_values_within_bound(positions, k, vocab, value_bits):
    x = make_logits(positions, vocab)
    payload = encode(x, k, value_bits)
    out = decode(payload)
    kept = top_k(x, k)
    assert (out.positions, out.k, out.vocab, out.lengths) == (positions, k, vocab, (positions,))
    assert out.indices.dtype == torch.int64 and out.values.dtype == torch.float32
    assert torch.equal(out.indices, kept.indices)
    assert torch.all(out.indices.diff(dim=1) > 0)  # ascending, distinct
    err = (out.values.double() - kept.values.double()).abs()
    assert torch.all(err <= value_error_bound(kept.values, value_bits))
    # The kept values are the row's k largest: none left out is larger than the smallest kept.
    assert torch.equal(kept.values, x.gather(1, kept.indices))
    left_out = x.clone().scatter_(1, kept.indices, -math.inf)
    assert torch.all(left_out.max(dim=1).values <= kept.values.min(dim=1).values)


def test_cases_cover_every_index_code():
    assert {index_code(v, k)[0] for _, k, v, _ in CASES} == set(range(len(INDEX_CODES)))


def test_full_logits_decode_to_the_logits_themselves():
    x = make_logits(6, 40)
    out = decode(encode(x, 40, 16))
    assert torch.equal(out.indices, torch.arange(40).expand(6, 40))
    assert torch.equal(out.dense(), x.half().float())  # fp16 is all the rounding there is


def test_dense_fills_what_was_not_sent():
    x = make_logits(3, 20)
    out = decode(encode(x, 5, 16))
    dense = out.dense(fill=-1e9)
    assert torch.equal((dense > -1e9).sum(dim=1), torch.full((3,), 5))
    assert torch.equal(dense.gather(1, out.indices), out.values)


def test_segment_lengths_and_numpy_input_round_trip():
    x = make_logits(10, 50).numpy().astype(np.float64)
    payload = encode(x, 7, 8, lengths=[3, 6, 1])
    assert decode(payload).lengths == (3, 6, 1)
    assert len(payload) == size_bytes(10, 7, 50, 8, segments=3)
    assert payload.spec() == {"positions": 10, "vocab": 50, "k": 7, "value_bits": 8,
                              "index_code": "elias-fano", "lengths": [3, 6, 1]}


def test_payload_is_a_codecs_payload_and_encoding_is_deterministic():
    x = make_logits(8, 100)
    a, b = encode(x, 10), encode(x.clone(), 10)
    assert isinstance(a, LogitsPayload) and isinstance(a, codecs.Payload)
    assert a.data == b.data
    assert decode(a.data).k == 10  # bytes decode as well as the payload
    assert a.describe() == "topk-logits(k=10,vocab=100,bits=16)"


# --- exact size ------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [1, 2, 3, 5, 16, 17, 100, 257, 1000, 4096])
@pytest.mark.parametrize("value_bits", [16, 8])
def test_size_bytes_is_the_payload_length(vocab, value_bits):
    ks = sorted({1, 2, 3, vocab // 3, vocab // 2, vocab - 1, vocab} & set(range(1, vocab + 1)))
    for positions in (1, 3, 8):
        x = make_logits(positions, vocab, seed=positions)
        for k in ks:
            for lengths in ([positions], [1] * positions):
                payload = encode(x, k, value_bits, lengths=lengths)
                assert len(payload) == size_bytes(positions, k, vocab, value_bits,
                                                  segments=len(lengths)), (positions, k)


def test_size_bytes_by_hand_for_the_worked_example():
    # 64 positions, k = 128, V = 49152: Elias-Fano l = 8, 8·128 + 128 + 191 + 1 = 1344 bits a
    # row = 168 bytes, 64 rows = 10752; header and trailer 35.
    assert size_bytes(64, 128, 49152, 16) == 35 + 10752 + 64 * 128 * 2 == 27171
    assert size_bytes(64, 128, 49152, 8) == 35 + 10752 + 64 * 8 + 64 * 128 == 19491
    assert size_bytes(64, 49152, 49152, 16) == 35 + 64 * 49152 * 2 == 6291491  # full fp16


@pytest.mark.parametrize("vocab", [2, 7, 64, 1000, 30522, 49152])
def test_size_grows_with_k_below_the_vocabulary(vocab):
    """What choose_k's binary search relies on (k = V, sending no indices, is apart)."""
    ks = range(1, vocab) if vocab <= 1000 else range(1, vocab, 97)
    for bits in (16, 8):
        sizes = [size_bytes(4, k, vocab, bits) for k in ks]
        assert increasing(sizes, strict=True)


def test_size_bytes_rejects_bad_sizes():
    with pytest.raises(FedsimError, match=r"k must be an integer in \[1, 10\], got 11"):
        size_bytes(4, 11, 10)
    with pytest.raises(FedsimError, match="value_bits must be 16 or 8, got 4"):
        size_bytes(4, 2, 10, 4)
    with pytest.raises(FedsimError, match="positions"):
        size_bytes(0, 2, 10)
    with pytest.raises(FedsimError, match="4 GiB"):
        size_bytes(2**20, 2**12, 2**12)


# --- values ----------------------------------------------------------------------------------


def test_fp16_bound_holds_from_tiny_to_huge_values():
    x = torch.tensor([[1e-8, -3e-6, 0.1, 7.3, -70000.0, 1e5, 123.456, 0.0]])
    out = decode(encode(x, 8, 16))
    err = (out.values.double() - x.double()).abs()
    bound = value_error_bound(x, 16)
    assert torch.all(err <= bound)
    assert out.values[0, 4] == -65504.0 and out.values[0, 5] == 65504.0  # clipped to fp16
    assert float(bound[0, 3]) == pytest.approx(7.3 * 2**-11)


def test_8bit_bound_is_half_a_step_and_nearly_reached():
    x = make_logits(200, 64, scale=5.0)
    x[0] = 2.5  # a constant row: step 0, exact
    x[1, :] = torch.linspace(-1000.0, 1000.0, 64)  # a wide row
    out = decode(encode(x, 64, 8))
    err = (out.values.double() - x.double()).abs()
    assert torch.all(err <= value_error_bound(x, 8))
    assert torch.all(out.values[0] == 2.5)
    step_half = (x.double().max(dim=1).values - x.double().min(dim=1).values) / 510
    assert float((err.max(dim=1).values[2:] / step_half[2:]).max()) > 0.9  # the bound is tight
    assert float(err[1].max()) <= 2000 / 510 + 1e-3


# --- index codes by hand ---------------------------------------------------------------------


def test_index_code_bits_by_hand():
    assert index_code(1000, 1) == (1, 10)  # fixed 10 < Elias-Fano 9 + 1 + 1 + 1 = 12
    assert index_code(1000, 10) == (2, 86)  # l = 6: 60 + 10 + 15 + 1 = 86 < fixed 100
    assert index_code(256, 8) == (2, 56)  # l = 5: 40 + 8 + 7 + 1 = 56 < fixed 64
    assert index_code(64, 4) == (1, 24)  # a tie, fixed 24 = Elias-Fano 16 + 4 + 3 + 1: fixed
    assert index_code(16, 12) == (3, 16)  # bitmap 16 < Elias-Fano 28 < fixed 48
    assert index_code(49152, 128) == (2, 1344)
    assert index_code(77, 77) == (0, 0)  # full logits: no indices


@pytest.mark.parametrize("vocab", [2, 9, 100, 1000])
def test_index_code_is_codecs_elias_fano_or_bitmap_or_shorter(vocab):
    for k in range(1, vocab):
        fixed = k * math.ceil(math.log2(vocab))
        assert index_code(vocab, k)[1] == min(codecs.index_bits(vocab, k), fixed)


def logits_with_top(vocab: int, idx: list[int]) -> torch.Tensor:
    """One row whose largest logits are exactly at ``idx``."""
    x = torch.zeros(1, vocab)
    x[0, idx] = torch.arange(1, len(idx) + 1, dtype=torch.float32)
    return x


def test_fixed_code_bytes_by_hand():
    # V = 16: 4 bits an index; 3 = 0011, 9 = 1001: one byte 0x39 after the 31 header bytes.
    data = encode(logits_with_top(16, [9, 3]), 2).data
    assert data[HEADER + 4:HEADER + 5] == bytes([0x39])
    assert len(data) == 31 + 1 + 2 * 2 + 4


def test_elias_fano_bytes_by_hand():
    # V = 256, k = 8, l = 5: low parts (idx & 31) in 5 bits each, then the high parts
    # (idx >> 5: 0 1 1 3 4 6 6 7) + rank (0..7) set bits 0 2 3 6 8 11 12 14 of 16.
    idx = [1, 40, 41, 100, 130, 200, 201, 255]
    lows = "00001" "01000" "01001" "00100" "00010" "01000" "01001" "11111"
    upper = "1011001010011010"
    expected = int(lows + upper, 2).to_bytes(7, "big")
    payload = encode(logits_with_top(256, idx), 8)
    assert payload.data[HEADER + 4:HEADER + 11] == expected
    assert decode(payload).indices.tolist() == [idx]


# --- corruption ------------------------------------------------------------------------------


def test_every_flipped_byte_is_caught():
    data = encode(make_logits(3, 30), 5, 8, lengths=[2, 1]).data
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x10
        with pytest.raises(codecs.PayloadError):
            decode(bytes(bad))


def test_truncated_or_extended_payload_is_caught():
    data = encode(make_logits(4, 30), 5).data
    for cut in (0, 1, 9, HEADER, len(data) // 2, len(data) - 1):
        with pytest.raises(codecs.PayloadError):
            decode(data[:cut])
    with pytest.raises(codecs.PayloadError, match="its header says"):
        decode(data + b"\0")
    with pytest.raises(codecs.PayloadError, match="bad magic"):
        codecs.decode(data)  # the weight codecs' decoder refuses it, with the same error


def test_consistent_crc_but_bad_content_is_caught():
    data = bytearray(encode(logits_with_top(16, [9, 3]), 2).data)
    data[HEADER + 4] = 0x93  # indices 9, 3: not ascending
    with pytest.raises(codecs.PayloadError, match="ascending"):
        decode(with_crc(bytes(data)))
    data = bytearray(encode(logits_with_top(16, [9, 3]), 2).data)
    struct.pack_into("<I", data, 17, 17)  # k = 17 > V = 16
    with pytest.raises(codecs.PayloadError, match="inconsistent header"):
        decode(with_crc(bytes(data)))
    ef = bytearray(encode(logits_with_top(256, [1, 40, 41, 100, 130, 200, 201, 255]), 8).data)
    ef[HEADER + 10] |= 0x01  # a ninth high-part bit
    with pytest.raises(codecs.PayloadError, match="Elias-Fano"):
        decode(with_crc(bytes(ef)))
    lengths = bytearray(encode(make_logits(3, 10), 2).data)
    struct.pack_into("<I", lengths, HEADER, 2)  # one segment of 2 positions, 3 sent
    with pytest.raises(codecs.PayloadError, match="segment lengths"):
        decode(with_crc(bytes(lengths)))


def test_encode_rejects_bad_input():
    x = make_logits(3, 10)
    with pytest.raises(FedsimError, match="2-D float"):
        encode(x[None], 2)
    with pytest.raises(FedsimError, match="2-D float"):
        encode(torch.ones(3, 10, dtype=torch.int64), 2)
    nan = x.clone()
    nan[1, 2] = math.nan
    with pytest.raises(FedsimError, match="finite, got 1"):
        encode(nan, 2)
    with pytest.raises(FedsimError, match=r"k must be an integer in \[1, 10\], got 0"):
        encode(x, 0)
    with pytest.raises(FedsimError, match="value_bits must be 16 or 8, got 32"):
        encode(x, 2, 32)
    with pytest.raises(FedsimError, match="lengths must sum to the 3 positions"):
        encode(x, 2, lengths=[1, 1])


# --- adaptive k ------------------------------------------------------------------------------


def test_choose_k_worked_example():
    # 4 positions, V = 1000, fp16. k = 10: 35 + ceil(4·86 / 8) = 43 + 4·10·2 = 80 -> 158 bytes;
    # k = 11: Elias-Fano 66 + 11 + 15 + 1 = 93 bits a row -> 35 + 47 + 88 = 170 bytes.
    assert size_bytes(4, 10, 1000) == 158 and size_bytes(4, 11, 1000) == 170
    common = {"positions": 4, "vocab": 1000, "k_min": 1, "k_max": 1000, "safety_margin": 1.0}
    assert choose_k(1280.0, 1.0, **common) == 10  # 160 bytes
    assert choose_k(1359.0, 1.0, **common) == 10  # 169.9 bytes
    assert choose_k(1360.0, 1.0, **common) == 11  # 170 bytes
    assert choose_k(1600.0, 1.0, **common | {"safety_margin": 0.85}) == 11  # 0.85·200 = 170


@pytest.mark.parametrize(("positions", "vocab", "value_bits"),
                         [(4, 1000, 16), (16, 300, 8), (3, 12, 16), (2, 49152, 8)])
def test_choose_k_is_the_largest_fitting_k(positions, vocab, value_bits):
    k_max = vocab if vocab <= 1000 else 600
    ks = range(2, k_max + 1)
    sizes = {k: size_bytes(positions, k, vocab, value_bits) for k in ks}
    for budget in [*sorted(set(sizes.values()))[::7], 1.0, 1e12]:
        fit = [k for k in ks if sizes[k] <= budget]
        want = max(fit) if fit else 2
        # rate_bps = 8·budget / time_left_s: the budget in bytes, exactly
        assert choose_k(8 * budget, 1.0, positions, vocab, k_min=2, k_max=k_max,
                        value_bits=value_bits, safety_margin=1.0) == want


def test_choose_k_grows_with_rate_and_time_left():
    rates = np.geomspace(1e3, 1e9, 60)
    ks = [choose_k(float(r), 0.5, 64, 49152, k_min=16, k_max=1024) for r in rates]
    assert increasing(ks)
    assert ks[0] == 16 and ks[-1] == 1024 and len(set(ks)) > 10
    uploads = [size_bytes(64, k, 49152) for k in ks]
    assert increasing(uploads)
    times = np.geomspace(1e-3, 1e3, 60)
    kt = [choose_k(1e6, float(t), 64, 49152, k_min=16, k_max=1024) for t in times]
    assert increasing(kt) and len(set(kt)) > 10


def test_choose_k_is_clipped_to_its_bounds_and_the_vocabulary():
    args = {"positions": 64, "vocab": 49152, "k_min": 16, "k_max": 1024}
    assert choose_k(0.0, 10.0, **args) == 16  # nothing fits: k_min
    assert choose_k(1e6, -1.0, **args) == 16  # the deadline passed
    assert choose_k(math.inf, 1.0, **args) == 1024
    small = {"positions": 8, "vocab": 4}
    assert choose_k(1e9, 1.0, **small, k_min=1, k_max=128) == 4  # full logits
    assert choose_k(0.0, 1.0, **small, k_min=16, k_max=128) == 4  # k_min above V: V
    with pytest.raises(FedsimError, match="k_max must be an integer in"):
        choose_k(1e6, 1.0, **small, k_min=8, k_max=4)
    with pytest.raises(FedsimError, match="rate_bps must be a number, got nan"):
        choose_k(math.nan, 1.0, **small, k_min=1, k_max=4)


def test_budget_bytes():
    assert budget_bytes(8e6, 2.0, 0.5) == 1e6  # 0.5 · 8 Mbit/s · 2 s / 8 bits a byte
    assert budget_bytes(-1.0, 2.0) == 0.0
    with pytest.raises(FedsimError, match="safety_margin must be in"):
        budget_bytes(1.0, 1.0, 0.0)


# --- config ----------------------------------------------------------------------------------


def test_config_defaults_and_k_for():
    cfg = TopKLogitsConfig()
    assert (cfg.k, cfg.adaptive, cfg.k_min, cfg.k_max, cfg.value_bits) == (128, False, 16, 1024,
                                                                         16)
    assert cfg.k_for(1.0, 1.0, 64, 49152) == 128  # fixed: the channel does not matter
    assert cfg.k_for(1.0, 1.0, 64, 4) == 4  # capped at the vocabulary
    assert TopKLogitsConfig(k="full").k_for(1.0, 1.0, 64, 49152) == 49152
    adaptive = TopKLogitsConfig(adaptive=True, value_bits=8, k_min=4, k_max=256)
    assert adaptive.k_for(2e6, 0.3, 64, 49152) == choose_k(
        2e6, 0.3, 64, 49152, k_min=4, k_max=256, value_bits=8, safety_margin=0.8)
    with pytest.raises(ValidationError):
        cfg.k = 3  # frozen


@pytest.mark.parametrize(("doc", "message"), [
    ({"k": 0}, "k must be an integer >= 1 or 'full', got 0"),
    ({"k": "all"}, "k must be an integer >= 1 or 'full', got 'all'"),
    ({"k": True}, "k must be an integer >= 1 or 'full', got True"),
    ({"k_min": 0}, r"k_min\n.*greater than or equal to 1.*input_value=0"),
    ({"k_max": -5}, r"k_max\n.*greater than or equal to 1.*input_value=-5"),
    ({"k_min": 64, "k_max": 32}, "k_min must be <= k_max, got k_min=64, k_max=32"),
    ({"value_bits": 4}, r"value_bits\n.*16 or 8.*input_value=4"),
    ({"safety_margin": 1.5}, r"safety_margin\n.*less than or equal to 1.*input_value=1.5"),
    ({"adaptive": "sometimes"}, r"adaptive\n.*valid boolean.*input_value='sometimes'"),
    ({"top_k": 3}, r"top_k\n.*Extra inputs are not permitted"),
])
def test_config_errors_name_the_key_and_value(doc, message):
    with pytest.raises(ValidationError, match=message):
        TopKLogitsConfig(**doc)

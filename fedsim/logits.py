"""Top-k logits as real bytes, and the channel-adaptive choice of k (distillation's payload).

A client distilling into the server sends, for each position of the round's proxy batch (a
token of a text; classification: an example), the k largest of its logits over the vocabulary
(classification: over the labels). :func:`encode` turns a (positions × vocabulary) tensor into a
:class:`LogitsPayload`; ``len(payload)`` is what the simulated uplink carries, and
:func:`size_bytes` gives that length from the sizes alone (the adaptive choice sizes candidate
k's without encoding). :func:`decode` gives back a :class:`TopKLogits`: the indices exactly, the
values within :func:`value_error_bound`. k = vocabulary is the full-logits reference.

Wire format (version 1; integers little-endian), in the spirit of :mod:`fedsim.codecs`::

    offset  size  field
    0       4     magic b"FSLG"
    4       1     format version (1)
    5       4     total payload length in bytes, trailer included (u32): truncation is seen
                  before anything else is read
    9       4     P: positions (u32)
    13      4     V: vocabulary size (u32)
    17      4     k: logits kept per position, 1 <= k <= V (u32)
    21      1     value bits (u8: 16 or 8)
    22      1     index code (u8: 0 all, 1 fixed, 2 Elias-Fano, 3 bitmap; a function of V, k)
    23      4     S: segments, e.g. the texts of the batch (u32)
    27      4·S   segment lengths in positions (u32 each, >= 1), summing to P
    27+4S   ...   indices: P rows of b bits each (:func:`index_code`), packed MSB first without
                  padding between rows, the last byte zero-padded: ceil(P·b / 8) bytes
    ...     ...   values: 16 bits: P·k float16; 8 bits: P (offset, step) float32 pairs, then
                  P·k uint8 codes (row by row, in the rows' index order)
    end-4   4     CRC32 (zlib.crc32) of every byte before it (u32)

Header bytes = 31 + 4·S, trailer included. Each row's indices are sent sorted ascending, by the
shortest of three codes (ties go to the earlier one); k = V sends none (code 0, ``all``):

- ``fixed``: each index in w = ceil(log2 V) bits: k·w bits.
- ``elias-fano`` (as :func:`fedsim.codecs.index_bits`): l = floor(log2(V / k)) low bits of each
  index verbatim, then a unary code of the high parts in k + ((V − 1) >> l) + 1 bits.
- ``bitmap``: V bits, one per vocabulary entry (shortest when k is near V).

Example: V = 49152, k = 128: fixed 2048 bits, Elias-Fano 1344 (l = 8), bitmap 49152: 168 bytes a
row against 256 for the values at 16 bits. Fixed wins only for k <= 4 or so (V = 49152, k = 1:
16 bits against 18), the bitmap from k > V / 4.

Values. 16 bits: float16, clipped to ±65504; |x − x̂| <= max(2⁻¹¹·|x|, 2⁻²⁵) (round to nearest).
8 bits: a per-row affine code on the raw logits, offset = the row's minimum lo, step = (hi −
lo) / 255, code = round((x − lo) / step); |x − x̂| <= (hi − lo) / 510, plus float32 rounding.
Why affine on logits and not log-softmax: softmax is shift-invariant, so a row's offset costs
nothing in meaning, and the top-k of a row typically spans a few nats, so the step is small;
an error δ in every logit moves each top-k probability by a factor within e^(±2δ/T) at
temperature T.
Rows of equal logits have step 0 and decode exactly.

The adaptive k (arXiv 2509.01750, communication-aware distillation over wireless networks): the
largest k in [k_min, k_max] whose payload fits safety_margin · rate_bps · time_left_s / 8 bytes
(:func:`choose_k`); none fits: k_min. :class:`TopKLogitsConfig` holds the setting.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsim.codecs import FP16_MAX, Payload, PayloadError
from fedsim.errors import FedsimError
from fedsim.plugins import TopKLogitsConfig  # noqa: F401  (its home: configs stay torch-free)

MAGIC = b"FSLG"
VERSION = 1
VALUE_BITS = (16, 8)
INDEX_CODES = ("all", "fixed", "elias-fano", "bitmap")  # header byte = position in this tuple
_U32_MAX = 2**32 - 1
_FIXED = struct.Struct("<4sBIIIIBBI")  # magic, version, total, P, V, k, value bits, code, S
_CRC = struct.Struct("<I")
_PAIR_BYTES = 8  # one row's (offset, step) float32 pair at 8 bits


class LogitsPayload(Payload):
    """The bytes of one top-k logits upload; ``len(payload)`` is the number of bytes on the
    wire. A :class:`fedsim.codecs.Payload`, so whatever carries an update's bytes carries it."""

    def spec(self) -> dict[str, Any]:
        """The header's fields (after the length and CRC checks)."""
        h = _read_header(self.data)
        return {"positions": h.positions, "vocab": h.vocab, "k": h.k,
                "value_bits": h.value_bits, "index_code": INDEX_CODES[h.code],
                "lengths": list(h.lengths)}

    def describe(self) -> str:
        h = _read_header(self.data)
        return f"topk-logits(k={h.k},vocab={h.vocab},bits={h.value_bits})"


@dataclass(frozen=True)
class TopKLogits:
    """Per position, the k kept logits: ``indices`` (P, k) int64, ascending in each row, and
    ``values`` (P, k) float32 at those indices; ``lengths``: positions per segment (sum P)."""

    indices: torch.Tensor
    values: torch.Tensor
    vocab: int
    lengths: tuple[int, ...]

    @property
    def positions(self) -> int:
        return self.indices.shape[0]

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def dense(self, fill: float = -math.inf) -> torch.Tensor:
        """(P, V) float32: the kept logits at their indices, ``fill`` elsewhere."""
        out = torch.full((self.positions, self.vocab), fill, dtype=torch.float32)
        return out.scatter_(1, self.indices, self.values)


# --- checks ----------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def check_count(key: str, v: Any) -> int:
    """``v`` as an integer >= 1 (a clear error naming ``key`` otherwise)."""
    return _check_int(key, v, 1)


def _check_int(key: str, v: Any, low: int, high: int = _U32_MAX) -> int:
    if not _is_int(v) or not low <= v <= high:
        raise FedsimError(f"{key} must be an integer in [{low}, {high}], got {v!r}")
    return int(v)


def _check_value_bits(v: Any) -> int:
    if not _is_int(v) or v not in VALUE_BITS:
        raise FedsimError(f"value_bits must be 16 or 8, got {v!r}")
    return int(v)


def _check_lengths(lengths: Sequence[int] | None, positions: int) -> tuple[int, ...]:
    """Segment lengths (positions per text); None: one segment of every position."""
    if lengths is None:
        return (positions,)
    out = tuple(_check_int("lengths[i]", n, 1) for n in lengths)
    if not out or sum(out) != positions:
        raise FedsimError(f"lengths must sum to the {positions} positions, got {list(out)}")
    return out


def _as_logits(logits: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A finite float (P, V) tensor, as float32 on the CPU."""
    x = torch.as_tensor(logits)
    if x.dim() != 2 or not x.is_floating_point():
        raise FedsimError(f"logits must be a 2-D float tensor (positions × vocabulary), got "
                          f"{x.dtype} of shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float32)
    _check_int("positions", x.shape[0], 1)
    _check_int("vocab", x.shape[1], 1)
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise FedsimError(f"logits must be finite, got {bad} inf or NaN values")
    return x


# --- sizes -----------------------------------------------------------------------------------


def _ef_low_bits(vocab: int, k: int) -> int:
    """l = floor(log2(V / k)): the low bits of each index sent verbatim by Elias-Fano."""
    return (vocab // k).bit_length() - 1


def index_code(vocab: int, k: int) -> tuple[int, int]:
    """(code, bits per row) of the shortest index code for k sorted indices in [0, V)."""
    vocab, k = _check_int("vocab", vocab, 1), _check_int("k", k, 1, vocab)
    if k == vocab:
        return 0, 0  # every index is sent: nothing to say which
    fixed = k * (vocab - 1).bit_length()  # ceil(log2 V) bits each
    low = _ef_low_bits(vocab, k)
    elias_fano = k * low + k + ((vocab - 1) >> low) + 1
    bits = (fixed, elias_fano, vocab)
    best = min(bits)
    return 1 + bits.index(best), best


def _values_bytes(positions: int, k: int, value_bits: int) -> int:
    if value_bits == 16:
        return 2 * positions * k
    return _PAIR_BYTES * positions + positions * k


def _payload_bytes(positions: int, k: int, vocab: int, value_bits: int, segments: int) -> int:
    """Header + indices + values + trailer, for checked sizes."""
    _, row_bits = index_code(vocab, k)
    return (_FIXED.size + 4 * segments + math.ceil(positions * row_bits / 8)
            + _values_bytes(positions, k, value_bits) + _CRC.size)


def size_bytes(positions: int, k: int, vocab: int, value_bits: int = 16,
               segments: int = 1) -> int:
    """Exact length in bytes of :func:`encode`'s payload for these sizes, without encoding."""
    positions = _check_int("positions", positions, 1)
    segments = _check_int("segments", segments, 1, positions)
    total = _payload_bytes(positions, k, vocab, _check_value_bits(value_bits), segments)
    if total > _U32_MAX:
        raise FedsimError(f"a payload of {total} bytes exceeds the format's 4 GiB limit")
    return total


def value_error_bound(values: torch.Tensor, value_bits: int) -> torch.Tensor:
    """The largest |x − x̂| the value code allows for each of a (P, k) set of kept logits."""
    x = values.detach().double().abs()
    if _check_value_bits(value_bits) == 16:
        rounding = torch.clamp(x * 2.0**-11, min=2.0**-25)  # half an fp16 ulp
        return torch.where(x > FP16_MAX, x - FP16_MAX, rounding)
    lo, hi = values.double().min(dim=1).values, values.double().max(dim=1).values
    float32_slack = 2.0**-22 * torch.maximum(lo.abs(), hi.abs())  # offset, step and x̂ rounding
    return ((hi - lo) / 510 + float32_slack)[:, None].expand_as(x)


# --- bit fields ------------------------------------------------------------------------------


def _bits(ints: np.ndarray, width: int) -> np.ndarray:
    """(rows, n) unsigned ints (< 2**width) as (rows, n·width) 0/1 uint8, MSB first."""
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    bits = (ints[..., None] >> shifts) & 1
    return bits.astype(np.uint8).reshape(ints.shape[0], -1)


def _ints(bits: np.ndarray, width: int) -> np.ndarray:
    """Inverse of :func:`_bits`: (rows, n·width) bits -> (rows, n) int64."""
    rows = bits.shape[0]
    if width == 0:
        return np.zeros((rows, 0), np.int64)
    weights = np.int64(1) << np.arange(width - 1, -1, -1, dtype=np.int64)
    return bits.reshape(rows, -1, width).astype(np.int64) @ weights


def _encode_indices(idx: np.ndarray, vocab: int, code: int) -> np.ndarray:
    """(P, k) sorted indices -> (P, row bits) 0/1 by ``code``."""
    rows, k = idx.shape
    if code == 0:
        return np.zeros((rows, 0), np.uint8)
    if code == 1:
        return _bits(idx, (vocab - 1).bit_length())
    if code == 3:
        bits = np.zeros((rows, vocab), np.uint8)
        np.put_along_axis(bits, idx, 1, axis=1)
        return bits
    low = _ef_low_bits(vocab, k)
    upper = np.zeros((rows, k + ((vocab - 1) >> low) + 1), np.uint8)
    np.put_along_axis(upper, (idx >> low) + np.arange(k), 1, axis=1)  # unary high parts
    return np.concatenate([_bits(idx & ((1 << low) - 1), low), upper], axis=1)


def _ones_per_row(bits: np.ndarray, k: int, what: str) -> np.ndarray:
    """The column of each 1 in each row, (P, k); PayloadError unless every row holds k."""
    if np.any(bits.sum(axis=1) != k):
        raise PayloadError(f"{what} index code does not hold {k} indices in every row")
    return np.nonzero(bits)[1].reshape(bits.shape[0], k)


def _decode_indices(bits: np.ndarray, vocab: int, k: int, code: int) -> np.ndarray:
    """(P, row bits) -> (P, k) int64, checked to be ascending and below ``vocab``."""
    rows = bits.shape[0]
    if code == 0:
        return np.broadcast_to(np.arange(vocab, dtype=np.int64), (rows, vocab)).copy()
    if code == 1:
        idx = _ints(bits, (vocab - 1).bit_length())
    elif code == 3:
        idx = _ones_per_row(bits, k, "bitmap")
    else:
        low = _ef_low_bits(vocab, k)
        high = _ones_per_row(bits[:, k * low:], k, "Elias-Fano") - np.arange(k)
        idx = (high << low) | _ints(bits[:, :k * low], low)
    if np.any(idx >= vocab) or np.any(np.diff(idx, axis=1) <= 0):
        raise PayloadError("indices are not k ascending distinct vocabulary entries per row")
    return idx


# --- values ----------------------------------------------------------------------------------


def _encode_values(values: np.ndarray, value_bits: int) -> bytes:
    """(P, k) float32 -> bytes: float16, or per-row (offset, step) float32 and uint8 codes."""
    if value_bits == 16:
        return np.clip(values, -FP16_MAX, FP16_MAX).astype("<f2").tobytes()
    lo = values.min(axis=1).astype(np.float32)  # exact: the values are float32
    step = ((values.max(axis=1).astype(np.float64) - lo) / 255).astype(np.float32)
    scale = np.where(step > 0, step, 1.0).astype(np.float64)[:, None]
    codes = np.clip(np.rint((values - lo[:, None].astype(np.float64)) / scale), 0, 255)
    pairs = np.stack([lo, step], axis=1).astype("<f4")
    return pairs.tobytes() + codes.astype(np.uint8).tobytes()


def _decode_values(buf: bytes, positions: int, k: int, value_bits: int) -> np.ndarray:
    if value_bits == 16:
        out = np.frombuffer(buf, "<f2").astype(np.float32).reshape(positions, k)
        if not np.all(np.isfinite(out)):
            raise PayloadError("float16 logit values are not finite")
        return out
    split = _PAIR_BYTES * positions
    pairs = np.frombuffer(buf[:split], "<f4").reshape(positions, 2).astype(np.float64)
    if not np.all(np.isfinite(pairs)) or np.any(pairs[:, 1] < 0):
        raise PayloadError("8-bit logit offsets or steps are negative or not finite")
    codes = np.frombuffer(buf[split:], np.uint8).reshape(positions, k)
    return (pairs[:, :1] + codes * pairs[:, 1:]).astype(np.float32)


# --- payload ---------------------------------------------------------------------------------


def top_k(logits: torch.Tensor | np.ndarray, k: int,
          lengths: Sequence[int] | None = None) -> TopKLogits:
    """The k largest logits of each row (exact values), indices ascending in each row."""
    x = _as_logits(logits)
    positions, vocab = x.shape
    k = _check_int("k", k, 1, vocab)
    lengths = _check_lengths(lengths, positions)
    if k == vocab:  # full logits: every index, in order
        idx = torch.arange(vocab).expand(positions, vocab).contiguous()
        return TopKLogits(idx, x.clone(), vocab, lengths)
    values, idx = torch.topk(x, k, dim=1, sorted=False)
    idx, order = idx.sort(dim=1)
    return TopKLogits(idx, values.gather(1, order), vocab, lengths)


def encode(logits: torch.Tensor | np.ndarray, k: int, value_bits: int = 16,
           lengths: Sequence[int] | None = None) -> LogitsPayload:
    """The top-k of each row of (P, V) ``logits`` as a payload; ``lengths``: positions per
    segment (texts of the batch), None for one segment."""
    value_bits = _check_value_bits(value_bits)
    top = top_k(logits, k, lengths)
    code, _ = index_code(top.vocab, top.k)
    total = size_bytes(top.positions, top.k, top.vocab, value_bits, len(top.lengths))
    idx_bits = _encode_indices(top.indices.numpy(), top.vocab, code)
    head = _FIXED.pack(MAGIC, VERSION, total, top.positions, top.vocab, top.k, value_bits, code,
                       len(top.lengths))
    body = (struct.pack(f"<{len(top.lengths)}I", *top.lengths)
            + np.packbits(idx_bits.ravel()).tobytes()
            + _encode_values(top.values.numpy(), value_bits))
    data = head + body
    return LogitsPayload(data + _CRC.pack(zlib.crc32(data)))


@dataclass(frozen=True)
class _Header:
    positions: int
    vocab: int
    k: int
    value_bits: int
    code: int
    lengths: tuple[int, ...]
    body: bytes  # indices then values


def _read_header(data: bytes) -> _Header:
    """Check magic, version, length and CRC, then the header's fields (PayloadError if bad)."""
    data = bytes(data)
    end = len(data) - _CRC.size
    if end < _FIXED.size:
        raise PayloadError(f"truncated payload: {len(data)} bytes")
    magic, version, total, positions, vocab, k, value_bits, code, segments = \
        _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise PayloadError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise PayloadError(f"unsupported logits payload format version {version}")
    if total != len(data):
        raise PayloadError(f"payload has {len(data)} bytes, its header says {total}")
    if zlib.crc32(data[:end]) != _CRC.unpack_from(data, end)[0]:
        raise PayloadError("CRC32 mismatch: corrupt payload")
    if not (1 <= k <= vocab and 1 <= segments <= positions and value_bits in VALUE_BITS):
        raise PayloadError(f"inconsistent header: P={positions}, V={vocab}, k={k}, "
                           f"value bits {value_bits}, {segments} segments")
    if code != index_code(vocab, k)[0]:
        raise PayloadError(f"index code {code} is not the one for V={vocab}, k={k}")
    start = _FIXED.size + 4 * segments
    if start > end:
        raise PayloadError("segment lengths run past the end of the payload")
    lengths = struct.unpack_from(f"<{segments}I", data, _FIXED.size)
    if sum(lengths) != positions or min(lengths) < 1:
        raise PayloadError(f"segment lengths {list(lengths)} are not >= 1 summing to the "
                           f"{positions} positions")
    needed = _payload_bytes(positions, k, vocab, value_bits, segments)
    if total != needed:
        raise PayloadError(f"payload has {total} bytes, its header's sizes need {needed}")
    return _Header(positions, vocab, k, value_bits, code, lengths, data[start:end])


def decode(payload: Payload | bytes) -> TopKLogits:
    """The kept logits of a payload: indices exact, values within :func:`value_error_bound`."""
    h = _read_header(payload.data if isinstance(payload, Payload) else payload)
    row_bits = index_code(h.vocab, h.k)[1]
    split = math.ceil(h.positions * row_bits / 8)
    bits = np.unpackbits(np.frombuffer(h.body[:split], np.uint8), count=h.positions * row_bits)
    idx = _decode_indices(bits.reshape(h.positions, row_bits), h.vocab, h.k, h.code)
    values = _decode_values(h.body[split:], h.positions, h.k, h.value_bits)
    return TopKLogits(torch.from_numpy(idx), torch.from_numpy(values), h.vocab, h.lengths)


# --- adaptive k ------------------------------------------------------------------------------


def budget_bytes(rate_bps: float, time_left_s: float, safety_margin: float = 0.8) -> float:
    """Bytes the uplink moves before the deadline: safety_margin · rate_bps · time_left_s / 8
    (a negative rate or time left: 0). The margin absorbs the rate estimate's error."""
    for key, v in (("rate_bps", rate_bps), ("time_left_s", time_left_s)):
        if not _is_number(v) or math.isnan(v):
            raise FedsimError(f"{key} must be a number, got {v!r}")
    if not _is_number(safety_margin) or not 0 < safety_margin <= 1:
        raise FedsimError(f"safety_margin must be in (0, 1], got {safety_margin!r}")
    if rate_bps <= 0 or time_left_s <= 0:
        return 0.0
    return safety_margin * rate_bps * time_left_s / 8  # bits/s · s / (bits per byte)


def choose_k(rate_bps: float, time_left_s: float, positions: int, vocab: int, *,
             k_min: int, k_max: int, value_bits: int = 16, safety_margin: float = 0.8,
             segments: int = 1) -> int:
    """The largest k in [k_min, k_max] (capped at V) whose payload fits the channel before the
    deadline (:func:`budget_bytes`); none fits: k_min (the round policy drops a late upload).

    ``size_bytes`` grows with k on [1, V − 1] (each index code and the values grow with k), so
    a binary search finds the largest fit; k = V sends no indices and is checked on its own.
    """
    budget = budget_bytes(rate_bps, time_left_s, safety_margin)
    vocab = _check_int("vocab", vocab, 1)
    k_min = _check_int("k_min", k_min, 1)
    k_max = _check_int("k_max", k_max, k_min)
    high = min(k_max, vocab)
    low = min(k_min, high)

    def fits(k: int) -> bool:
        return size_bytes(positions, k, vocab, value_bits, segments) <= budget

    if high == vocab and fits(vocab):
        return vocab
    high = min(high, vocab - 1)
    if low > high or not fits(low):
        return low
    while low < high:  # invariant: fits(low)
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low

"""Codecs: a client's update (a dict of float tensors) as real bytes, and the adaptive policy.

A codec (registry ``CODECS``) turns ``{name: tensor}`` into a :class:`Payload`; ``len(payload)``
is what the simulated uplink carries. ``codec.size_bytes(shapes)`` is the exact length, computed
from the shapes alone (the adaptive policy sizes candidates without encoding them).

Wire format (version 1; integers little-endian)::

    offset  size  field
    0       4     magic b"FSCD"
    4       1     format version (1)
    5       4     total payload length in bytes, trailer included (u32): truncation is seen
                  before anything else is read
    9       2     S: spec length (u16)
    11      S     spec: compact JSON {"codec": name, **params}, sorted keys
    11+S    2     T: tensor count (u16)
    ...           T layout entries: name length (u16), name (UTF-8), dtype code (u8: 0 float32,
                  1 float16, 2 bfloat16, 3 float64), ndim (u8), ndim dims (u32 each)
    ...           body: one section per tensor, in layout order; section sizes follow from the
                  spec and the layout, so the body holds no lengths
    end-4   4     CRC32 (zlib.crc32) of every byte before it (u32)

Header bytes = 17 + S + sum over tensors (4 + len(name) + 4·ndim), trailer included. Sections
(n = numel; bit fields are packed MSB first, the last byte zero-padded):

- ``none``: n float32 (4n bytes). ``fp16``: n float16, clipped to ±65504 (2n bytes).
- ``qsgd(bits, block_size)``: one float32 scale = max|x| per block of ``block_size`` elements
  (0: one per tensor), then n codes of ``bits`` bits: 4·ceil(n/block) + ceil(n·bits/8) bytes.
  With s = 2^(bits-1) − 1 levels, y = s·x/scale is rounded to floor(y + u), u ~ U[0, 1), so
  E[x̂] = x; the integer q ∈ [−s, s] is sent as the offset code q + s (bits=2: s=1, 4: 7, 8: 127).
- ``topk(ratio)``: k = ceil(ratio·n) largest |x|; the sorted indices as an Elias-Fano code
  (l = floor(log2(n/k)) low bits each, then a k + ((n−1) >> l) + 1 bit unary upper part) or a
  bitmap of n bits, whichever is shorter; then the k values by the value codec (fp32, fp16, or
  qsgd for ``topk-qsgd``). Error feedback: encode x + residual, residual ← that − transmitted.
- ``lowrank(rank)``: a LoRA pair (``…lora_A…`` (r, in) with ``…lora_B…`` (out, r)) is re-factored
  to rank r' = min(rank, r) < r: B' (out·r' float32), A' (r'·in float32), zero-padded back to
  rank r by the decoder (B'A' is the best rank-r' approximation of BA; rank >= r: both raw
  float32). Another m×n matrix: one PowerSGD power iteration, P (m·r') and Q (n·r') float32,
  if (m + n)·r' < m·n, else raw float32. Tensors that are not matrices: fp16.

The ``adaptive`` policy picks, from a ladder of settings ordered from least to most lossy, the
first whose payload fits the channel: size_bytes·8 / rate_bps <= safety_margin · time_left_s
and size_bytes <= max_bytes (when set); the header names the chosen setting, so
:func:`decode` needs no client-side settings. Randomness comes only from the generator passed to
``encode``: the same generator state gives byte-identical payloads.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from fedsim.errors import FedsimError
from fedsim.plugins import CODECS, CodecConfig

MAGIC = b"FSCD"
VERSION = 1
FP16_MAX = 65504.0  # largest finite float16
QSGD_BITS = (2, 4, 8)
_FIXED = struct.Struct("<4sBIH")  # magic, version, total length (bytes), spec length (bytes)
_U16 = struct.Struct("<H")
_DTYPE_NDIM = struct.Struct("<BB")
_CRC = struct.Struct("<I")
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_DTYPE_OF = {code: dtype for dtype, code in _DTYPES.items()}

Shapes = Mapping[str, tuple[int, ...]]


class PayloadError(ValueError):
    """A payload that cannot be trusted: bad magic, bad CRC, truncated or inconsistent."""


@dataclass(frozen=True)
class Payload:
    """The bytes of one encoded update; ``len(payload)`` is the number of bytes on the wire."""

    data: bytes

    def __len__(self) -> int:
        return len(self.data)

    def spec(self) -> dict[str, Any]:
        """The codec setting named in the header (after the CRC check)."""
        return _read(self.data).spec

    def describe(self) -> str:
        return _from_spec(self.spec()).describe()


@dataclass(frozen=True)
class Encoded:
    """A payload and what the server will decode from it, known while encoding (so the client
    measures its error without decoding its own bytes)."""

    payload: Payload
    reconstruction: dict[str, torch.Tensor]  # equal to decode(payload), tensor by tensor


@dataclass
class ClientCodecState:
    """What stays on the client between rounds: error-feedback residuals (name -> tensor)."""

    residuals: dict[str, torch.Tensor] = field(default_factory=dict)

    def add_to(self, xs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """x + residual for each tensor (a residual of another size is stale: ignored)."""
        out = dict(xs)
        for name, x in xs.items():
            r = self.residuals.get(name)
            if r is not None and r.numel() == x.size:
                out[name] = x + r.detach().numpy().reshape(-1)
        return out

    def keep(self, sent: dict[str, np.ndarray], recon: dict[str, np.ndarray], shapes: Shapes):
        """residual ← what we meant to send − what the server will decode."""
        self.residuals = {n: torch.from_numpy(sent[n] - recon[n]).reshape(shapes[n]) for n in sent}


# --- pure functions --------------------------------------------------------------------------


def shapes_of(delta: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in delta.items()}


def raw_bytes(delta: Mapping[str, torch.Tensor]) -> int:
    """The update's size as raw float32 (4 bytes per element)."""
    return 4 * sum(t.numel() for t in delta.values())


def relative_error(original: Mapping[str, torch.Tensor],
                   decoded: Mapping[str, torch.Tensor]) -> float:
    """||x − x̂||₂ / ||x||₂ over all tensors together (0 when both are zero)."""
    err = sum(float((original[n].double() - decoded[n].double()).square().sum()) for n in original)
    norm = sum(float(t.double().square().sum()) for t in original.values())
    if norm == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return math.sqrt(err / norm)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _bits_of(values: np.ndarray, width: int) -> np.ndarray:
    """Unsigned ints (< 2**width) as a flat 0/1 uint8 array, most significant bit first."""
    size = 1 if width <= 8 else 4 if width <= 32 else 8  # bytes per int on the way
    as_bytes = values.astype(f">u{size}").view(np.uint8).reshape(-1, size)
    return np.unpackbits(as_bytes, axis=1)[:, 8 * size - width:].ravel()


def _ints_of(bits: np.ndarray, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`_bits_of`: ``count`` ints of ``width`` bits (int64)."""
    size = 1 if width <= 8 else 4 if width <= 32 else 8
    cols = np.zeros((count, 8 * size), np.uint8)
    cols[:, 8 * size - width:] = bits[: count * width].reshape(count, width)
    return np.packbits(cols, axis=1).view(f">u{size}").reshape(count).astype(np.int64)


def _unpack(buf: bytes, nbits: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(buf, np.uint8), count=nbits)


def _fail(codec: str, key: str, rule: str, value: Any) -> FedsimError:
    return FedsimError(f"{codec}: {key} must be {rule}, got {value!r}")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# --- top-k indices: Elias-Fano or bitmap ---------------------------------------------------


def _ef_low_bits(n: int, k: int) -> int:
    """l = floor(log2(n / k)): the low bits of each index kept verbatim."""
    return (n // k).bit_length() - 1


def index_bits(n: int, k: int) -> int:
    """Bits for k sorted distinct indices in [0, n): min(Elias-Fano, bitmap)."""
    if k == 0:
        return 0
    low = _ef_low_bits(n, k)
    return min(k * low + k + ((n - 1) >> low) + 1, n)


def _encode_indices(idx: np.ndarray, n: int) -> bytes:
    k = idx.size
    if k == 0:
        return b""
    low = _ef_low_bits(n, k)
    if index_bits(n, k) == n:  # dense: a bitmap is shorter
        bits = np.zeros(n, np.uint8)
        bits[idx] = 1
        return np.packbits(bits).tobytes()
    upper = np.zeros(k + ((n - 1) >> low) + 1, np.uint8)
    upper[(idx >> low) + np.arange(k)] = 1  # unary gaps of the high parts
    lows = _bits_of(idx & ((1 << low) - 1), low)
    return np.packbits(np.concatenate([lows, upper])).tobytes()


def _decode_indices(buf: bytes, n: int, k: int) -> np.ndarray:
    if k == 0:
        return np.zeros(0, np.int64)
    nbits = index_bits(n, k)
    bits = _unpack(buf, nbits)
    if nbits == n:
        idx = np.flatnonzero(bits)
    else:
        low = _ef_low_bits(n, k)
        ones = np.flatnonzero(bits[k * low:])
        if ones.size != k:
            raise PayloadError(f"top-k index code holds {ones.size} indices, expected {k}")
        idx = ((ones - np.arange(k)) << low) | _ints_of(bits, k, low)
    if idx.size != k or np.any(idx >= n) or np.any(np.diff(idx) <= 0):
        raise PayloadError("top-k indices are not k sorted distinct positions")
    return idx


# --- payload framing ---------------------------------------------------------------------------


def _layout_bytes(shapes: Shapes) -> int:
    return _U16.size + sum(
        _U16.size + len(name.encode()) + _DTYPE_NDIM.size + 4 * len(shape)
        for name, shape in shapes.items())


def _frame(spec: bytes, delta: Mapping[str, torch.Tensor], body: bytes) -> Payload:
    parts = [_U16.pack(len(delta))]
    for name, t in delta.items():
        encoded = name.encode()
        parts += [_U16.pack(len(encoded)), encoded, _DTYPE_NDIM.pack(_DTYPES[t.dtype], t.dim()),
                  struct.pack(f"<{t.dim()}I", *t.shape)]
    tail = b"".join(parts) + body
    total = _FIXED.size + len(spec) + len(tail) + _CRC.size
    head = _FIXED.pack(MAGIC, VERSION, total, len(spec)) + spec + tail
    return Payload(head + _CRC.pack(zlib.crc32(head)))


@dataclass(frozen=True)
class _Parsed:
    spec: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    body: bytes


class _Reader:
    """A cursor over the header that never reads past ``end``."""

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data, self.pos, self.end = data, pos, end

    def take(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise PayloadError("payload header runs past the end of the payload")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def unpack(self, fmt: struct.Struct) -> tuple[Any, ...]:
        return fmt.unpack(self.take(fmt.size))


def _read(data: bytes) -> _Parsed:
    """Check magic, version, length and CRC, then parse the header (PayloadError if bad)."""
    data = bytes(data)
    end = len(data) - _CRC.size
    if end < _FIXED.size + _U16.size:
        raise PayloadError(f"truncated payload: {len(data)} bytes")
    magic, version, total, spec_len = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise PayloadError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise PayloadError(f"unsupported payload format version {version}")
    if total != len(data):
        raise PayloadError(f"payload has {len(data)} bytes, its header says {total}")
    if zlib.crc32(data[:end]) != _CRC.unpack_from(data, end)[0]:
        raise PayloadError("CRC32 mismatch: corrupt payload")
    reader = _Reader(data, _FIXED.size, end)
    try:
        spec = json.loads(reader.take(spec_len))
        shapes, dtypes = {}, {}
        for _ in range(reader.unpack(_U16)[0]):
            name = reader.take(reader.unpack(_U16)[0]).decode()
            code, ndim = reader.unpack(_DTYPE_NDIM)
            shapes[name] = reader.unpack(struct.Struct(f"<{ndim}I"))
            dtypes[name] = _DTYPE_OF[code]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError) as e:
        raise PayloadError(f"malformed payload header: {e}") from None
    if not isinstance(spec, dict):
        raise PayloadError("payload spec is not a JSON object")
    return _Parsed(spec, shapes, dtypes, data[reader.pos:end])


def _from_spec(spec: dict[str, Any]) -> TensorCodec:
    params = dict(spec)
    name = params.pop("codec", None)
    if not isinstance(name, str) or name not in CODECS:
        raise PayloadError(f"payload names an unknown codec {name!r}")
    cls = CODECS.get(name)
    if not issubclass(cls, TensorCodec):
        raise PayloadError(f"payload names a policy, not a codec setting: {name!r}")
    try:
        return cls(**params)
    except (FedsimError, TypeError) as e:
        raise PayloadError(f"payload has bad codec parameters: {e}") from None


def decode(payload: Payload | bytes) -> dict[str, torch.Tensor]:
    """Decode any payload: the header names the codec and its parameters."""
    parsed = _read(payload.data if isinstance(payload, Payload) else payload)
    codec = _from_spec(parsed.spec)
    sizes = codec.section_sizes(parsed.shapes)
    if sum(sizes) != len(parsed.body):
        raise PayloadError(f"payload body has {len(parsed.body)} bytes, layout needs {sum(sizes)}")
    sections = [parsed.body[a:b] for a, b in itertools.pairwise(np.cumsum([0, *sizes]).tolist())]
    arrays = codec.decode_sections(sections, parsed.shapes)
    return {n: torch.from_numpy(arrays[n]).reshape(s).to(parsed.dtypes[n])
            for n, s in parsed.shapes.items()}


# --- codecs --------------------------------------------------------------------------------


class Codec(ABC):
    """A compression policy: picks a :class:`TensorCodec` setting for an update, then encodes."""

    name: ClassVar[str]

    @abstractmethod
    def choose(self, shapes: Shapes, rate_bps: float | None = None,
               time_left_s: float | None = None) -> TensorCodec:
        """The setting used for an update of these shapes on this channel."""

    @abstractmethod
    def describe(self) -> str:
        """A short label, e.g. ``topk(ratio=0.01)+qsgd(bits=4)``."""

    def size_bytes(self, shapes: Shapes, rate_bps: float | None = None,
                   time_left_s: float | None = None) -> int:
        """Exact length in bytes of the payload that ``encode`` would produce."""
        return self.choose(shapes, rate_bps, time_left_s).payload_bytes(shapes)

    def encode(self, delta: Mapping[str, torch.Tensor], state: ClientCodecState | None = None,
               rng: np.random.Generator | None = None, *, rate_bps: float | None = None,
               time_left_s: float | None = None) -> Payload:
        """Encode ``delta`` (see :meth:`encode_update`); the payload alone."""
        return self.encode_update(delta, state, rng, rate_bps=rate_bps,
                                  time_left_s=time_left_s).payload

    def encode_update(self, delta: Mapping[str, torch.Tensor],
                      state: ClientCodecState | None = None,
                      rng: np.random.Generator | None = None, *, rate_bps: float | None = None,
                      time_left_s: float | None = None) -> Encoded:
        """Encode ``delta``, with the reconstruction the decoder will rebuild. Error feedback
        runs while the setting sparsifies; a dense setting sends a residual left by an earlier
        sparse round along, then clears it (its own rounding is unbiased or tiny)."""
        chosen = self.choose(shapes_of(delta), rate_bps, time_left_s)
        if state is None or not (chosen.sparsifying or state.residuals):
            return chosen.encode_tensors(delta, None, rng)
        encoded = chosen.encode_tensors(delta, state, rng)
        if not chosen.sparsifying:
            state.residuals = {}
        return encoded

    def decode(self, payload: Payload | bytes) -> dict[str, torch.Tensor]:
        return decode(payload)


class TensorCodec(Codec):
    """One fixed setting: each tensor becomes one body section of a size known from its shape."""

    sparsifying: ClassVar[bool] = False  # True: runs error feedback

    def params(self) -> dict[str, Any]:
        return {}

    def choose(self, shapes: Shapes, rate_bps: float | None = None,
               time_left_s: float | None = None) -> TensorCodec:
        return self

    def spec_bytes(self) -> bytes:
        spec = {"codec": self.name, **self.params()}
        return json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()

    def payload_bytes(self, shapes: Shapes) -> int:
        head = _FIXED.size + len(self.spec_bytes()) + _layout_bytes(shapes)
        return head + sum(self.section_sizes(shapes)) + _CRC.size

    def section_sizes(self, shapes: Shapes) -> list[int]:
        return [self.tensor_bytes(shape) for shape in shapes.values()]

    def encode_sections(self, xs: dict[str, np.ndarray], shapes: Shapes,
                        rng: np.random.Generator | None) -> tuple[list[bytes], dict]:
        """(section bytes in layout order, what the decoder will rebuild: flat float32)."""
        done = {n: self.encode_tensor(x, shapes[n], rng) for n, x in xs.items()}
        return [b for b, _ in done.values()], {n: r for n, (_, r) in done.items()}

    def decode_sections(self, sections: list[bytes], shapes: Shapes) -> dict[str, np.ndarray]:
        return {n: self.decode_tensor(buf, s)
                for (n, s), buf in zip(shapes.items(), sections, strict=True)}

    @abstractmethod
    def tensor_bytes(self, shape: tuple[int, ...]) -> int:
        """Section length in bytes for a tensor of this shape."""

    @abstractmethod
    def encode_tensor(self, x: np.ndarray, shape: tuple[int, ...],
                      rng: np.random.Generator | None) -> tuple[bytes, np.ndarray]:
        """Flat float32 ``x`` -> (section bytes, the flat float32 the decoder will rebuild)."""

    @abstractmethod
    def decode_tensor(self, buf: bytes, shape: tuple[int, ...]) -> np.ndarray:
        """Section bytes -> flat float32."""

    def encode_tensors(self, delta: Mapping[str, torch.Tensor], state: ClientCodecState | None,
                       rng: np.random.Generator | None) -> Encoded:
        for name, t in delta.items():
            if t.dtype not in _DTYPES:
                raise ValueError(f"{name}: codecs take float tensors, got {t.dtype}")
        shapes = shapes_of(delta)
        xs = {n: t.detach().to(torch.float32).cpu().numpy().reshape(-1) for n, t in delta.items()}
        if state is not None:
            xs = state.add_to(xs)
        sections, recon = self.encode_sections(xs, shapes, rng)
        if state is not None:
            state.keep(xs, recon, shapes)
        # As decode() rebuilds it: flat float32, reshaped, in the tensor's own dtype.
        rebuilt = {n: torch.from_numpy(np.asarray(recon[n], dtype=np.float32)).reshape(s)
                   .to(delta[n].dtype) for n, s in shapes.items()}
        return Encoded(_frame(self.spec_bytes(), delta, b"".join(sections)), rebuilt)


@CODECS.register("none")
class Raw(TensorCodec):
    """float32 as is: 4 bytes per element."""

    def describe(self) -> str:
        return "none"

    def tensor_bytes(self, shape: tuple[int, ...]) -> int:
        return 4 * _numel(shape)

    def encode_tensor(self, x, shape, rng):
        return x.astype("<f4").tobytes(), x

    def decode_tensor(self, buf, shape):
        return np.frombuffer(buf, "<f4").astype(np.float32)


@CODECS.register("fp16")
class Half(TensorCodec):
    """float16, clipped to its finite range: 2 bytes per element."""

    def describe(self) -> str:
        return "fp16"

    def tensor_bytes(self, shape: tuple[int, ...]) -> int:
        return 2 * _numel(shape)

    def encode_tensor(self, x, shape, rng):
        half = np.clip(x, -FP16_MAX, FP16_MAX).astype("<f2")
        return half.tobytes(), half.astype(np.float32)

    def decode_tensor(self, buf, shape):
        return np.frombuffer(buf, "<f2").astype(np.float32)


@CODECS.register("qsgd")
class QSGD(TensorCodec):
    """Unbiased stochastic uniform quantization (Alistarh et al. 2017), one scale per block.

    ``block_size`` 512 follows QSGD's bucketing: a float32 scale costs 32/512 = 1/16 bit per
    element and keeps one outlier from coarsening the whole tensor. 0: one scale per tensor.
    """

    def __init__(self, bits: int = 8, block_size: int = 512) -> None:
        if not _is_int(bits) or bits not in QSGD_BITS:
            raise _fail("qsgd", "bits", "one of 2, 4, 8", bits)
        if not _is_int(block_size) or block_size < 0:
            raise _fail("qsgd", "block_size", "an integer >= 0", block_size)
        self.bits, self.block_size = bits, block_size
        self.levels = 2 ** (bits - 1) - 1  # s: codes q + s in [0, 2s] fit in `bits` bits

    def params(self) -> dict[str, Any]:
        return {"bits": self.bits, "block_size": self.block_size}

    def describe(self) -> str:
        block = "" if self.block_size == 512 else f",block_size={self.block_size}"
        return f"qsgd(bits={self.bits}{block})"

    def _width(self, n: int) -> int:
        return self.block_size or max(n, 1)

    def tensor_bytes(self, shape: tuple[int, ...]) -> int:
        n = _numel(shape)
        return 4 * math.ceil(n / self._width(n)) + math.ceil(n * self.bits / 8)

    def encode_tensor(self, x, shape, rng):
        if rng is None:
            raise ValueError("qsgd rounds at random: pass a numpy Generator to encode")
        n, width = x.size, self._width(x.size)
        blocks = np.zeros(math.ceil(n / width) * width)  # float64, zero-padded
        blocks[:n] = x
        blocks = blocks.reshape(-1, width)
        scale = np.abs(blocks).max(axis=1).astype(np.float32)
        if not np.all(np.isfinite(scale)):
            raise ValueError("qsgd cannot encode a delta with inf or NaN values")
        y = blocks / np.where(scale > 0, scale, 1.0)[:, None] * self.levels  # in [-s, s]
        # floor(y + u) is y rounded up with probability frac(y): E = y, so E[x̂] = x.
        q = np.clip(np.floor(y + rng.random(y.shape)), -self.levels, self.levels)
        codes = (q.ravel()[:n] + self.levels).astype(np.int64)
        data = scale.astype("<f4").tobytes() + np.packbits(_bits_of(codes, self.bits)).tobytes()
        return data, self._dequantize(codes, scale, n)

    def _dequantize(self, codes: np.ndarray, scale: np.ndarray, n: int) -> np.ndarray:
        step = np.repeat(scale / np.float32(self.levels), self._width(n))[:n]
        return (codes - self.levels).astype(np.float32) * step

    def decode_tensor(self, buf, shape):
        n = _numel(shape)
        nscale = 4 * math.ceil(n / self._width(n))
        scale = np.frombuffer(buf[:nscale], "<f4")
        if not np.all(np.isfinite(scale) & (scale >= 0)):
            raise PayloadError("qsgd scale is negative or not finite")
        codes = _ints_of(_unpack(buf[nscale:], n * self.bits), n, self.bits)
        if np.any(codes > 2 * self.levels):
            raise PayloadError(f"qsgd code above {2 * self.levels}")
        return self._dequantize(codes, scale, n)


@CODECS.register("topk")
class TopK(TensorCodec):
    """The k = ceil(ratio·n) largest |x| of each tensor, with error feedback on the client.

    The kept values go through ``self.values``, itself a codec setting (fp32, fp16 or qsgd):
    a sparsifier composed with a quantizer.
    """

    sparsifying = True

    def __init__(self, ratio: float = 0.01, values: str = "fp32") -> None:
        if not _is_number(ratio) or not 0 < ratio <= 1:
            raise _fail(self.name, "ratio", "in (0, 1]", ratio)
        if values not in ("fp32", "fp16"):
            raise _fail(self.name, "values", "'fp32' or 'fp16'", values)
        self.ratio, self.value_format = float(ratio), values
        self.values: TensorCodec = Raw() if values == "fp32" else Half()

    def params(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "values": self.value_format}

    def describe(self) -> str:
        values = "" if self.value_format == "fp32" else "+fp16"
        return f"topk(ratio={self.ratio:g}){values}"

    def k(self, n: int) -> int:
        """ceil(ratio·n), ignoring float noise (0.1·30 is 3, not 4)."""
        return min(n, math.ceil(round(self.ratio * n, 9)))

    def tensor_bytes(self, shape: tuple[int, ...]) -> int:
        n = _numel(shape)
        k = self.k(n)
        return math.ceil(index_bits(n, k) / 8) + self.values.tensor_bytes((k,))

    def encode_tensor(self, x, shape, rng):
        n, k = x.size, self.k(x.size)
        idx = np.sort(np.argpartition(np.abs(x), n - k)[n - k:]) if k else np.zeros(0, np.int64)
        vbytes, vrec = self.values.encode_tensor(x[idx], (k,), rng)
        recon = np.zeros(n, np.float32)
        recon[idx] = vrec
        return _encode_indices(idx, n) + vbytes, recon

    def decode_tensor(self, buf, shape):
        n = _numel(shape)
        k = self.k(n)
        split = math.ceil(index_bits(n, k) / 8)
        out = np.zeros(n, np.float32)
        out[_decode_indices(buf[:split], n, k)] = self.values.decode_tensor(buf[split:], (k,))
        return out


@CODECS.register("topk-qsgd")
class TopKQSGD(TopK):
    """Top-k whose kept values are quantized by QSGD."""

    def __init__(self, ratio: float = 0.01, bits: int = 8, block_size: int = 512) -> None:
        super().__init__(ratio)
        self.values = QSGD(bits, block_size)

    def params(self) -> dict[str, Any]:
        return {"ratio": self.ratio, **self.values.params()}

    def describe(self) -> str:
        return f"topk(ratio={self.ratio:g})+{self.values.describe()}"


def lora_pairs(shapes: Shapes) -> dict[str, str]:
    """``…lora_A…`` name -> its ``…lora_B…`` partner, for 2-D pairs (r, in) / (out, r)."""
    pairs = {}
    for a, shape_a in shapes.items():
        head, sep, tail = a.rpartition("lora_A")
        b = head + "lora_B" + tail
        shape_b = shapes.get(b)
        if sep and shape_b and len(shape_a) == 2 and len(shape_b) == 2 \
                and shape_a[0] == shape_b[1]:
            pairs[a] = b
    return pairs


def refactor_lora(b: np.ndarray, a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-``rank`` factors (B', A') of B·A via QR of B and Aᵀ and an SVD of the r×r core.

    B = Q_b R_b, Aᵀ = Q_a R_a, so BA = Q_b (R_b R_aᵀ) Q_aᵀ; the SVD U S Vᵀ of the small core
    gives B' = Q_b U √S, A' = √S Vᵀ Q_aᵀ. Cost O((out + in) r²), never the out×in product.
    """
    qb, rb = torch.linalg.qr(torch.from_numpy(b).double())
    qa, ra = torch.linalg.qr(torch.from_numpy(a).double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    root = s[:rank].sqrt()
    new_b = (qb @ u[:, :rank]) * root
    new_a = root[:, None] * (vh[:rank] @ qa.T)
    return new_b.float().numpy(), new_a.float().numpy()


def power_iteration(m: np.ndarray, rank: int, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
    """PowerSGD (Vogels et al. 2019), one iteration from a seeded Gaussian start: M ≈ P Qᵀ."""
    mat = torch.from_numpy(m).double()
    p, _ = torch.linalg.qr(mat @ torch.from_numpy(rng.standard_normal((m.shape[1], rank))))
    return p.float().numpy(), (mat.T @ p).float().numpy()


@CODECS.register("lowrank")
class LowRank(TensorCodec):
    """Rank-``rank`` re-factoring of LoRA pairs, PowerSGD for other matrices, fp16 for the rest.

    A LoRA pair is rebuilt with its original shapes (factors zero-padded to rank r): the product
    B·A, the task vector, is what this codec preserves, not the individual factors.
    """

    def __init__(self, rank: int = 2) -> None:
        if not _is_int(rank) or rank < 1:
            raise _fail("lowrank", "rank", "an integer >= 1", rank)
        self.rank = rank

    def params(self) -> dict[str, Any]:
        return {"rank": self.rank}

    def describe(self) -> str:
        return f"lowrank(rank={self.rank})"

    def plan(self, shapes: Shapes) -> dict[str, tuple[str, int]]:
        """name -> (what is sent: lora_a / lora_b (a new factor), power (P, Q), raw, fp16; rank)."""
        out = {n: self._single(s) for n, s in shapes.items()}
        for a, b in lora_pairs(shapes).items():
            rank = min(self.rank, *shapes[a], shapes[b][0])  # <= r, in, out
            low = rank < shapes[a][0]
            out[a], out[b] = (("lora_a", rank), ("lora_b", rank)) if low else (("raw", 0),) * 2
        return out

    def _single(self, shape: tuple[int, ...]) -> tuple[str, int]:
        if len(shape) != 2:
            return ("fp16", 0)
        rank = min(self.rank, *shape)
        return ("power", rank) if rank * sum(shape) < _numel(shape) else ("raw", 0)

    @staticmethod
    def _bytes(shape: tuple[int, ...], how: tuple[str, int]) -> int:
        kind, rank = how
        if kind in ("raw", "fp16"):
            return (2 if kind == "fp16" else 4) * _numel(shape)
        if kind == "power":
            return 4 * rank * sum(shape)  # P (rows·rank) and Q (cols·rank)
        return 4 * rank * (shape[1] if kind == "lora_a" else shape[0])  # A' rank·in, B' out·rank

    def tensor_bytes(self, shape: tuple[int, ...]) -> int:
        return self._bytes(shape, self._single(shape))

    def section_sizes(self, shapes: Shapes) -> list[int]:
        plan = self.plan(shapes)
        return [self._bytes(s, plan[n]) for n, s in shapes.items()]

    def encode_tensor(self, x, shape, rng):
        """A tensor on its own (not one of a LoRA pair)."""
        return self._send(x, shape, self._single(shape), rng)

    def decode_tensor(self, buf, shape):
        return self._rebuild(buf, shape, self._single(shape))

    def encode_sections(self, xs, shapes, rng):
        plan, factors = self.plan(shapes), {}
        for a, b in lora_pairs(shapes).items():
            if plan[a][0] == "lora_a":
                mat_b, mat_a = xs[b].reshape(shapes[b]), xs[a].reshape(shapes[a])
                factors[b], factors[a] = refactor_lora(mat_b, mat_a, plan[a][1])
        done = {n: self._send(factors.get(n, x).ravel(), shapes[n], plan[n], rng)
                for n, x in xs.items()}
        return [b for b, _ in done.values()], {n: r for n, (_, r) in done.items()}

    def decode_sections(self, sections, shapes):
        plan = self.plan(shapes)
        return {n: self._rebuild(buf, s, plan[n])
                for (n, s), buf in zip(shapes.items(), sections, strict=True)}

    def _send(self, x: np.ndarray, shape: tuple[int, ...], how: tuple[str, int],
              rng: np.random.Generator | None) -> tuple[bytes, np.ndarray]:
        """Flat data (the tensor, or its new LoRA factor) -> (bytes, what the decoder rebuilds)."""
        kind, rank = how
        if kind == "power":
            if rng is None:
                raise ValueError("lowrank power iteration needs a numpy Generator")
            p, q = power_iteration(x.reshape(shape), rank, rng)
            x = np.concatenate([p.ravel(), q.ravel()])
        buf, _ = (Half() if kind == "fp16" else Raw()).encode_tensor(x, (x.size,), rng)
        return buf, self._rebuild(buf, shape, how)

    @staticmethod
    def _rebuild(buf: bytes, shape: tuple[int, ...], how: tuple[str, int]) -> np.ndarray:
        kind, rank = how
        flat = (Half() if kind == "fp16" else Raw()).decode_tensor(buf, shape)
        if kind == "power":
            p = flat[: shape[0] * rank].reshape(shape[0], rank)
            return (p @ flat[shape[0] * rank:].reshape(shape[1], rank).T).ravel()
        if kind not in ("lora_a", "lora_b"):
            return flat
        out = np.zeros(shape, np.float32)  # zero-pad the factor back to the LoRA rank r
        if kind == "lora_a":
            out[:rank] = flat.reshape(rank, shape[1])
        else:
            out[:, :rank] = flat.reshape(shape[0], rank)
        return out.ravel()


# --- adaptive policy -------------------------------------------------------------------------


def default_ladder() -> tuple[TensorCodec, ...]:
    """Settings from least to most lossy: relative L2 error and bits per element measured on a
    64×384 + 384×64 N(0, 1) LoRA pair (a Student-t(3)-scaled pair in brackets).

    none 0 @32, fp16 2e-4 @16, qsgd-8 0.01 [0.03] @8.1, qsgd-4 0.19 [0.49] @4.1, then top-k with
    8-bit values, ratio 0.25: 0.53 [0.24] @3.0, 0.1: 0.75 [0.44] @1.4, 0.05: 0.85 [0.56] @0.74,
    0.02: 0.92 [0.70] @0.34, 0.01: 0.96 [0.77] @0.19, 0.005 @0.11, 0.002 @0.06, 0.001 @0.05,
    then 4- and 2-bit values at ratio 0.001. qsgd-2 alone is off the ladder: error 1.3 [2.0]
    at 2.1 bits, worse than top-k 0.05 at a third of the size. 8-bit top-k values cost little
    and keep heavy tails (4-bit: 0.51 instead of 0.24 at ratio 0.25). Error feedback carries
    what top-k drops into the client's next round.
    """
    sparse = [TopKQSGD(r, bits=8) for r in (0.25, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)]
    return (Raw(), Half(), QSGD(8), QSGD(4), *sparse, TopKQSGD(0.001, 4), TopKQSGD(0.001, 2))


@CODECS.register("adaptive")
class Adaptive(Codec):
    """The least lossy ladder setting whose payload fits the channel before the deadline.

    Budget (bytes): ``max_bytes`` (None: unlimited) and, with a deadline, at most
    safety_margin · time_left_s · rate_bps / 8. Nothing fits: the smallest payload. This is the
    adaptive top-k of communication-aware federated distillation: k follows the channel state.
    """

    def __init__(self, safety_margin: float = 0.8, max_bytes: int | None = None,
                 ladder: tuple[TensorCodec, ...] | None = None) -> None:
        if not _is_number(safety_margin) or not 0 < safety_margin <= 1:
            raise _fail("adaptive", "safety_margin", "in (0, 1]", safety_margin)
        if max_bytes is not None and (not _is_int(max_bytes) or max_bytes < 1):
            raise _fail("adaptive", "max_bytes", "an integer >= 1 or None", max_bytes)
        self.safety_margin, self.max_bytes = float(safety_margin), max_bytes
        self.ladder = tuple(ladder) if ladder else default_ladder()

    def describe(self) -> str:
        return f"adaptive(safety_margin={self.safety_margin:g},max_bytes={self.max_bytes})"

    def budget_bytes(self, rate_bps: float | None, time_left_s: float | None) -> float:
        """The bits budget (``max_bytes``) and, with a deadline, the time budget: the smaller."""
        cap = math.inf if self.max_bytes is None else float(self.max_bytes)
        if rate_bps is None or time_left_s is None:
            return cap
        return min(cap, max(0.0, self.safety_margin * time_left_s) * max(0.0, rate_bps) / 8)

    def choose(self, shapes: Shapes, rate_bps: float | None = None,
               time_left_s: float | None = None) -> TensorCodec:
        budget = self.budget_bytes(rate_bps, time_left_s)
        smallest, chosen = math.inf, self.ladder[-1]
        for setting in self.ladder:
            size = setting.payload_bytes(shapes)
            if size < smallest:  # a lossier setting that is no smaller is never worth it
                smallest, chosen = size, setting
                if size <= budget:
                    break
        return chosen


def from_config(cfg: CodecConfig) -> Codec:
    """The codec ``cfg`` names (``cfg.codec``), built with its options."""
    return CODECS.get(cfg.codec)(**cfg.options())

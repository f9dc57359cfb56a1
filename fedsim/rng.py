"""Explicit, reproducible randomness: named generators spawned from the scenario seed, and
counter-based draws for processes that must not depend on the order of events.

``streams(seed)`` gives one ``numpy.random.Generator`` per named component, spawned with
``SeedSequence`` so that adding a component never shifts another's numbers.
``hashed_uniform(key, a, b)`` is a SplitMix64 hash of (key, a, b) mapped to (0, 1): the draw for
(client, block) is the same whichever flows or clients happened to be active before it.
"""

from __future__ import annotations

import hashlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_A = np.uint64(0xBF58476D1CE4E5B9)
_MIX_B = np.uint64(0x94D049BB133111EB)
_ODD = np.uint64(0xD1B54A32D192ED03)
_MASK64 = 2**64 - 1


_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, in place on a fresh array (no temporaries: a fading block of
    10^5 flows hashes twice as fast)."""
    x += _GOLDEN
    t = x >> _S30
    x ^= t
    x *= _MIX_A
    np.right_shift(x, _S27, out=t)
    x ^= t
    x *= _MIX_B
    np.right_shift(x, _S31, out=t)
    x ^= t
    return x


def _splitmix64_int(x: int) -> int:
    """:func:`_splitmix64` on one Python int (no numpy call overhead for a single draw)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def hashed_uniform_one(key: int, a: int, b: int) -> float:
    """One draw of :func:`hashed_uniform`, bit-identical to the vectorized one."""
    x = _splitmix64_int(((a * 0xD1B54A32D192ED03) & _MASK64) ^ (key & _MASK64))
    x = _splitmix64_int(x ^ (b & (2**62 - 1)))
    return ((x >> 11) + 0.5) * (1.0 / 2**53)


def hashed_uniform(key: int, a: np.ndarray, b: np.ndarray | int) -> np.ndarray:
    """Uniform (0, 1) draws, one per element of ``a`` (and ``b``), a pure function of the keys."""
    if np.ndim(a) == 1 and len(a) == 1 and np.ndim(b) == 0:
        return np.array([hashed_uniform_one(key, int(a[0]), int(b))])
    b64 = (np.asarray(b).astype(np.int64) & np.int64(2**62 - 1)).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = np.asarray(a).astype(np.uint64)  # a copy: hashed in place
        x *= _ODD
        x ^= np.uint64(key & _MASK64)
        x = _splitmix64(x)
        x ^= b64
        x = _splitmix64(x)
    x >>= _S11
    out = x.astype(np.float64)
    out += 0.5
    out *= 1.0 / 2**53
    return out


def hashed_exponential(key: int, a: np.ndarray, b: np.ndarray | int) -> np.ndarray:
    """Exp(1) draws keyed like :func:`hashed_uniform`."""
    return -np.log(hashed_uniform(key, a, b))


def _stable_word(name: str) -> int:
    """A name as a 32-bit integer, the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2s(name.encode(), digest_size=4).digest(), "little")


def stream(seed: int, name: str) -> np.random.Generator:
    """The generator of component ``name`` for scenario ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([seed, _stable_word(name)]))


def key(seed: int, name: str) -> int:
    """A 63-bit key for counter-based draws of component ``name``."""
    return int(stream(seed, name).integers(0, 2**63))

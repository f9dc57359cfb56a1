"""Token alignment across tokenizers (FedMKT): a vocabulary map and a sequence alignment.

A client model and the server model may tokenize differently (smollm2: GPT-2 byte-level BPE,
49,152 ids; gemma3: sentencepiece-style BPE with byte fallback, 262,144 ids). Distillation moves
a client's top-k distribution per client token onto the server's tokens in two steps:

1. **Vocabulary map** (:func:`vocab_map`): every client id goes to one server id, the server
   token whose string is nearest by Levenshtein distance, as FedMKT's MinED map. Strings are
   compared as the text they stand for (:func:`surface`): byte-level ``Ġthe`` and metaspace
   ``▁the`` are both `` the``, ``Ċ`` and ``<0x0A>`` both a newline, so most pairs match exactly
   (46,145 of 49,135 regular smollm2 tokens have an exact gemma3 twin); the rest go by edit
   distance (rapidfuzz, in C). Ties go to the server's regular tokens before its byte-fallback
   tokens (the tokenizer emits those only for text nothing else covers), then to the smallest
   id (BPE and sentencepiece give frequent tokens small ids). Special tokens map among the
   server's specials: same role first (eos, bos, pad, unk), else by edit distance of their
   literal strings. The map is computed once per vocabulary pair and cached on disk.
2. **Sequence alignment** (:func:`align_sequences`): the two tokenizations of one text are
   aligned by the Levenshtein dynamic program over their bytes (a monotone path; C-implemented),
   and a server token is paired with every client token that shares an aligned byte with it, so
   one-to-many and many-to-one come out exactly where the pieces overlap. FedMKT's DTW instead
   charges the edit distance of whole token strings per pair; that cost grows with a long
   token's length each time it is repeated, so a coarse tokenization's long token ends up
   paired with too few pieces (`` un|believable`` against `` un|bel|iev|able`` pairs `` un``
   with ``bel`` and ``iev``); the byte path has no such bias. Special tokens stand for no text
   and pair with nothing.

:func:`align_topk` combines the two: client top-k ids go through the map, and the distributions
of the client positions aligned to one server position are averaged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from fedsim.atomic import atomic_file
from fedsim.errors import FedsimError
from fedsim.models import cache_dir, model_source

_CACHE_FORMAT = 1  # bump when the cached maps' meaning changes
# Role order for a client special that holds several (smollm2's <|im_end|> is eos and pad).
ROLES = ("eos", "bos", "pad", "unk")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece byte fallback, e.g. <0x0A>
# Edit distances are kept in uint8 (a (256, 262k) chunk is 67 MB); longer ones read as 255.
_MAX_DISTANCE = 254


# --- token strings and the text they stand for ------------------------------------------------


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the byte each printable stand-in character means.

    Printable bytes stand for themselves; the other 68 (controls, space, 0x7F-0xA0, 0xAD) are
    shifted to U+0100 onwards in byte order, which makes ``Ġ`` a space and ``Ċ`` a newline.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(shifted)}
    return {c: b for b, c in chars.items()}


def _decode(raw: bytes) -> str:
    # A piece of a multi-byte character keeps its bytes as lone surrogates (U+DC80..U+DCFF),
    # so it compares equal to the same bytes from the other tokenizer and encodes back exactly.
    return raw.decode("utf-8", "surrogateescape")


def _byte_level_surface(token: str) -> str:
    decoder = _byte_level_decoder()
    if all(c in decoder for c in token):
        return _decode(bytes(decoder[c] for c in token))
    return token  # an added token outside the byte alphabet stands for itself


def _metaspace_surface(token: str) -> str:
    match = _BYTE_TOKEN.fullmatch(token)
    if match:
        return _decode(bytes([int(match[1], 16)]))
    return token.replace("▁", " ")


_SURFACES: dict[str, Callable[[str], str]] = {
    "byte-level": _byte_level_surface,  # GPT-2, llama-3, smollm2: bytes as printable characters
    "metaspace": _metaspace_surface,  # sentencepiece, gemma: ▁ for a space, <0xNN> for a byte
}
SCHEMES = tuple(_SURFACES)


def surface(token: str, scheme: str) -> str:
    """The text a regular token stands for under ``scheme`` (one of :data:`SCHEMES`)."""
    if scheme not in _SURFACES:
        raise FedsimError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    return _SURFACES[scheme](token)


def _is_byte_fallback(token: str, scheme: str) -> bool:
    return scheme == "metaspace" and _BYTE_TOKEN.fullmatch(token) is not None


# --- vocabularies ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """A tokenizer's token strings by id, how to read them, and which ids are special.

    ``roles`` pairs role names of :data:`ROLES` with ids (``(("eos", 1), ("bos", 2))``).
    """

    name: str
    tokens: tuple[str, ...]
    scheme: str
    special_ids: frozenset[int] = frozenset()
    roles: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if not self.tokens:
            raise FedsimError(f"vocabulary {self.name!r} has no tokens")
        if self.scheme not in _SURFACES:
            raise FedsimError(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        for i in self.special_ids:
            if not 0 <= i < len(self.tokens):
                raise FedsimError(f"vocabulary {self.name!r}: special id {i} outside "
                                  f"0..{len(self.tokens) - 1}")
        for role, i in self.roles:
            if role not in ROLES or i not in self.special_ids:
                raise FedsimError(f"vocabulary {self.name!r}: role ({role!r}, {i}) must name "
                                  f"one of {', '.join(ROLES)} and a special id")

    def __len__(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def strings(self) -> tuple[str, ...]:
        """What the vocabulary map compares: a regular token's surface, a special's literal."""
        return tuple(t if i in self.special_ids else surface(t, self.scheme)
                     for i, t in enumerate(self.tokens))

    def texts(self, ids: Sequence[int]) -> list[str]:
        """The text each token of a tokenized sequence stands for: ``""`` for specials."""
        n = len(self.tokens)
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise FedsimError(f"vocabulary {self.name!r}: ids {bad[:5]} outside 0..{n - 1}")
        return ["" if i in self.special_ids else self.strings[i] for i in ids]

    def role_id(self, role: str) -> int | None:
        return dict(self.roles).get(role)

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of everything the map depends on: scheme, token strings, specials, roles."""
        doc = [self.scheme, self.tokens, sorted(self.special_ids), self.roles]
        return hashlib.sha256(json.dumps(doc).encode()).hexdigest()


def _scheme_of(tokenizer: Any, name: str) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    state = decoder.__getstate__().decode() if decoder is not None else ""  # the decoder's JSON
    if '"ByteLevel"' in state:
        return "byte-level"
    if '"Metaspace"' in state or "▁" in state:
        return "metaspace"
    raise FedsimError(f"tokenizer of {name!r}: token alignment needs a fast tokenizer whose "
                      f"decoder is byte-level or metaspace, got {state or 'none'}")


def vocabulary(tokenizer: Any, name: str) -> Vocabulary:
    """The :class:`Vocabulary` of a transformers tokenizer (ids must run 0..n−1)."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise FedsimError(f"tokenizer of {name!r}: token ids are not 0..{len(by_id) - 1}")
    specials = frozenset(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    roles = tuple((role, i) for role in ROLES
                  if (i := getattr(tokenizer, f"{role}_token_id", None)) in specials)
    return Vocabulary(name, tuple(by_id[i] for i in range(len(by_id))),
                      _scheme_of(tokenizer, name), specials, roles)


def load_vocabulary(model: str) -> Vocabulary:
    """The vocabulary of model ``model`` (any name :func:`fedsim.models.model_source` takes)."""
    return vocabulary(model_source(model).tokenizer(), model)


# --- the vocabulary map ------------------------------------------------------------------------


def nearest(queries: Sequence[str], candidates: Sequence[str],
            chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the index of its nearest candidate by Levenshtein distance, and the distance.

    Exact matches come from a dict; the rest from rapidfuzz's ``cdist``, ``chunk`` queries at a
    time. A tie goes to the earliest candidate, so the caller's candidate order is the
    tie-break. Distances over 254 read as 255 (smollm2's longest token has 81 characters).
    """
    if not candidates:
        raise FedsimError("nearest: no candidates")
    first: dict[str, int] = {}
    for i, c in enumerate(candidates):
        first.setdefault(c, i)
    index = np.array([first.get(q, -1) for q in queries], dtype=np.int64)
    distance = np.zeros(len(queries), dtype=np.int32)
    todo = np.flatnonzero(index < 0)
    for start in range(0, len(todo), chunk):
        rows = todo[start:start + chunk]
        d = process.cdist([queries[r] for r in rows], candidates, scorer=Levenshtein.distance,
                          dtype=np.uint8, score_cutoff=_MAX_DISTANCE, workers=1)
        best = d.argmin(axis=1)  # argmin keeps the first minimum: the earliest candidate
        index[rows], distance[rows] = best, d[np.arange(len(rows)), best]
    return index, distance


@dataclass(frozen=True, eq=False)
class VocabMap:
    """``server_ids[c]``: the server id of client id ``c``; ``distance[c]``: their edit distance."""

    client: Vocabulary
    server: Vocabulary
    server_ids: np.ndarray  # int64, (len(client),)
    distance: np.ndarray  # int32, (len(client),); 0 for an exact match

    def __post_init__(self) -> None:
        n = len(self.client)
        if self.server_ids.shape != (n,) or self.distance.shape != (n,):
            raise FedsimError(f"vocabulary map needs {n} entries, got {self.server_ids.shape} "
                              f"and {self.distance.shape}")
        if n and not 0 <= self.server_ids.min() <= self.server_ids.max() < len(self.server):
            raise FedsimError(f"vocabulary map: server ids outside 0..{len(self.server) - 1}")

    @property
    def exact_fraction(self) -> float:
        """Share of client ids whose string the server vocabulary has exactly."""
        return float(np.mean(self.distance == 0))

    def __call__(self, client_ids: np.ndarray) -> np.ndarray:
        """Server ids of an array of client ids (any shape)."""
        ids = np.asarray(client_ids)
        if ids.size and not 0 <= ids.min() <= ids.max() < len(self.client):
            raise FedsimError(f"client ids must lie in 0..{len(self.client) - 1}, got "
                              f"{ids.min()}..{ids.max()}")
        return self.server_ids[ids]


def _candidate_order(server: Vocabulary, ids: Sequence[int]) -> np.ndarray:
    """Server ids in tie-break order: regular tokens before byte-fallback ones, then by id."""
    return np.array(sorted(ids, key=lambda i: (_is_byte_fallback(server.tokens[i], server.scheme),
                                               i)), dtype=np.int64)


def _special_target(c: int, client: Vocabulary, server: Vocabulary,
                    specials: np.ndarray) -> tuple[int, int]:
    """A client special's server id: the holder of its first shared role, else the nearest."""
    text = client.strings[c]
    for role in ROLES:
        target = server.role_id(role)
        if client.role_id(role) == c and target is not None:
            return target, Levenshtein.distance(text, server.strings[target])
    pool = specials if len(specials) else np.arange(len(server))
    index, distance = nearest([text], [server.strings[i] for i in pool])
    return int(pool[index[0]]), int(distance[0])


def build_vocab_map(client: Vocabulary, server: Vocabulary) -> VocabMap:
    """Compute the client → server map (see the module's docstring); no cache."""
    server_ids = np.empty(len(client), dtype=np.int64)
    distance = np.empty(len(client), dtype=np.int32)
    regular = [i for i in range(len(server)) if i not in server.special_ids]
    if not regular:
        raise FedsimError(f"vocabulary {server.name!r} has only special tokens")
    order = _candidate_order(server, regular)
    plain = np.array([i for i in range(len(client)) if i not in client.special_ids], np.int64)
    index, dist = nearest([client.strings[i] for i in plain],
                          [server.strings[i] for i in order])
    server_ids[plain], distance[plain] = order[index], dist
    specials = _candidate_order(server, sorted(server.special_ids))
    for c in sorted(client.special_ids):
        server_ids[c], distance[c] = _special_target(c, client, server, specials)
    return VocabMap(client, server, server_ids, distance)


def token_map_cache_dir() -> Path:
    """``$FEDSIM_CACHE/token-maps`` (default ``~/.cache/fedsim/token-maps``)."""
    return cache_dir().parent / "token-maps"


def vocab_map_key(client: Vocabulary, server: Vocabulary) -> str:
    """The cache key: both vocabularies' digests (their content, not their names) and format.

    Two models that share a tokenizer (tiny-llama borrows smollm2's) share the cached map.
    """
    parts = {"format": _CACHE_FORMAT, "client": client.digest, "server": server.digest}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _load_map(path: Path, client: Vocabulary, server: Vocabulary, key: str) -> VocabMap | None:
    """The cached map, or None when absent, unreadable or not this pair's."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
        arrays = load_file(str(path))
        return VocabMap(client, server, arrays["server_ids"].astype(np.int64),
                        arrays["distance"].astype(np.int32))
    except (SafetensorError, OSError, ValueError, KeyError, FedsimError):
        return None  # a damaged entry is rebuilt and overwritten


def vocab_map(client: Vocabulary, server: Vocabulary, *, directory: Path | None = None,
              use_cache: bool = True) -> VocabMap:
    """The client → server map, read from ``directory/<key>.safetensors`` or built and saved.

    ``directory`` defaults to :func:`token_map_cache_dir`; the file is written atomically (a
    temporary beside it, then one rename), so a killed build leaves no half-written entry.
    """
    key = vocab_map_key(client, server)
    path = (directory or token_map_cache_dir()) / f"{key}.safetensors"
    cached = _load_map(path, client, server, key) if use_cache else None
    if cached is not None:
        return cached
    built = build_vocab_map(client, server)
    if use_cache:
        with atomic_file(path) as tmp:
            save_file({"server_ids": built.server_ids, "distance": built.distance}, str(tmp),
                      metadata={"client": client.name, "server": server.name, "key": key})
    return built


# --- sequence alignment ------------------------------------------------------------------------


def _owners(texts: Sequence[str]) -> tuple[bytes, np.ndarray]:
    """The texts' bytes joined, and for each byte the index of the text it came from."""
    pieces = [t.encode("utf-8", "surrogateescape") for t in texts]
    owner = np.repeat(np.arange(len(pieces)), [len(p) for p in pieces])
    return b"".join(pieces), owner


def align_sequences(server_texts: Sequence[str], client_texts: Sequence[str]) -> list[list[int]]:
    """For each server token, the client tokens aligned with it (ascending; maybe none).

    The texts are each token's text (:meth:`Vocabulary.texts`). Their bytes are aligned by the
    Levenshtein dynamic program (rapidfuzz's opcodes: one monotone path of minimum edit cost);
    within a matched or substituted block byte t of the server side faces byte t of the client
    side (scaled if the block's sides differ in length), and two tokens are aligned when any
    of their bytes face each other. Inserted or deleted bytes face nothing, so a server token
    made only of them (a dummy-prefix space, a special token) gets an empty list.
    """
    server_bytes, server_owner = _owners(server_texts)
    client_bytes, client_owner = _owners(client_texts)
    pairs = []
    for op in Levenshtein.opcodes(server_bytes, client_bytes):
        if op.tag in ("equal", "replace"):
            k = np.arange(op.src_start, op.src_end)
            facing = op.dest_start + (k - op.src_start) * (op.dest_end - op.dest_start) // len(k)
            pairs.append(np.stack([server_owner[k], client_owner[facing]], axis=1))
    groups: list[list[int]] = [[] for _ in server_texts]
    if pairs:
        for s, c in np.unique(np.concatenate(pairs), axis=0):  # rows sorted: ascending per s
            groups[s].append(int(c))
    return groups


# --- top-k distributions onto the server's positions -------------------------------------------


def align_topk(vmap: VocabMap, server_ids: Sequence[int], client_ids: Sequence[int],
               indices: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A client's top-k per client position, as top-k per server position of the same text.

    ``server_ids`` and ``client_ids`` are the two tokenizations of one text; row j of
    ``indices``/``probs`` (both ``(len(client_ids), k)``) is the client's distribution for the
    token at position j (a causal LM's output at j − 1): client ids and their probabilities.
    Each client id goes through ``vmap`` (two that land on one server id add up); the rows of
    the client positions aligned to a server position (:func:`align_sequences`) are averaged,
    a token missing from a row counting 0 there; the k largest masses are kept (ties: smaller
    server id first). Returns ``(len(server_ids), k)`` server ids and probabilities, padded
    with id −1 and probability 0 where fewer than k ids remain or nothing is aligned.
    """
    indices, probs = np.asarray(indices), np.asarray(probs, dtype=np.float64)
    if indices.ndim != 2 or indices.shape != probs.shape or indices.shape[1] < 1:
        raise FedsimError(f"indices and probs must both be (positions, k >= 1), got "
                          f"{indices.shape} and {probs.shape}")
    if indices.shape[0] != len(client_ids):
        raise FedsimError(f"{indices.shape[0]} rows of top-k for {len(client_ids)} client tokens")
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise FedsimError("probs must be finite probabilities >= 0 (softmax, then top-k)")
    k = indices.shape[1]
    mapped = vmap(indices)
    groups = align_sequences(vmap.server.texts(server_ids), vmap.client.texts(client_ids))
    out_ids = np.full((len(groups), k), -1, dtype=np.int64)
    out_probs = np.zeros((len(groups), k))
    for i, rows in enumerate(groups):
        if not rows:
            continue
        ids, inverse = np.unique(mapped[rows].ravel(), return_inverse=True)
        mass = np.bincount(inverse, weights=probs[rows].ravel()) / len(rows)
        keep = np.lexsort((ids, -mass))[:k]  # largest mass first, then the smaller id
        out_ids[i, :len(keep)], out_probs[i, :len(keep)] = ids[keep], mass[keep]
    return out_ids, out_probs

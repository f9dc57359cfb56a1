"""Task vectors, module role maps, and small → large projectors (registry ``PROJECTORS``).

A client family trains LoRA on a small model; the server holds a larger one. For each module
*role* (q/k/v/o, up/gate/down, and the classification ``head``) :func:`module_pairs` matches the
small model's modules with the large model's: small layer ℓ goes to large layer
round(ℓ·(L_large−1)/(L_small−1)) (halves round up; a one-layer model's layer is layer 0). Widths
come from the modules' own weights, so grouped-query attention (k/v narrower than q) needs no
special case.

A projector gives, per pair, ``P_out`` (out_large × out_small) and ``Q_in`` (in_small ×
in_large), and a LoRA update ``ΔW_s = B·A`` becomes ``ΔW_L = (P_out·B)·(A·Q_in)``: still rank r,
and the small dense matrix is never formed. The reason: if the large module's output relates to
the small one's as y_L ≈ P·y_s and its input as x_s ≈ Q·x_L, then the small update's effect
ΔW_s·x_s seen in the large model is P·ΔW_s·Q·x_L.

The classification head is the model's *final* linear layer: BERT's ``classifier`` (on the pooled
[CLS]), MPNet's ``classifier.out_proj`` (after its ``classifier.dense`` + tanh), Llama/Gemma's
``score`` (read at the last real token). Class axes correspond one to one, so the head's
``P_out`` is the identity and only ``Q_in`` acts, fitted on the head's own inputs, one per
sequence. Layers before the final linear in a head (MPNet's ``classifier.dense``) are not mapped:
their deltas stay with the family.

Projectors: ``lstsq`` (ridge least squares on paired activations of a probe corpus, cached on
disk), ``orthogonal`` (a seeded random isometry), ``pad`` (zero-pad / truncate identity).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fedsim.accelerators import device_of, to_device
from fedsim.atomic import atomic_file
from fedsim.errors import FedsimError
from fedsim.models import cache_dir
from fedsim.plugins import PROJECTORS
from fedsim.roles import ROLES, role_of

HEAD = "head"
# The head's final linear layer, by module name, most specific first.
HEAD_MODULES = ("classifier.out_proj", "classifier", "score")
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
_LAYER = re.compile(r"(?:^|\.)(?:layer|layers)\.(\d+)\.")  # the layer index in a module path
_WORD = re.compile(r"\S+")
_CACHE_FORMAT = 1  # bump when the cached maps' meaning changes


class ModelLike(Protocol):
    """What a projector reads: a ``LoadedModel``, a ``FamilyTrainer``, or a test stand-in.
    One with a ``task`` (a :class:`fedsim.tasks.Task`) gets its whole-model inputs in the
    task's shape (a multiple-choice head takes (batch, choices, tokens))."""

    model: nn.Module
    tokenizer: Any
    spec: Any  # .name and .architecture


# ---------------------------------------------------------------------------------------------
# Module role maps


@dataclass(frozen=True)
class ModulePair:
    """One small module and the large module its updates land in.

    Names are module names as adapter keys spell them (peft's prefixes stripped); layers are
    None for the head; shapes are the weights' (out, in).
    """

    role: str
    small_name: str
    large_name: str
    small_layer: int | None
    large_layer: int | None
    small_shape: tuple[int, int]
    large_shape: tuple[int, int]


def map_layer(layer: int, small_layers: int, large_layers: int) -> int:
    """round(ℓ·(L_large−1)/(L_small−1)), halves up; a one-layer small model maps to layer 0."""
    if not 0 <= layer < small_layers:
        raise FedsimError(f"layer must be in [0, {small_layers}), got {layer}")
    if small_layers == 1:
        return 0
    return math.floor(layer * (large_layers - 1) / (small_layers - 1) + 0.5)


def _clean(name: str) -> str:
    """A module name as adapter keys spell it: peft's ``base_model.model.`` prefix dropped, and a
    ``modules_to_save`` copy (the trained head) named as the module it replaces."""
    return name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules by clean name. Where peft keeps an original and a trained copy of a head, the
    copy (listed last) wins: it is the one the forward pass uses."""
    return {_clean(name): module for name, module in model.named_modules()}


def _weight(module: nn.Module) -> torch.Tensor:
    while hasattr(module, "base_layer"):  # a peft LoRA layer wraps the frozen linear
        module = module.base_layer
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise FedsimError(f"module {type(module).__name__} has no 2-D weight")
    return weight


def _shape(module: nn.Module) -> tuple[int, int]:
    out_dim, in_dim = _weight(module).shape
    return int(out_dim), int(in_dim)


def head_name(modules: Mapping[str, nn.Module]) -> str | None:
    """The name of the final linear layer of a classification head, or None (no head)."""
    for name in HEAD_MODULES:
        module = modules.get(name)
        if module is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
            return name
    return None


def _layered(modules: Mapping[str, nn.Module], arch: str) -> dict[str, dict[int, str]]:
    """role -> layer -> module name, for every module that has a role in ``arch``."""
    out: dict[str, dict[int, str]] = {}
    for name in modules:
        role = role_of(arch, name)
        match = _LAYER.search(name) if role else None
        if role and match:
            out.setdefault(role, {})[int(match.group(1))] = name
    return out


def module_pairs(small_model: nn.Module, small_arch: str, large_model: nn.Module,
                 large_arch: str, roles: Sequence[str]) -> list[ModulePair]:
    """Every small module of ``roles`` paired with its large module (see the module docstring).

    Raises when a role is unknown or has no module in either model (a requested update with
    nowhere to go is an error, not a silent drop), or when the heads' class counts differ.
    """
    roles = tuple(dict.fromkeys(roles))
    unknown = [r for r in roles if r not in (*ROLES, HEAD)]
    if unknown or not roles:
        raise FedsimError(f"roles must be a non-empty subset of {(*ROLES, HEAD)}, got {roles}")
    small, large = named_modules(small_model), named_modules(large_model)
    by_role_s, by_role_l = _layered(small, small_arch), _layered(large, large_arch)
    depth_s = 1 + max((i for layers in by_role_s.values() for i in layers), default=0)
    depth_l = 1 + max((i for layers in by_role_l.values() for i in layers), default=0)
    pairs = []
    for role in (r for r in roles if r != HEAD):
        for arch, found in ((small_arch, by_role_s), (large_arch, by_role_l)):
            if not found.get(role):
                raise FedsimError(f"role {role!r} has no module in the {arch} model")
        for layer, name in sorted(by_role_s[role].items()):
            target = map_layer(layer, depth_s, depth_l)
            large_name = by_role_l[role].get(target)
            if large_name is None:
                raise FedsimError(f"role {role!r}: the {large_arch} model has no layer {target}")
            pairs.append(ModulePair(role, name, large_name, layer, target,
                                    _shape(small[name]), _shape(large[large_name])))
    if HEAD in roles:
        head_s, head_l = head_name(small), head_name(large)
        if head_s is None or head_l is None:
            which = small_arch if head_s is None else large_arch
            raise FedsimError(f"role 'head': the {which} model has no classification head")
        shape_s, shape_l = _shape(small[head_s]), _shape(large[head_l])
        if shape_s[0] != shape_l[0]:
            raise FedsimError(f"role 'head': {shape_s[0]} classes in the small model, "
                              f"{shape_l[0]} in the large one")
        pairs.append(ModulePair(HEAD, head_s, head_l, None, None, shape_s, shape_l))
    return pairs


# ---------------------------------------------------------------------------------------------
# Task vectors in LoRA factor form


class LowRank(NamedTuple):
    """ΔW = B·A with B (out × rank) and A (rank × in)."""

    B: torch.Tensor
    A: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def dense(self) -> torch.Tensor:
        return self.B @ self.A


@dataclass(frozen=True)
class TaskVector:
    """A client's round update: LoRA modules in factor form, other keys (the head) dense."""

    factors: dict[str, LowRank]  # module name -> factors of its weight update
    dense: dict[str, torch.Tensor]  # parameter key -> its update (e.g. classifier.weight)


def task_vector(start: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                scale: float) -> TaskVector:
    """The round's task vector of a client that trained from ``start`` and reports ``delta``.

    For a LoRA module with start (A0, B0) and delta (ΔA, ΔB), s·((B0+ΔB)(A0+ΔA) − B0·A0) is
    exactly [s·(B0+ΔB), −s·B0]·[A0+ΔA; A0]: rank 2r, kept in that form. Where B0 = 0 (a fresh
    adapter, round one) the second half is zero and is dropped: rank r. ``scale`` is LoRA's
    lora_alpha / r. Non-LoRA keys (the trained head) are dense deltas as they are.
    """
    if delta.keys() - start.keys():
        raise FedsimError(f"delta keys missing from the start adapter: "
                          f"{sorted(delta.keys() - start.keys())[:3]}")
    factors: dict[str, LowRank] = {}
    dense: dict[str, torch.Tensor] = {}
    for key, d in delta.items():
        if key.endswith(LORA_A):
            module = key.removesuffix(LORA_A)
            a0, b0 = start[key], start[module + LORA_B]
            a1, b1 = a0 + d, b0 + delta[module + LORA_B]
            if torch.count_nonzero(b0) == 0:
                factors[module] = LowRank(scale * b1, a1)
            else:
                factors[module] = LowRank(torch.cat([scale * b1, -scale * b0], dim=1),
                                          torch.cat([a1, a0], dim=0))
        elif not key.endswith(LORA_B):
            dense[key] = d
    return TaskVector(factors, dense)


def projection_flops(pair: ModulePair, rank: int) -> float:
    """FLOPs of (P_out·B, A·Q_in) for rank-``rank`` factors: 2·out_L·out_s·r + 2·r·in_s·in_L."""
    (out_s, in_s), (out_l, in_l) = pair.small_shape, pair.large_shape
    return 2.0 * rank * (out_l * out_s + in_s * in_l)


def dense_projection_flops(pair: ModulePair) -> float:
    """FLOPs of P_out·D·Q_in for a dense (out_s × in_s) delta D, the head's."""
    (out_s, in_s), (out_l, in_l) = pair.small_shape, pair.large_shape
    return 2.0 * (out_l * out_s * in_s + out_l * in_s * in_l)


# ---------------------------------------------------------------------------------------------
# Ridge least squares: pure math


class PairedMoments:
    """Running float64 sums of paired sample rows, enough for ridge least squares
    ``target ≈ M·source`` (M: d_target × d_source) without keeping the samples."""

    def __init__(self, d_source: int, d_target: int) -> None:
        f64 = torch.float64
        self.n = 0
        self.sum_s, self.sum_t = torch.zeros(d_source, dtype=f64), torch.zeros(d_target, dtype=f64)
        self.ss = torch.zeros(d_source, d_source, dtype=f64)  # Σ s sᵀ
        self.ts = torch.zeros(d_target, d_source, dtype=f64)  # Σ t sᵀ

    def update(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Add (n, d_source) and (n, d_target) rows, sample i in row i of both."""
        if source.shape[0] != target.shape[0]:
            raise FedsimError(f"paired rows differ: {source.shape[0]} and {target.shape[0]}")
        s, t = source.to(torch.float64), target.to(torch.float64)
        self.n += s.shape[0]
        self.sum_s += s.sum(0)
        self.sum_t += t.sum(0)
        self.ss += s.T @ s
        self.ts += t.T @ s

    def solve(self, ridge: float, center: bool) -> torch.Tensor:
        """argmin_M ||T − M·S||² + λ||M||², i.e. M = (T Sᵀ)(S Sᵀ + λI)⁻¹.

        ``center``: fit on mean-removed samples (an intercept, then dropped). λ = ``ridge`` ×
        the mean eigenvalue of S Sᵀ, so one ``ridge`` suits activations of any scale.
        """
        if self.n == 0:
            raise FedsimError("no paired samples to fit a map on")
        ss, ts = self.ss, self.ts
        if center:
            ss = ss - torch.outer(self.sum_s, self.sum_s) / self.n
            ts = ts - torch.outer(self.sum_t, self.sum_s) / self.n
        d = ss.shape[0]
        lam = ridge * max(float(torch.trace(ss)) / d, 1e-12)
        # ss is symmetric: M·(ss + λI) = ts  <=>  (ss + λI)·Mᵀ = tsᵀ
        return torch.linalg.solve(ss + lam * torch.eye(d, dtype=ss.dtype), ts.T).T


def fit_linear_map(source: torch.Tensor, target: torch.Tensor, ridge: float = 1e-6,
                   center: bool = False) -> torch.Tensor:
    """Ridge least-squares M (d_target × d_source) with target rows ≈ M·source rows."""
    moments = PairedMoments(source.shape[1], target.shape[1])
    moments.update(source, target)
    return moments.solve(ridge, center)


# ---------------------------------------------------------------------------------------------
# Paired activations: word-aligned capture


def token_word_ids(texts: Sequence[str], offsets: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """(batch, tokens) index of the whitespace-separated word of ``texts[i]`` each token belongs
    to, from a fast tokenizer's character offsets; −1 for special, padding and blank tokens.

    A token belongs to the word of its first non-space character (byte-level BPE puts the
    preceding space into the token).
    """
    out = torch.full(mask.shape, -1, dtype=torch.long)
    for i, text in enumerate(texts):
        char_word = np.full(len(text) + 1, -1, dtype=np.int64)
        for j, match in enumerate(_WORD.finditer(text)):
            char_word[match.start():match.end()] = j
        for t, (start, end) in enumerate(offsets[i].tolist()):
            if end > start and mask[i, t]:
                words = char_word[start:end]
                words = words[words >= 0]
                if words.size:
                    out[i, t] = int(words[0])
    return out


def _align(words_s: torch.Tensor, words_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per token of each model, the index of its (text, word) among the words both models saw
    (truncation can cut either), or −1; and how many such words there are."""
    def keys(words: torch.Tensor) -> np.ndarray:
        rows = np.arange(words.shape[0])[:, None] << 32
        w = words.numpy()
        return np.where(w >= 0, rows + w, -1)

    ks, kl = keys(words_s), keys(words_l)
    common = np.intersect1d(ks[ks >= 0], kl[kl >= 0])

    def index(k: np.ndarray) -> torch.Tensor:
        if common.size == 0:
            return torch.full(k.shape, -1, dtype=torch.long)
        pos = np.minimum(np.searchsorted(common, k), common.size - 1)
        return torch.from_numpy(np.where((k >= 0) & (common[pos] == k), pos, -1))

    return index(ks), index(kl), int(common.size)


class _WordPooler:
    """Mean of the token states of each aligned word, as one sparse (words × tokens) averaging
    matrix per batch; a tensor hooked at several modules (q, k and v share their input) is
    pooled once."""

    def __init__(self, index: torch.Tensor, n: int) -> None:
        idx = index.reshape(-1)
        tokens = (idx >= 0).nonzero().squeeze(1)
        words = idx[tokens]
        counts = torch.bincount(words, minlength=n).to(torch.float64)
        self.matrix = torch.sparse_coo_tensor(torch.stack([words, tokens]), 1.0 / counts[words],
                                              (n, idx.numel()), check_invariants=True).coalesce()
        self._pooled: dict[int, torch.Tensor] = {}  # by id: the batch's tensors stay alive

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        """(words, d) float64 from (batch, tokens, d)."""
        if id(states) not in self._pooled:
            flat = states.reshape(-1, states.shape[-1]).to(torch.float64)
            self._pooled[id(states)] = torch.sparse.mm(self.matrix, flat)
        return self._pooled[id(states)]


def _input_groups(acts: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, str]:
    """Each hooked module -> the first (by name) that received the very same input tensor."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(acts[name][0]), name) for name in sorted(acts)}


def _last_real(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One row per sequence: (batch, d) as it is, or the last real token of (batch, tokens, d)
    (where a decoder's classification head reads; batches are right-padded)."""
    if states.dim() == 2:
        return states
    last = (mask.long() * torch.arange(mask.shape[1])).argmax(dim=1)
    return states[torch.arange(states.shape[0]), last]


def _runner(model: nn.Module, with_head: bool) -> nn.Module:
    """The module to run: the whole model when the head's inputs are needed, else the backbone
    alone (a causal LM's vocabulary-wide logits would dominate the cost)."""
    if with_head:
        return model
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "base_model", inner)


@dataclass
class _Capture:
    """One forward pass's (input, output) of the hooked modules, and its token layout."""

    acts: dict[str, tuple[torch.Tensor, torch.Tensor]]
    words: torch.Tensor  # (batch, tokens) word index, −1 for none
    mask: torch.Tensor  # (batch, tokens) attention mask


@torch.inference_mode()
def capture(obj: ModelLike, texts: Sequence[str], names: Sequence[str], max_length: int,
            with_head: bool) -> _Capture:
    """Run ``obj`` on ``texts`` (right-padded, truncated to ``max_length`` tokens) and keep the
    input and output of each module in ``names``. The model runs as it is (eval mode)."""
    tokenizer = obj.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise FedsimError(f"{obj.spec.name}: word alignment needs a fast tokenizer (offsets)")
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                    return_offsets_mapping=True, return_tensors="pt", padding_side="right")
    offsets = enc.pop("offset_mapping")
    runner = _runner(obj.model, with_head)
    accepted = inspect.signature(runner.forward).parameters
    inputs = {k: v for k, v in enc.items() if k in accepted or "kwargs" in accepted}
    task = getattr(obj, "task", None)
    if with_head and hasattr(task, "single_text_inputs"):  # the head's own input shape
        inputs = task.single_text_inputs(inputs)
    modules = named_modules(obj.model)
    acts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        acts[name] = (args[0].detach().cpu(), output.detach().cpu())  # fitted on the CPU

    hooks = [modules[n].register_forward_hook(functools.partial(keep, n)) for n in set(names)]
    try:
        runner(**to_device(inputs, device_of(obj.model)))
    finally:
        for hook in hooks:
            hook.remove()
    mask = enc["attention_mask"]
    return _Capture(acts, token_word_ids(texts, offsets, mask), mask)


def head_inputs(obj: ModelLike, texts: Sequence[str], max_length: int,
                batch_size: int = 16) -> torch.Tensor:
    """(len(texts), hidden) inputs of the model's final classification layer, one per text."""
    name = head_name(named_modules(obj.model))
    if name is None:
        raise FedsimError(f"{obj.spec.name} has no classification head")
    rows = []
    for i in range(0, len(texts), batch_size):
        cap = capture(obj, texts[i:i + batch_size], [name], max_length, with_head=True)
        rows.append(_last_real(cap.acts[name][0], cap.mask))
    return torch.cat(rows).to(torch.float32)


def fingerprint(model: nn.Module) -> str:
    """sha256 of the model's parameters as they are (names, shapes, bytes): 0.3 s per 100M."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        t = param.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Projectors


class Projector(ABC):
    """Maps (P_out, Q_in) per module pair between one small and one large model.

    ``fit`` matches the modules of ``roles`` (``module_pairs``) and fits the maps; then
    ``project(pair, B, A)`` gives the large module's factors (P_out·B, A·Q_in).
    """

    name: str

    def __init__(self, roles: Sequence[str] = ("q", "v", HEAD), *, seed: int = 0) -> None:
        self.roles = tuple(dict.fromkeys(roles))
        self.seed = seed
        self.pairs: list[ModulePair] = []
        self.cache_hit = False  # lstsq: whether the last fit loaded its maps from disk
        self._by_small: dict[str, ModulePair] = {}

    def fit(self, small: ModelLike, large: ModelLike, probe_texts: Sequence[str]) -> None:
        """Pair the modules of ``small`` and ``large`` and fit the maps (``probe_texts``:
        an unlabelled server-side corpus; only ``lstsq`` reads it)."""
        self.pairs = module_pairs(small.model, small.spec.architecture, large.model,
                                  large.spec.architecture, self.roles)
        self._by_small = {p.small_name: p for p in self.pairs}
        self._fit(small, large, list(probe_texts))

    def _fit(self, small: ModelLike, large: ModelLike, probe_texts: list[str]) -> None:
        """Fit the maps of ``self.pairs`` (nothing to fit for data-free projectors)."""

    def pair_of(self, small_name: str) -> ModulePair:
        """The pair of small module ``small_name``."""
        if not self.pairs:
            raise FedsimError(f"projector {self.name!r} is not fitted: call fit first")
        try:
            return self._by_small[small_name]
        except KeyError:
            raise FedsimError(f"small module {small_name!r} has no fitted pair (roles "
                              f"{self.roles})") from None

    @property
    def head_pair(self) -> ModulePair | None:
        return next((p for p in self.pairs if p.role == HEAD), None)

    @abstractmethod
    def maps(self, pair: ModulePair) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_out: out_L × out_s, Q_in: in_s × in_L), float32."""

    def project(self, pair: ModulePair, B: torch.Tensor,
                A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The large module's factors (P_out·B, A·Q_in) of the small update B·A: same rank."""
        (out_s, in_s) = pair.small_shape
        if B.shape[0] != out_s or A.shape[1] != in_s or B.shape[1] != A.shape[0]:
            raise FedsimError(f"{pair.small_name}: factors {tuple(B.shape)}·{tuple(A.shape)} "
                              f"do not fit a {out_s}×{in_s} weight")
        p_out, q_in = self.maps(pair)
        return p_out @ B.to(p_out.dtype), A.to(q_in.dtype) @ q_in

    def project_dense(self, pair: ModulePair, delta: torch.Tensor) -> torch.Tensor:
        """P_out·D·Q_in for a dense weight delta D, or P_out·d for a bias delta d."""
        p_out, q_in = self.maps(pair)
        delta = delta.to(p_out.dtype)
        return p_out @ delta @ q_in if delta.dim() == 2 else p_out @ delta




def _identity_head(pair: ModulePair) -> torch.Tensor:
    return torch.eye(pair.large_shape[0], pair.small_shape[0])


@PROJECTORS.register("pad")
class Pad(Projector):
    """Zero-pad / truncate: the small space is the first coordinates of the large one.

    P_out = [I; 0] (out_L × out_s) embeds; Q_in = [I 0] (in_s × in_L) keeps the first in_s
    input coordinates. The data-free baseline: right only if the large model extends the small
    one coordinate by coordinate.
    """

    def maps(self, pair: ModulePair) -> tuple[torch.Tensor, torch.Tensor]:
        (out_s, in_s), (out_l, in_l) = pair.small_shape, pair.large_shape
        p_out = _identity_head(pair) if pair.role == HEAD else torch.eye(out_l, out_s)
        return p_out, torch.eye(in_s, in_l)


def semi_orthogonal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random (rows × cols) matrix with orthonormal columns (rows ≥ cols) or rows."""
    g = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)  # sign fix: Haar, not QR-biased
    return (q if rows >= cols else q.T).to(torch.float32)


@PROJECTORS.register("orthogonal")
class Orthogonal(Projector):
    """A random isometry between each pair of widths: R (d_L × d_s), semi-orthogonal, drawn from
    a generator seeded by (seed, d_s, d_L); P_out = R_out, Q_in = R_inᵀ.

    One R per pair of widths makes the maps consistent across modules that share a space (the
    residual stream: an o output and a q input), as ``pad`` is; ``pad`` is R = [I; 0].
    """

    def __init__(self, roles: Sequence[str] = ("q", "v", HEAD), *, seed: int = 0) -> None:
        super().__init__(roles, seed=seed)
        self._drawn: dict[tuple[int, int], torch.Tensor] = {}

    def isometry(self, d_small: int, d_large: int) -> torch.Tensor:
        """R (d_large × d_small), the same for the same (seed, widths)."""
        if (d_small, d_large) not in self._drawn:
            state = np.random.SeedSequence([self.seed, d_small, d_large]).generate_state(2)
            gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
            self._drawn[d_small, d_large] = semi_orthogonal(d_large, d_small, gen)
        return self._drawn[d_small, d_large]

    def maps(self, pair: ModulePair) -> tuple[torch.Tensor, torch.Tensor]:
        (out_s, in_s), (out_l, in_l) = pair.small_shape, pair.large_shape
        p_out = _identity_head(pair) if pair.role == HEAD else self.isometry(out_s, out_l)
        return p_out, self.isometry(in_s, in_l).T.contiguous()


def projector_cache_dir() -> Path:
    """``$FEDSIM_CACHE/projectors`` (default ``~/.cache/fedsim/projectors``)."""
    return cache_dir().parent / "projectors"


@PROJECTORS.register("lstsq")
class LeastSquares(Projector):
    """Learned from paired activations of both models on a probe corpus.

    Both models run on the same texts; forward hooks keep each paired module's input and output
    per token; tokens are pooled into words (whitespace-separated spans, mean of the sub-token
    states, via the fast tokenizers' offsets) so that different tokenizers line up, and only words
    both models saw are used. Then, by ridge least squares in float64:

    - ``P_out`` = argmin ||Y_L − P·Y_s||² + λ||P||², on mean-removed outputs: an update moves
      outputs by ΔW·x, a direction, so a constant offset between the spaces is irrelevant;
    - ``Q_in`` = argmin ||X_s − Q·X_L||² + λ||Q||², uncentered: ΔW_s acts on the whole input,
      mean included;
    - the head: ``Q_in`` from the heads' inputs, one row per text; ``P_out`` = I.

    λ is ``ridge`` times the mean eigenvalue of the source Gram matrix. Maps are cached under
    :func:`projector_cache_dir` as ``<key>.safetensors`` (written atomically, read with
    safetensors, never pickle); the key hashes both models' names and parameters, the roles,
    ``ridge``, ``max_length`` and the probe corpus: a changed corpus or changed weights refit.
    """

    def __init__(self, roles: Sequence[str] = ("q", "v", HEAD), *, seed: int = 0,
                 ridge: float = 1e-2, max_length: int = 128, batch_size: int = 8,
                 use_cache: bool = True) -> None:
        super().__init__(roles, seed=seed)
        if not ridge > 0:
            raise FedsimError(f"ridge must be > 0, got {ridge}")
        if max_length < 2 or batch_size < 1:
            raise FedsimError(f"max_length must be >= 2 and batch_size >= 1, got {max_length} "
                              f"and {batch_size}")
        self.ridge, self.max_length, self.batch_size = ridge, max_length, batch_size
        self.use_cache = use_cache
        self._maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def cache_key(self, small: ModelLike, large: ModelLike, probe_texts: Sequence[str]) -> str:
        corpus = hashlib.sha256(json.dumps(list(probe_texts)).encode()).hexdigest()
        parts = {"format": _CACHE_FORMAT, "small": small.spec.name, "large": large.spec.name,
                 "small_params": fingerprint(small.model), "large_params": fingerprint(large.model),
                 "roles": list(self.roles), "ridge": self.ridge, "max_length": self.max_length,
                 "corpus": corpus}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def _fit(self, small: ModelLike, large: ModelLike, probe_texts: list[str]) -> None:
        if not probe_texts:
            raise FedsimError("projector 'lstsq' needs a non-empty probe corpus")
        path = projector_cache_dir() / f"{self.cache_key(small, large, probe_texts)}.safetensors"
        maps = _load_maps(path, self.pairs) if self.use_cache else None
        self.cache_hit = maps is not None
        if maps is None:
            maps = self._fit_maps(small, large, probe_texts)
            if self.use_cache:
                _save_maps(path, maps, self.pairs)
        self._maps = maps

    def _fit_maps(self, small: ModelLike, large: ModelLike,
                  texts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        layered = [p for p in self.pairs if p.role != HEAD]
        head = self.head_pair
        p_fit = {p.small_name: PairedMoments(p.small_shape[0], p.large_shape[0]) for p in layered}
        # Q_in moments by (small input, large input): q, k and v of a layer share one.
        q_fit: dict[tuple[str, str], PairedMoments] = {}
        q_key: dict[str, tuple[str, str]] = {}
        if head is not None:
            q_key[head.small_name] = (HEAD, HEAD)
            q_fit[HEAD, HEAD] = PairedMoments(head.large_shape[1], head.small_shape[1])
        for i in range(0, len(texts), self.batch_size):
            batch = texts[i:i + self.batch_size]
            cap_s = capture(small, batch, [p.small_name for p in self.pairs], self.max_length,
                            head is not None)
            cap_l = capture(large, batch, [p.large_name for p in self.pairs], self.max_length,
                            head is not None)
            index_s, index_l, n = _align(cap_s.words, cap_l.words)
            pool_s, pool_l = _WordPooler(index_s, n), _WordPooler(index_l, n)
            groups_s, groups_l = _input_groups(cap_s.acts), _input_groups(cap_l.acts)
            updated = set()
            for p in layered:
                (x_s, y_s), (x_l, y_l) = cap_s.acts[p.small_name], cap_l.acts[p.large_name]
                p_fit[p.small_name].update(source=pool_s(y_s), target=pool_l(y_l))
                key = q_key.setdefault(p.small_name, (groups_s[p.small_name],
                                                      groups_l[p.large_name]))
                if key not in updated:
                    moments = q_fit.setdefault(key, PairedMoments(p.large_shape[1],
                                                                  p.small_shape[1]))
                    moments.update(source=pool_l(x_l), target=pool_s(x_s))
                    updated.add(key)
            if head is not None:
                q_fit[HEAD, HEAD].update(
                    source=_last_real(cap_l.acts[head.large_name][0], cap_l.mask),
                    target=_last_real(cap_s.acts[head.small_name][0], cap_s.mask))
        solved = {key: m.solve(self.ridge, center=False).float() for key, m in q_fit.items()}
        maps = {}
        for p in self.pairs:
            p_out = (_identity_head(p) if p.role == HEAD
                     else p_fit[p.small_name].solve(self.ridge, center=True).float())
            maps[p.small_name] = (p_out, solved[q_key[p.small_name]])
        return maps

    def maps(self, pair: ModulePair) -> tuple[torch.Tensor, torch.Tensor]:
        if pair.small_name not in self._maps:
            raise FedsimError(f"projector 'lstsq' has no maps for {pair.small_name!r}: fit first")
        return self._maps[pair.small_name]


def _pairs_tag(pairs: Sequence[ModulePair]) -> str:
    return json.dumps([[p.small_name, p.large_name, p.small_shape, p.large_shape] for p in pairs])


def _save_maps(path: Path, maps: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
               pairs: Sequence[ModulePair]) -> None:
    """Write the maps to ``path`` atomically: a temp file beside it, then one rename."""
    tensors = {}
    for name, (p_out, q_in) in maps.items():
        tensors[f"P_out:{name}"], tensors[f"Q_in:{name}"] = p_out.contiguous(), q_in.contiguous()
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"pairs": _pairs_tag(pairs)})


def _load_maps(path: Path, pairs: Sequence[ModulePair]
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """The cached maps of ``pairs``, or None when absent, unreadable or for other pairs."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("pairs") != _pairs_tag(pairs):
                return None
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return None  # a damaged cache entry is refitted and overwritten
    try:
        return {p.small_name: (tensors[f"P_out:{p.small_name}"], tensors[f"Q_in:{p.small_name}"])
                for p in pairs}
    except KeyError:
        return None


def make_projector(name: str, roles: Sequence[str], seed: int = 0, **options: Any) -> Projector:
    """``PROJECTORS[name](roles, seed=seed, **options)``; unknown names raise with the known."""
    return PROJECTORS.get(name)(roles, seed=seed, **options)

"""The server model: a larger model into which the client families' task vectors are merged.

Each client family trains LoRA on its own small model. The server holds one large model and,
per family, a projector fitted between that family's model and it (``fedsim.projection``). A
client's round update becomes a task vector in LoRA factor form, is projected into the large
model's modules (still low rank), and at the round's close the aggregation rule combines the
projected updates, ``W ← W + η·Σ αᵢ·τᵢ / Σ αᵢ`` for task arithmetic, merged into the weights.

Why merged, not kept as adapters: there is one model to evaluate and serve, whatever the number
of families; families train different roles at different ranks, and stacking their adapters
would grow the server's rank (and inference cost) every round.

The large model is held by a :class:`~fedsim.training.FamilyTrainer` (a minimal rank-1 LoRA
with B = 0, so it computes exactly the base model) so that the server is evaluated with exactly
the clients' evaluation: same tokenization, same metrics, for every task type.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from fedsim.aggregators import Aggregator, ClientResult, Delta
from fedsim.atomic import atomic_file
from fedsim.data import Example
from fedsim.errors import FedsimError
from fedsim.models import cache_dir, model_source
from fedsim.plugins import TRANSFERS, TransferConfig
from fedsim.projection import (
    HEAD,
    LORA_A,
    LORA_B,
    ModelLike,
    Projector,
    dense_projection_flops,
    fingerprint,
    head_inputs,
    head_name,
    make_projector,
    named_modules,
    projection_flops,
    task_vector,
)
from fedsim.roles import ROLE_MODULES
from fedsim.training import FamilyTrainer, LocalTrainingConfig


def _param_key(name: str) -> str | None:
    """A parameter's key in the server's weight space (``...attn.q.weight``,
    ``classifier.out_proj.weight``), or None for peft's own parameters and copies."""
    if ".lora_" in name or "original_module" in name:
        return None
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return name.replace("modules_to_save.default.", "")


def probe_cache_dir() -> Path:
    """``$FEDSIM_CACHE/probes``: fitted linear probes (16 s of mpnet-base features for the
    quickstart's 200 texts), read back by the next run of the same server."""
    return cache_dir().parent / "probes"


def _load_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    """A cached safetensors file's tensors, or None when absent or unreadable (refitted)."""
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return None


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                            l2: float = 1e-3, max_iter: int = 200, bias: bool = True
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multinomial logistic regression, W (classes × d) and b: scikit-learn's L-BFGS in float64.

    It minimizes mean cross-entropy + ``l2``·‖W‖² on standardized features (``l2`` applies to
    the standardized weights); the result is folded back onto raw features, and without
    ``bias`` they are only scaled. Deterministic: full batch, at most ``max_iter`` iterations.
    """
    x = features.to(torch.float64)
    mean = x.mean(0) if bias else torch.zeros(x.shape[1], dtype=torch.float64)
    scale = (x - mean).pow(2).mean(0).sqrt().clamp_min(1e-8)
    z = ((x - mean) / scale).numpy()
    w, b = _fit_standardized(z, labels.numpy(), num_classes, l2, max_iter, bias)
    w_raw = (torch.from_numpy(w) / scale).float()
    return w_raw, ((torch.from_numpy(b) - w_raw.double() @ mean).float() if bias else None)


def _fit_standardized(z: np.ndarray, y: np.ndarray, num_classes: int, l2: float, max_iter: int,
                      bias: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows 0..num_classes-1 of W and b (b centred: softmax ignores a common shift).

    scikit-learn minimizes ½‖W‖² + C·Σ CE, i.e. mean CE + ‖W‖²/(2·C·n): C = 1/(2·l2·n). Two
    classes it fits as one vector v, whose softmax rows are ∓v/2 (the penalized optimum is
    symmetric), so ‖W‖² = ‖v‖²/2 and C = 1/(l2·n). A class absent from ``y`` keeps a zero row:
    the fitted rows sum to zero, so it never scores above every seen class; with fewer than two
    seen classes there is nothing to separate and every row stays zero.
    """
    w, b = np.zeros((num_classes, z.shape[1])), np.zeros(num_classes)
    seen = np.unique(y)
    if len(seen) < 2:
        return w, b
    binary = len(seen) == 2
    model = LogisticRegression(C=1.0 / ((1 if binary else 2) * l2 * len(y)), fit_intercept=bias,
                               solver="lbfgs", max_iter=max_iter, tol=1e-9)
    with warnings.catch_warnings():  # an exhausted iteration budget is the contract, not a fault
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(z, y)
    coef = model.coef_
    intercept = np.broadcast_to(model.intercept_, (len(coef),)).astype(np.float64)
    if binary:
        coef, intercept = np.vstack([-coef[0], coef[0]]) / 2, np.array([-1.0, 1.0]) * intercept / 2
    w[seen], b[seen] = coef, intercept - intercept.mean()
    return w, b


@dataclass
class ServerFamily:
    """A client family as the server sees it: its projector and LoRA scale (lora_alpha / r)."""

    model: str
    projector: Projector
    lora_scale: float


class ServerModel:
    """The large server model, one projector per client family, and the merged updates.

    ``model``, ``tokenizer`` and ``spec`` make it a model a projector can be fitted against.
    ``probe_examples`` (labelled, server-side; classification only): the head's final linear
    layer is fitted on the frozen model's features as a linear probe, so the "no update"
    baseline is a sensible classifier rather than a random head. ``zero_head`` (no labelled
    server data, ``server.linear_probe: false``): the head's final layer starts at zero, so the
    start scores every class (or choice) alike and whatever the head then tells apart comes
    from the clients' projected head updates, not from a random draw or the server's labels.
    """

    def __init__(self, model_name: str, task: str,
                 num_labels: int | None = None, seed: int = 0, *, projector: str = "lstsq",
                 projector_options: Mapping[str, Any] | None = None,
                 probe_examples: Sequence[Example] = (), max_length: int = 64,
                 batch_size: int = 16, dataset: str | None = None,
                 zero_head: bool = False, lora_r: int = 1, lora_alpha: float = 1.0,
                 target_roles: Sequence[str] | None = None, device: str = "cpu") -> None:
        arch = model_source(model_name).spec.architecture
        if arch not in ROLE_MODULES:
            raise FedsimError(f"server model {model_name!r}: no module role map for {arch!r}")
        # By default a rank-1 LoRA with B = 0 on one role: the trainer's machinery, the base
        # model's outputs. A transfer that trains the server (distillation) asks for its own.
        roles = tuple(target_roles or (next(iter(ROLE_MODULES[arch])),))
        cfg = LocalTrainingConfig(lora_r=lora_r, lora_alpha=lora_alpha, target_roles=roles,
                                  max_length=max_length, batch_size=batch_size,
                                  lora_dropout=0.0, device=device)
        self.model_name = model_name
        self.trainer = FamilyTrainer(model_name, task, num_labels, cfg, seed, dataset)
        self.model, self.tokenizer, self.spec = (self.trainer.model, self.trainer.tokenizer,
                                                 self.trainer.spec)
        self.task = self.trainer.task  # the head's input shape, for a projector's probe runs
        self.seed, self.max_length, self.batch_size = seed, max_length, batch_size
        self.projector_name, self.projector_options = projector, dict(projector_options or {})
        self.families: dict[str, ServerFamily] = {}
        self._weights: dict[str, torch.nn.Parameter] = {}
        for name, param in self.model.named_parameters():
            key = _param_key(name)
            if key is not None:
                self._weights[key] = param
        self.head = head_name(named_modules(self.model))
        self._merged: set[str] = set()  # weight keys aggregation has changed
        if probe_examples:
            self.fit_linear_probe(probe_examples)
        elif zero_head and self.head is not None:  # no labelled server data: see the class text
            with torch.no_grad():
                for key in (self.head + ".weight", self.head + ".bias"):
                    if key in self._weights:
                        self._weights[key].zero_()
        self.adapter = self.trainer.current_adapter()  # the head as evaluation applies it

    # -- state --------------------------------------------------------------------------------

    def weights(self) -> dict[str, torch.Tensor]:
        """The server's weights by key (detached views on the CPU; copies from a GPU)."""
        return {k: p.detach().cpu() for k, p in self._weights.items()}

    def merged_weights(self) -> dict[str, torch.Tensor]:
        """The weights aggregation has changed so far (what a checkpoint must keep: the rest
        is the base model and the linear probe, rebuilt from the seed)."""
        return {k: self._weights[k].detach().cpu() for k in sorted(self._merged)}

    def load_merged_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in weights.items():
                self._weights[k].copy_(v)
        self._merged = set(weights)
        self.adapter = self.trainer.current_adapter()

    def fold_lora(self) -> None:
        """Fold the trainer's LoRA into the weights, W += (α/r)·B·A per module, and reset the
        LoRA to its start (B = 0): the server is its weights again (what a checkpoint keeps).
        The head, trained in place, is marked as changed too."""
        params, start = self.trainer._params, self.trainer._initial
        scale = self.trainer.cfg.lora_alpha / self.trainer.cfg.lora_r
        with torch.no_grad():
            for key, param in params.items():
                if key.endswith(LORA_A):
                    module = key.removesuffix(LORA_A)
                    b = params[module + LORA_B]
                    weight = self._weights[module + ".weight"]
                    weight.add_((scale * b.float() @ param.float()).to(weight.dtype))
                    self._merged.add(module + ".weight")
                elif not key.endswith(LORA_B) and key in self._weights:
                    self._merged.add(key)  # the head
            for key, param in params.items():
                if key.endswith((LORA_A, LORA_B)):
                    param.copy_(start[key])
        self.adapter = self.trainer.current_adapter()

    def head_weights(self) -> dict[str, torch.Tensor]:
        """The head's final layer (weight, bias) as it is now: copies."""
        if self.head is None:
            return {}
        return {k: self._weights[k].detach().cpu().clone() for k in
                (self.head + ".weight", self.head + ".bias") if k in self._weights}

    def load_head(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Set the head's final layer to ``weights`` (from :meth:`head_weights` of a server
        built the same way: the probe fitted once serves every variant)."""
        with torch.no_grad():
            for k, v in weights.items():
                self._weights[k].copy_(v)
        self.adapter = self.trainer.current_adapter()

    def fit_linear_probe(self, examples: Sequence[Example], l2: float = 1e-3) -> None:
        """Fit the head's final linear layer on the frozen features of labelled ``examples``."""
        if not self.trainer.task.has_classes or self.head is None:
            raise FedsimError("a linear probe needs a classification task and head")
        bias_key = self.head + ".bias"
        texts, labels = [e.text for e in examples], [e.label for e in examples]
        path = probe_cache_dir() / f"{self._probe_key(texts, labels, l2)}.safetensors"
        cached = _load_tensors(path)
        if cached is not None:
            w, b = cached["weight"], cached.get("bias")
        else:
            features = head_inputs(self, texts, self.max_length, self.batch_size)
            w, b = fit_logistic_regression(features, torch.tensor(labels, dtype=torch.long),
                                           self.trainer.num_classes or 0, l2=l2,
                                           bias=bias_key in self._weights)
            with atomic_file(path) as tmp:
                save_file({"weight": w.contiguous()} | ({} if b is None else
                                                        {"bias": b.contiguous()}), str(tmp))
        with torch.no_grad():
            self._weights[self.head + ".weight"].copy_(w)
            if b is not None:
                self._weights[bias_key].copy_(b)
        self.adapter = self.trainer.current_adapter()

    def _probe_key(self, texts: list[str], labels: list[int], l2: float) -> str:
        """The probe's cache key: the model's name and parameters (the head's too, so that
        a probe is never fitted on another start), the labelled texts and the settings."""
        parts = {"format": 1, "model": self.model_name, "params": fingerprint(self.model),
                 "data": hashlib.sha256(json.dumps([texts, labels]).encode()).hexdigest(),
                 "max_length": self.max_length, "batch_size": self.batch_size, "l2": l2,
                 "classes": self.trainer.num_classes, "device": self.trainer.device.type}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    # -- families and projection ----------------------------------------------------------------

    def add_family(self, model_name: str, small: ModelLike, *, roles: Sequence[str],
                   lora_scale: float, probe_texts: Sequence[str]) -> Projector:
        """Fit a projector from family ``model_name``'s model ``small`` (a FamilyTrainer or a
        LoadedModel) to the server's, for its LoRA ``roles`` plus the head when both have one."""
        has_head = head_name(named_modules(small.model)) is not None and self.head is not None
        roles = tuple(r for r in roles if r != HEAD) + ((HEAD,) if has_head else ())
        projector = make_projector(self.projector_name, roles, self.seed,
                                   **self.projector_options)
        projector.fit(small, self, probe_texts)
        self.families[model_name] = ServerFamily(model_name, projector, lora_scale)
        return projector

    def _family(self, model_name: str) -> ServerFamily:
        if model_name not in self.families:
            raise FedsimError(f"family {model_name!r} has no projector: call add_family first")
        return self.families[model_name]

    def project(self, family_model_name: str, start_adapter: Mapping[str, torch.Tensor],
                delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A client's round task vector in the server's weight space (see :meth:`carry`)."""
        return self.carry(family_model_name, start_adapter, delta)[0]

    def flops_of_projection(self, family_model_name: str,
                            start_adapter: Mapping[str, torch.Tensor],
                            delta: Mapping[str, torch.Tensor]) -> float:
        """FLOPs of :meth:`project` for this update (see :meth:`carry`)."""
        return self.carry(family_model_name, start_adapter, delta)[1]

    def carry(self, family_model_name: str, start_adapter: Mapping[str, torch.Tensor],
              delta: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        """A client's round task vector in the server's weight space, and the FLOPs of
        projecting it; the task vector is built once for both.

        Keys: ``<large module>.lora_B.weight`` (out_L × rank) and ``.lora_A.weight`` (rank ×
        in_L) per targeted module, whose product is the module's weight update (small layers
        that map to one large layer are concatenated along the rank: their sum); and the head's
        dense ``<head>.weight`` (and ``.bias`` where both heads have one). Deltas of layers
        before a head's final linear (MPNet's ``classifier.dense``) are not projected. FLOPs:
        the P_out·B and A·Q_in products of every module (rank 2r, or r while the start B is
        zero) and the head's P_out·D·Q_in.
        """
        fam = self._family(family_model_name)
        tv = task_vector(start_adapter, delta, fam.lora_scale)
        out: dict[str, torch.Tensor] = {}
        flops = 0.0
        for module, factors in tv.factors.items():
            pair = fam.projector.pair_of(module)
            b, a = fam.projector.project(pair, factors.B, factors.A)
            flops += projection_flops(pair, factors.rank)
            kb, ka = pair.large_name + LORA_B, pair.large_name + LORA_A
            out[kb] = torch.cat([out[kb], b], dim=1) if kb in out else b
            out[ka] = torch.cat([out[ka], a], dim=0) if ka in out else a
        head = fam.projector.head_pair
        if head is not None:
            if head.small_name + ".weight" in tv.dense:
                flops += dense_projection_flops(head)
            for suffix in (".weight", ".bias"):
                small_key, large_key = head.small_name + suffix, head.large_name + suffix
                if small_key in tv.dense and large_key in self._weights:
                    out[large_key] = fam.projector.project_dense(head, tv.dense[small_key])
        return out, float(flops)

    # -- aggregation and evaluation -------------------------------------------------------------

    def _densify(self, projected: Mapping[str, torch.Tensor]) -> tuple[Delta, float]:
        """Projected factors as dense weight updates by weight key, and the FLOPs of B·A."""
        dense: Delta = {}
        flops = 0.0
        for key, value in projected.items():
            if key.endswith(LORA_A):
                continue
            if key.endswith(LORA_B):
                module = key.removesuffix(LORA_B)
                a = projected[module + LORA_A]
                key, value = module + ".weight", value @ a
                flops += 2.0 * value.numel() * a.shape[0]
            if key not in self._weights or self._weights[key].shape != value.shape:
                raise FedsimError(f"projected update {key!r} {tuple(value.shape)} does not fit "
                                  "the server model")
            dense[key] = dense[key] + value if key in dense else value
        return dense, flops

    def apply(self, results: Sequence[ClientResult], aggregator: Aggregator, round_: int = 0,
              failures: int = 0) -> float:
        """Merge the clients' projected updates (``ClientResult.delta`` = :meth:`project`'s
        output; α inputs as the clients reported them) with ``aggregator`` into the weights.

        Updates are made dense per weight (a client that does not touch a weight contributes
        zero to it), the aggregator gets the current weights as its LARS reference, and its
        result is added to the weights. Returns the FLOPs: B·A products, ~2 per element per
        client for the combination, 1 per element for the merge. Memory: one dense copy of
        the touched weights per client.
        """
        if not results:
            return 0.0
        dense, flops = [], 0.0
        for r in results:
            d, f = self._densify(r.delta)
            dense.append(d)
            flops += f
        keys = sorted({k for d in dense for k in d})
        dense = [{k: d[k] if k in d else torch.zeros(self._weights[k].shape) for k in keys}
                 for d in dense]
        results = [replace(r, delta=d) for r, d in zip(results, dense, strict=True)]
        aggregator.set_reference({k: self._weights[k].detach().cpu() for k in keys})
        step = aggregator.aggregate(round_, results, failures)
        with torch.no_grad():
            for key, value in step.items():
                self._weights[key].add_(value.to(self._weights[key]))
        self._merged.update(step)
        self.adapter = self.trainer.current_adapter()
        numel = sum(self._weights[k].numel() for k in keys)
        return flops + 2.0 * len(results) * numel + numel

    def evaluate(self, examples: Sequence[Example], limit: int | None = None) -> dict[str, float]:
        """The server model on ``examples[:limit]``, as the trainer evaluates clients: loss and
        accuracy/macro_f1 (classification, multiple choice) or rougeL/chrf/bleu (generation)."""
        return self.trainer.evaluate(self.adapter, examples, limit)


# --- transfers: how a client family's knowledge reaches a server model ----------------------


class Transfer(ABC):
    """How client updates reach one server model (registry ``TRANSFERS``).

    ``prepare`` readies the server for each client family (e.g. fits its projector);
    ``carry`` turns one accepted client update into what the server merges, with the server
    FLOPs of that work; ``merge`` combines a round's carried updates into the server.
    """

    name: str

    def __init__(self, cfg: TransferConfig) -> None:
        self.cfg = cfg

    @property
    def key(self) -> str:
        """Variants whose transfers share a key carry an update once between them."""
        return json.dumps(self.cfg.model_dump(mode="json"), sort_keys=True)

    def server_options(self) -> dict[str, Any]:
        """What the server model is built with for this transfer (``ServerModel`` keywords)."""
        return {}

    @abstractmethod
    def prepare(self, server: ServerModel, family: str, small: ModelLike, *,
                roles: Sequence[str], lora_scale: float, probe_texts: Sequence[str]) -> None: ...

    @abstractmethod
    def carry(self, server: ServerModel, family: str, start: Mapping[str, torch.Tensor],
              delta: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]: ...

    def merge(self, server: ServerModel, results: Sequence[ClientResult],
              aggregator: Aggregator, round_: int) -> float:
        return server.apply(results, aggregator, round_)


@TRANSFERS.register("projection")
class ProjectionTransfer(Transfer):
    """Task vectors (decode → τ = B·A → P_out·B, A·Q_in) through the configured projector."""

    def server_options(self) -> dict[str, Any]:
        p = self.cfg.projector
        return {"projector": p.name, "projector_options": p.options()}

    def prepare(self, server: ServerModel, family: str, small: ModelLike, *,
                roles: Sequence[str], lora_scale: float, probe_texts: Sequence[str]) -> None:
        server.add_family(family, small, roles=roles, lora_scale=lora_scale,
                          probe_texts=probe_texts)

    def carry(self, server: ServerModel, family: str, start: Mapping[str, torch.Tensor],
              delta: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        return server.carry(family, start, delta)


def make_transfer(cfg: TransferConfig) -> Transfer:
    return TRANSFERS.get(cfg.name)(cfg)


Carried = dict[str, dict[str, torch.Tensor]]  # variant name -> the update as it receives it


@dataclass
class ServerVariant:
    """One server model, the transfer that feeds it and the rule that merges into it."""

    name: str
    model: ServerModel
    transfer: Transfer
    aggregator: Aggregator


class ServerSet:
    """The server models of a run: the primary (``server``) and, in ``fedsim compare``, the
    variants beside it, fed the very same client updates. Only the primary's work is charged
    simulated time: the variants are an observation of what another choice would have done."""

    def __init__(self) -> None:
        self.variants: dict[str, ServerVariant] = {}

    def __bool__(self) -> bool:
        return bool(self.variants)

    def __iter__(self) -> Iterator[ServerVariant]:
        return iter(self.variants.values())

    @property
    def primary(self) -> ServerVariant:
        return next(iter(self.variants.values()))

    def add(self, variant: ServerVariant) -> ServerVariant:
        self.variants[variant.name] = variant
        return variant

    def clear(self) -> None:
        self.variants.clear()

    def carry(self, family: str, start: Mapping[str, torch.Tensor],
              delta: Mapping[str, torch.Tensor]) -> tuple[Carried, float]:
        """One client update as each variant receives it (by variant name; variants of the same
        transfer share one computation) and the FLOPs charged: the primary's."""
        by_key: dict[str, dict[str, torch.Tensor]] = {}
        carried: Carried = {}
        flops = 0.0
        for v in self:
            key = v.transfer.key
            if key not in by_key:
                by_key[key], f = v.transfer.carry(v.model, family, start, delta)
                flops = f if v is self.primary else flops
            carried[v.name] = by_key[key]
        return carried, flops

    def merge(self, results: Sequence[ClientResult], carried: Sequence[Mapping[str, Any]],
              round_: int) -> float:
        """Each variant merges the round's updates as it received them (``carried[i]`` is
        ``results[i]``'s, by variant name); the FLOPs charged are the primary's."""
        flops = 0.0
        for v in self:
            mine = [replace(r, delta=c[v.name]) for r, c in zip(results, carried, strict=True)]
            f = v.transfer.merge(v.model, mine, v.aggregator, round_)
            flops = f if v is self.primary else flops
        return flops

    def evaluate(self, examples: Sequence[Example]) -> dict[str, float]:
        """``<variant>/<metric>`` for every variant, and the primary's as plain ``<metric>``."""
        out: dict[str, float] = {}
        for v in self:
            for k, x in v.model.evaluate(examples).items():
                out[f"{v.name}/{k}"] = x
                if v is self.primary:
                    out[k] = x
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """The weights aggregation has changed, per variant (``<name>/<weight key>``)."""
        return {f"{v.name}/{k}": t for v in self for k, t in v.model.merged_weights().items()}

    def restore(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for v in self:
            head = v.name + "/"
            v.model.load_merged_weights({k[len(head):]: t for k, t in tensors.items()
                                         if k.startswith(head)})


from fedsim import distillation as _distillation  # noqa: E402,F401  (registers "distillation")

"""Distillation as a transfer: clients' top-k logits on a proxy batch, distilled into the server.

The weight path (:class:`fedsim.server.ProjectionTransfer`) moves task vectors; this one moves
what the clients' models *say* on a shared unlabelled corpus (FedMKT, FedCoLLM; the top-k
payload and its channel-adaptive k as in arXiv 2509.01750). The life of a round:

1. **Proxy batch.** :class:`ProxySet` holds the server-side corpus (held-out texts of the task,
   never scored); each round's batch is drawn from the seed and the round, the same for every
   client of the round.
2. **Client.** After its local LoRA training the client runs its model on the batch
   (:func:`client_logits`) and uploads the top-k of each position's logits
   (:mod:`fedsim.logits`: indices and fp16/8-bit values, CRC; ``len(payload)`` on the uplink).
   A position is an example for a classifier or multiple choice (logits over its labels or
   choices), a target token for a causal LM (logits over the vocabulary). The forward pass is
   part of the client's modelled FLOPs. Nothing else leaves the client: it keeps its own adapter
   for the next round (no client adapter is averaged).
3. **Alignment.** Class logits need none. Token logits are mapped onto the server's vocabulary
   and positions (:mod:`fedsim.alignment`: minimum-edit-distance vocabulary map, sequence
   alignment of the two tokenizations of the same target text).
4. **Aggregation** (:func:`aggregate_teachers`). Per server position, the union of the clients'
   supports: ``adaptive`` gives token t the weighted mean of p_i(t) over the clients that sent
   t; ``zero-pad`` over every client of the batch, a missing token counting 0 (the baseline the
   paper improves on). Client weights: the examples each trained on × the round policy's
   weight. ``selective`` (FedMKT) keeps, per proxy example, the one client whose distribution
   gives the example's reference the lowest cross-entropy.
5. **Server.** The teacher (normalized on its support) is distilled into the server's LoRA:
   ``server_steps`` AdamW steps of T²·KL(teacher ‖ student on the support) at temperature T,
   full batch, dropout off; the LoRA is then folded into the server's weights
   (W += (α/r)·B·A, LoRA reset), so the server is one set of weights, as on the weight path.
   FLOPs: forward + backward per step, 4·N·tokens (+ the LM head), charged as server time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedsim import logits as topk
from fedsim.alignment import VocabMap, align_topk, vocab_map, vocabulary
from fedsim.data import Example
from fedsim.errors import FedsimError
from fedsim.plugins import TRANSFERS, DistillationTransferConfig, ProxyConfig
from fedsim.rng import stream
from fedsim.server import ModelLike, ServerModel, Transfer

if TYPE_CHECKING:
    from fedsim.aggregators import Aggregator, ClientResult
    from fedsim.training import FamilyTrainer


# Key prefixes of the tensors a client's upload becomes: the decoded payload at ingest
# (``logits/``) and the teacher in the server's space after ``carry`` (``teacher/``); any other
# key is a weight update (``weights: true``, both transfers at once).
LOGITS, TEACHER = "logits/", "teacher/"


# --- the proxy set ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxySet:
    """The server-side corpus and each round's batch of it."""

    examples: tuple[Example, ...]
    batch_size: int
    seed: int

    @property
    def nbytes(self) -> int:
        """UTF-8 bytes of the corpus (texts, and references where it has them): what crosses
        the downlink once when it is not preinstalled."""
        return sum(len(e.text.encode()) + len((e.target or "").encode()) for e in self.examples)

    def batch(self, round_: int) -> tuple[int, ...]:
        """Positions in :attr:`examples` of round ``round_``'s batch, ascending."""
        n = len(self.examples)
        rng = stream(self.seed, f"proxy/{round_}")
        return tuple(sorted(int(i) for i in rng.choice(n, size=min(self.batch_size, n),
                                                       replace=False)))

    def take(self, positions: Sequence[int]) -> list[Example]:
        return [self.examples[int(i)] for i in positions]


def proxy_set(test: Sequence[Example], evaluated: int, cfg: ProxyConfig, seed: int) -> ProxySet:
    """``cfg.size`` held-out examples after the first ``evaluated`` of the test split, or the
    first ``cfg.size`` texts of another dataset's test split, unlabelled (``cfg.source``)."""
    if cfg.source != "held-out":
        from fedsim.data import load_dataset

        other = load_dataset(cfg.source, "classification").test[:cfg.size]
        return ProxySet(tuple(Example(e.text) for e in other), cfg.batch, seed)
    pool = tuple(test[evaluated:evaluated + cfg.size])
    if not pool:
        raise FedsimError(f"transfer.proxy: the test split has {len(test)} examples and "
                          f"task.eval_examples takes {evaluated}: none left for the proxy set")
    return ProxySet(pool, cfg.batch, seed)


# --- the client side ---------------------------------------------------------------------------


def _target_mask(targets: torch.Tensor, kept: int) -> torch.Tensor:
    """(batch, kept − 1) True where a kept logit predicts a target token (see
    ``Generation.loss``: kept position t predicts token t + 1)."""
    return targets[:, -kept:][:, 1:] != -100


def model_logits(trainer: FamilyTrainer, examples: Sequence[Example]) -> tuple[torch.Tensor,
                                                                              list[int]]:
    """The trainer's current model on ``examples``: (positions × outputs) logits and the
    positions of each example (1 for a choosing task; its target tokens for a causal LM).
    Batches of ``batch_size``, with gradients where the caller enables them."""
    rows, lengths = [], []
    # An unlabelled text gets class 0 for collation only: the logits do not depend on it.
    examples = [e if e.label is not None or e.target is not None or e.choices
                else replace(e, label=0) for e in examples]
    for i in range(0, len(examples), trainer.cfg.batch_size):
        batch, targets = trainer.inputs(examples[i:i + trainer.cfg.batch_size])
        out = trainer.model(**batch).logits
        if out.dim() == 2:  # a class (or choice) per example
            rows.append(out)
            lengths += [1] * out.shape[0]
            continue
        mask = _target_mask(targets, out.shape[1])
        rows.append(out[:, :-1][mask])
        lengths += mask.sum(1).tolist()
    return torch.cat(rows).float(), lengths


@torch.inference_mode()
def client_logits(trainer: FamilyTrainer, adapter: Mapping[str, torch.Tensor],
                  examples: Sequence[Example]) -> tuple[torch.Tensor, list[int]]:
    """``adapter``'s logits on the proxy ``examples`` (see :func:`model_logits`), on the
    job's thread count: the same numbers whichever executor trained it."""
    from fedsim.training import torch_threads

    with torch_threads(trainer.cfg.threads):
        trainer.apply(dict(adapter))
        z, lengths = model_logits(trainer, examples)
        return z.cpu(), lengths


def forward_flops(trainer: FamilyTrainer, examples: Sequence[Example]) -> float:
    """FLOPs of one forward pass of ``trainer``'s model over ``examples`` (2·N·tokens, and a
    causal LM's output layer on its logit positions)."""
    return trainer._forward_flops(examples, trainer._forward_tokens(examples))


def output_size(trainer: FamilyTrainer, examples: Sequence[Example]) -> int:
    """V of the payload: the labels, the choices, or the vocabulary."""
    if trainer.task.head == "causal-lm":
        return int(trainer.model.config.vocab_size)
    if trainer.num_classes:
        return int(trainer.num_classes)
    return len(examples[0].choices or ())


def positions_of(trainer: FamilyTrainer, examples: Sequence[Example]) -> list[int]:
    """Positions per example, from the tokenization alone (what the payload will hold)."""
    if trainer.task.head != "causal-lm":
        return [1] * len(examples)
    return [sum(t != -100 for t in trainer._encode(e)[0].labels or ()) for e in examples]


def target_ids(trainer: FamilyTrainer, example: Example) -> list[int]:
    """The tokens of ``example``'s target as ``trainer`` tokenizes it (end token included)."""
    row = trainer._encode(example)[0]
    return [i for i, t in zip(row.ids, row.labels or (), strict=True) if t != -100]


# --- aggregation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Teacher:
    """A distribution per server position on a small support: ids (P × U, −1 padding) and
    probabilities (P × U, 0 on padding)."""

    ids: torch.Tensor
    probs: torch.Tensor

    def normalized(self) -> Teacher:
        total = self.probs.sum(1, keepdim=True)
        return Teacher(self.ids, torch.where(total > 0, self.probs / total.clamp_min(1e-30),
                                             self.probs))


def truncated_softmax(values: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(values / T) over each row's kept logits (the top-k renormalized)."""
    return torch.softmax(values.double() / temperature, dim=-1)


def aggregate_teachers(teachers: Sequence[Teacher], weights: Sequence[float],
                       rule: str = "adaptive") -> Teacher:
    """Per position, the union of the clients' supports with, for each token t,
    ``adaptive``: Σᵢ wᵢ·pᵢ(t) / Σ_{i sent t} wᵢ; ``zero-pad``: Σᵢ wᵢ·pᵢ(t) / Σᵢ wᵢ (every
    client, a missing token counting 0). Not renormalized (:meth:`Teacher.normalized`); ids
    ascending within a row. Every teacher has the same positions."""
    if not teachers or len(teachers) != len(weights):
        raise FedsimError(f"{len(teachers)} teachers for {len(weights)} weights")
    if rule not in ("adaptive", "zero-pad"):
        raise FedsimError(f"aggregation rule must be adaptive or zero-pad, got {rule!r}")
    positions = teachers[0].ids.shape[0]
    if any(t.ids.shape[0] != positions for t in teachers):
        raise FedsimError("teachers of one batch must have the same positions")
    pos, ids, mass, sent = [], [], [], []
    for t, w in zip(teachers, weights, strict=True):
        p = np.repeat(np.arange(positions), t.ids.shape[1])
        i, q = t.ids.numpy().ravel(), t.probs.double().numpy().ravel()
        keep = i >= 0
        pos.append(p[keep]), ids.append(i[keep]), mass.append(w * q[keep])
        sent.append(np.full(int(keep.sum()), float(w)))
    p, i = np.concatenate(pos), np.concatenate(ids)
    width = int(i.max()) + 1 if i.size else 1
    keys, inverse = np.unique(p * width + i, return_inverse=True)
    num = np.bincount(inverse, np.concatenate(mass), minlength=len(keys))
    den = (np.bincount(inverse, np.concatenate(sent), minlength=len(keys)) if rule == "adaptive"
           else np.full(len(keys), float(sum(weights))))
    return _padded(keys // width, keys % width, num / np.where(den > 0, den, 1.0), positions)


def _padded(pos: np.ndarray, ids: np.ndarray, q: np.ndarray, positions: int) -> Teacher:
    """COO entries (sorted by position) as padded rows."""
    counts = np.bincount(pos, minlength=positions)
    width = max(int(counts.max()) if counts.size else 0, 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    col = np.arange(len(pos)) - starts[pos]
    out_ids = np.full((positions, width), -1, dtype=np.int64)
    out_q = np.zeros((positions, width))
    out_ids[pos, col], out_q[pos, col] = ids, q
    return Teacher(torch.from_numpy(out_ids), torch.from_numpy(out_q))


def reference_loss(teacher: Teacher, references: torch.Tensor) -> torch.Tensor:
    """Per position, −log of the teacher's (normalized) probability of the reference id;
    inf where the reference is outside its support or the position has none (< 0)."""
    t = teacher.normalized()
    hit = (t.ids == references[:, None]) & (references[:, None] >= 0)
    p = (t.probs * hit).sum(1)
    return torch.where(p > 0, -torch.log(p.clamp_min(1e-300)), torch.full_like(p, math.inf))


def entropy(teacher: Teacher) -> torch.Tensor:
    t = teacher.normalized()
    return -(t.probs * torch.log(t.probs.clamp_min(1e-300))).sum(1)


def select_teachers(teachers: Sequence[Teacher], lengths: Sequence[int],
                    references: torch.Tensor | None) -> Teacher:
    """FedMKT's selective transfer: per example (``lengths``: its positions), the teacher of
    the lowest mean reference cross-entropy (no references: the lowest mean entropy; ties:
    the earlier client)."""
    scores = torch.stack([reference_loss(t, references) if references is not None
                          else entropy(t) for t in teachers])  # clients × positions
    width = max(t.ids.shape[1] for t in teachers)
    ids = torch.full((int(sum(lengths)), width), -1, dtype=torch.long)
    probs = torch.zeros(ids.shape, dtype=torch.float64)
    start = 0
    for n in lengths:
        seg = slice(start, start + n)
        best = int(torch.argmin(scores[:, seg].mean(1)))  # inf where a reference is missed
        t = teachers[best]
        ids[seg, :t.ids.shape[1]], probs[seg, :t.ids.shape[1]] = t.ids[seg], t.probs[seg]
        start += n
    return Teacher(ids, probs)


# --- the server side ---------------------------------------------------------------------------


def kl_on_support(student_logits: torch.Tensor, teacher: Teacher, temperature: float
                  ) -> torch.Tensor:
    """T²·mean over positions of KL(q ‖ p) on each position's support, p the student's
    softmax(z / T) renormalized there; positions with an empty support are left out."""
    t = teacher.normalized()
    t = Teacher(t.ids.to(student_logits.device), t.probs.to(student_logits.device))
    valid = t.ids >= 0
    rows = valid.any(1)
    logp = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    s = logp.gather(1, t.ids.clamp_min(0)).masked_fill(~valid, -math.inf)
    s = s - torch.logsumexp(s, dim=1, keepdim=True)
    q = t.probs.to(s.dtype)
    kl = torch.where(valid, q * (torch.log(q.clamp_min(1e-30)) - s), torch.zeros_like(q))
    return temperature ** 2 * kl[rows].sum(1).mean()


def distil_adapter(trainer: FamilyTrainer, adapter: Mapping[str, torch.Tensor],
                   examples: Sequence[Example], teacher: Teacher, *, steps: int, lr: float,
                   temperature: float) -> dict[str, torch.Tensor]:
    """``steps`` full-batch AdamW steps of :func:`kl_on_support` from ``adapter`` (its LoRA and
    head), eval mode (no dropout: the result is a function of its inputs); the new adapter."""
    from fedsim.training import torch_threads

    with torch_threads(trainer.cfg.threads):
        trainer.apply(dict(adapter))
        optimizer = torch.optim.AdamW(list(trainer._params.values()), lr=lr, weight_decay=0.0)
        for _ in range(steps):
            logits, _ = model_logits(trainer, examples)
            kl_on_support(logits, teacher, temperature).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return trainer.current_adapter()


def distil_flops(trainer: FamilyTrainer, examples: Sequence[Example], steps: int) -> float:
    """FLOPs of :func:`distil_adapter`: forward + backward (2 forwards' worth) per step."""
    return steps * 2.0 * forward_flops(trainer, examples)


def distil(server: ServerModel, examples: Sequence[Example], teacher: Teacher,
           cfg: DistillationTransferConfig) -> float:
    """Train the server's LoRA (and head) on KL to ``teacher``, then fold it into the weights;
    the FLOPs (``server_steps`` × forward + backward)."""
    distil_adapter(server.trainer, server.adapter, examples, teacher, steps=cfg.server_steps,
                   lr=cfg.server_lr, temperature=cfg.temperature)
    server.fold_lora()
    return distil_flops(server.trainer, examples, cfg.server_steps)


@dataclass
class _Family:
    trainer: Any  # the family's model (a FamilyTrainer): tokenizes the proxy as the client did
    vmap: VocabMap | None  # client -> server token ids (generation only)
    back: VocabMap | None = None  # server -> client token ids (generation, mutual transfer)


def _aligned(vmap: VocabMap, to_trainer: Any, from_trainer: Any, examples: Sequence[Example],
             ids: torch.Tensor, probs: torch.Tensor, lengths: Sequence[int]
             ) -> tuple[torch.Tensor, torch.Tensor, list[int], float]:
    """Per-example top-k rows of ``from_trainer``'s target tokens as rows of ``to_trainer``'s
    (:func:`fedsim.alignment.align_topk`); ids, probs, positions per example and FLOPs."""
    out_ids, out_p, out_len, row, flops = [], [], [], 0, 0.0
    for e, n in zip(examples, lengths, strict=True):
        to_ids = target_ids(to_trainer, e)
        a_ids, a_p = align_topk(vmap, to_ids, target_ids(from_trainer, e),
                                ids[row:row + n].numpy(), probs[row:row + n].numpy())
        out_ids.append(torch.from_numpy(a_ids)), out_p.append(torch.from_numpy(a_p))
        out_len.append(len(to_ids))
        row += n
        flops += 4.0 * a_ids.size  # map, group, sort per aligned entry
    return torch.cat(out_ids), torch.cat(out_p), out_len, flops


@TRANSFERS.register("distillation")
class DistillationTransfer(Transfer):
    """Top-k logits → aligned → aggregated → distilled (see the module text).

    ``carry`` receives the decoded payload as tensors (``logits/indices``, ``logits/values``
    from :func:`fedsim.logits.decode`, ``logits/lengths`` per example, ``logits/proxy`` the
    batch's positions; with ``weights``, the LoRA delta's tensors beside them) and returns the
    client's teacher in the server's space (``teacher/ids``, ``/probs``, ``/lengths``,
    ``/proxy``; with ``weights``, the projected task vector beside it); ``merge`` merges the
    projected updates (``weights``), then aggregates each proxy batch's teachers and distils.
    """

    cfg: DistillationTransferConfig

    def __init__(self, cfg: DistillationTransferConfig) -> None:
        super().__init__(cfg)
        self.families: dict[str, _Family] = {}
        self.proxy: ProxySet | None = None

    def server_options(self) -> dict[str, Any]:
        r = self.cfg.server_lora_r
        out = {"lora_r": r, "lora_alpha": 2 * r, "target_roles": self.cfg.server_roles}
        if self.cfg.weights:  # the weight path beside: its projector
            out |= {"projector": self.cfg.projector.name,
                    "projector_options": self.cfg.projector.options()}
        return out

    def prepare(self, server: ServerModel, family: str, small: ModelLike, *,
                roles: Sequence[str], lora_scale: float, probe_texts: Sequence[str]) -> None:
        vmap = back = None
        if server.trainer.task.head == "causal-lm":
            mine = vocabulary(small.tokenizer, family)
            theirs = vocabulary(server.tokenizer, server.model_name)
            vmap = vocab_map(mine, theirs)
            back = vocab_map(theirs, mine) if self.cfg.mutual else None
        self.families[family] = _Family(small, vmap, back)
        if self.cfg.weights:
            server.add_family(family, small, roles=roles, lora_scale=lora_scale,
                              probe_texts=probe_texts)

    def _proxy(self) -> ProxySet:
        if self.proxy is None:
            raise FedsimError("the distillation transfer has no proxy set (set .proxy)")
        return self.proxy

    def carry(self, server: ServerModel, family: str, start: Mapping[str, torch.Tensor],
              delta: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        fam = self.families[family]
        logit = {k.removeprefix(LOGITS): v for k, v in delta.items() if k.startswith(LOGITS)}
        probs = truncated_softmax(logit["values"], self.cfg.temperature)
        ids, lengths = logit["indices"].long(), logit["lengths"].long()
        flops = 3.0 * probs.numel()  # exp, sum, divide per kept logit
        if fam.vmap is not None:  # onto the server's vocabulary and positions, per example
            examples = self._proxy().take(logit["proxy"].tolist())
            ids, probs, out_len, f = _aligned(fam.vmap, server.trainer, fam.trainer, examples,
                                              ids, probs, lengths.tolist())
            lengths, flops = torch.tensor(out_len), flops + f
        out = {TEACHER + "ids": ids, TEACHER + "probs": probs, TEACHER + "lengths": lengths,
               TEACHER + "proxy": logit["proxy"].long()}
        if self.cfg.weights:  # and the task vector, projected as on the weight path
            projected, f = server.carry(family, start, {k: v for k, v in delta.items()
                                                        if not k.startswith(LOGITS)})
            out, flops = {**projected, **out}, flops + f
        return out, flops

    def merge(self, server: ServerModel, results: Sequence[ClientResult],
              aggregator: Aggregator, round_: int) -> float:
        """With ``weights``, first merge the projected updates (``aggregator``); then, per proxy
        batch (an asynchronous policy may mix rounds'), aggregate the teachers and distil."""
        flops = 0.0
        if self.cfg.weights:
            flops += server.apply([replace(r, delta={k: v for k, v in r.delta.items()
                                                     if not k.startswith(TEACHER)})
                                   for r in results], aggregator, round_)
        groups: dict[tuple[int, ...], list[ClientResult]] = {}
        for r in results:
            groups.setdefault(tuple(r.delta[TEACHER + "proxy"].tolist()), []).append(r)
        for batch, members in sorted(groups.items()):
            examples = self._proxy().take(batch)
            lengths = members[0].delta[TEACHER + "lengths"].tolist()
            teachers = [Teacher(r.delta[TEACHER + "ids"], r.delta[TEACHER + "probs"])
                        for r in members]
            if self.cfg.selective:
                teacher = select_teachers(teachers, lengths, references(server, examples))
            else:
                weights = [r.num_samples * r.weight for r in members]
                teacher = aggregate_teachers(teachers, weights, self.cfg.aggregation)
            flops += 2.0 * sum(t.ids.numel() for t in teachers)
            flops += distil(server, examples, teacher, self.cfg)
        return flops


    # -- mutual transfer: the server's logits back down -----------------------------------

    def server_payload(self, server: ServerModel, batch: Sequence[int]) -> topk.LogitsPayload:
        """The server's top-k logits on proxy ``batch`` (k: ``logits.k``, k_max if adaptive)."""
        z, lengths = client_logits(server.trainer, server.adapter, self._proxy().take(batch))
        cfg = self.cfg.logits
        k = cfg.k_max if cfg.adaptive else cfg.k_for(0.0, None, z.shape[0], z.shape[1])
        return topk.encode(z, min(k, z.shape[1]), cfg.value_bits, lengths)

    def client_teacher(self, server: ServerModel, family: str, payload: topk.LogitsPayload,
                       batch: Sequence[int]) -> Teacher:
        """The server's payload as a teacher in ``family``'s space (its vocabulary and
        positions, for token logits)."""
        decoded = topk.decode(payload)
        ids = decoded.indices.long()
        probs = truncated_softmax(decoded.values, self.cfg.temperature)
        fam = self.families[family]
        if fam.back is not None:
            ids, probs, _, _ = _aligned(fam.back, fam.trainer, server.trainer,
                                        self._proxy().take(batch), ids, probs, decoded.lengths)
        return Teacher(ids, probs)

    def client_distil(self, server: ServerModel, family: str, adapter: Mapping[str, torch.Tensor],
                      payload: topk.LogitsPayload, batch: Sequence[int]
                      ) -> tuple[dict[str, torch.Tensor], float]:
        """A client's adapter after distilling from the server's payload, and the FLOPs."""
        trainer = self.families[family].trainer
        examples = self._proxy().take(batch)
        out = distil_adapter(trainer, adapter, examples,
                             self.client_teacher(server, family, payload, batch),
                             steps=self.cfg.client_steps, lr=self.cfg.client_lr,
                             temperature=self.cfg.temperature)
        return out, distil_flops(trainer, examples, self.cfg.client_steps)


def references(server: ServerModel, examples: Sequence[Example]) -> torch.Tensor | None:
    """Per server position the reference id: the label or right choice, or the target token;
    None when the proxy examples have none."""
    if server.trainer.task.head == "causal-lm":
        if any(e.target is None for e in examples):
            return None
        return torch.tensor([i for e in examples for i in target_ids(server.trainer, e)])
    if any(e.label is None for e in examples):
        return None
    return torch.tensor([int(e.label) for e in examples])  # type: ignore[arg-type]


def payload_tensors(decoded: topk.TopKLogits, proxy: Sequence[int]) -> dict[str, torch.Tensor]:
    """A decoded payload as the tensors :meth:`DistillationTransfer.carry` takes."""
    return {LOGITS + "indices": decoded.indices.long(), LOGITS + "values": decoded.values.float(),
            LOGITS + "lengths": torch.tensor(decoded.lengths, dtype=torch.long),
            LOGITS + "proxy": torch.tensor(list(proxy), dtype=torch.long)}


__all__ = ["DistillationTransfer", "ProxySet", "Teacher", "aggregate_teachers", "client_logits",
           "distil", "kl_on_support", "proxy_set", "select_teachers"]

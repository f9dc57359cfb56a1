"""Several clients' LoRA training in one batched pass over their family's shared frozen base.

A client's job is a few steps of a small batch (16 × 64 tokens in the quickstart): on a GPU such
a step leaves most of the device idle. Clients of one family share the frozen base model and
differ only by their adapters, so ``train_together`` runs step t of K clients as one forward and
backward pass over the K batches stacked along the batch axis (the base's big matrix products
see K times the rows), with each client's LoRA matrices and task head stacked on a leading K
axis and applied to its own rows by batched matrix products (as multi-LoRA serving does,
Punica's BGMV), and one AdamW over the stacked tensors (AdamW is elementwise, so that is K
independent optimizers).

The result equals training the K clients one by one (``FamilyTrainer.train``) within float
tolerance, not bit for bit (a matrix product of K·B rows may sum in another order):

- the loss is Σₖ lossₖ, and no client's loss depends on another's parameters, so each client's
  gradient is its own;
- each client's rows keep their own padded length: a client's step is padded to the longest
  row of the group (on the side its task pads), and attention masks the extra positions;
- dropout draws each client's masks from its own generator, in its solo job's shapes and order:
  every dropout site (``nn.Dropout`` modules and the attention function's dropout) runs client
  by client on that client's unpadded slice with the random state its solo job would have there
  (``_Streams``). Attention without dropout runs on the whole group at once.

The plans (batches, tokens, FLOPs, peak memory) are the clients' own, made before: the simulated
timeline does not change. The validation losses before and after are measured client by client,
as ``FamilyTrainer.train`` does.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from fedsim.data import Example
from fedsim.errors import FedsimError

if TYPE_CHECKING:
    from fedsim.training import FamilyTrainer, TrainPlan, TrainResult

ATTENTION = "fedsim-batched"  # the attention function's name while a group trains


@dataclass(frozen=True)
class Request:
    """One client's job: the adapter it starts from, its examples, its plan and its seed (as
    ``FamilyTrainer.train`` takes them)."""

    adapter: dict[str, torch.Tensor]
    examples: Sequence[Example]
    plan: TrainPlan
    seed: int


def train_together(trainer: FamilyTrainer, requests: Sequence[Request]) -> list[TrainResult]:
    """Each request's ``TrainResult``, training requests with the same number of steps in one
    batched pass (a group of one is trained as ``FamilyTrainer.train`` does)."""
    from fedsim.training import torch_threads

    groups: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(len(r.plan.batches), []).append(i)
    out: list[TrainResult | None] = [None] * len(requests)
    with torch_threads(trainer.cfg.threads):
        for members in groups.values():
            if len(members) == 1:
                r = requests[members[0]]
                out[members[0]] = trainer._train(r.adapter, r.examples, r.plan, r.seed)
                continue
            for i, result in zip(members, _Group(trainer, [requests[i] for i in members]).train(),
                                 strict=True):
                out[i] = result
    return [r for r in out if r is not None]


# ---------------------------------------------------------------------------------------------
# Where each client's rows lie in a group's step


@dataclass(frozen=True)
class _Layout:
    """A step's rows (sequences, as the model sees them: examples × choices) per client, each
    client's own padded length, and the group's."""

    bounds: tuple[tuple[int, int], ...]  # rows [start, end) of each client
    lengths: tuple[int, ...]  # each client's padded length (tokens)
    length: int  # the group's
    left: bool  # padding on the left (causal-LM prompts), else on the right

    @property
    def rows(self) -> int:
        return self.bounds[-1][1]

    def positions(self, k: int) -> slice:
        """Client k's own token positions in a row of the group's length."""
        n = self.lengths[k]
        return slice(self.length - n, self.length) if self.left else slice(0, n)

    @functools.cached_property
    def equal_rows(self) -> bool:
        """Every client has as many rows (a batched product serves them at once)."""
        return len({b - a for a, b in self.bounds}) == 1


class _Streams:
    """Each client's random state as its solo job's would be: seeded like the forked global
    generator of ``FamilyTrainer.train``, and advanced only by that client's draws."""

    def __init__(self, seeds: Sequence[int], device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.index = device.index if device.index is not None else 0
        self.states = []
        with torch.random.fork_rng(devices=[self.index] if self.cuda else []):
            for seed in seeds:
                torch.manual_seed(seed)
                self.states.append(self._get())

    def _get(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.index) if self.cuda else torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.cuda:
            torch.cuda.set_rng_state(state, self.index)
        else:
            torch.set_rng_state(state)

    @contextlib.contextmanager
    def use(self, k: int) -> Iterator[None]:
        outer = self._get()
        self._set(self.states[k])
        try:
            yield
        finally:
            self.states[k] = self._get()
            self._set(outer)


# ---------------------------------------------------------------------------------------------
# The group


class _Group:
    """K requests with the same number of steps, trained in one pass per step."""

    def __init__(self, trainer: FamilyTrainer, requests: Sequence[Request]) -> None:
        self.trainer, self.requests = trainer, list(requests)
        self.k = len(requests)
        self.left = trainer.task.pad_left
        self.streams = _Streams([r.seed for r in requests], trainer.device)
        self.layout: _Layout | None = None  # the step being run
        self.attention_before = "sdpa"  # the model's attention function (set when installed)
        dev = trainer.device
        # each trainable tensor as a (K, ...) leaf: client k's slice is its adapter
        self.stacked = {key: torch.stack([r.adapter[key].to(dev, p.dtype) for r in requests])
                        .requires_grad_(True) for key, p in trainer._params.items()}

    # -- the steps ------------------------------------------------------------------------

    def train(self) -> list[TrainResult]:
        tr = self.trainer
        held = [[r.examples[i] for i in r.plan.validation] for r in self.requests]
        before = []
        for r, h in zip(self.requests, held, strict=True):  # eval mode, client by client
            tr.apply(r.adapter)
            before.append(tr._mean_loss(h) if h else math.nan)
        optimizer = tr.optimizer(self.stacked.values())
        losses: list[list[float]] = [[] for _ in self.requests]
        tr.model.train()
        try:
            with self._installed():
                for t in range(len(self.requests[0].plan.batches)):
                    step = [[r.examples[i] for i in r.plan.batches[t]] for r in self.requests]
                    with tr.autocast():
                        each = self._losses(step)
                        total = torch.stack(each).sum()
                    total.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    for k, loss in enumerate(each):
                        losses[k].append(loss.item())
        finally:
            tr.model.eval()
            self.layout = None
        results = []
        for k, (r, h) in enumerate(zip(self.requests, held, strict=True)):
            tr.apply({key: s[k].detach() for key, s in self.stacked.items()})  # client k's end
            results.append(tr.finish(r.adapter, r.plan, losses[k], before[k], h))
        return results

    def _losses(self, step: list[list[Example]]) -> list[torch.Tensor]:
        """Each client's loss of this step, from one forward pass over the group's rows."""
        tr = self.trainer
        inputs = [tr.inputs(examples) for examples in step]  # each as its solo job has it
        batch, counts = self._stack([b for b, _ in inputs])
        logits = tr.model(**batch).logits
        out, start = [], 0
        for (own, targets), n in zip(inputs, counts, strict=True):
            mine = logits[start:start + n]
            start += n
            keep = own.get("logits_to_keep")
            if isinstance(keep, int) and keep:  # a causal LM's last positions: the client's own
                mine = mine[:, -keep:]
            out.append(tr.task.loss(mine, targets))
        return out

    def _stack(self, batches: list[dict[str, Any]]) -> tuple[dict[str, Any], list[int]]:
        """The clients' model inputs as one batch (each padded on its task's side to the
        group's length), the examples per client; sets the step's layout."""
        ids = [b["input_ids"] for b in batches]
        lengths = [x.shape[-1] for x in ids]
        length = max(lengths)
        pad_id = self.trainer.tokenizer.pad_token_id
        out: dict[str, Any] = {}
        for key, first in batches[0].items():
            if not isinstance(first, torch.Tensor):
                out[key] = max(b[key] for b in batches) if isinstance(first, int) else first
                continue
            fill = pad_id if key == "input_ids" else 0
            padded = []
            for b, n in zip(batches, lengths, strict=True):
                extra = (length - n, 0) if self.left else (0, length - n)
                padded.append(F.pad(b[key], extra, value=fill) if length > n else b[key])
            out[key] = torch.cat(padded)
        bounds, start = [], 0
        for x, n in zip(ids, lengths, strict=True):
            rows = x.numel() // n  # examples × choices
            bounds.append((start, start + rows))
            start += rows
        self.layout = _Layout(tuple(bounds), tuple(lengths), length, self.left)
        return out, [x.shape[0] for x in ids]

    # -- the model's pieces, per client ----------------------------------------------------

    @contextlib.contextmanager
    def _installed(self) -> Iterator[None]:
        """The model's LoRA layers, task heads, dropouts and attention function, per client,
        for the length of the block."""
        config = self.trainer.model.config
        patched: list[nn.Module] = []
        try:
            unplaced = sorted(self.stacked.keys() - self._patch(patched))
            if unplaced:  # a trained tensor no per-client module reads (a head not linear)
                raise FedsimError(f"batched training cannot train {unplaced[:3]} per client")
            self.attention_before = config._attn_implementation
            # the masks the model's own function takes (an unknown name would get none at all)
            AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS[
                self.attention_before])
            config._attn_implementation = ATTENTION
            _ACTIVE.append(self)
            try:
                yield
            finally:
                _ACTIVE.pop()
                config._attn_implementation = self.attention_before
        finally:
            for module in patched:
                del module.forward  # the class's again

    def _patch(self, patched: list[nn.Module]) -> set[str]:
        """Per-client forwards on the model's modules (appended to ``patched``); the stacked
        tensors they read."""
        tr = self.trainer
        placed: set[str] = set()
        lora: list[str] = []  # LoRA layers' names: their own A and B modules are not called
        for name, module in tr.model.named_modules():
            key = tr._key(name + ".")[:-1]  # as its parameters are named, less the tail
            if isinstance(module, LoraLayer):
                module.forward = self._lora(module, key)
                lora.append(key + ".")
                placed |= {f"{key}.lora_A.weight", f"{key}.lora_B.weight"}
            elif isinstance(module, nn.Dropout) and module.p > 0:  # LoRA's own too
                module.forward = self._dropout(module)
            elif any(key.startswith(prefix) for prefix in lora):
                continue
            elif isinstance(module, nn.Linear) and f"{key}.weight" in self.stacked:
                module.forward = self._linear(key)  # a layer of a trained task head
                placed |= {f"{key}.weight", f"{key}.bias"}
            else:
                continue
            patched.append(module)
        return placed

    def _rows(self, x: torch.Tensor, fn: Callable[[int, torch.Tensor], torch.Tensor],
              seq: bool) -> torch.Tensor:
        """``fn(k, rows)`` on each client's rows of ``x`` (its own positions only where ``seq``:
        the token axis is 1), the padding positions passed through, joined again."""
        lay = self.layout
        assert lay is not None and x.shape[0] == lay.rows, "a tensor outside the group's rows"
        pieces = []
        for k, (a, b) in enumerate(lay.bounds):
            rows = x[a:b]
            pos = lay.positions(k)
            if not seq or lay.lengths[k] == lay.length:
                pieces.append(fn(k, rows.contiguous()))
                continue
            own = fn(k, rows[:, pos].contiguous())
            pad = rows[:, :pos.start] if lay.left else rows[:, pos.stop:]
            pieces.append(torch.cat([pad, own] if lay.left else [own, pad], dim=1))
        return torch.cat(pieces)

    def _dropout(self, module: nn.Dropout) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            if not module.training:
                return x
            lay = self.layout
            seq = lay is not None and x.dim() >= 3 and x.shape[1] == lay.length

            def one(k: int, rows: torch.Tensor) -> torch.Tensor:
                with self.streams.use(k):
                    return F.dropout(rows, module.p, True, module.inplace)
            return self._rows(x, one, seq)
        return forward

    def _lora(self, layer: LoraLayer, key: str) -> Callable[..., torch.Tensor]:
        name = "default"
        if layer.use_dora.get(name) or name not in layer.lora_A:
            raise FedsimError(f"batched training supports plain LoRA layers only ({key})")
        a, b = self.stacked[f"{key}.lora_A.weight"], self.stacked[f"{key}.lora_B.weight"]
        scaling, dropout = layer.scaling[name], layer.lora_dropout[name]

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            result = layer.base_layer(x, *args, **kwargs)
            h = dropout(x.to(a.dtype))  # peft's order: cast, dropout, A, B, scale
            return (result + self._matmul(self._matmul(h, a), b) * scaling).to(result.dtype)
        return forward

    def _linear(self, key: str) -> Callable[..., torch.Tensor]:
        w = self.stacked[f"{key}.weight"]
        bias = self.stacked.get(f"{key}.bias")

        def forward(x: torch.Tensor) -> torch.Tensor:
            y = self._matmul(x, w)
            return y if bias is None else y + self._broadcast(bias, y)
        return forward

    def _matmul(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Each client's rows of ``x`` times its own ``w[k]``ᵀ (a batched product where the
        clients have as many rows each)."""
        lay = self.layout
        assert lay is not None and x.shape[0] == lay.rows, "a tensor outside the group's rows"
        if lay.equal_rows:
            xs = x.reshape(self.k, -1, x.shape[-1])
            return torch.bmm(xs, w.transpose(1, 2)).reshape(*x.shape[:-1], w.shape[1])
        return torch.cat([x[a:b] @ w[k].T for k, (a, b) in enumerate(lay.bounds)])

    def _broadcast(self, bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each client's ``bias[k]`` over its rows of ``y``."""
        lay = self.layout
        assert lay is not None
        sizes = torch.tensor([b - a for a, b in lay.bounds], device=bias.device)
        per_row = bias.repeat_interleave(sizes, dim=0)  # (rows, out)
        return per_row.view(y.shape[0], *([1] * (y.dim() - 2)), y.shape[-1])

    def attend(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
               **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """The model's own attention function: on the whole group without dropout (no draws;
        the masks keep clients apart), else client by client on its own positions with its own
        random state."""
        inner = _attention_function(module, self.attention_before)
        lay = self.layout
        if not dropout or lay is None:
            return inner(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
        pieces = []
        for k, (a, b) in enumerate(lay.bounds):  # query, key, value: (rows, heads, length, dim)
            pos = lay.positions(k)
            q, kk, v = (t[a:b, :, pos] for t in (query, key, value))
            mask = (None if attention_mask is None
                    else _own_mask(attention_mask[a:b], pos, lay.length))
            with self.streams.use(k):
                out, _ = inner(module, q, kk, v, mask, dropout=dropout, **kwargs)
            # out: (rows, length, heads, dim); padding positions zero (nothing reads them)
            gap = lay.length - lay.lengths[k]
            pieces.append(F.pad(out, (0, 0, 0, 0, gap, 0) if lay.left else (0, 0, 0, 0, 0, gap)))
        return torch.cat(pieces), None


_ACTIVE: list[_Group] = []  # the group training now (the attention function asks it)


def _attention(module: nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    return _ACTIVE[-1].attend(module, *args, **kwargs)


AttentionInterface.register(ATTENTION, _attention)


def _attention_function(module: nn.Module, name: str) -> Callable[..., Any]:
    """The attention function the model would call under ``name`` (its own eager one)."""
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _own_mask(mask: torch.Tensor, pos: slice, length: int) -> torch.Tensor:
    """A client's attention mask on its own positions (query and key axes of the group's
    length; a broadcast axis of 1 left as it is)."""
    if mask.shape[-1] == length:
        mask = mask[..., pos]
    if mask.dim() >= 2 and mask.shape[-2] == length:
        mask = mask[..., pos, :]
    return mask

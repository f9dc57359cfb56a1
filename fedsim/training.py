"""Local LoRA fine-tuning of one client, and its FLOP and memory accounting.

One ``FamilyTrainer`` per (model family, task) loads one frozen base model and wraps it once with
peft; clients differ only by their adapter (LoRA A/B of the target modules plus the task head),
which is copied into the model's trainable parameters before each job. Fifty clients thus cost
one model and fifty adapters.

A job is planned before it runs: ``plan`` draws the batches from the seed and tokenizes them, so
the tokens, FLOPs (4·N·tokens, see DESIGN "The one rule") and peak memory are known before any
training; the simulator waits ``flops / device FLOP/s`` and checks the memory against the device.
``train`` then runs exactly that plan and returns the adapter delta.

A plan may hold out a local validation split (``validation_split``: examples of the client's
own data that it never trains on): the job measures its mean loss on them before and after
training, the loss improvement that task arithmetic weighs clients by; the two forward passes
(2·N·tokens each) are part of the plan's FLOPs.

What depends on the task (the model head, tokenization and batching, the loss, the metrics) is
asked of the trainer's task entry (registry ``TASKS``, :mod:`fedsim.tasks`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from peft import LoraConfig, get_peft_model

from fedsim.accelerators import to_device
from fedsim.data import Example
from fedsim.errors import FedsimError
from fedsim.models import load_model, non_embedding_parameters
from fedsim.plugins import TASKS
from fedsim.roles import ROLES, target_modules
from fedsim.tasks import Batch, Row, Task


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` torch intra-op threads, then restore the count."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Accounting: pure functions


def lora_step_flops(non_embedding_params: int, tokens: int) -> float:
    """FLOPs of LoRA training on ``tokens`` tokens: forward 2N + activation gradients 2N.

    The frozen weights get no weight gradients (the 2N that makes a full fine-tune 6N); LoRA's
    own matrices are r/h of a layer's and neglected. N excludes embedding tables, and so a tied
    LM head (``models.non_embedding_parameters``): a causal LM's output layer is counted apart,
    by :func:`lm_head_flops`, on the positions whose logits are really computed.
    """
    return 4.0 * non_embedding_params * tokens


def lm_head_flops(vocab_size: int, hidden: int, positions: int) -> float:
    """FLOPs of a causal LM's output layer on ``positions`` logit positions: forward 2·V·h and
    the gradient to its input 2·V·h each (the tied weight is frozen: no weight gradient).

    It matters for small LMs with large vocabularies: gemma3-270m's V·h = 168M against
    N = 100M non-embedding parameters.
    """
    return 4.0 * vocab_size * hidden * positions


def forward_flops(non_embedding_params: int, tokens: int) -> float:
    """FLOPs of one forward pass over ``tokens`` tokens: 2N (a causal LM's output layer apart,
    2·V·h per logit position: half of :func:`lm_head_flops`)."""
    return 2.0 * non_embedding_params * tokens


def full_finetune_flops(non_embedding_params: int, tokens: int) -> float:
    """FLOPs of full fine-tuning: forward 2N, activation gradients 2N, weight gradients 2N."""
    return 6.0 * non_embedding_params * tokens


def peak_memory_bytes(total_params: int, trainable_params: int, batch: int, seq_len: int,
                      hidden: int, layers: int, heads: int, bytes_per_param: int = 4,
                      vocab_size: int = 0, logit_len: int | None = None) -> int:
    """Peak training memory in bytes: weights + gradients + AdamW state + activations.

    weights ``bytes·P``; gradients of the trainable ``bytes·T``; AdamW's two moments ``2·bytes·T``
    (8·T in fp32). Activations per transformer layer: ``s·b·h·(34 + 5·a·s/h)`` bytes for 16-bit
    activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
    Models", eq. 1, no tensor parallelism or recomputation), scaled by ``bytes/2`` (×2 in fp32).
    It is an upper bound for LoRA (frozen linears need not keep their inputs). ``vocab_size`` > 0
    adds the output logits and their gradient, ``2·b·logit_len·V·bytes`` (``logit_len`` defaults
    to ``seq_len``), which the paper leaves out and which dominate for small causal LMs with
    50k-260k vocabularies.
    """
    s, b, h, a = seq_len, batch, hidden, heads
    per_layer_16bit = s * b * h * (34 + 5 * a * s / h)
    activations = layers * per_layer_16bit * bytes_per_param / 2
    logits = 2 * b * (s if logit_len is None else logit_len) * vocab_size * bytes_per_param
    states = bytes_per_param * total_params + 3 * bytes_per_param * trainable_params
    return round(states + activations + logits)


def adapter_bytes(adapter: dict[str, torch.Tensor]) -> int:
    """Bytes of an adapter's tensors as stored (fp32: 4 per value)."""
    return sum(t.numel() * t.element_size() for t in adapter.values())


# ---------------------------------------------------------------------------------------------
# Configuration and results


@dataclass(frozen=True)
class LocalTrainingConfig:
    """Hyperparameters of one client's local training (validated on construction)."""

    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_roles: tuple[str, ...] = ("q", "v")
    lr: float = 5e-4
    weight_decay: float = 0.0
    local_steps: int = 10
    local_epochs: int | None = None  # set: that many passes over the client's data instead
    batch_size: int = 16
    max_length: int = 64  # tokens per sequence, prompt + target for generation
    max_new_tokens: int = 16  # greedy decoding length for generation metrics
    # torch threads of a job: a float sum's order depends on the thread count, so a fixed one
    # gives bit-identical deltas wherever the job runs (scenario.executor.threads_per_job).
    threads: int = 1
    device: str = "cpu"  # a resolved torch device (fedsim.accelerators.resolve)
    precision: str = "fp32"  # of the training steps: fp32, or bf16 under autocast

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_roles", tuple(self.target_roles))
        positive = {"lora_r": self.lora_r, "lora_alpha": self.lora_alpha, "lr": self.lr,
                    "local_steps": self.local_steps, "batch_size": self.batch_size,
                    "max_new_tokens": self.max_new_tokens, "threads": self.threads}
        for key, value in positive.items():
            if not value > 0:
                raise FedsimError(f"{key} must be > 0, got {value}")
        if not 0 <= self.lora_dropout < 1:
            raise FedsimError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.local_epochs is not None and self.local_epochs < 1:
            raise FedsimError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if self.weight_decay < 0:
            raise FedsimError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.precision not in ("fp32", "bf16"):
            raise FedsimError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.max_length < 8:
            raise FedsimError(f"max_length must be >= 8, got {self.max_length}")
        if not self.target_roles or set(self.target_roles) - set(ROLES):
            raise FedsimError(f"target_roles must be a non-empty subset of {ROLES}, "
                              f"got {self.target_roles}")


def validation_split(num_examples: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Positions (sorted) of a client's validation split among its ``num_examples`` examples:
    ``size`` drawn without replacement, at most ``num_examples − 1`` (one is left to train on);
    empty for ``size`` 0."""
    size = min(size, num_examples - 1)
    if size <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.sort(rng.choice(num_examples, size=size, replace=False))


@dataclass(frozen=True)
class TrainPlan:
    """A job fixed before it runs: batches (indices into the client's examples, one tuple per
    local step), the validation split it measures (indices too, never in a batch) and what
    they cost."""

    batches: tuple[tuple[int, ...], ...]
    tokens: int  # training tokens, padding included: Σ_steps batch·rows·padded_len
    flops: float  # lora_step_flops(N, tokens) (+ output layer) + the validation passes
    peak_memory_bytes: int
    num_samples: int  # distinct examples trained on
    padded_lengths: tuple[int, ...] = ()  # tokens per sequence of each step, after padding
    validation: tuple[int, ...] = ()  # the held-out examples whose loss is measured
    validation_tokens: int = 0  # tokens of one forward pass over them, padding included


@dataclass(frozen=True)
class TrainResult:
    """What a job returns: the adapter delta (fp32, CPU) and its measurements."""

    delta: dict[str, torch.Tensor]
    tokens: int
    flops: float
    peak_memory_bytes: int
    num_samples: int
    losses: tuple[float, ...]  # training loss of each local step (the batch mean)
    # Mean loss on the plan's validation split before training (eval mode) and after; without
    # a split, the first and the last step's training loss (other examples: a noisy proxy).
    loss_before: float
    loss_after: float
    metrics: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The trainer


class FamilyTrainer:
    """One frozen base model of a family, wrapped once with LoRA; per-client adapters swap in.

    Adapter keys are the base model's parameter names with LoRA's ``lora_A.weight`` /
    ``lora_B.weight`` tails (``bert.encoder.layer.0.attention.self.query.lora_A.weight``) and the
    task head's own names (``classifier.weight``): peft's ``base_model.model.``, ``.default`` and
    ``modules_to_save.`` are stripped.
    """

    def __init__(self, model_name: str, task: str, num_labels: int | None,
                 cfg: LocalTrainingConfig, seed: int, dataset: str | None = None) -> None:
        kind = TASKS.get(task)
        kind.check_num_labels(num_labels)
        self.task: Task = kind(dataset)  # the dataset names the prompt of a generation task
        self.cfg = cfg
        loaded = load_model(model_name, kind.head, num_labels, seed=seed)
        self.tokenizer, self.spec = loaded.tokenizer, loaded.spec
        self.num_classes = num_labels if kind.has_classes else None
        base = loaded.model
        self.non_embedding_params = non_embedding_parameters(base)  # N, before LoRA is added
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(seed)  # LoRA A draws from the global generator; fork restores it
            # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`: not ours.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            self.model = get_peft_model(base, self._lora_config())
        self.device = torch.device(cfg.device)
        self.model.to(self.device)  # the frozen base stays resident there between jobs
        self.model.eval()
        self._params = {self._key(n): p for n, p in self.model.named_parameters()
                        if p.requires_grad}
        self._initial = {k: p.detach().cpu().clone() for k, p in self._params.items()}
        self.total_params = sum(p.numel() for p in self.model.parameters())
        self.trainable_params = sum(p.numel() for p in self._params.values())
        self._cache: dict[Example, tuple[Row, ...]] = {}  # training encodings, by value

    def _lora_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
            target_modules=target_modules(self.spec.architecture, self.cfg.target_roles),
            **self.task.lora_options())  # the task's head: a peft task type, or named modules

    @staticmethod
    def _key(name: str) -> str:
        name = name.removeprefix("base_model.model.")
        return name.replace("modules_to_save.default.", "").replace(".default.", ".")

    # -- adapters ---------------------------------------------------------------------------

    def initial_adapter(self) -> dict[str, torch.Tensor]:
        """The starting trainable state (LoRA A random, B zero, the head), fixed by ``seed``."""
        return {k: t.clone() for k, t in self._initial.items()}

    def apply(self, adapter: dict[str, torch.Tensor]) -> None:
        """Copy ``adapter`` into the model's trainable parameters (it must have every key)."""
        if adapter.keys() != self._params.keys():
            missing = sorted(self._params.keys() - adapter.keys())[:3]
            extra = sorted(adapter.keys() - self._params.keys())[:3]
            raise FedsimError(f"adapter does not fit this model: missing {missing}, extra {extra}")
        with torch.no_grad():
            for key, param in self._params.items():
                param.copy_(adapter[key])

    def current_adapter(self) -> dict[str, torch.Tensor]:
        """The model's trainable state now, detached fp32 copies."""
        return {k: p.detach().to("cpu", torch.float32, copy=True) for k, p in self._params.items()}

    # -- tokenization -----------------------------------------------------------------------

    def _encode(self, example: Example) -> tuple[Row, ...]:
        """Training rows of ``example``, tokenized once per trainer (cached by value)."""
        rows = self._cache.get(example)
        if rows is None:
            rows = self.task.encode(self.tokenizer, example, self.cfg.max_length)
            self._cache[example] = rows
        return rows

    # -- planning ---------------------------------------------------------------------------

    def plan(self, examples: Sequence[Example], seed: int,
             validation: Sequence[int] = ()) -> TrainPlan:
        """Batches for ``local_steps`` steps (or ``local_epochs`` passes) drawn from ``seed``
        among the examples not in ``validation`` (positions in ``examples``), and the cost.

        Each epoch is a fresh permutation cut into full batches (the remainder is dropped, so a
        batch never repeats an example); a client with fewer examples than ``batch_size`` uses
        all of them every step. The validation split's loss is measured before and after
        training: two forward passes, in the FLOPs.
        """
        held = sorted({int(i) for i in validation})
        if held and not 0 <= held[0] <= held[-1] < len(examples):
            raise FedsimError(f"validation positions must be in [0, {len(examples)}), got {held}")
        pool = np.setdiff1d(np.arange(len(examples)), held)  # the examples trained on
        n, size, steps = len(pool), self.cfg.batch_size, self.cfg.local_steps
        if n == 0:
            raise FedsimError("a client needs at least one example to train")
        if self.cfg.local_epochs is not None:  # full batches per pass, at least one step each
            steps = self.cfg.local_epochs * max(n // size, 1)
        rng = np.random.default_rng(seed)
        batches: list[tuple[int, ...]] = []
        while len(batches) < steps:
            order = pool[rng.permutation(n)].tolist()
            width = min(size, n)
            batches += [tuple(order[i:i + width]) for i in range(0, n - width + 1, width)]
        batches = batches[:steps]
        lengths = tuple(max(len(r.ids) for i in b for r in self._encode(examples[i]))
                        for b in batches)
        rows = len(self._encode(examples[0]))  # sequences per example: 1, or one per choice
        tokens = sum(len(b) * rows * length for b, length in zip(batches, lengths, strict=True))
        used = [[examples[i] for i in b] for b in batches]
        flops = lora_step_flops(self.non_embedding_params, tokens)
        positions = self._logit_positions(used)
        if positions:  # a causal LM's output layer, on each batch's logit positions only
            config = self.model.config
            flops += lm_head_flops(config.vocab_size, config.hidden_size, positions)
        held_out = [examples[i] for i in held]
        val_tokens = self._forward_tokens(held_out)
        flops += 2 * self._forward_flops(held_out, val_tokens)  # before and after training
        return TrainPlan(tuple(batches), tokens, flops, self._peak_memory(used),
                         len({i for b in batches for i in b}), lengths, tuple(held), val_tokens)

    def _logit_positions(self, batches: Sequence[Sequence[Example]]) -> int:
        """Vocabulary logit positions of ``batches`` (0 where the head scores classes)."""
        return sum(len(b) * self.task.vocab_positions([r for e in b for r in self._encode(e)])
                   for b in batches)

    def _eval_batches(self, examples: Sequence[Example]) -> list[Sequence[Example]]:
        """``examples`` as evaluation batches: ``batch_size`` at a time, in order."""
        size = self.cfg.batch_size
        return [examples[i:i + size] for i in range(0, len(examples), size)]

    def _forward_tokens(self, examples: Sequence[Example]) -> int:
        """Tokens of one evaluation pass over ``examples``, each batch padded to its longest."""
        return sum(len(rows) * max(len(r.ids) for r in rows) for b in self._eval_batches(examples)
                   if (rows := [r for e in b for r in self._encode(e)]))

    def _forward_flops(self, examples: Sequence[Example], tokens: int) -> float:
        """FLOPs of one evaluation pass over ``examples`` (``tokens`` of them): 2·N·tokens, and
        a causal LM's output layer forward, 2·V·h per logit position."""
        flops = forward_flops(self.non_embedding_params, tokens)
        positions = self._logit_positions(self._eval_batches(examples))
        if positions:
            config = self.model.config
            flops += lm_head_flops(config.vocab_size, config.hidden_size, positions) / 2
        return flops

    def _peak_memory(self, batches: Sequence[Sequence[Example]]) -> int:
        """``peak_memory_bytes`` at the largest batch and longest padded sequence of a plan."""
        rows = [[r for e in b for r in self._encode(e)] for b in batches]
        config = self.model.config
        logit_len = max(self.task.vocab_positions(r) for r in rows)  # 0: no vocabulary logits
        return peak_memory_bytes(
            self.total_params, self.trainable_params, batch=max(len(r) for r in rows),
            seq_len=max(len(x.ids) for r in rows for x in r), hidden=config.hidden_size,
            layers=config.num_hidden_layers, heads=config.num_attention_heads,
            vocab_size=config.vocab_size if logit_len else 0, logit_len=logit_len or None)

    # -- training ---------------------------------------------------------------------------

    def inputs(self, examples: Sequence[Example]) -> tuple[Batch, torch.Tensor]:
        """Model inputs and targets (class index per example, or LM labels per token)."""
        batch, targets = self.task.collate(examples, [self._encode(e) for e in examples],
                                           self.tokenizer.pad_token_id)
        return to_device(batch, self.device), targets.to(self.device)

    def _loss(self, examples: Sequence[Example]) -> torch.Tensor:
        """The task's mean cross-entropy: over examples (class or choice), or target tokens."""
        batch, targets = self.inputs(examples)
        return self.task.loss(self.model(**batch).logits, targets)

    @torch.inference_mode()
    def _mean_loss(self, examples: Sequence[Example]) -> float:
        """Mean of per-batch losses over ``examples`` in eval mode, batch_size at a time."""
        return float(np.mean([self._loss(b).item() for b in self._eval_batches(examples)]))

    def train(self, adapter: dict[str, torch.Tensor], examples: Sequence[Example],
              plan: TrainPlan, seed: int) -> TrainResult:
        """Run ``plan`` from ``adapter`` with a fresh AdamW; return the adapter delta.

        Same adapter, examples, plan and seed give a bit-identical delta (on the same machine
        and thread count). ``seed`` drives dropout, in a forked global generator that is
        restored afterwards. Loss before/after is measured on the plan's validation split in
        eval mode (its FLOPs are the plan's); without one, the first and last step losses.
        """
        with torch_threads(self.cfg.threads):
            return self._train(adapter, examples, plan, seed)

    def _train(self, adapter: dict[str, torch.Tensor], examples: Sequence[Example],
               plan: TrainPlan, seed: int) -> TrainResult:
        self.apply(adapter)
        held_out = [examples[i] for i in plan.validation]
        optimizer = self.optimizer(self._params.values())
        loss_before = self._mean_loss(held_out) if held_out else math.nan
        losses = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model.train()
            try:
                for batch in plan.batches:
                    with self.autocast():
                        loss = self._loss([examples[i] for i in batch])
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(loss.item())
            finally:
                self.model.eval()
        return self.finish(adapter, plan, losses, loss_before, held_out)

    def optimizer(self, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
        """A job's fresh AdamW (its learning rate and weight decay) over ``params``."""
        return torch.optim.AdamW(list(params), lr=self.cfg.lr,
                                 weight_decay=self.cfg.weight_decay)

    def autocast(self) -> torch.autocast:
        """The training steps' precision: bf16 autocast, or off (fp32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.precision == "bf16")

    def finish(self, adapter: dict[str, torch.Tensor], plan: TrainPlan, losses: list[float],
               loss_before: float, held_out: Sequence[Example]) -> TrainResult:
        """The result of a job whose end state is the model's trainable state now: the delta
        from ``adapter``, and the validation loss after it (without a validation split, the
        first and last steps' losses stand for before and after)."""
        if held_out:
            loss_after = self._mean_loss(held_out)
        else:
            loss_before, loss_after = losses[0], losses[-1]
        delta = {k: p.detach().float().cpu() - adapter[k].float()
                 for k, p in self._params.items()}
        delta_norm = float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())))
        return TrainResult(delta, plan.tokens, plan.flops, plan.peak_memory_bytes,
                           plan.num_samples, tuple(losses), loss_before, loss_after,
                           {"delta_norm": delta_norm, "loss_first": losses[0],
                            "loss_last": losses[-1]})

    # -- evaluation -------------------------------------------------------------------------

    @torch.inference_mode()
    def evaluate(self, adapter: dict[str, torch.Tensor], examples: Sequence[Example],
                 limit: int | None = None) -> dict[str, float]:
        """Metrics of ``adapter`` on ``examples[:limit]``: ``loss`` and the task's ``metrics``
        (accuracy/macro_f1, or rougeL, chrf and bleu of greedy decodes)."""
        self.apply(adapter)
        examples = list(examples[:limit])
        if not examples:
            raise FedsimError("evaluate needs at least one example")
        metrics = self.task.evaluate(self, examples)
        if "loss" in metrics:  # scored in the same pass (classification, multiple choice)
            return metrics
        return {"loss": self._mean_loss(examples)} | metrics

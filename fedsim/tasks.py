"""Tasks: what a client fine-tunes for: its model head, batches, loss and metrics.

Registry ``TASKS`` (names declared in :mod:`fedsim.plugins`): ``classification``,
``multiple-choice`` and ``generation``. One class per task behind :class:`Task`, as Flower has one
class per strategy: the trainer (:class:`fedsim.training.FamilyTrainer`) holds one and asks it,
never the task's name, what to load, how to tokenize and batch, what to minimise and what to
report. The federation asks it whether examples carry class labels (label-skew partitions, the
server's linear probe).

Prompts for generation come from the dataset entry (``Dataset.prompt``, default
``"{text}\\n=>"``): the text's tokens are cut so that prompt + target fit in ``max_length``; the
target follows with a space and ends with the end-of-sequence token; only target tokens carry the
loss. Greedy decoding stops at the end-of-sequence token, and the decoded text is cut at its first
newline (targets are one line). Causal-LM batches are left-padded (position ids count real tokens
only) so that the logits, the costliest part of a small LM with a 50k-260k vocabulary, are
computed for the target positions only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np
import sacrebleu
import torch
import torch.nn.functional as F
from peft import TaskType
from rouge_score import rouge_scorer
from sklearn.metrics import confusion_matrix, f1_score

from fedsim.accelerators import to_device
from fedsim.data import Example, TaskData
from fedsim.errors import FedsimError
from fedsim.plugins import DATASETS, TASKS

if TYPE_CHECKING:
    from fedsim.training import FamilyTrainer

Batch = dict[str, Any]  # model keyword arguments: tensors, and logits_to_keep (an int)


# ---------------------------------------------------------------------------------------------
# Rows and padding


class Row(NamedTuple):
    """One tokenized sequence: an example has 1 row, or one per choice for multiple choice."""

    ids: tuple[int, ...]
    types: tuple[int, ...] | None  # token type ids (BERT), None where the model has none
    labels: tuple[int, ...] | None  # causal-LM labels (-100 on the prompt), None otherwise


def _pad(seqs: Sequence[Sequence[int]], value: int, length: int, left: bool) -> torch.Tensor:
    """(len(seqs), length) int64 tensor, each sequence padded with ``value``."""
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, seq in enumerate(seqs):
        start = length - len(seq) if left else 0
        out[i, start:start + len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def collate(rows: Sequence[Row], pad_id: int, left: bool = False) -> Batch:
    """Model inputs for ``rows`` padded to the longest (dynamic padding)."""
    length = max(len(r.ids) for r in rows)
    batch = {"input_ids": _pad([r.ids for r in rows], pad_id, length, left),
             "attention_mask": _pad([[1] * len(r.ids) for r in rows], 0, length, left)}
    if rows[0].types is not None:
        batch["token_type_ids"] = _pad([r.types or () for r in rows], 0, length, left)
    if rows[0].labels is not None:
        batch["labels"] = _pad([r.labels or () for r in rows], -100, length, left)
    return batch


def logit_positions(rows: Sequence[Row]) -> int:
    """Positions whose logits a left-padded causal-LM batch needs: the longest target, plus
    the prompt's last token, which predicts the target's first."""
    return 1 + max(sum(t != -100 for t in r.labels or ()) for r in rows)


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Unweighted mean over classes of F1 = 2TP / (2TP + FP + FN).

    Classes absent from both truth and predictions are left out: no ``labels``, so scikit-learn
    averages over the labels seen in either. A class predicted but never true, or true but never
    predicted, scores 0 (``zero_division=0`` also keeps it from warning).
    """
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


# ---------------------------------------------------------------------------------------------
# The task interface


class Task(ABC):
    """One fine-tuning objective. Class attributes are facts of the task; an instance is built
    per trainer with the dataset it trains on (its prompt, for generation)."""

    name: ClassVar[str] = ""  # set by TASKS.register
    head: ClassVar[str]  # the model head, as fedsim.models.load_model names it
    # Examples carry class labels: the model gets num_labels, a partition can skew them
    # (dirichlet), the server's head can be fitted as a linear probe.
    has_classes: ClassVar[bool] = False
    metrics: ClassVar[tuple[str, ...]]  # what evaluate returns (besides loss); first: primary
    pad_left: ClassVar[bool] = False  # collate pads rows on the left (else the right)

    def __init__(self, dataset: str | None = None) -> None:
        self.dataset = dataset

    @classmethod
    def check_num_labels(cls, num_labels: int | None) -> None:
        """Raise if ``num_labels`` does not suit the task (tasks without classes take any)."""

    @classmethod
    def partition_labels(cls, examples: Sequence[Example]) -> np.ndarray | None:
        """The labels a partition may skew (one class index per example), None without classes."""
        return np.array([e.label for e in examples]) if cls.has_classes else None

    @classmethod
    def primary_metric(cls, data: TaskData) -> str:
        """The run's quality metric: the dataset's own for this task (translation: chrf), else
        the task's first."""
        return data.metric or cls.metrics[0]

    @abstractmethod
    def lora_options(self) -> dict[str, Any]:
        """What peft's ``LoraConfig`` needs to train this task's head beside the LoRA matrices."""

    @abstractmethod
    def encode(self, tokenizer: Any, example: Example, max_length: int) -> tuple[Row, ...]:
        """The training rows of ``example``, at most ``max_length`` tokens each."""

    @abstractmethod
    def collate(self, examples: Sequence[Example], encoded: Sequence[tuple[Row, ...]],
                pad_id: int) -> tuple[Batch, torch.Tensor]:
        """Model inputs and targets of ``examples`` (``encoded``: their rows)."""

    @abstractmethod
    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of a batch's logits against its targets."""

    def single_text_inputs(self, batch: Batch) -> Batch:
        """Model inputs for one plain text per example (a projection's probe texts, tokenized
        (batch, tokens)) in the shape this task's whole model takes: as they are."""
        return batch

    def vocab_positions(self, rows: Sequence[Row]) -> int:
        """Positions per row of a batch whose logits span the vocabulary (a causal LM's output
        layer, costed apart in FLOPs and memory); 0 where the head scores classes."""
        return 0

    @abstractmethod
    def evaluate(self, trainer: FamilyTrainer, examples: Sequence[Example]) -> dict[str, float]:
        """``metrics`` of the trainer's model as it is now on ``examples`` (non-empty); with
        ``loss`` where the scoring pass gives it for free (else the trainer adds a loss pass)."""


# ---------------------------------------------------------------------------------------------
# Choosing one of K outputs: a class, or a choice


def _encoder_rows(encodings: Sequence[Any]) -> tuple[Row, ...]:
    """Rows of a tokenizer's outputs (with token type ids where the tokenizer gives them)."""
    return tuple(Row(tuple(e["input_ids"]), tuple(e["token_type_ids"])
                     if "token_type_ids" in e else None, None) for e in encodings)


class _Choosing(Task):
    """A task scored by the arg-max of its head's logits: accuracy and macro-F1."""

    metrics = ("accuracy", "macro_f1")

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)  # mean over examples

    @abstractmethod
    def num_choices(self, trainer: FamilyTrainer, examples: Sequence[Example]) -> int:
        """K: the outputs an example chooses among (the confusion matrix's size)."""

    def evaluate(self, trainer: FamilyTrainer, examples: Sequence[Example]) -> dict[str, float]:
        """``loss`` too: the mean of per-batch losses, from the logits the choices are read from
        (one forward pass where a loss pass and a scoring pass would give the same logits)."""
        size, predicted, losses = trainer.cfg.batch_size, [], []
        for i in range(0, len(examples), size):
            batch, targets = trainer.inputs(examples[i:i + size])
            logits = trainer.model(**batch).logits
            losses.append(self.loss(logits, targets).item())
            predicted += logits.argmax(-1).tolist()
        truth = [e.label for e in examples]
        confusion = confusion_matrix(truth, predicted,
                                     labels=range(self.num_choices(trainer, examples)))
        return {"loss": float(np.mean(losses)),
                "accuracy": float(np.trace(confusion) / len(examples)),
                "macro_f1": macro_f1(truth, predicted)}


@TASKS.register("classification")
class Classification(_Choosing):
    """One label of ``num_labels`` classes per text."""

    head = "sequence-classification"
    has_classes = True

    @classmethod
    def check_num_labels(cls, num_labels: int | None) -> None:
        if num_labels is None or num_labels < 2:
            raise FedsimError(f"classification needs num_labels >= 2, got {num_labels}")

    def lora_options(self) -> dict[str, Any]:
        return {"task_type": TaskType.SEQ_CLS}  # peft adds the head (classifier/score) as trainable

    def encode(self, tokenizer: Any, example: Example, max_length: int) -> tuple[Row, ...]:
        return _encoder_rows([tokenizer(example.text, truncation=True, max_length=max_length)])

    def collate(self, examples: Sequence[Example], encoded: Sequence[tuple[Row, ...]],
                pad_id: int) -> tuple[Batch, torch.Tensor]:
        batch = collate([r for rows in encoded for r in rows], pad_id)
        return batch, torch.tensor([e.label for e in examples], dtype=torch.long)

    def num_choices(self, trainer: FamilyTrainer, examples: Sequence[Example]) -> int:
        return trainer.num_classes or 0


@TASKS.register("multiple-choice")
class MultipleChoice(_Choosing):
    """The right one of an example's choices; its label is the answer's position (not a class)."""

    head = "multiple-choice"

    def lora_options(self) -> dict[str, Any]:
        return {"modules_to_save": ["classifier"]}  # peft has no such task type: name the head

    def encode(self, tokenizer: Any, example: Example, max_length: int) -> tuple[Row, ...]:
        return _encoder_rows([tokenizer(example.text, c, truncation=True, max_length=max_length)
                              for c in example.choices or ()])

    def collate(self, examples: Sequence[Example], encoded: Sequence[tuple[Row, ...]],
                pad_id: int) -> tuple[Batch, torch.Tensor]:
        batch = collate([r for rows in encoded for r in rows], pad_id)
        # (batch·choices, len) -> (batch, choices, len): the head scores each example's choices
        batch = {k: v.view(len(examples), len(encoded[0]), -1) for k, v in batch.items()}
        return batch, torch.tensor([e.label for e in examples], dtype=torch.long)

    def num_choices(self, trainer: FamilyTrainer, examples: Sequence[Example]) -> int:
        return len(examples[0].choices or ())

    def single_text_inputs(self, batch: Batch) -> Batch:
        # (batch, tokens) -> (batch, 1, tokens): each text is one example's only choice (a
        # multiple-choice head reads the choice axis from the input's second dimension)
        return {k: v.unsqueeze(1) if isinstance(v, torch.Tensor) and v.dim() == 2 else v
                for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Generation


@TASKS.register("generation")
class Generation(Task):
    """A target text after a prompt: causal-LM loss on the target tokens, greedy decodes scored
    by rougeL (F-measure, 0-1), chrf and bleu (sacrebleu's 0-100)."""

    head = "causal-lm"
    metrics = ("rougeL", "chrf", "bleu")
    pad_left = True
    default_prompt: ClassVar[str] = "{text}\n=>"

    def __init__(self, dataset: str | None = None) -> None:
        super().__init__(dataset)
        own = DATASETS.get(dataset).prompt if dataset else None
        self.prompt = own or self.default_prompt  # "{text}" stands for the (cut) example text

    def lora_options(self) -> dict[str, Any]:
        return {"task_type": TaskType.CAUSAL_LM}

    def prompt_ids(self, tokenizer: Any, text: str, room: int) -> list[int]:
        """``self.prompt`` around ``text``, the text's tokens cut so the whole fits ``room``
        (at least one text token is kept: a tiny ``max_length`` can be exceeded)."""
        before, after = self.prompt.split("{text}")
        head = tokenizer(before).input_ids  # with the tokenizer's start token, if any
        tail = tokenizer(after, add_special_tokens=False).input_ids
        body = tokenizer(text, add_special_tokens=False).input_ids
        return head + body[: max(room - len(head) - len(tail), 1)] + tail

    def encode(self, tokenizer: Any, example: Example, max_length: int) -> tuple[Row, ...]:
        target = tokenizer(" " + (example.target or ""), add_special_tokens=False).input_ids
        # At most half the tokens for the target (with its end token): the rest for the prompt.
        target = [*target[: max_length // 2 - 1], tokenizer.eos_token_id]
        prompt = self.prompt_ids(tokenizer, example.text, max_length - len(target))
        return (Row(tuple(prompt + target), None, tuple([-100] * len(prompt) + target)),)

    def collate(self, examples: Sequence[Example], encoded: Sequence[tuple[Row, ...]],
                pad_id: int) -> tuple[Batch, torch.Tensor]:
        rows = [r for rows in encoded for r in rows]
        # Left padding lines the targets up at the end, so the (vocabulary-wide, costly)
        # logits are computed for the last positions only; positions count real tokens.
        batch = collate(rows, pad_id, left=self.pad_left)
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        batch["logits_to_keep"] = logit_positions(rows)
        return batch, batch.pop("labels")

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Mean over target tokens; the kept positions t predict tokens t+1 (the last, nothing).
        targets = targets[:, -logits.shape[1]:]
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(),
                               ignore_index=-100)

    def vocab_positions(self, rows: Sequence[Row]) -> int:
        return logit_positions(rows)

    def evaluate(self, trainer: FamilyTrainer, examples: Sequence[Example]) -> dict[str, float]:
        outputs = self._decode(trainer, examples)
        targets = [e.target or "" for e in examples]
        scorer = rouge_scorer.RougeScorer(["rougeL"])
        rouge = [scorer.score(t, o)["rougeL"].fmeasure
                 for t, o in zip(targets, outputs, strict=True)]
        return {"rougeL": float(np.mean(rouge)),
                "chrf": float(sacrebleu.corpus_chrf(outputs, [targets]).score),
                "bleu": float(sacrebleu.corpus_bleu(outputs, [targets]).score)}

    def _decode(self, trainer: FamilyTrainer, examples: Sequence[Example]) -> list[str]:
        """Greedy decodes of ``max_new_tokens`` tokens, each cut at its first newline."""
        tok, cfg = trainer.tokenizer, trainer.cfg
        room = max(cfg.max_length - cfg.max_new_tokens, 8)  # prompt tokens; 8 at the least
        outputs: list[str] = []
        for i in range(0, len(examples), cfg.batch_size):
            prompts = [Row(tuple(self.prompt_ids(tok, e.text, room)), None, None)
                       for e in examples[i:i + cfg.batch_size]]
            batch = to_device(collate(prompts, tok.pad_token_id, left=True), trainer.device)
            ids = trainer.model.generate(**batch, max_new_tokens=cfg.max_new_tokens,
                                         do_sample=False, pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id)
            new = ids[:, batch["input_ids"].shape[1]:].cpu()  # left padding: new tokens line up
            outputs += [t.strip().split("\n")[0].strip()
                        for t in tok.batch_decode(new, skip_special_tokens=True)]
        return outputs

"""The real workload: LoRA fine-tuning of client model families on partitioned data.

Registered as workload ``real``. Clients are grouped into *families* by model; each family
shares one frozen base model (a :class:`~fedsim.training.FamilyTrainer`) and a global LoRA
adapter that its clients download, fine-tune on their own partition, and upload — as a real
encoded payload — for the server to decode and aggregate (FedAvg within a family).

Every random choice is keyed by (seed, client, round), so a job's result is the same whichever
order jobs run in and wherever they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsim import codecs
from fedsim.aggregators import ClientResult, make_aggregator
from fedsim.data import TaskData, label_entropy, load_dataset, partition
from fedsim.devices import Fleet
from fedsim.rng import stream
from fedsim.scenario import Scenario
from fedsim.training import FamilyTrainer, LocalTrainingConfig, TrainResult
from fedsim.workload import WORKLOADS, Arrival, Ingested, JobPlan, Upload, Workload

Adapter = dict[str, torch.Tensor]
CLIENT_EVAL_EXAMPLES = 100  # held-out examples per client in quality.clients_final
CLIENT_EVAL_MAX = 100  # clients beyond which per-client evaluation is skipped (cost)


def local_config(scenario: Scenario) -> LocalTrainingConfig:
    """The scenario's training section as the trainer's plain config."""
    t = scenario.training
    return LocalTrainingConfig(
        lora_r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
        target_roles=tuple(t.lora.target_roles), lr=t.lr, weight_decay=t.weight_decay,
        local_steps=t.local_steps, local_epochs=t.local_epochs, batch_size=t.batch_size,
        max_length=t.max_length,
        quality_eval=t.quality_eval)


def job_seed(seed: int, client: int, round_: int) -> int:
    """A 32-bit seed for one client's job in one round, independent of event order."""
    return int(np.random.SeedSequence([seed, client, round_]).generate_state(1)[0])


@dataclass
class Family:
    """Clients training one model: a shared trainer and the family's global adapter."""

    model: str
    trainer: FamilyTrainer
    adapter: Adapter
    adapter_nbytes: int  # the adapter as downloaded (an fp32 payload), bytes
    clients: list[int]
    version: int = 0


@dataclass(frozen=True)
class Sent:
    """What a client's upload carries besides the delta itself."""

    family: str
    num_samples: int
    quality: float  # local loss improvement
    payload: codecs.Payload


def partition_clients(task: TaskData, scenario: Scenario, n_clients: int) -> list[np.ndarray]:
    """Each client's indices into the training set, reproducible from the seed."""
    p = scenario.task.partition
    labels = np.array([ex.label for ex in task.train]) if task.task == "classification" else None
    return partition(p.name, labels, len(task.train), n_clients, stream(scenario.seed, "partition"),
                     alpha=p.alpha, exponent=p.exponent, min_size=p.min_size)


@WORKLOADS.register("real")
class LoraWorkload(Workload):
    """Real LoRA fine-tuning, real payloads, FedAvg per model family."""

    def __init__(self, scenario: Scenario, fleet: Fleet) -> None:
        super().__init__(scenario, fleet)
        tc = scenario.task
        full = load_dataset(tc.dataset, tc.kind)
        train = full.train[: tc.max_train_examples] if tc.max_train_examples else full.train
        self.task = TaskData(full.name, full.task, train, full.test, full.label_names,
                             full.metric)
        self.eval_examples = self.task.test[: tc.eval_examples]
        self.parts = partition_clients(self.task, scenario, fleet.size)
        self.cfg = local_config(scenario)
        num_labels = len(self.task.label_names) if self.task.label_names else None
        self.families: dict[str, Family] = {}
        for model in dict.fromkeys(fleet.model):
            trainer = FamilyTrainer(model, self.task.task, num_labels, self.cfg, scenario.seed)
            adapter = trainer.initial_adapter()
            nbytes = len(codecs.CODECS.get("none")().encode(adapter))
            members = [i for i, m in enumerate(fleet.model) if m == model]
            self.families[model] = Family(model, trainer, adapter, nbytes, members)
        self.codec = codecs.from_config(scenario.compression)
        self.codec_state = [codecs.ClientCodecState() for _ in range(fleet.size)]
        self.aggregator = make_aggregator(scenario.aggregation)
        self._downloaded: dict[int, Adapter] = {}  # the adapter each client trains from
        n_classes = num_labels or 0
        labels = np.array([ex.label for ex in train]) if n_classes else None
        self.heterogeneity = [label_entropy(labels, idx, n_classes) if labels is not None else 1.0
                              for idx in self.parts]
        self._last: dict[int, tuple[Adapter, Adapter]] = {}  # client -> (start, delta)

    def primary_metric(self) -> str:
        return self.task.metric

    def _family(self, client: int) -> Family:
        return self.families[self.fleet.model[client]]

    def _examples(self, client: int) -> list[Any]:
        return [self.task.train[i] for i in self.parts[client]]

    # --- the life of an update ----------------------------------------------------------------

    def download_bytes(self, client: int) -> int:
        fam = self._family(client)
        self._downloaded[client] = fam.adapter  # immutable: aggregation builds a new dict
        return fam.adapter_nbytes

    def plan(self, client: int, round_: int) -> JobPlan:
        fam = self._family(client)
        p = fam.trainer.plan(self._examples(client), job_seed(self.scenario.seed, client, round_))
        return JobPlan(flops=p.flops, peak_memory_bytes=p.peak_memory_bytes,
                       num_samples=p.num_samples, tokens=p.tokens, context=p)

    def train(self, client: int, round_: int, plan: JobPlan) -> TrainResult:
        fam = self._family(client)
        start = self._downloaded.get(client, fam.adapter)
        return fam.trainer.train(start, self._examples(client), plan.context,
                                 job_seed(self.scenario.seed, client, round_))

    def encode(self, client: int, round_: int, update: TrainResult, rate_bps: float,
               time_left_s: float | None) -> Upload:
        self._last[client] = (self._downloaded.get(client, self._family(client).adapter),
                              update.delta)
        rng = np.random.default_rng(job_seed(self.scenario.seed, client, round_))
        payload = self.codec.encode(update.delta, self.codec_state[client], rng,
                                    rate_bps=rate_bps, time_left_s=time_left_s)
        err = codecs.relative_error(update.delta, codecs.decode(payload))
        sent = Sent(self.fleet.model[client], update.num_samples,
                    update.loss_before - update.loss_after, payload)
        return Upload(nbytes=len(payload), raw_bytes=codecs.raw_bytes(update.delta),
                      codec=payload.describe(), rel_error=err, payload=sent)

    def ingest(self, client: int, upload: Upload) -> Ingested:
        sent: Sent = upload.payload
        try:
            delta = codecs.decode(sent.payload)
        except codecs.PayloadError as e:
            return Ingested(flops=0.0, accepted=False, detail=f"corrupt payload: {e}")
        numel = sum(t.numel() for t in delta.values())
        if not all(torch.isfinite(t).all() for t in delta.values()):
            return Ingested(flops=numel, accepted=False, detail="non-finite delta quarantined")
        result = ClientResult(client=client, delta=delta, num_samples=sent.num_samples,
                              quality=sent.quality, heterogeneity=self.heterogeneity[client])
        # Server work: decode (a few operations per element) + checks, ~4 FLOPs per element.
        return Ingested(flops=4.0 * numel, accepted=True, update=result)

    def aggregate(self, round_: int, arrivals: list[Arrival]) -> float:
        flops = 0.0
        for model, fam in self.families.items():
            results = [self._weighted(a) for a in arrivals if self.fleet.model[a.client] == model]
            if not results:
                continue
            step = self.aggregator.aggregate(round_, results, failures=0)
            fam.adapter = {k: v + step[k] if k in step else v for k, v in fam.adapter.items()}
            fam.version += 1
            # a weighted sum: 2 FLOPs per element per client
            flops += 2.0 * len(results) * sum(t.numel() for t in step.values())
        return flops

    @staticmethod
    def _weighted(a: Arrival) -> ClientResult:
        r: ClientResult = a.update
        return ClientResult(r.client, r.delta, r.num_samples, a.weight, r.quality,
                            r.heterogeneity)

    def evaluate(self, round_: int) -> dict[str, float]:
        """Each family's global adapter on the held-out examples; the first family's metric
        is the run's primary metric (the server model joins in with projection)."""
        out: dict[str, float] = {}
        for i, (model, fam) in enumerate(self.families.items()):
            scores = fam.trainer.evaluate(fam.adapter, self.eval_examples)
            for k, v in scores.items():
                out[f"{model}/{k}"] = v
                if i == 0:
                    out[k] = v
        return out

    def client_metrics(self) -> dict[int, dict[str, float]]:
        """Each client's own last model (its start adapter + its last delta) on up to
        ``CLIENT_EVAL_EXAMPLES`` held-out examples; skipped beyond ``CLIENT_EVAL_MAX`` clients."""
        if len(self._last) > CLIENT_EVAL_MAX:
            return {}
        out = {}
        for client in sorted(self._last):
            start, delta = self._last[client]
            local = {k: v + delta[k] if k in delta else v for k, v in start.items()}
            trainer = self._family(client).trainer
            out[client] = trainer.evaluate(local, self.eval_examples[:CLIENT_EVAL_EXAMPLES])
        return out

    def close(self) -> None:
        self.families.clear()


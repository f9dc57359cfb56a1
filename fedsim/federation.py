"""The real workload: LoRA fine-tuning of client model families on partitioned data.

Registered as workload ``real``. Clients are grouped into *families* by model; each family
shares one frozen base model (a :class:`~fedsim.training.FamilyTrainer`) and a global LoRA
adapter that its clients download, fine-tune on their own partition, and upload — as a real
encoded payload — for the server to decode and aggregate.

At ingest the server decodes the payload and projects the client's task vector into the larger
server model (``scenario.server.model``, :class:`~fedsim.server.ServerModel`). At the round's
close the aggregation rule (``scenario.aggregation``) combines the updates twice: per family in
LoRA space (the adapter the family's clients download next round; its factors or their exact
products, ``aggregation.lora``) and across families in the server's weight space, merged into
the server model — ``W ← W + η·Σ αᵢ·τᵢ / Σ αᵢ`` for task arithmetic. LARS applies once: in the
server's space (in the family's when there is no server model). The run's primary metric is
the server model's. There is no back-projection: the clients gain from each other through their
family adapter, not from the server model.

What α weighs is fixed here: each client's n_k (its partition's size), its data's distance to
the federation's (:mod:`fedsim.heterogeneity`) and, when the rule weighs loss improvement, a
validation split held out of its partition (``training.validation_examples``, drawn from the
seed per client, the same every round) on which its job measures the loss before and after.

Every random choice is keyed by (seed, client, round), so a job's result is the same whichever
order jobs run in and wherever they run.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fedsim import codecs
from fedsim import logits as topk
from fedsim.accelerators import resolve as resolve_device
from fedsim.aggregators import ClientResult, global_norm, make_aggregator, make_lora_space
from fedsim.attacks import attack
from fedsim.batching import Request, train_together
from fedsim.data import TaskData, load_dataset, partition
from fedsim.devices import Fleet
from fedsim.distillation import (
    DistillationTransfer,
    ProxySet,
    client_logits,
    forward_flops,
    output_size,
    payload_tensors,
    positions_of,
    proxy_set,
)
from fedsim.executors import Executor, JobFailed, WorkerCache
from fedsim.heterogeneity import heterogeneity
from fedsim.plugins import TASKS, AggregatorConfig, TransferConfig
from fedsim.rng import stream
from fedsim.scenario import Scenario
from fedsim.server import ServerModel, ServerSet, ServerVariant, make_transfer
from fedsim.training import (
    FamilyTrainer,
    LocalTrainingConfig,
    TrainResult,
    torch_threads,
    validation_split,
)
from fedsim.workload import (
    WORKLOADS,
    Adapter,
    Arrival,
    Deferred,
    Ingested,
    JobPlan,
    Sent,
    Upload,
    Workload,
)

CLIENT_EVAL_MAX = 100  # clients beyond which per-client evaluation is skipped (cost)

# What the workload is doing, for a progress display (the CLI shows it beside its bar).
log = logging.getLogger("fedsim")


def local_config(scenario: Scenario) -> LocalTrainingConfig:
    """The scenario's training section as the trainer's plain config."""
    t = scenario.training
    return LocalTrainingConfig(
        lora_r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
        target_roles=tuple(t.lora.target_roles), lr=t.lr, weight_decay=t.weight_decay,
        local_steps=t.local_steps, local_epochs=t.local_epochs, batch_size=t.batch_size,
        max_length=t.max_length, threads=scenario.executor.threads_per_job,
        device=str(resolve_device(scenario.executor.device)), precision=t.precision)


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
class FamilyKey:
    """What a worker needs to build a family's trainer and data itself (the cache key)."""

    model: str
    task: str
    num_labels: int | None
    cfg: LocalTrainingConfig
    seed: int
    dataset: str
    kind: str

    def trainer(self) -> FamilyTrainer:
        # The dataset names the prompt of a generation task: clients train on the prompt the
        # server model is scored with.
        return FamilyTrainer(self.model, self.task, self.num_labels, self.cfg, self.seed,
                             self.dataset)


@dataclass(frozen=True)
class TrainJob:
    """One client's training job as data (a :class:`fedsim.executors.RemoteJob`): the adapter
    it starts from, its example indices into the training split, the batch plan and the seed.
    A worker loads the family's base model and the data set once and keeps them."""

    family: FamilyKey
    start: Adapter
    indices: tuple[int, ...]
    plan: Any  # fedsim.training.TrainPlan
    seed: int

    def run(self, cache: WorkerCache) -> TrainResult:
        fam = self.family
        trainer = cache.get(("trainer", fam), fam.trainer)
        train = _worker_data(cache, fam).train
        return trainer.train(self.start, [train[i] for i in self.indices], self.plan, self.seed)


@dataclass(frozen=True)
class TrainGroupJob:
    """Several clients' training jobs of one family, trained in one batched pass in a worker
    (``fedsim.batching.train_together``); the result is their list of results."""

    members: tuple[TrainJob, ...]

    def run(self, cache: WorkerCache) -> list[TrainResult]:
        fam = self.members[0].family
        trainer = cache.get(("trainer", fam), fam.trainer)
        train = _worker_data(cache, fam).train
        return train_together(trainer, [Request(m.start, [train[i] for i in m.indices], m.plan,
                                                m.seed) for m in self.members])


def _worker_data(cache: WorkerCache, fam: FamilyKey) -> TaskData:
    """The task's data set, loaded once per worker."""
    return cache.get(("data", fam.dataset, fam.kind), lambda: load_dataset(fam.dataset, fam.kind))


@dataclass(frozen=True)
class EvalJob:
    """One client's own last model scored on the first ``count`` evaluation examples, as
    data (a :class:`fedsim.executors.RemoteJob`): the end-of-run per-client scores run on the
    workers side by side instead of one after another in the main process (20 minilm-l6
    clients x 100 articles: ~24 s in the main process here). On the family's job thread count
    wherever it runs, so that every executor gives the same numbers."""

    family: FamilyKey
    adapter: Adapter
    count: int

    def run(self, cache: WorkerCache) -> dict[str, float]:
        trainer = cache.get(("trainer", self.family), self.family.trainer)
        return evaluate_on_threads(trainer, self.adapter,
                                   _worker_data(cache, self.family).test[: self.count])


def evaluate_on_threads(trainer: FamilyTrainer, adapter: Adapter,
                        examples: list[Any]) -> dict[str, float]:
    """``trainer.evaluate`` on the jobs' torch thread count (a sum's order depends on it)."""
    with torch_threads(trainer.cfg.threads):
        return trainer.evaluate(adapter, examples)


def partition_clients(task: TaskData, scenario: Scenario, n_clients: int) -> list[np.ndarray]:
    """Each client's indices into the training set, reproducible from the seed."""
    p = scenario.task.partition
    labels = TASKS.get(task.task).partition_labels(task.train)  # None: nothing to skew
    return partition(p.name, labels, len(task.train), n_clients, stream(scenario.seed, "partition"),
                     **p.options())


def validation_splits(scenario: Scenario, parts: list[np.ndarray]) -> list[np.ndarray]:
    """Each client's validation split, as positions in its partition: held out of training when
    the rule weighs loss improvement (``training.validation_examples`` of them, at most all but
    one), else empty. Drawn per client from the seed: the same every round."""
    size = scenario.training.validation_examples if scenario.aggregation.measures_quality else 0
    return [validation_split(len(idx), size, stream(scenario.seed, f"validation/{c}"))
            for c, idx in enumerate(parts)]


def _taker(tensors: dict[str, torch.Tensor]) -> Any:
    """``take(prefix)``: the tensors named ``prefix/<name>``, by ``<name>``."""
    def take(prefix: str) -> dict[str, torch.Tensor]:
        head = prefix + "/"
        return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
    return take


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
        self.family_keys: dict[str, FamilyKey] = {}
        for model in dict.fromkeys(fleet.model):
            log.info("loading %s (client family)", model)
            fkey = FamilyKey(model, self.task.task, num_labels, self.cfg, scenario.seed,
                             tc.dataset, tc.kind)
            self.family_keys[model] = fkey
            trainer = fkey.trainer()
            adapter = trainer.initial_adapter()
            nbytes = len(codecs.CODECS.get("none")().encode(adapter))
            members = [i for i, m in enumerate(fleet.model) if m == model]
            self.families[model] = Family(model, trainer, adapter, nbytes, members)
        self.codec = codecs.from_config(scenario.compression)
        self.codec_state = [codecs.ClientCodecState() for _ in range(fleet.size)]
        agg = scenario.aggregation
        # LARS once: in the server's weight space when a server model takes the merge.
        self.aggregator = make_aggregator(agg if scenario.server.model is None
                                          else agg.in_lora_space())
        self.lora_space = make_lora_space(agg.lora)
        self.validation = validation_splits(scenario, self.parts)
        self._downloaded: dict[int, Adapter] = {}  # the adapter each client trains from
        # Distillation: clients upload logits, keep their own adapters (``_personal``) and
        # download their model once (``_installed``); the proxy set is the server's corpus.
        self.distilling = scenario.transfer.name == "distillation"
        # Logits alone: no client adapter is averaged, each client keeps its own.
        self.personal = self.distilling and not scenario.transfer.weights
        self._personal: dict[int, Adapter] = {}
        self._installed: set[int] = set()
        self.proxy: ProxySet | None = (
            proxy_set(self.task.test, len(self.eval_examples), scenario.transfer.proxy,
                      scenario.seed) if self.distilling else None)
        self._upload_estimate: dict[str, int] = {}
        # Mutual transfer: merges so far (the server's logits exist after the first), the
        # server's payload of the current version, and each client's distillation FLOPs.
        self._server_version = 0
        self._server_logits: tuple[int, Any, tuple[int, ...]] | None = None
        self._kd_flops: dict[int, float] = {}
        self.servers = ServerSet()
        self._start_head: dict[str, torch.Tensor] | None = None  # see add_server
        if scenario.server.model is not None:
            self.add_server("server", scenario.transfer, scenario.aggregation)
        # Each client's data against the federation's, by measure (classes, or target lengths).
        labels = TASKS.get(self.task.task).partition_labels(train)
        self.heterogeneity = heterogeneity(train, labels, num_labels or 0, self.parts)
        self._last: dict[int, tuple[Adapter, Adapter]] = {}  # client -> (start, delta)
        self._evaluating: Deferred | None = None  # a background evaluation in progress

    def primary_metric(self) -> str:
        return TASKS.get(self.task.task).primary_metric(self.task)

    def server_probe(self) -> list[Any]:
        """Server-side held-out examples: the test split after the evaluation slice (at most
        ``server.probe_examples``), or the training split's head when the test split is used up."""
        n, start = self.scenario.server.probe_examples, len(self.eval_examples)
        held_out = self.task.test[start:start + n]
        return held_out if held_out else self.task.train[:n]

    def add_server(self, name: str, transfer: TransferConfig,
                   aggregation: AggregatorConfig) -> ServerVariant:
        """A server model fed by every family through ``transfer``, merged by
        ``aggregation``'s rule (projectors of the same kind are fitted once and cached)."""
        sc = self.scenario
        probe = self.server_probe()
        labelled = sc.server.linear_probe and TASKS.get(self.task.task).has_classes
        # The probe is fitted once: every server starts from the same head (same model, task,
        # seed and probe examples), so later variants take a copy (an mpnet-base probe on 200
        # examples is ~11 s of forward passes here).
        start_head = self._start_head
        log.info("loading %s (server %s)", sc.server.model, name)
        carrier = make_transfer(transfer)
        if isinstance(carrier, DistillationTransfer):
            carrier.proxy = self.proxy
        server = ServerModel(
            sc.server.model, self.task.task,
            len(self.task.label_names) if self.task.label_names else None, sc.seed,
            **carrier.server_options(),
            probe_examples=probe if labelled and start_head is None else (),
            max_length=self.cfg.max_length, batch_size=self.cfg.batch_size,
            dataset=self.task.name, zero_head=not sc.server.linear_probe,
            device=self.cfg.device)
        if start_head is None:
            self._start_head = server.head_weights()
        else:
            server.load_head(start_head)
        texts = [e.text for e in probe]
        for model, fam in self.families.items():
            log.info("fitting the %s transfer: %s -> %s", transfer.name, model, sc.server.model)
            carrier.prepare(server, model, fam.trainer, roles=self.cfg.target_roles,
                            lora_scale=self.cfg.lora_alpha / self.cfg.lora_r, probe_texts=texts)
        return self.servers.add(ServerVariant(name, server, carrier, make_aggregator(aggregation)))

    def _family(self, client: int) -> Family:
        return self.families[self.fleet.model[client]]

    def _start(self, client: int) -> Adapter:
        """The adapter ``client`` trains from: the one it downloaded (its family's now, if it
        has not yet)."""
        return self._downloaded.get(client, self._family(client).adapter)

    def _examples(self, client: int) -> list[Any]:
        return [self.task.train[i] for i in self.parts[client]]

    # --- the life of an update ----------------------------------------------------------------

    def download_bytes(self, client: int) -> int:
        fam = self._family(client)
        if self.distilling:  # its own adapter stays on the device (logits alone): it comes once
            start = self._personal.get(client, fam.adapter) if self.personal else fam.adapter
            nbytes = self.download_bytes_estimate(client)
            self._installed.add(client)
            if self._mutual_now():  # the server's logits come down and the client distils
                payload, batch = self._server_payload()
                variant = self.servers.primary
                start, self._kd_flops[client] = variant.transfer.client_distil(
                    variant.model, fam.model, start, payload, batch)
            self._downloaded[client] = start
            return nbytes
        self._downloaded[client] = fam.adapter  # immutable: aggregation builds a new dict
        return fam.adapter_nbytes

    def download_bytes_estimate(self, client: int) -> int:
        fam = self._family(client)
        if not self.distilling:
            return fam.adapter_nbytes
        down = len(self._server_payload()[0]) if self._mutual_now() else 0
        new = client not in self._installed
        model = fam.adapter_nbytes if new or not self.personal else 0
        assert self.proxy is not None
        proxy = self.proxy.nbytes if new and not self.scenario.transfer.proxy.preinstalled else 0
        return model + proxy + down

    def _mutual_now(self) -> bool:
        """Whether downloads carry the server's logits: mutual transfer, once it has distilled."""
        return bool(self.distilling and self.scenario.transfer.mutual and self._server_version)

    def _server_payload(self) -> tuple[Any, tuple[int, ...]]:
        """The server's top-k logits on the batch of its current version (the round its
        downloads are for, in sync rounds), computed once per version."""
        assert self.proxy is not None
        if self._server_logits is None or self._server_logits[0] != self._server_version:
            self._settle()  # a background evaluation uses the server's model
            batch = self.proxy.batch(self._server_version)
            variant = self.servers.primary
            self._server_logits = (self._server_version,
                                   variant.transfer.server_payload(variant.model, batch), batch)
        return self._server_logits[1], self._server_logits[2]

    def upload_bytes_estimate(self, client: int) -> int:
        fam = self._family(client)
        weights = self.codec.size_bytes(codecs.shapes_of(fam.adapter))
        if not self.distilling:
            return weights
        if fam.model not in self._upload_estimate:  # a batch's payload at the largest k
            assert self.proxy is not None
            examples = self.proxy.take(self.proxy.batch(0))
            lengths, vocab = positions_of(fam.trainer, examples), output_size(fam.trainer, examples)
            cfg = self.scenario.transfer.logits
            k = cfg.k_for(math.inf, None, sum(lengths), vocab, len(lengths))
            self._upload_estimate[fam.model] = topk.size_bytes(
                sum(lengths), k, vocab, cfg.value_bits, len(lengths))
        return self._upload_estimate[fam.model] + (0 if self.personal else weights)

    def plan(self, client: int, round_: int) -> JobPlan:
        fam = self._family(client)
        p = fam.trainer.plan(self._examples(client), job_seed(self.scenario.seed, client, round_),
                             validation=self.validation[client])
        flops = p.flops
        if self.distilling:  # then its model's forward pass over the round's proxy batch
            assert self.proxy is not None
            flops += forward_flops(fam.trainer, self.proxy.take(self.proxy.batch(round_)))
            flops += self._kd_flops.get(client, 0.0)  # mutual: its distillation first
        return JobPlan(flops=flops, peak_memory_bytes=p.peak_memory_bytes,
                       num_samples=p.num_samples, tokens=p.tokens, context=p)

    def train(self, client: int, round_: int, plan: JobPlan) -> TrainResult:
        fam = self._family(client)
        return fam.trainer.train(self._start(client), self._examples(client), plan.context,
                                 job_seed(self.scenario.seed, client, round_))

    def batch_key(self, client: int) -> str:
        return self.fleet.model[client]  # a family: one frozen base, the clients' adapters

    def train_many(self, jobs: Sequence[tuple[int, int, JobPlan]]) -> list[TrainResult]:
        """One family's jobs in one batched pass over its base (fedsim.batching)."""
        assert len({self.fleet.model[c] for c, _, _ in jobs}) == 1, "one family's jobs"
        requests = [Request(self._start(c), self._examples(c), plan.context,
                            job_seed(self.scenario.seed, c, r)) for c, r, plan in jobs]
        return train_together(self._family(jobs[0][0]).trainer, requests)

    def remote_group(self, jobs: Sequence[tuple[int, int, JobPlan]]) -> TrainGroupJob:
        assert len({self.fleet.model[c] for c, _, _ in jobs}) == 1, "one family's jobs"
        return TrainGroupJob(tuple(self.remote_job(*job) for job in jobs))

    def remote_job(self, client: int, round_: int, plan: JobPlan) -> TrainJob:
        model = self.fleet.model[client]
        return TrainJob(self.family_keys[model], self._start(client),
                        tuple(int(i) for i in self.parts[client]), plan.context,
                        job_seed(self.scenario.seed, client, round_))

    def encode(self, client: int, round_: int, update: TrainResult, rate_bps: float,
               time_left_s: float | None) -> Upload:
        if self.distilling:
            return self._encode_logits(client, round_, update, rate_bps, time_left_s)
        self._last[client] = (self._start(client), update.delta)
        enc, delta, err = self._encode_delta(client, round_, update, rate_bps, time_left_s)
        sent = Sent(self.fleet.model[client], update.num_samples,
                    update.loss_before - update.loss_after, enc.payload, self._start(client))
        losses = np.asarray(update.losses, dtype=float)
        return Upload(nbytes=len(enc.payload), raw_bytes=codecs.raw_bytes(delta),
                      codec=enc.payload.describe(), rel_error=err, sent=sent,
                      loss_rms=float(np.sqrt(np.mean(losses ** 2))) if losses.size else math.nan)

    def _encode_delta(self, client: int, round_: int, update: TrainResult, rate_bps: float,
                      time_left_s: float | None) -> tuple[Any, Adapter, float]:
        """The LoRA update as the codec encodes it (a malicious client's altered one), what
        was encoded and its relative error."""
        rng = np.random.default_rng(job_seed(self.scenario.seed, client, round_))
        delta = update.delta
        threat = self.scenario.clients[int(self.fleet.group[client])].attack
        if threat is not None:  # a malicious client sends this instead of its honest update
            delta = attack(threat.kind, delta, threat.factor, rng)
        enc = self.codec.encode_update(delta, self.codec_state[client], rng,
                                       rate_bps=rate_bps, time_left_s=time_left_s)
        err = codecs.relative_error(delta, enc.reconstruction)  # no decode of its own bytes
        return enc, delta, err

    def _encode_logits(self, client: int, round_: int, update: TrainResult, rate_bps: float,
                       time_left_s: float | None) -> Upload:
        """Distillation: the client keeps its trained adapter and uploads its top-k logits on
        the round's proxy batch, k from its channel estimate and time left (adaptive k)."""
        assert self.proxy is not None
        fam, start = self._family(client), self._start(client)
        local = {k: v + update.delta[k] if k in update.delta else v for k, v in start.items()}
        self._last[client] = (start, update.delta)
        if self.personal:
            self._personal[client] = local
        self._kd_flops.pop(client, None)
        batch = self.proxy.batch(round_)
        z, lengths = client_logits(fam.trainer, local, self.proxy.take(batch))
        cfg = self.scenario.transfer.logits
        k = cfg.k_for(rate_bps, time_left_s, z.shape[0], z.shape[1], len(lengths))
        payload = topk.encode(z, k, cfg.value_bits, lengths)
        exact = topk.top_k(z, k, lengths).values
        err = float(torch.linalg.vector_norm(topk.decode(payload).values - exact)
                    / torch.linalg.vector_norm(exact).clamp_min(1e-30))
        raw, describe, nbytes = 4 * z.numel(), payload.describe(), len(payload)
        if self.personal:
            sent = Sent(fam.model, update.num_samples, update.loss_before - update.loss_after,
                        payload, start, proxy=batch)
        else:  # both transfers: the LoRA update first, the logits beside it
            enc, delta, err_w = self._encode_delta(client, round_, update, rate_bps, time_left_s)
            sent = Sent(fam.model, update.num_samples, update.loss_before - update.loss_after,
                        enc.payload, start, proxy=batch, logits=payload)
            raw, nbytes = raw + codecs.raw_bytes(delta), nbytes + len(enc.payload)
            describe, err = f"{enc.payload.describe()}+{describe}", max(err, err_w)
        losses = np.asarray(update.losses, dtype=float)
        return Upload(nbytes=nbytes, raw_bytes=raw, codec=describe, rel_error=err, sent=sent,
                      loss_rms=float(np.sqrt(np.mean(losses ** 2))) if losses.size else math.nan)

    def _ingest_logits(self, client: int, sent: Sent) -> Ingested:
        try:
            decoded = topk.decode(sent.payload if sent.logits is None else sent.logits)
        except codecs.PayloadError as e:
            return Ingested(flops=0.0, accepted=False, detail=f"corrupt logits payload: {e}")
        if not torch.isfinite(decoded.values).all():
            return Ingested(flops=decoded.values.numel(), accepted=False,
                            detail="non-finite logits quarantined")
        tensors = payload_tensors(decoded, sent.proxy)
        if sent.logits is not None:  # both transfers: the weight path's checks, then both
            ing = self._ingest_delta(client, sent, extra=tensors)
            return replace(ing, flops=ing.flops + 2.0 * decoded.values.numel())
        result = ClientResult(
            client=client, delta=tensors, num_samples=sent.num_samples, quality=sent.quality,
            heterogeneity={m: v[client] for m, v in self.heterogeneity.items()},
            dataset_size=len(self.parts[client]), start=sent.start)
        carried, flops = self.servers.carry(sent.family, sent.start, tensors)
        return Ingested(flops=2.0 * decoded.values.numel() + flops, accepted=True,
                        result=result, carried=carried)

    def ingest(self, client: int, upload: Upload) -> Ingested:
        sent = upload.sent
        assert sent is not None, "a real upload carries its payload"
        if self.distilling:
            return self._ingest_logits(client, sent)
        return self._ingest_delta(client, sent)

    def _ingest_delta(self, client: int, sent: Sent,
                      extra: dict[str, torch.Tensor] | None = None) -> Ingested:
        """Decode and check a LoRA update, and carry it (with ``extra``: the decoded logits of
        an upload that carries both) into the server models."""
        try:
            delta = codecs.decode(sent.payload)
        except codecs.PayloadError as e:
            return Ingested(flops=0.0, accepted=False, detail=f"corrupt payload: {e}")
        numel = sum(t.numel() for t in delta.values())
        if not all(torch.isfinite(t).all() for t in delta.values()):
            return Ingested(flops=numel, accepted=False, detail="non-finite delta quarantined")
        limit = self.scenario.aggregation.max_update_norm
        if limit is not None and (norm := global_norm(delta)) > limit:
            return Ingested(flops=2.0 * numel, accepted=False,
                            detail=f"update norm {norm:.4g} > max_update_norm {limit:g}: "
                            "quarantined")
        result = ClientResult(
            client=client, delta=delta, num_samples=sent.num_samples, quality=sent.quality,
            heterogeneity={m: v[client] for m, v in self.heterogeneity.items()},
            dataset_size=len(self.parts[client]), start=sent.start)
        # Server work: decode (a few operations per element) + checks, ~4 FLOPs per element,
        # then the transfer into the server model (the primary's, when a study has more).
        carried, flops = self.servers.carry(sent.family, sent.start, {**delta, **(extra or {})})
        return Ingested(flops=4.0 * numel + flops, accepted=True, result=result, carried=carried)

    def aggregate(self, round_: int, arrivals: list[Arrival]) -> float:
        """Per family in LoRA space (the next download), then into every server model."""
        self._settle()
        flops = 0.0
        for model, fam in (() if self.personal else self.families.items()):  # logits only
            results = [self._weighted(a) for a in arrivals if self.fleet.model[a.client] == model]
            if not results:
                continue
            space = self.lora_space  # the factors, or their exact products
            updates = space.updates(results)
            results = [replace(r, delta=u) for r, u in zip(results, updates, strict=True)]
            # LARS (no server model only): trust ratios against the adapter, in the same space
            self.aggregator.set_reference(space.reference(fam.adapter))
            step = self.aggregator.aggregate(round_, results, failures=0)
            fam.adapter, f = space.apply(fam.adapter, step, len(results))
            fam.version += 1
            flops += f
        if self.servers:
            flops += self.servers.merge([self._weighted(a) for a in arrivals],
                                        [a.carried for a in arrivals], round_)
            self._server_version += bool(self.distilling and arrivals)
        return flops

    @staticmethod
    def _weighted(a: Arrival) -> ClientResult:
        assert a.result is not None, "a real arrival carries its decoded update"
        return replace(a.result, weight=a.weight)

    def evaluate(self, round_: int) -> dict[str, float] | Deferred:
        """The server model on the held-out examples (the run's primary metric; a study's
        other servers as ``<name>/<metric>``), then each family's adapter as
        ``<model>/<metric>``. Without a server model the first family's is the primary.

        With an out-of-process executor the server models are evaluated in a background thread
        while the next round's jobs train on the workers (the next :meth:`aggregate` waits
        for it before it changes the weights); the numbers are the same.
        """
        families: dict[str, dict[str, float]] = {  # distillation: no family adapter moves
            model: fam.trainer.evaluate(fam.adapter, self.eval_examples)
            for model, fam in self.families.items() if not self.personal}

        def quality() -> dict[str, float]:
            out = self.evaluate_servers()
            for model, metrics in families.items():
                for k, x in metrics.items():
                    out[f"{model}/{k}"] = x
                    out.setdefault(k, x)
            return out

        if self.servers and self.scenario.executor.shares_threads:
            # Inline training changes torch's thread count mid-run: evaluate in step with it.
            self._evaluating = Deferred(quality)
            return self._evaluating
        return quality()

    def evaluate_servers(self) -> dict[str, float]:
        """The server models now, on the evaluation examples (see ``ServerSet.evaluate``)."""
        return self.servers.evaluate(self.eval_examples)

    def _settle(self) -> None:
        """Wait for a background evaluation (before the server weights change)."""
        if self._evaluating is not None:
            self._evaluating.result()
            self._evaluating = None

    def client_metrics(self, executor: Executor | None = None) -> dict[int, dict[str, float]]:
        """Each client's own last model (its start adapter + its last delta) on up to
        ``task.client_eval_examples`` held-out examples (0: not scored); skipped beyond
        ``CLIENT_EVAL_MAX`` clients. With an out-of-process ``executor`` the clients are scored
        on its workers at once."""
        count = min(self.scenario.task.client_eval_examples, len(self.eval_examples))
        if not count or len(self._last) > CLIENT_EVAL_MAX:
            return {}
        log.info("scoring each client's last model (%d clients)", len(self._last))
        # on the workers where jobs run in other processes (shares_threads: process, ray);
        # inline, here with the workload's own trainers (an inline EvalJob would load a model
        # per client)
        remote = executor is not None and self.scenario.executor.shares_threads
        models = {}
        for client in sorted(self._last):
            start, delta = self._last[client]
            models[client] = {k: v + delta[k] if k in delta else v for k, v in start.items()}
        if not remote:
            return {c: evaluate_on_threads(self._family(c).trainer, m, self.eval_examples[:count])
                    for c, m in models.items()}
        jobs = {c: executor.submit(EvalJob(self.family_keys[self.fleet.model[c]], m, count))
                for c, m in models.items()}
        out = {}
        for client, job in jobs.items():
            try:
                out[client] = job.result()
            except JobFailed as e:  # a lost worker costs that client's score, not the run
                log.warning("client %d's final evaluation failed: %s", client, e)
        return out

    # --- checkpoints ---------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Family adapters and versions, error-feedback residuals, each client's last (start,
        delta) and the server models' merged weights. Tensors are cloned: safetensors refuses
        tensors that share memory (clients share their family's start adapter)."""
        t: dict[str, torch.Tensor] = {}

        def put(prefix: str, tensors: dict[str, torch.Tensor]) -> None:
            for k, v in tensors.items():
                t[f"{prefix}/{k}"] = v.detach().clone()

        for model, fam in self.families.items():
            put(f"family/{model}", fam.adapter)
        for c, cs in enumerate(self.codec_state):
            put(f"residual/{c}", cs.residuals)
        for c, (start, delta) in self._last.items():
            put(f"last/{c}/start", start)
            put(f"last/{c}/delta", delta)
        put("server", self.servers.state())
        for c, adapter in self._downloaded.items():  # what updates in flight train from
            put(f"downloaded/{c}", adapter)
        for c, adapter in self._personal.items():  # distillation: each client's own adapter
            put(f"personal/{c}", adapter)
        state = {"versions": {m: f.version for m, f in self.families.items()},
                 "last": sorted(self._last), "downloaded": sorted(self._downloaded),
                 "personal": sorted(self._personal), "installed": sorted(self._installed),
                 "server_version": self._server_version,
                 "kd_flops": {str(c): f for c, f in self._kd_flops.items()}}
        return state, t

    def restore(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        take = _taker(tensors)
        self._downloaded = {c: take(f"downloaded/{c}") for c in state.get("downloaded", [])}
        self._personal = {c: take(f"personal/{c}") for c in state.get("personal", [])}
        self._installed = set(state.get("installed", []))
        self._server_version = state.get("server_version", 0)
        self._kd_flops = {int(c): f for c, f in state.get("kd_flops", {}).items()}
        self._server_logits = None
        for model, fam in self.families.items():
            fam.adapter = take(f"family/{model}")
            fam.version = state["versions"][model]
        for c, cs in enumerate(self.codec_state):
            cs.residuals = take(f"residual/{c}")
        self._last = {c: (take(f"last/{c}/start"), take(f"last/{c}/delta"))
                      for c in state["last"]}
        self.servers.restore(take("server"))

    def upload_state(self, upload: Upload, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
        doc, _ = super().upload_state(upload, key)
        sent = upload.sent
        assert sent is not None, "a real upload carries its payload"
        doc["sent"] = {"family": sent.family, "num_samples": sent.num_samples,
                       "quality": sent.quality, "proxy": list(sent.proxy),
                       "logits": None if sent.logits is None
                       else base64.b64encode(sent.logits.data).decode("ascii"),
                       "payload": base64.b64encode(sent.payload.data).decode("ascii")}
        return doc, {f"{key}/start/{k}": v.detach().clone() for k, v in sent.start.items()}

    def restore_upload(self, doc: dict[str, Any], tensors: dict[str, Any], key: str) -> Upload:
        s = doc["sent"]
        sent = Sent(s["family"], s["num_samples"], s["quality"],
                    codecs.Payload(base64.b64decode(s["payload"])),
                    _taker(tensors)(f"{key}/start"), tuple(s.get("proxy", ())),
                    None if s.get("logits") is None
                    else codecs.Payload(base64.b64decode(s["logits"])))
        return Upload(**{k: v for k, v in doc.items() if k != "sent"}, sent=sent)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # its error, if any, was raised to the engine
            self._settle()
        self.families.clear()


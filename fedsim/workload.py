"""The workload interface: the ML work of one update, as data the engine turns into time.

The engine never trains or encodes by itself; at each step of the life of an update it asks
the workload (registry ``WORKLOADS``):

- ``download_bytes(client)``: the family adapter a client receives;
- ``plan(client, round)``: FLOPs and peak memory of the local job, known before it runs
  (the engine waits FLOPs / device FLOP/s and fails a job the device cannot hold);
- ``train(client, round, plan)``: the job itself, returning an opaque ``Update``;
  ``remote_job(client, round, plan)`` is the same job as data, for ``process``/``ray`` workers;
- ``encode(client, round, update, rate_bps, time_left_s)``: the upload, whose ``nbytes`` is what the
  channel carries;
- ``ingest(client, upload)``: server-side decode + projection, FLOPs of that work, and whether
  the update is accepted (a corrupt or poisoned one is not);
- ``aggregate(round, arrivals)``: apply accepted updates to the server model, FLOPs;
- ``evaluate(round)``: quality metrics of the server model (an observation: no simulated time;
  a :class:`Deferred` when they are computed in the background).

``synthetic`` is the network-study mode: fixed sizes and FLOPs, no ML at all. It exists to sweep
thousands of clients over network conditions; its bytes are a parameter, not an encoding.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedsim.devices import Fleet

if TYPE_CHECKING:
    import torch

    from fedsim.aggregators import ClientResult
    from fedsim.codecs import Payload
from fedsim.plugins import WORKLOADS
from fedsim.scenario import Scenario


@dataclass(frozen=True)
class JobPlan:
    flops: float  # FLOPs of the local training steps
    peak_memory_bytes: int  # weights + grads + optimizer state + activations
    num_samples: int  # examples the job trains on
    tokens: int = 0
    context: Any = None  # what the workload needs to run it (batches of indices, seeds)


Adapter = dict[str, "torch.Tensor"]  # LoRA tensors by parameter name
Carried = dict[str, Adapter]  # server variant name -> the update as that server receives it


@dataclass(frozen=True)
class Sent:
    """What a real client's upload carries: the encoded delta and what travels with it."""

    family: str  # the client's model (its family)
    num_samples: int
    quality: float  # local loss improvement
    payload: Payload  # the bytes on the wire
    start: Adapter  # the adapter the client trained from (the server knows it: it sent it)
    proxy: tuple[int, ...] = ()  # distillation: the proxy batch the logits are of (positions)
    logits: Payload | None = None  # both transfers: the logits beside the update's payload


@dataclass(frozen=True)
class Upload:
    nbytes: int  # bytes on the wire (the encoded payload's length)
    raw_bytes: int  # the update before compression (fp32)
    codec: str  # the codec setting used
    rel_error: float = 0.0  # relative L2 reconstruction error of the encoding
    sent: Sent | None = None  # None: the synthetic workload sends sizes, not bytes
    # RMS of the job's training losses (nats), what an Oort client reports; NaN: no loss.
    loss_rms: float = math.nan


@dataclass(frozen=True)
class Ingested:
    flops: float  # server work: decode + transfer into the server models
    accepted: bool
    detail: str = ""
    result: ClientResult | None = None  # the decoded update, as an aggregation rule sees it
    carried: Carried = field(default_factory=dict)


@dataclass
class Arrival:
    """An update that reached the server and was accepted, waiting for aggregation."""

    client: int
    round: int
    num_samples: int
    staleness: int = 0
    weight: float = 1.0  # round-policy weight (async staleness discount)
    result: ClientResult | None = None
    carried: Carried = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    upload: Upload | None = None  # what it was decoded from (a checkpoint re-ingests it)


class Deferred:
    """Quality metrics computed in a background thread: evaluation is an observation (no
    simulated time), so it may overlap the next round's jobs on the executor's workers.
    ``result()`` waits for them."""

    def __init__(self, compute: Callable[[], dict[str, float]]) -> None:
        self._out: dict[str, float] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(compute,), daemon=True,
                                        name="fedsim-evaluate")
        self._thread.start()

    def _run(self, compute: Callable[[], dict[str, float]]) -> None:
        try:
            self._out = compute()
        except BaseException as e:  # re-raised in the caller's thread by result()
            self._error = e

    def result(self) -> dict[str, float]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out


class Workload(ABC):
    """What the engine asks of the ML side; see the module docstring."""

    name: str
    # Whether ``encode`` reads its ``rate_bps`` (the engine estimates the uplink only then).
    reads_rate = True

    def __init__(self, scenario: Scenario, fleet: Fleet) -> None:
        self.scenario, self.fleet = scenario, fleet

    def primary_metric(self) -> str | None:
        return None

    @abstractmethod
    def download_bytes(self, client: int) -> int: ...

    @abstractmethod
    def download_bytes_estimate(self, client: int) -> int:
        """What :meth:`download_bytes` would be now, without the download happening."""

    @abstractmethod
    def upload_bytes_estimate(self, client: int) -> int:
        """The bytes a selector expects ``client``'s next upload to be (the codec's size for
        the update's shapes, without a channel to adapt to)."""

    @abstractmethod
    def plan(self, client: int, round_: int) -> JobPlan: ...

    @abstractmethod
    def train(self, client: int, round_: int, plan: JobPlan) -> Any: ...

    def batch_key(self, client: int) -> Hashable | None:
        """Which clients' jobs ``train_many`` may run in one batched pass (those with equal
        keys), or None: this client's jobs run one by one."""
        return None

    def train_many(self, jobs: Sequence[tuple[int, int, JobPlan]]) -> list[Any]:
        """``train`` of each (client, round, plan), in one batched pass where the workload
        can (jobs of one ``batch_key``); the results equal ``train``'s within float
        tolerance."""
        return [self.train(*job) for job in jobs]

    def remote_group(self, jobs: Sequence[tuple[int, int, JobPlan]]) -> Any:
        """``train_many``'s job (jobs of one ``batch_key``) as picklable data for an
        out-of-process executor, or None to run ``train_many`` here."""
        return None

    def remote_job(self, client: int, round_: int, plan: JobPlan) -> Any:
        """``train``'s job as picklable data for an out-of-process executor (a
        :class:`fedsim.executors.RemoteJob` whose result equals ``train``'s), or None to run
        ``train`` here."""
        return None

    @abstractmethod
    def encode(self, client: int, round_: int, update: Any, rate_bps: float,
               time_left_s: float | None) -> Upload: ...

    @abstractmethod
    def ingest(self, client: int, upload: Upload) -> Ingested: ...

    @abstractmethod
    def aggregate(self, round_: int, arrivals: list[Arrival]) -> float: ...

    def evaluate(self, round_: int) -> dict[str, float] | Deferred:
        return {}

    def client_metrics(self, executor: Any = None) -> dict[int, dict[str, float]]:
        """Final per-client quality, if the workload measures it (on ``executor``'s workers
        where it can)."""
        return {}

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """What the rest of the run depends on, between rounds: (JSON, name -> tensor)."""
        return {}, {}

    def restore(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        """Take the state :meth:`state` returned (on a freshly built workload)."""

    def upload_state(self, upload: Upload, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """An upload in flight as (JSON, tensors named under ``key``) for a checkpoint."""
        return {"nbytes": upload.nbytes, "raw_bytes": upload.raw_bytes, "codec": upload.codec,
                "rel_error": upload.rel_error, "loss_rms": upload.loss_rms}, {}

    def restore_upload(self, doc: dict[str, Any], tensors: dict[str, Any], key: str) -> Upload:
        return Upload(**doc)

    def close(self) -> None:
        """Release executors and models."""




@WORKLOADS.register("synthetic")
class SyntheticWorkload(Workload):
    """Network-study mode: every update is ``update_bytes`` and costs ``flops_per_step`` each of
    ``training.local_steps`` steps; no model, no data, no encoding."""

    reads_rate = False  # its sizes are fixed

    def __init__(self, scenario: Scenario, fleet: Fleet) -> None:
        super().__init__(scenario, fleet)
        self.cfg = cfg = scenario.workload
        self.steps = scenario.training.local_steps
        self.batch = scenario.training.batch_size
        # The same for every client and round (frozen): made once, not a million times.
        self._plan = JobPlan(flops=cfg.flops_per_step * self.steps, peak_memory_bytes=0,
                             num_samples=self.steps * self.batch)
        self._upload = Upload(nbytes=cfg.update_bytes, raw_bytes=cfg.update_bytes,
                              codec="synthetic")
        self._ingested = Ingested(flops=cfg.server_flops_per_update, accepted=True)

    def download_bytes(self, client: int) -> int:
        return self.cfg.download_bytes

    def download_bytes_estimate(self, client: int) -> int:
        return self.cfg.download_bytes

    def upload_bytes_estimate(self, client: int) -> int:
        return self.cfg.update_bytes

    def plan(self, client: int, round_: int) -> JobPlan:
        return self._plan

    def train(self, client: int, round_: int, plan: JobPlan) -> None:
        return None

    def encode(self, client: int, round_: int, update: Any, rate_bps: float | None,
               time_left_s: float | None) -> Upload:
        return self._upload

    def ingest(self, client: int, upload: Upload) -> Ingested:
        return self._ingested

    def aggregate(self, round_: int, arrivals: list[Arrival]) -> float:
        return self.cfg.server_flops_per_update * 0.01 * len(arrivals)  # a weighted sum


def make_workload(scenario: Scenario, fleet: Fleet) -> Workload:
    if scenario.workload.name not in WORKLOADS:
        # The real workload registers itself on import; torch and transformers load only now,
        # so network-only runs never pay for them.
        import fedsim.federation  # noqa: F401
    return WORKLOADS.get(scenario.workload.name)(scenario, fleet)


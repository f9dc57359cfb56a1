"""The plug-in families: one registry each, and the options of every entry as a config class.

A scenario section that names a plug-in (``compression: {codec: qsgd, bits: 4}``) is validated
against that entry's own frozen config class: the scenario holds each such section as the
discriminated union of its family's configs (``Registry.union``), as peft has one config class
per method. An option of another entry is rejected, naming the entries that take it; a rule that
concerns one plug-in ("trace needs a file", "deadline needs deadline_s") lives in its config.

Why the configs live here and not beside their implementations: validating a scenario must not
import torch (~3 s) or transformers (~10 s), so that ``fedsim validate`` and network-only runs
stay light (peft keeps ``LoraConfig`` apart from its model code too). Each implementation
registers under the same name in the family's home module, loaded on first ``get``; the
contract tests check that every declared config has an implementation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedsim.registry import Registry

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class Config(BaseModel):
    """Base of every config: frozen, unknown keys rejected, NaN/inf rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class PluginConfig(Config):
    """The options of one registry entry; its discriminator field names the entry."""

    registry: ClassVar[Registry[Any]]

    def options(self) -> dict[str, Any]:
        """The entry's options as keyword arguments (the discriminator left out)."""
        return {k: getattr(self, k) for k in type(self).model_fields if k != self.registry.key}


CHANNELS: Registry[Any] = Registry("channel", home="fedsim.channels")
CODECS: Registry[Any] = Registry("codec", home="fedsim.codecs", key="codec")
AGGREGATORS: Registry[Any] = Registry("aggregator", home="fedsim.aggregators")
PROJECTORS: Registry[Any] = Registry("projector", home="fedsim.projection")
TRANSFERS: Registry[Any] = Registry("transfer", home="fedsim.server")
ROUND_POLICIES: Registry[Any] = Registry("round policy", home="fedsim.rounds")
SELECTORS: Registry[Any] = Registry("selector", home="fedsim.selection")
EXECUTORS: Registry[Any] = Registry("executor", home="fedsim.executors")
ATTACKS: Registry[Any] = Registry("attack", home="fedsim.attacks", key="kind")
PARTITIONERS: Registry[Any] = Registry("partitioner", home="fedsim.data")
WORKLOADS: Registry[Any] = Registry("workload", home="fedsim.federation")
# Entries without options: named by a plain string, checked against the registry's names.
DATASETS: Registry[Any] = Registry("dataset", home="fedsim.data")
MODELS: Registry[Any] = Registry("model", home="fedsim.models")
MODELS.declare("minilm-l6", "mpnet-base", "smollm2-135m", "gemma3-270m",  # packaged
               "tiny-bert", "tiny-mpnet", "tiny-llama", "tiny-gemma3")  # random-init, for tests
TASKS: Registry[Any] = Registry("task", home="fedsim.tasks")
TASKS.declare("classification", "multiple-choice", "generation")  # no options of their own yet


# --- channels (fedsim.channels) -------------------------------------------------------------


class ChannelConfig(PluginConfig):
    registry = CHANNELS
    name: str
    has_snr: ClassVar[bool] = False  # rates from a signal-to-noise ratio (interference applies)


@CHANNELS.options("static")
class StaticChannelConfig(ChannelConfig):
    """The cell carrier's fixed rate (``network.cells[i].uplink_rate_bps``), shared equally."""

    name: Literal["static"] = "static"


@CHANNELS.options("pathloss")
class PathlossChannelConfig(ChannelConfig):
    """128.1 + 37.6 log10(d_km) dB (3GPP TR 36.814 macro), log-normal shadowing, Rayleigh."""

    name: Literal["pathloss"] = "pathloss"
    has_snr: ClassVar[bool] = True
    shadowing_sigma_db: NonNegFloat = 8.0
    fading: bool = True  # Rayleigh block fading, redrawn every coherence time
    coherence_time_s: PositiveFloat = 0.05
    outage_snr_db: float = Field(default=-5.0, ge=-50, le=50)


@CHANNELS.options("trace")
class TraceChannelConfig(ChannelConfig):
    """Rates replayed from a CSV with columns time_s,uplink_bps,downlink_bps[,client]."""

    name: Literal["trace"] = "trace"
    trace_path: str = Field(min_length=1)

    @field_validator("trace_path")
    @classmethod
    def _exists(cls, v: str) -> str:
        if not Path(v).is_file():
            raise ValueError(f"trace file {v!r} not found (relative paths are read from the "
                             "working directory)")
        return v


# --- codecs (fedsim.codecs) -----------------------------------------------------------------


class CodecConfig(PluginConfig):
    registry = CODECS
    codec: str


@CODECS.options("none")
class NoneCodecConfig(CodecConfig):
    """float32, as trained."""

    codec: Literal["none"] = "none"


@CODECS.options("fp16")
class Fp16CodecConfig(CodecConfig):
    codec: Literal["fp16"] = "fp16"


@CODECS.options("qsgd")
class QsgdCodecConfig(CodecConfig):
    """Unbiased stochastic quantization to ``bits`` bits (Alistarh et al. 2017)."""

    codec: Literal["qsgd"] = "qsgd"
    bits: Literal[2, 4, 8] = 8


@CODECS.options("topk")
class TopkCodecConfig(CodecConfig):
    """The ceil(ratio·n) largest entries of each tensor, with error feedback."""

    codec: Literal["topk"] = "topk"
    ratio: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.01


@CODECS.options("topk-qsgd")
class TopkQsgdCodecConfig(TopkCodecConfig):
    codec: Literal["topk-qsgd"] = "topk-qsgd"  # type: ignore[assignment]
    bits: Literal[2, 4, 8] = 8


@CODECS.options("lowrank")
class LowrankCodecConfig(CodecConfig):
    """LoRA pairs re-factored to ``rank``, PowerSGD for other matrices."""

    codec: Literal["lowrank"] = "lowrank"
    rank: int = Field(default=2, ge=1)


@CODECS.options("adaptive")
class AdaptiveCodecConfig(CodecConfig):
    """The least lossy ladder setting whose payload fits the channel before the deadline."""

    codec: Literal["adaptive"] = "adaptive"
    safety_margin: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.8
    max_bytes: int | None = Field(default=None, ge=1)
    # What the client knows of its uplink when it chooses (fedsim.estimation): the state now
    # (exact, an oracle) or the previous block's with a log-normal error (realistic).
    estimate: Literal["exact", "realistic"] = "realistic"
    estimate_error_db: NonNegFloat = 2.0

    def options(self) -> dict[str, Any]:
        # The channel knowledge is the engine's: it estimates the rate the codec is given.
        return {k: v for k, v in super().options().items()
                if k not in ("estimate", "estimate_error_db")}


# --- aggregators (fedsim.aggregators) -------------------------------------------------------


class AggregatorConfig(PluginConfig):
    """Every rule also takes ``max_update_norm``: an update whose L2 norm (all its tensors)
    exceeds it is quarantined at ingest (recorded as rejected, never aggregated); null: no
    limit (NaN/Inf updates are always quarantined). ``lora``: what a family's rule combines in
    LoRA space, ``factors`` (each of A and B separately: avg(B)·avg(A)) or ``exact`` (each
    module's product update B·A − B₀A₀, re-factored to rank r by truncated SVD)."""

    registry = AGGREGATORS
    name: str
    max_update_norm: PositiveFloat | None = None
    lora: Literal["factors", "exact"] = "factors"

    @property
    def measures_quality(self) -> bool:
        """Whether the rule weighs clients by their loss improvement (clients then hold out a
        validation split, ``training.validation_examples``, and measure it)."""
        return False

    def in_lora_space(self) -> AggregatorConfig:
        """The rule as a family applies it to its LoRA adapter when a server model takes the
        merge (LARS off: it applies once, in the server's weight space)."""
        return self


@AGGREGATORS.options("fedavg")
class FedAvgConfig(AggregatorConfig):
    name: Literal["fedavg"] = "fedavg"


@AGGREGATORS.options("task-arithmetic")
class TaskArithmeticConfig(AggregatorConfig):
    """η·Σ αᵢ·τᵢ / Σ αᵢ, αᵢ = quality × heterogeneity × policy weight, optional LARS: each
    tensor u of the combined update times λ = lars_coefficient·‖W‖ / (‖u‖ + lars_eps) before η
    (a zero ‖W‖: λ = 1), in the server model's weight space (the family's without a server)."""

    name: Literal["task-arithmetic"] = "task-arithmetic"
    eta: PositiveFloat = 1.0
    lars: bool = False
    lars_coefficient: PositiveFloat = 1.0  # c: each tensor's step has norm ≈ η·c·‖W‖
    lars_eps: PositiveFloat = 1e-8  # ε, in the units of ‖u‖
    quality: Literal["none", "loss-improvement"] = "loss-improvement"
    heterogeneity: Literal["none", "samples", "label-entropy", "js-similarity"] = "js-similarity"

    @property
    def measures_quality(self) -> bool:
        return self.quality != "none"

    def in_lora_space(self) -> AggregatorConfig:
        return self.model_copy(update={"lars": False})


@AGGREGATORS.options("norm-clip")
class NormClipConfig(AggregatorConfig):
    name: Literal["norm-clip"] = "norm-clip"
    clip_norm: PositiveFloat = 1.0


@AGGREGATORS.options("trimmed-mean")
class TrimmedMeanConfig(AggregatorConfig):
    name: Literal["trimmed-mean"] = "trimmed-mean"
    trim_ratio: Annotated[float, Field(ge=0, lt=0.5, allow_inf_nan=False)] = 0.1


@AGGREGATORS.options("median")
class MedianConfig(AggregatorConfig):
    name: Literal["median"] = "median"


# --- projectors and transfers (fedsim.projection, fedsim.server) ----------------------------


class ProjectorConfig(PluginConfig):
    registry = PROJECTORS
    name: str


@PROJECTORS.options("pad")
class PadProjectorConfig(ProjectorConfig):
    """Zero-pad / truncate: the data-free baseline."""

    name: Literal["pad"] = "pad"


@PROJECTORS.options("orthogonal")
class OrthogonalProjectorConfig(ProjectorConfig):
    """A random isometry per pair of widths, drawn from the seed."""

    name: Literal["orthogonal"] = "orthogonal"


@PROJECTORS.options("lstsq")
class LstsqProjectorConfig(ProjectorConfig):
    """Ridge least squares on paired activations of both models on the probe corpus."""

    name: Literal["lstsq"] = "lstsq"
    ridge: PositiveFloat = 1e-2
    max_length: int = Field(default=128, ge=2)  # probe tokens per text
    batch_size: int = Field(default=8, ge=1)
    use_cache: bool = True  # fitted maps cached on disk, keyed by model pair and probe corpus


def _named(v: Any) -> Any:
    """A bare name (``projector: lstsq``) as the config it names."""
    return {"name": v} if isinstance(v, str) else v


class TransferConfig(PluginConfig):
    registry = TRANSFERS
    name: str


@TRANSFERS.options("projection")
class ProjectionTransferConfig(TransferConfig):
    """Task vectors projected from each family's weight space into the server model's."""

    name: Literal["projection"] = "projection"
    projector: Annotated[PROJECTORS.union(), Field(default_factory=LstsqProjectorConfig)]

    @field_validator("projector", mode="before")
    @classmethod
    def _bare_name(cls, v: Any) -> Any:
        return _named(v)


class TopKLogitsConfig(Config):
    """What a client uploads for distillation: its top-k logits per proxy position.

    ``k``: the fixed setting (FATE-LLM's default keeps 128; ``full``: every logit, the
    reference), capped at the vocabulary (a 4-label classifier sends its 4). ``adaptive``:
    k per client per round by :func:`fedsim.logits.choose_k` between ``k_min`` and ``k_max``
    (``k`` unused), from the client's rate estimate and the time before the round's deadline;
    a round without a deadline gives it ``time_budget_s`` (null: no limit, so ``k_max``). The
    defaults 16..1024 are ours, not the paper's, and put 128 at their geometric middle.
    """

    k: int | Literal["full"] = 128
    adaptive: bool = False
    k_min: int = Field(default=16, ge=1)
    k_max: int = Field(default=1024, ge=1)
    value_bits: Literal[16, 8] = 16
    safety_margin: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.8
    time_budget_s: PositiveFloat | None = None  # upload time allowed without a deadline (s)
    # The rate the adaptive k is chosen from (fedsim.estimation): the state now (exact, an
    # oracle) or the previous block's with a log-normal error (realistic); an adaptive codec
    # beside it (both transfers at once) sets it for both.
    estimate: Literal["exact", "realistic"] = "realistic"
    estimate_error_db: NonNegFloat = 2.0

    @field_validator("k", mode="before")
    @classmethod
    def _k_is_count_or_full(cls, v: Any) -> Any:
        if v == "full" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(f"k must be an integer >= 1 or 'full', got {v!r}")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> TopKLogitsConfig:
        if self.k_min > self.k_max:
            raise ValueError(f"k_min must be <= k_max, got k_min={self.k_min}, "
                             f"k_max={self.k_max}")
        return self

    def k_for(self, rate_bps: float, time_left_s: float | None, positions: int, vocab: int,
              segments: int = 1) -> int:
        """This round's k for a client with this channel estimate and time before deadline
        (None: the round has none)."""
        from fedsim import logits  # torch: imported when a run computes, not when it validates

        if self.adaptive:
            budget_s = time_left_s if time_left_s is not None else self.time_budget_s
            if budget_s is None:
                return max(1, min(self.k_max, vocab))
            return logits.choose_k(rate_bps, budget_s, positions, vocab, k_min=self.k_min,
                                   k_max=self.k_max, value_bits=self.value_bits,
                                   safety_margin=self.safety_margin, segments=segments)
        vocab = logits.check_count("vocab", vocab)
        return vocab if self.k == "full" else min(self.k, vocab)


class ProxyConfig(Config):
    """The unlabelled server-side corpus distillation runs on.

    ``held-out``: texts of the task's test split after the evaluation slice (never scored), the
    first ``size`` of them, with their references (labels, targets: selective transfer scores
    teachers by them). Another dataset's name (classification only): the first ``size`` texts of
    that dataset's test split, unlabelled (an out-of-domain corpus; selective transfer then
    takes the surest teacher). Each round's batch is ``batch`` of them, drawn from the seed and
    the round, the same for every client of the round. ``preinstalled: false``: the texts cross
    the downlink once, with a client's first download (their UTF-8 bytes, counted).
    """

    source: str = "held-out"
    size: int = Field(default=64, ge=1)  # examples in the proxy pool

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        return v if v == "held-out" else DATASETS.require(v)
    batch: int = Field(default=16, ge=1)  # examples per round
    preinstalled: bool = True


@TRANSFERS.options("distillation")
class DistillationTransferConfig(TransferConfig):
    """Top-k logits of each client's model on a proxy batch, aggregated and distilled into the
    server's LoRA (FedMKT, FedCoLLM; channel-adaptive k as arXiv 2509.01750).

    Clients upload logits, not weights, so no client adapter is averaged: each client keeps its
    own (personal) adapter from round to round. ``aggregation``: ``adaptive`` averages each
    token over the clients that sent it, ``zero-pad`` over every client (a missing token counts
    0). ``selective`` (FedMKT): per proxy example only the client whose distribution scores the
    example's reference best. The server trains a LoRA of rank ``server_lora_r`` on
    ``server_roles`` (and its head) for ``server_steps`` AdamW steps of KL at ``temperature``
    on each round's batch, then merges it into its weights.
    """

    name: Literal["distillation"] = "distillation"
    proxy: ProxyConfig = ProxyConfig()
    logits: TopKLogitsConfig = TopKLogitsConfig()
    temperature: PositiveFloat = 2.0
    aggregation: Literal["adaptive", "zero-pad"] = "adaptive"
    selective: bool = False
    server_steps: int = Field(default=5, ge=1)
    server_lr: PositiveFloat = 1e-3
    server_lora_r: int = Field(default=8, ge=1)
    server_roles: tuple[str, ...] = ("q", "v")
    # Mutual transfer (FedMKT, FedCoLLM): once the server has distilled, each download also
    # carries the server's top-k logits on the round's proxy batch (``logits.k``, or k_max
    # when adaptive; bytes counted), and the client distils from them (``client_steps`` AdamW
    # steps at ``client_lr``, FLOPs in its job) before its local training.
    mutual: bool = False
    client_steps: int = Field(default=2, ge=1)
    client_lr: PositiveFloat = 1e-3
    # Both transfers at once: each upload also carries the client's LoRA update (encoded by
    # ``compression``), family adapters are averaged as on the weight path, and the server
    # merges the ``projector``-projected updates before it distils the round's logits.
    weights: bool = False
    projector: Annotated[PROJECTORS.union(), Field(default_factory=LstsqProjectorConfig)]

    @field_validator("projector", mode="before")
    @classmethod
    def _bare_name(cls, v: Any) -> Any:
        return _named(v)


# --- round policies (fedsim.rounds) ---------------------------------------------------------


class RoundPolicyConfig(PluginConfig):
    registry = ROUND_POLICIES
    name: str
    # Whether a run can be checkpointed at round boundaries (output.checkpoint_every), and
    # with server worker failures (an update preempted in service is not restored yet).
    checkpoints: ClassVar[bool] = True
    checkpoints_server_failures: ClassVar[bool] = True
    closes_rounds: ClassVar[bool] = True  # a round of selected clients ends (not async)


@ROUND_POLICIES.options("sync")
class SyncRoundsConfig(RoundPolicyConfig):
    """Each round waits for every selected client (FedAvg)."""

    name: Literal["sync"] = "sync"
    clients_per_round: int | None = Field(default=None, ge=1)  # None: every available client


@ROUND_POLICIES.options("deadline")
class DeadlineRoundsConfig(RoundPolicyConfig):
    """Like sync, but updates not uploaded ``deadline_s`` after the round starts are dropped."""

    name: Literal["deadline"] = "deadline"
    clients_per_round: int | None = Field(default=None, ge=1)
    deadline_s: PositiveFloat


@ROUND_POLICIES.options("async")
class AsyncRoundsConfig(RoundPolicyConfig):
    """FedBuff (Nguyen et al. 2022): aggregate every ``buffer_size`` arrivals."""

    name: Literal["async"] = "async"
    checkpoints_server_failures: ClassVar[bool] = False  # updates are in service at a checkpoint
    closes_rounds: ClassVar[bool] = False
    buffer_size: int = Field(default=10, ge=1)
    concurrency: int = Field(default=20, ge=1)  # clients training at once
    staleness_exponent: NonNegFloat = 0.5  # weight (1 + staleness)^-a


# --- client selection (fedsim.selection) ---------------------------------------------------


class SelectorConfig(PluginConfig):
    registry = SELECTORS
    name: str

    def check_rounds(self, policy: RoundPolicyConfig) -> str | None:
        """What is wrong with this selector under ``policy`` (``key: message``), if anything."""
        return None


def _has_deadline(policy: RoundPolicyConfig) -> bool:
    return getattr(policy, "deadline_s", None) is not None


class TimedSelectorConfig(SelectorConfig):
    """A selector that models each update's time from the channel estimate: ``exact`` (the
    channel state now) or ``realistic`` (the previous block, log-normal error of
    ``estimate_error_db``); see fedsim.selection."""

    estimate: Literal["exact", "realistic"] = "realistic"
    estimate_error_db: NonNegFloat = 2.0


def _check_over_selection(name: str, policy: RoundPolicyConfig) -> str | None:
    """What is wrong with keeping the first k arrivals of ``policy``'s rounds, if anything."""
    if not policy.closes_rounds:
        return (f"selection.name: {name} keeps the first k arrivals of a round; "
                f"{policy.name} rounds have none (use sync or deadline)")
    if getattr(policy, "clients_per_round", None) is None:
        return (f"round_policy.clients_per_round: {name} needs k, the arrivals a round "
                f"keeps")
    return None


OverSelection = Annotated[float, Field(ge=1, le=10, allow_inf_nan=False)]


@SELECTORS.options("uniform")
class UniformSelectorConfig(SelectorConfig):
    """ceil(over_selection·k) distinct clients uniformly at random (k: the round policy's
    ``clients_per_round``); with ``over_selection`` > 1 the round keeps the first k arrivals
    and stops the rest (Bonawitz et al. 2019 select 130 % of the target)."""

    name: Literal["uniform"] = "uniform"
    over_selection: OverSelection = 1.0

    def check_rounds(self, policy: RoundPolicyConfig) -> str | None:
        if self.over_selection > 1:
            return _check_over_selection("uniform with over_selection > 1", policy)
        return None


@SELECTORS.options("deadline-aware")
class DeadlineAwareSelectorConfig(TimedSelectorConfig):
    """FedCS (Nishio & Yonetani 2019): the most clients whose expected update fits the
    deadline; ``deadline_s`` defaults to the round policy's."""

    name: Literal["deadline-aware"] = "deadline-aware"
    deadline_s: PositiveFloat | None = None
    margin: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0  # share of it used

    def check_rounds(self, policy: RoundPolicyConfig) -> str | None:
        if self.deadline_s is None and not _has_deadline(policy):
            return ("selection.deadline_s: deadline-aware selection needs a deadline (give it "
                    "here, or use round_policy.name=deadline)")
        return None


@SELECTORS.options("fastest-k")
class FastestKSelectorConfig(TimedSelectorConfig):
    """FedScale's over-commitment: the ceil(over_selection·k) fastest expected, the first k
    arrivals kept (k: ``round_policy.clients_per_round``)."""

    name: Literal["fastest-k"] = "fastest-k"
    over_selection: OverSelection = 1.3

    def check_rounds(self, policy: RoundPolicyConfig) -> str | None:
        return _check_over_selection("fastest-k", policy)


@SELECTORS.options("utility")
class UtilitySelectorConfig(TimedSelectorConfig):
    """Oort (Lai et al. 2021): statistical utility x (T/t)^straggler_penalty beyond the
    preferred round time T (default: the round policy's deadline), ``exploration`` of the k
    slots for clients never seen."""

    name: Literal["utility"] = "utility"
    exploration: Probability = 0.1
    preferred_s: PositiveFloat | None = None
    straggler_penalty: NonNegFloat = 2.0  # Oort's α

    def check_rounds(self, policy: RoundPolicyConfig) -> str | None:
        if self.preferred_s is None and not _has_deadline(policy):
            return ("selection.preferred_s: utility selection needs a preferred round time "
                    "(give it here, or use round_policy.name=deadline)")
        return None


# --- executors (fedsim.executors) -----------------------------------------------------------


class ExecutorConfig(PluginConfig):
    """Where training jobs run. ``threads_per_job``: torch threads of every job, wherever it
    runs (a float sum's order depends on the thread count, so fixing it keeps results
    bit-identical across executors)."""

    registry = EXECUTORS
    name: str
    threads_per_job: int = Field(default=1, ge=1, le=256)
    # Where training, encoding, projection fitting, distillation and evaluation run
    # (fedsim.accelerators): auto (CUDA when torch sees one), cpu, cuda or cuda:N. The
    # simulated timeline comes from modelled FLOPs, so it does not change with the device.
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # Up to that many clients of one model family train in one batched pass over its shared
    # frozen base (fedsim.batching; for a GPU, which one small client batch leaves idle).
    # Results equal one-by-one training within float tolerance, not bit for bit: a run with
    # batch_clients > 1 is reproducible with the same value and executor. 1: one by one.
    batch_clients: int = Field(default=1, ge=1, le=4096)
    # Capabilities, asked instead of the executor's name: jobs run in other processes, so
    # this one may evaluate while they train; a sweep runs its points as this executor's tasks.
    shares_threads: ClassVar[bool] = False
    runs_sweep_points: ClassVar[bool] = False


class _PoolConfig(ExecutorConfig):
    shares_threads: ClassVar[bool] = True
    workers: int = Field(default=2, ge=1, le=1024)
    max_retries: int = Field(default=1, ge=0, le=10)  # resubmissions after a worker dies
    job_timeout_s: float | None = Field(default=None, gt=0)  # wall seconds; None: no limit
    # The workers' malloc (fedsim.allocators): auto (mimalloc where installed, Linux), system or
    # mimalloc. Less resident memory per worker, the same results.
    allocator: Literal["auto", "system", "mimalloc"] = "auto"


@EXECUTORS.options("inline")
class InlineExecutorConfig(ExecutorConfig):
    """Jobs run in this process (with ``batch_clients > 1``, a family's pending jobs in one
    pass when the first of them is collected)."""

    name: Literal["inline"] = "inline"


@EXECUTORS.options("process")
class ProcessExecutorConfig(_PoolConfig):
    """A local pool of ``workers`` processes (forked from a server process that imported torch
    once)."""

    name: Literal["process"] = "process"


@EXECUTORS.options("ray")
class RayExecutorConfig(_PoolConfig):
    """``workers`` Ray actors; ``address: auto`` joins a running cluster, none starts one."""

    name: Literal["ray"] = "ray"
    runs_sweep_points: ClassVar[bool] = True
    address: str | None = None
    # On a GPU (executor.device), actors share it: each requests 1/workers_per_gpu of one.
    workers_per_gpu: int = Field(default=1, ge=1, le=64)


# --- attacks (fedsim.attacks) ---------------------------------------------------------------


class AttackConfig(PluginConfig):
    """What a malicious group sends instead of its honest update."""

    registry = ATTACKS
    kind: str
    factor: PositiveFloat = 10.0


@ATTACKS.options("scale")
class ScaleAttackConfig(AttackConfig):
    """The honest update times ``factor``."""

    kind: Literal["scale"] = "scale"


@ATTACKS.options("sign-flip")
class SignFlipAttackConfig(AttackConfig):
    """The honest update times ``-factor``."""

    kind: Literal["sign-flip"] = "sign-flip"


@ATTACKS.options("random")
class RandomAttackConfig(AttackConfig):
    """Gaussian noise of ``factor`` times the honest update's norm."""

    kind: Literal["random"] = "random"


# --- partitioners (fedsim.data) -------------------------------------------------------------


class PartitionConfig(PluginConfig):
    registry = PARTITIONERS
    name: str


@PARTITIONERS.options("iid")
class IidPartitionConfig(PartitionConfig):
    name: Literal["iid"] = "iid"


@PARTITIONERS.options("dirichlet")
class DirichletPartitionConfig(PartitionConfig):
    """Label skew: each class shared among clients in Dirichlet(alpha) proportions."""

    name: Literal["dirichlet"] = "dirichlet"
    alpha: PositiveFloat = 0.5  # smaller = more label skew
    min_size: int = Field(default=2, ge=1)


@PARTITIONERS.options("quantity")
class QuantityPartitionConfig(PartitionConfig):
    """Quantity skew: client sizes follow a power law of rank."""

    name: Literal["quantity"] = "quantity"
    exponent: NonNegFloat = 1.5


# --- workloads (fedsim.workload, fedsim.federation) -----------------------------------------


class WorkloadConfig(PluginConfig):
    registry = WORKLOADS
    name: str
    trains_models: ClassVar[bool] = True  # loads the clients' and the server's models


@WORKLOADS.options("real")
class RealWorkloadConfig(WorkloadConfig):
    """Real LoRA fine-tuning of the clients' models, real payloads, a real server model."""

    name: Literal["real"] = "real"


@WORKLOADS.options("synthetic")
class SyntheticWorkloadConfig(WorkloadConfig):
    """The network-study mode: no ML, fixed sizes and FLOPs."""

    name: Literal["synthetic"] = "synthetic"
    trains_models: ClassVar[bool] = False
    update_bytes: int = Field(default=1_000_000, ge=1)
    download_bytes: int = Field(default=1_000_000, ge=0)
    flops_per_step: PositiveFloat = 1e11
    server_flops_per_update: NonNegFloat = 1e9


def check_model_name(name: str) -> str:
    """``name`` if it names a model: a registry entry, an existing ``local:<dir>``, or a hub id
    written ``org/name`` (which needs network access: see :func:`model_note`)."""
    if name.startswith("local:"):
        path = Path(name.removeprefix("local:")).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a model directory (no config.json written by "
                             "save_pretrained)")
        return name
    if name in MODELS or "/" in name:
        return name
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS.names())}, "
                     "local:<dir>, or a hub id as org/name (needs network)")


def model_note(name: str) -> str | None:
    """What a user should know about model ``name`` before running (a hub id needs network)."""
    if name.startswith("local:") or name in MODELS:
        return None
    return (f"model {name!r} is not a registry model: it is loaded as a Hugging Face hub id, "
            "which needs network access (HF_HUB_OFFLINE unset)")

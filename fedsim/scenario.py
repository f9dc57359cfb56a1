"""Scenario: frozen, validated pydantic models of a scenario YAML, and how to load one.

A scenario names everything a run needs: the clients (groups of a device profile), the cells
they share, the server, the task and its training, the compression of uploads, the aggregation
rule, the round policy, the executor and where the run directory goes.

``load(path, overrides)`` reads the YAML with ``yaml.safe_load``, applies ``--set a.b=v``
overrides (typed by the schema, list items by index: ``clients.0.count=50``) and validates.
Every problem is reported as ``path.to.key: message`` in one :class:`ScenarioError`.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticUndefined

from fedsim.errors import FedsimError

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class ScenarioError(FedsimError):
    """A scenario that cannot run; ``errors`` holds one ``path.to.key: message`` per problem."""

    def __init__(self, errors: list[str], source: str = "scenario") -> None:
        self.errors = errors
        super().__init__(f"{source}: invalid scenario\n" + "\n".join(f"  {e}" for e in errors))


class Config(BaseModel):
    """Base of every config: frozen, unknown keys rejected, NaN/inf rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --- devices -------------------------------------------------------------------------------


class DeviceOverrides(Config):
    """Any field of a device profile (see ``fedsim.devices``); unset fields keep the preset."""

    flops_per_s: PositiveFloat | None = None
    memory_gib: PositiveFloat | None = None
    tx_power_dbm: float | None = Field(default=None, ge=-30, le=60, allow_inf_nan=False)
    antenna_gain_dbi: float | None = Field(default=None, ge=-20, le=40, allow_inf_nan=False)
    noise_figure_db: NonNegFloat | None = None
    distance_m: tuple[PositiveFloat, PositiveFloat] | None = None
    wired_rate_bps: PositiveFloat | None = None
    mean_on_s: PositiveFloat | None = None
    mean_off_s: NonNegFloat | None = None

    @field_validator("distance_m")
    @classmethod
    def _ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and v[0] > v[1]:
            raise ValueError(f"distance_m must be [min, max] with min <= max, got {list(v)}")
        return v


class AttackConfig(Config):
    """What a malicious group sends instead of its honest update (``fedsim.attacks``)."""

    kind: str  # scale | sign-flip | random
    factor: PositiveFloat = 10.0  # scale: x factor; sign-flip: x -factor; random: factor x norm

    @field_validator("kind")
    @classmethod
    def _known(cls, v: str) -> str:
        from fedsim.attacks import ATTACKS

        return ATTACKS.require(v)


class ClientGroup(Config):
    """``count`` clients of one device ``profile`` training ``model`` (same model family)."""

    name: str | None = None
    profile: str
    count: int = Field(ge=1, le=1_000_000)
    model: str = "tiny-bert"
    cells: list[int] | None = None  # cells this group is spread over (round robin); None: all
    overrides: DeviceOverrides = DeviceOverrides()
    # Per-client lognormal spread (sigma of ln) around the preset, per numeric field.
    spread: dict[str, NonNegFloat] = Field(default_factory=dict)
    attack: AttackConfig | None = None  # set: every client of the group is malicious

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, v: str) -> str:
        from fedsim.devices import PROFILES

        if v not in PROFILES:
            raise ValueError(f"unknown device profile {v!r}; known: {', '.join(PROFILES)}")
        return v

    @field_validator("spread")
    @classmethod
    def _spread_fields(cls, v: dict[str, float]) -> dict[str, float]:
        from fedsim.devices import SPREADABLE_FIELDS

        bad = sorted(set(v) - set(SPREADABLE_FIELDS))
        if bad:
            raise ValueError(f"cannot spread {bad}; spreadable: {', '.join(SPREADABLE_FIELDS)}")
        return v


# --- network -------------------------------------------------------------------------------


class CellConfig(Config):
    """One base station: its own uplink and downlink bandwidth, shared by its active flows."""

    uplink_bandwidth_hz: PositiveFloat = 20e6  # a 20 MHz NR/LTE carrier
    downlink_bandwidth_hz: PositiveFloat = 20e6
    sharing: Literal["ofdma", "tdma"] = "ofdma"
    bs_tx_power_dbm: float = Field(default=46.0, ge=0, le=70)  # 3GPP TR 36.814 macro BS
    # Rates of the `static` channel (bits/s of the whole cell carrier).
    uplink_rate_bps: PositiveFloat = 21e6  # Ookla global median 5G upload, ~21 Mbps
    downlink_rate_bps: PositiveFloat = 200e6  # Ookla global median 5G download, ~200 Mbps


class ChannelConfig(Config):
    """The channel model (a registry name) and its parameters; see ``fedsim.channels``."""

    name: str = "static"
    # pathloss: 128.1 + 37.6 log10(d_km) dB (3GPP TR 36.814 macro), lognormal shadowing.
    shadowing_sigma_db: NonNegFloat = 8.0
    fading: bool = True  # Rayleigh block fading, redrawn every coherence time
    coherence_time_s: PositiveFloat = 0.05
    outage_snr_db: float = Field(default=-5.0, ge=-50, le=50)
    # trace: CSV with columns time_s,uplink_bps,downlink_bps (optionally a `client` column).
    trace_path: str | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from fedsim.channels import CHANNELS

        return CHANNELS.require(v)

    @model_validator(mode="after")
    def _trace_needs_path(self) -> ChannelConfig:
        if self.name == "trace" and not self.trace_path:
            raise ValueError("channel 'trace' needs trace_path")
        return self


class NetworkConfig(Config):
    channel: ChannelConfig = ChannelConfig()
    cells: list[CellConfig] = Field(default_factory=lambda: [CellConfig()], min_length=1)


# --- server, task, training ------------------------------------------------------------------


class ServerConfig(Config):
    # The larger model the clients' projected task vectors merge into (real workload); null:
    # no server model, the families' FedAvg adapters are the result.
    model: str | None = "tiny-mpnet"
    # Server-side held-out examples (from the test split, after the evaluation slice): their
    # texts are the projectors' probe corpus (unlabelled use) ...
    probe_examples: int = Field(default=200, ge=1)
    # ... and, for classification, their labels fit the server's head as a linear probe on the
    # frozen model: the server's starting point. false: the head as initialized by the seed.
    linear_probe: bool = True
    workers: int = Field(default=1, ge=1, le=1024)  # ingress workers (simpy.Resource capacity)
    queue_capacity: int = Field(default=100, ge=0)  # waiting updates beyond which we drop
    flops_per_s: PositiveFloat = 50e12  # one A100-class GPU at ~15% of 312 TFLOP/s bf16
    wired_rate_bps: PositiveFloat = 10e9  # datacenter NIC


class WorkloadConfig(Config):
    """``real``: real LoRA training; ``synthetic``: the network-study mode (no ML at all)."""

    name: Literal["real", "synthetic"] = "real"
    # synthetic: every update is update_bytes on the wire; training costs flops_per_step each.
    update_bytes: int = Field(default=1_000_000, ge=1)
    download_bytes: int = Field(default=1_000_000, ge=0)
    flops_per_step: PositiveFloat = 1e11
    server_flops_per_update: NonNegFloat = 1e9


class PartitionConfig(Config):
    name: str = "dirichlet"
    alpha: PositiveFloat = 0.5  # dirichlet concentration (smaller = more label skew)
    exponent: PositiveFloat = 1.5  # quantity skew power law
    min_size: int = Field(default=2, ge=1)


class TaskConfig(Config):
    dataset: str = "bbc-news"
    kind: Literal["classification", "multiple-choice", "generation"] = "classification"
    partition: PartitionConfig = PartitionConfig()
    max_train_examples: int | None = Field(default=None, ge=1)
    eval_examples: int = Field(default=200, ge=1)


class LoraConfig(Config):
    r: int = Field(default=8, ge=1, le=1024)
    alpha: PositiveFloat = 16
    dropout: Probability = 0.0
    target_roles: list[str] = Field(default_factory=lambda: ["q", "v"], min_length=1)


class TrainingConfig(Config):
    lora: LoraConfig = LoraConfig()
    lr: PositiveFloat = 5e-4
    weight_decay: NonNegFloat = 0.0
    local_steps: int = Field(default=10, ge=1)
    local_epochs: int | None = Field(default=None, ge=1)  # set: passes over local data instead
    batch_size: int = Field(default=16, ge=1)
    max_length: int = Field(default=64, ge=8, le=8192)
    # Loss over the job's examples before/after training (two extra forward passes, outside
    # the modelled FLOPs); off: first and last step losses stand in.
    quality_eval: bool = False


class CompressionConfig(Config):
    codec: str = "none"
    bits: int = 8
    ratio: Probability = 0.01
    rank: int = Field(default=2, ge=1)
    safety_margin: Probability = 0.8
    max_bytes: int | None = Field(default=None, ge=1)


class AggregationConfig(Config):
    name: str = "fedavg"
    eta: PositiveFloat = 1.0
    lars: bool = False
    quality: Literal["none", "loss-improvement"] = "loss-improvement"
    heterogeneity: Literal["none", "samples", "label-entropy"] = "samples"
    projector: str = "lstsq"
    trim_ratio: Annotated[float, Field(ge=0, lt=0.5)] = 0.1
    clip_norm: PositiveFloat = 1.0
    # An update whose L2 norm (all its tensors) exceeds this is quarantined at ingest: recorded
    # as rejected, never aggregated. null: no limit (NaN/Inf updates are always quarantined).
    max_update_norm: PositiveFloat | None = None


class RoundPolicyConfig(Config):
    """How rounds close: ``sync`` (all arrive), ``deadline`` (time's up), ``async`` (FedBuff)."""

    name: str = "sync"
    clients_per_round: int | None = Field(default=None, ge=1)  # None: every available client
    deadline_s: PositiveFloat | None = None
    buffer_size: int = Field(default=10, ge=1)  # async: aggregate every M arrivals
    concurrency: int = Field(default=20, ge=1)  # async: clients training at once
    staleness_exponent: NonNegFloat = 0.5  # async weight (1 + staleness)^-a (FedBuff)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from fedsim.engine import ROUND_POLICIES

        return ROUND_POLICIES.require(v)

    @model_validator(mode="after")
    def _deadline_needs_time(self) -> RoundPolicyConfig:
        if self.name == "deadline" and self.deadline_s is None:
            raise ValueError("round policy 'deadline' needs deadline_s")
        return self


class FaultsConfig(Config):
    """Faults of the simulated world, each a Poisson process (rates per hour of simulated
    time; 0 turns a fault off). Every fault is an event in events.csv."""

    # A client crashes while it works on an update (downloading, training or uploading):
    # the update is lost (``on_crash: drop``) or the client reboots for ``restart_s`` and
    # starts the update again (``retry``, at most ``crash_retries`` times, within the round).
    client_crash_per_h: NonNegFloat = 0.0
    on_crash: Literal["drop", "retry"] = "drop"
    crash_retries: int = Field(default=1, ge=0, le=100)
    restart_s: NonNegFloat = 30.0
    # A cell's base station goes down (uplink and downlink carry nothing) for an exponential
    # time of mean ``link_outage_s``; its flows stall and resume (wired clients are spared).
    link_outage_per_h: NonNegFloat = 0.0
    link_outage_s: PositiveFloat = 30.0
    # A server worker fails for ``server_repair_s``; the update it was serving is lost
    # (``on_server_failure: drop``) or queued again (``requeue``).
    server_failure_per_h: NonNegFloat = 0.0
    server_repair_s: PositiveFloat = 60.0
    on_server_failure: Literal["drop", "requeue"] = "requeue"


class ExecutorConfig(Config):
    """Where training jobs run (``fedsim.executors``): ``inline`` (here), ``process`` (a local
    pool of ``workers``) or ``ray`` (``workers`` actors; ``address: auto`` joins a running
    cluster, none starts a local one)."""

    name: str = "inline"
    workers: int = Field(default=2, ge=1, le=1024)
    address: str | None = None
    # torch threads of every training job, wherever it runs: a float sum's order depends on
    # the thread count, so fixing it keeps results bit-identical across executors.
    threads_per_job: int = Field(default=1, ge=1, le=256)
    max_retries: int = Field(default=1, ge=0, le=10)  # resubmissions after a worker dies
    job_timeout_s: float | None = Field(default=None, gt=0)  # wall seconds; None: no limit

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from fedsim.executors import EXECUTORS

        return EXECUTORS.require(v)

    @model_validator(mode="after")
    def _address_for_ray(self) -> ExecutorConfig:
        if self.address is not None and self.name != "ray":
            raise ValueError(f"address is for the ray executor, not {self.name!r}")
        return self


class OutputConfig(Config):
    dir: str = Field(default="runs", min_length=1, max_length=1024)
    events: bool = True  # write events.csv (large for 10k-client sweeps)
    # Checkpoint at every N-th round boundary into <run dir>/checkpoints/ (fedsim run
    # --resume DIR continues from the last). sync and deadline rounds only.
    checkpoint_every: int | None = Field(default=None, ge=1)

    @field_validator("dir")
    @classmethod
    def _inside(cls, v: str) -> str:
        # A scenario file travels between people: the runs it writes stay under the directory
        # it is run from. Elsewhere is the user's explicit choice: --out.
        p = PurePosixPath(v.replace("\\", "/"))
        if p.is_absolute() or ".." in p.parts or "\0" in v or re.match(r"^[A-Za-z]:", v):
            raise ValueError(f"must be a relative path without '..' (runs stay under the "
                             f"working directory; use --out for another place), got {v!r}")
        return v


class Scenario(Config):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    rounds: int = Field(ge=1, le=1_000_000)
    workload: WorkloadConfig = WorkloadConfig()
    clients: list[ClientGroup] = Field(min_length=1)
    server: ServerConfig = ServerConfig()
    network: NetworkConfig = NetworkConfig()
    task: TaskConfig = TaskConfig()
    training: TrainingConfig = TrainingConfig()
    compression: CompressionConfig = CompressionConfig()
    aggregation: AggregationConfig = AggregationConfig()
    round_policy: RoundPolicyConfig = RoundPolicyConfig()
    executor: ExecutorConfig = ExecutorConfig()
    faults: FaultsConfig = FaultsConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _checkpoints_need_rounds(self) -> Scenario:
        if self.output.checkpoint_every and self.round_policy.name == "async":
            raise ValueError("output.checkpoint_every: async runs cannot be checkpointed (their "
                             "updates overlap every aggregation; use sync or deadline rounds)")
        return self

    @model_validator(mode="after")
    def _cells_exist(self) -> Scenario:
        n = len(self.network.cells)
        for i, g in enumerate(self.clients):
            for c in g.cells or []:
                if not 0 <= c < n:
                    raise ValueError(f"clients.{i}.cells: cell {c} does not exist ({n} cells)")
        return self

    @property
    def num_clients(self) -> int:
        return sum(g.count for g in self.clients)

    def to_yaml(self) -> str:
        """The fully resolved scenario, defaults included (written to the run directory)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --- loading and overrides -------------------------------------------------------------------


def _format_errors(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        out.append(f"{path}: {msg}" if path else msg)
    return out


def _parse_value(text: str) -> Any:
    """An override value as YAML scalars read it (``50`` -> int, ``true`` -> bool, ``[1,2]``)."""
    try:
        return yaml.safe_load(text) if text.strip() else text
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: a 5,000-digit integer
        return text


def _field_exists(model: type[BaseModel], parts: list[str]) -> str | None:
    """Why the dotted path does not name a scenario field, or None when it does."""
    current: Any = model
    for depth, part in enumerate(parts):
        where = ".".join(parts[: depth + 1])
        origin = getattr(current, "__origin__", None)
        if isinstance(current, type) and issubclass(current, BaseModel):
            if part not in current.model_fields:
                return f"{where}: no such key"
            current = current.model_fields[part].annotation
            current = _unwrap_optional(current)
        elif origin is list:
            if not part.isdigit():
                return f"{where}: list index expected, got {part!r}"
            current = _unwrap_optional(current.__args__[0])
        elif origin is dict:
            current = _unwrap_optional(current.__args__[1])
        else:
            return f"{where}: {'.'.join(parts[:depth])} is not a mapping"
    return None


def _unwrap_optional(tp: Any) -> Any:
    args = getattr(tp, "__args__", ())
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return tp


def _default(model: Any, part: str) -> Any:
    """The schema default of field ``part`` of ``model`` as plain data ({} when none)."""
    if isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
        value = model.model_fields[part].get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        if isinstance(value, list):
            return [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
        if value is not None and value is not PydanticUndefined:
            return value
    return {}


def _child_model(model: Any, part: str) -> Any:
    if isinstance(model, type) and issubclass(model, BaseModel):
        return _unwrap_optional(model.model_fields[part].annotation)
    args = getattr(model, "__args__", ())
    return _unwrap_optional(args[-1]) if args else None


def apply_override(doc: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.0.c=value`` to the raw document.

    Sections the document leaves out are filled in from the schema defaults first, so
    ``network.cells.0.sharing=tdma`` edits the default cell.
    """
    if "=" not in assignment:
        raise ScenarioError([f"{assignment}: override must be key=value"], "--set")
    key, _, text = assignment.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ScenarioError([f"{key}: empty key segment"], "--set")
    problem = _field_exists(Scenario, parts)
    if problem:
        raise ScenarioError([problem], "--set")
    node: Any = doc
    model: Any = Scenario
    for depth, part in enumerate(parts):
        where = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, list):
            idx = int(part)
            if idx >= len(node):
                raise ScenarioError([f"{where}: index {idx} out of range ({len(node)} items)"],
                                    "--set")
            if last:
                node[idx] = _parse_value(text)
                return
            child = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = _parse_value(text)
                return
            if node.get(part) is None:
                node[part] = _default(model, part)
            child = node[part]
        else:
            raise ScenarioError([f"{where}: {'.'.join(parts[:depth])} is not a mapping"],
                                "--set")
        model = _child_model(model, part)
        node = child


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FedsimError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FedsimError(f"{path}: is a directory, expected a scenario YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FedsimError(f"{path}: cannot read: {e}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise FedsimError(f"{path}: malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise FedsimError(f"{path}: YAML nested too deeply") from None
    except (ValueError, OverflowError) as e:  # found by fuzzing: a 5,000-digit integer
        raise FedsimError(f"{path}: unreadable YAML value: {str(e).split(';')[0]}") from None
    if not isinstance(doc, dict):
        kind = "empty" if doc is None else type(doc).__name__
        raise FedsimError(f"{path}: a scenario is a YAML mapping, got {kind}")
    return doc


def validate(doc: dict[str, Any], source: str = "scenario") -> Scenario:
    """Validate a raw document; raise :class:`ScenarioError` listing every problem."""
    try:
        return Scenario.model_validate(doc)
    except ValidationError as e:
        raise ScenarioError(_format_errors(e), source) from None
    except (RecursionError, OverflowError, TypeError) as e:
        raise ScenarioError([f"cannot validate: {type(e).__name__}: {e}"], source) from None


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Scenario:
    """Read, override and validate a scenario file."""
    path = Path(path)
    doc = _read(path)
    for assignment in overrides:
        apply_override(doc, assignment)
    return validate(doc, str(path))

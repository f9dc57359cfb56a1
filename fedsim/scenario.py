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
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticUndefined

from fedsim.errors import FedsimError
from fedsim.plugins import (
    AGGREGATORS,
    ATTACKS,
    CHANNELS,
    CODECS,
    DATASETS,
    EXECUTORS,
    PARTITIONERS,
    ROUND_POLICIES,
    SELECTORS,
    TASKS,
    TRANSFERS,
    WORKLOADS,
    Config,
    DirichletPartitionConfig,
    FedAvgConfig,
    InlineExecutorConfig,
    NoneCodecConfig,
    NonNegFloat,
    PluginConfig,
    PositiveFloat,
    Probability,
    ProjectionTransferConfig,
    RealWorkloadConfig,
    StaticChannelConfig,
    SyncRoundsConfig,
    UniformSelectorConfig,
    check_model_name,
    model_note,
)
from fedsim.registry import Registry
from fedsim.roles import ROLES


class ScenarioError(FedsimError):
    """A scenario that cannot run; ``errors`` holds one ``path.to.key: message`` per problem."""

    def __init__(self, errors: list[str], source: str = "scenario") -> None:
        self.errors = errors
        super().__init__(f"{source}: invalid scenario\n" + "\n".join(f"  {e}" for e in errors))


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
    train_power_w: NonNegFloat | None = None
    tx_circuit_w: NonNegFloat | None = None
    pa_efficiency: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    rx_power_w: NonNegFloat | None = None
    idle_power_w: NonNegFloat | None = None
    cpu_hz: PositiveFloat | None = None
    battery_wh: PositiveFloat | None = None

    @field_validator("distance_m")
    @classmethod
    def _ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and v[0] > v[1]:
            raise ValueError(f"distance_m must be [min, max] with min <= max, got {list(v)}")
        return v


class EnergyConfig(Config):
    """How update energy is modelled (see ``fedsim.energy``): ``compute: power`` (the profile's
    training watts x compute time) or ``kappa`` (κ·f³ x compute time); batteries start at
    ``initial_charge`` and clients below ``min_charge`` leave availability (0: never)."""

    compute: Literal["power", "kappa"] = "power"
    kappa: PositiveFloat = 1e-28  # effective switched capacitance (Yang et al. 2021)
    initial_charge: Probability = 1.0
    min_charge: Probability = 0.0


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
    attack: ATTACKS.union() | None = None  # set: every client of the group is malicious

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
    # The site's coordinates (m), for interference; unset: the hexagonal layout's place.
    position_m: tuple[float, float] | None = None


class InterferenceConfig(Config):
    """Uplink inter-cell interference (see ``fedsim.interference``): ``none`` (noise-limited
    cells, as before) or ``load`` (co-channel neighbours' active transmitters), with frequency
    ``reuse`` 1 or 3, on a hexagonal layout of ``inter_site_distance_m`` unless every cell
    gives its ``position_m``."""

    model: Literal["none", "load"] = "none"
    reuse: Literal[1, 3] = 1
    inter_site_distance_m: PositiveFloat = 500.0  # 3GPP TR 38.901 UMa


class MobilityConfig(Config):
    """How clients move (see ``fedsim.mobility``): ``static`` (as before), ``random-waypoint``
    or ``trace`` (a CSV of positions); positions update every ``update_s``."""

    model: Literal["static", "random-waypoint", "trace"] = "static"
    speed_mps: tuple[NonNegFloat, NonNegFloat] = (0.5, 1.5)  # pedestrians
    pause_s: NonNegFloat = 30.0
    update_s: PositiveFloat = 1.0
    trace_path: str | None = None
    decorrelation_m: PositiveFloat = 50.0  # Gudmundson; 3GPP TR 36.814 UMa: 50 m
    handover: bool = False
    hysteresis_db: NonNegFloat = 3.0

    @model_validator(mode="after")
    def _consistent(self) -> MobilityConfig:
        if self.speed_mps[0] > self.speed_mps[1]:
            raise ValueError(f"speed_mps must be [min, max] with min <= max, got "
                             f"{list(self.speed_mps)}")
        if self.model == "trace" and not self.trace_path:
            raise ValueError("trace_path: mobility model trace needs a CSV of positions")
        return self


class NetworkConfig(Config):
    channel: CHANNELS.union("static") = StaticChannelConfig()
    cells: list[CellConfig] = Field(default_factory=lambda: [CellConfig()], min_length=1)
    interference: InterferenceConfig = InterferenceConfig()
    mobility: MobilityConfig = MobilityConfig()
    # Where clients have positions (interference or mobility on): ``nearest`` serves each one
    # from its nearest site once placed (the path-loss-strongest, as system-level simulators
    # attach users); ``drawn`` from the cell it was dropped around (its group's ``cells``).
    association: Literal["nearest", "drawn"] = "nearest"

    @model_validator(mode="after")
    def _interference_needs_a_radio_channel(self) -> NetworkConfig:
        if self.interference.model != "none" and not self.channel.has_snr:
            raise ValueError(f"network.interference.model: {self.interference.model} needs a "
                             f"channel with a signal-to-noise ratio (network.channel.name="
                             f"pathloss), got {self.channel.name}")
        if self.mobility.model != "static" and not self.channel.has_snr:
            raise ValueError(f"network.mobility.model: {self.mobility.model} needs a channel "
                             f"whose rates follow the distance (network.channel.name=pathloss), "
                             f"got {self.channel.name}")
        positions = [c.position_m is not None for c in self.cells]
        if any(positions) and not all(positions):
            raise ValueError("network.cells: give position_m for every cell or for none")
        return self


# --- server, task, training ------------------------------------------------------------------


class ServerConfig(Config):
    # The larger model the clients' projected task vectors merge into (real workload); null:
    # no server model, the families' FedAvg adapters are the result.
    model: str | None = "tiny-mpnet"
    # Server-side held-out examples (from the test split, after the evaluation slice): their
    # texts are the projectors' probe corpus (unlabelled use) ...
    probe_examples: int = Field(default=200, ge=1)
    # ... and, for classification, their labels fit the server's head as a linear probe on the
    # frozen model: the server's starting point. false (no labelled server data): the head's
    # final layer starts at zero, so what it tells apart comes from the clients' updates.
    linear_probe: bool = True
    workers: int = Field(default=1, ge=1, le=1024)  # ingress workers (simpy.Resource capacity)
    queue_capacity: int = Field(default=100, ge=0)  # waiting updates beyond which we drop
    flops_per_s: PositiveFloat = 50e12  # one A100-class GPU at ~15% of 312 TFLOP/s bf16
    wired_rate_bps: PositiveFloat = 10e9  # datacenter NIC


class TaskConfig(Config):
    dataset: str = "bbc-news"
    kind: str = "classification"  # a task (registry TASKS) the dataset offers
    partition: PARTITIONERS.union("dirichlet") = DirichletPartitionConfig()
    max_train_examples: int | None = Field(default=None, ge=1)
    eval_examples: int = Field(default=200, ge=1)
    # Held-out examples (the first of the evaluation slice) each client's own last model is
    # scored on at the end (summary quality.clients_final); 0: not scored. A minilm-l6 client
    # on 100 articles costs ~2.2 CPU-s here: at 10 clients, a tenth of the quickstart's work.
    client_eval_examples: int = Field(default=100, ge=0)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        return DATASETS.require(v)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        return TASKS.require(v)

    @model_validator(mode="after")
    def _dataset_has_kind(self) -> TaskConfig:
        tasks = DATASETS.get(self.dataset).tasks
        if self.kind not in tasks:
            raise ValueError(f"kind: dataset {self.dataset!r} has no task {self.kind!r}; its "
                             f"tasks: {', '.join(tasks)}")
        return self


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
    # Examples of each client's partition held out as its local validation split when the
    # aggregation weighs loss improvement (task-arithmetic's quality): never trained on, their
    # mean loss measured before and after each job (two forward passes, in the job's FLOPs).
    # 0: no split; the first and last step losses stand in (other examples: a noisy proxy).
    validation_examples: int = Field(default=8, ge=0, le=100_000)
    # The arithmetic of the training steps: fp32, or bf16 under torch.autocast (CPU AMX or a
    # GPU's tensor cores; weights, optimizer and adapters stay fp32). Results differ from fp32
    # within bf16's precision and are deterministic in their own right; the modelled FLOPs,
    # and so the simulated timeline, do not change. Evaluation stays fp32.
    precision: Literal["fp32", "bf16"] = "fp32"

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, doc: Any) -> Any:
        if isinstance(doc, dict) and "quality_eval" in doc:
            raise ValueError("quality_eval: removed; the loss improvement is now measured on a "
                             "held-out local validation split: set training.validation_examples "
                             "(its size; 0 = first and last step losses)")
        return doc


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
    workload: WORKLOADS.union("real") = RealWorkloadConfig()
    clients: list[ClientGroup] = Field(min_length=1)
    server: ServerConfig = ServerConfig()
    network: NetworkConfig = NetworkConfig()
    task: TaskConfig = TaskConfig()
    training: TrainingConfig = TrainingConfig()
    compression: CODECS.union("none") = NoneCodecConfig()
    aggregation: AGGREGATORS.union("fedavg") = FedAvgConfig()
    transfer: TRANSFERS.union("projection") = ProjectionTransferConfig()
    round_policy: ROUND_POLICIES.union("sync") = SyncRoundsConfig()
    selection: SELECTORS.union("uniform") = UniformSelectorConfig()
    executor: EXECUTORS.union("inline") = InlineExecutorConfig()
    faults: FaultsConfig = FaultsConfig()
    energy: EnergyConfig = EnergyConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, doc: Any) -> Any:
        """Keys of earlier versions, read at their new place (see ``MOVED``)."""
        return migrate(doc)

    @model_validator(mode="after")
    def _checkpoints_need_rounds(self) -> Scenario:
        if self.output.checkpoint_every and not self.round_policy.checkpoints:
            raise ValueError(f"output.checkpoint_every: {self.round_policy.name} rounds cannot "
                             "be checkpointed (their updates overlap every aggregation; use "
                             "sync or deadline rounds)")
        if (self.output.checkpoint_every and not self.round_policy.checkpoints_server_failures
                and self.faults.server_failure_per_h > 0):
            raise ValueError(f"output.checkpoint_every: {self.round_policy.name} runs with "
                             "server failures "
                             "(faults.server_failure_per_h) cannot be checkpointed yet: an "
                             "update preempted in service is not restored")
        return self

    @model_validator(mode="after")
    def _distillation_needs_a_server(self) -> Scenario:
        if self.transfer.name != "distillation":
            return self
        if self.server.model is None or not self.workload.trains_models:
            raise ValueError("transfer.name: distillation needs a server model to distil into "
                             "(server.model) and the real workload")
        source = self.transfer.proxy.source
        if source != "held-out" and self.task.kind != "classification":
            raise ValueError(f"transfer.proxy.source: an out-of-domain corpus ({source!r}) "
                             f"serves classification only (a {self.task.kind} proxy needs the "
                             "task's own inputs: use held-out)")
        if source == self.task.dataset:
            raise ValueError(f"transfer.proxy.source: {source!r} is the task's own dataset, "
                             "whose test split is scored: use held-out (the texts after the "
                             "evaluation slice)")
        unknown = [r for r in self.transfer.server_roles if r not in ROLES]
        if unknown or not self.transfer.server_roles:
            raise ValueError(f"transfer.server_roles: {unknown or 'none'}: roles are "
                             f"{', '.join(ROLES)}")
        return self

    @model_validator(mode="after")
    def _selection_fits_the_rounds(self) -> Scenario:
        problem = self.selection.check_rounds(self.round_policy)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _models_exist(self) -> Scenario:
        if not self.workload.trains_models:
            return self  # the synthetic workload loads no model
        errors = []
        named = [(f"clients.{i}.model", g.model) for i, g in enumerate(self.clients)]
        if self.server.model is not None:
            named.append(("server.model", self.server.model))
        for where, name in named:
            try:
                check_model_name(name)
            except ValueError as e:
                errors.append(f"{where}: {e}")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def notes(self) -> list[str]:
        """What a user should know before running it (a model that needs network)."""
        if not self.workload.trains_models:
            return []
        names = [g.model for g in self.clients] + [self.server.model or ""]
        return [n for name in dict.fromkeys(names) if name and (n := model_note(name))]

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

# Keys of earlier versions and where they live now: still read, at their new place.
MOVED = {"aggregation.projector": "transfer.projector"}


def migrate(doc: Any) -> Any:
    """``doc`` with every key of ``MOVED`` at its new place (a copy; the new key wins)."""
    if not isinstance(doc, dict):
        return doc
    doc = dict(doc)
    for old, new in MOVED.items():
        (osec, okey), (nsec, nkey) = old.split("."), new.split(".")
        section = doc.get(osec)
        if not isinstance(section, dict) or okey not in section:
            continue
        doc[osec] = {k: v for k, v in section.items() if k != okey}
        target = doc.get(nsec)
        target = dict(target) if isinstance(target, dict) else {}
        target.setdefault(nkey, section[okey])
        doc[nsec] = target
    return doc


def _strip(tp: Any) -> Any:
    """``tp`` without ``Annotated`` metadata and without ``None`` in a union."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
            continue
        if get_origin(tp) in (Union, UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) == 1:
                tp = args[0]
                continue
        return tp


def _models(tp: Any) -> list[type[BaseModel]] | None:
    """The config classes a field of type ``tp`` can hold (several for a plug-in union)."""
    tp = _strip(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    if get_origin(tp) in (Union, UnionType):
        found = [m for a in get_args(tp) for m in (_models(a) or [])]
        return found or None
    return None


def _plugin(tp: Any) -> Registry[Any] | None:
    """The registry whose entries a field of type ``tp`` names, if it is a plug-in section."""
    members = _models(tp)
    if members and all(issubclass(m, PluginConfig) for m in members):
        return members[0].registry  # type: ignore[attr-defined]
    return None


def _child(tp: Any, part: str) -> tuple[Any, str | None]:
    """The type at key ``part`` inside a value of type ``tp``, or (None, why not)."""
    members = _models(tp)
    if members is not None:
        having = [m for m in members if part in m.model_fields]
        if not having:
            return None, "no such key"
        return having[0].model_fields[part].annotation, None
    tp = _strip(tp)
    origin, args = get_origin(tp), get_args(tp)
    if origin is list:
        return (args[0], None) if part.isdigit() else (None, f"list index expected, got {part!r}")
    if origin is dict:
        return args[1], None
    return None, "not a mapping"


_KEYED = re.compile(r"^([a-z_][a-z0-9_]*): ")


def _plural(family: str) -> str:
    return family[:-1] + "ies" if family.endswith("y") else family + "s"


def _format_errors(err: ValidationError) -> list[str]:
    """Each error as ``path.to.key: message``, the union tags pydantic puts in the path left
    out (``compression.qsgd.rank`` is ``compression.rank``) and plug-in errors said plainly."""
    out = []
    for e in err.errors():
        tp: Any = Scenario
        path: list[str] = []
        entry: tuple[Registry[Any], str] | None = None  # the plug-in entry the key is in
        for part in (str(p) for p in e["loc"]):
            reg = _plugin(tp) if tp is not None else None
            if reg is not None and part in reg.names() and len(_models(tp) or []) > 1:
                entry, tp = (reg, part), reg.config(part)
                continue
            tp, _ = _child(tp, part) if tp is not None else (None, None)
            path.append(part)
        msg = e["msg"].removeprefix("Value error, ")
        reg = _plugin(tp) if tp is not None else None
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            if entry is not None and len(path) and entry[0].key != path[-1]:
                family, takers = entry[0].family, entry[0].taking(path[-1])
                msg = f"not an option of {family} {entry[1]!r}" + (
                    f"; {_plural(family)} that take it: {', '.join(takers)}" if takers else "")
        elif e["type"] == "union_tag_invalid" and reg is not None:
            path.append(reg.key)
            msg = reg._unknown(e["ctx"]["tag"])
        elif e["type"] == "union_tag_not_found" and reg is not None:
            path.append(reg.key)
            msg = f"required: the {reg.family} (one of {', '.join(reg.names())})"
        where = ".".join(path)
        for m in msg.split("\n"):
            # A section's own rule names its key first ("kind: ..."): one path for both.
            key = _KEYED.match(m)
            sep = "." if where and key and _child(tp, key.group(1))[1] is None else ": "
            out.append(f"{where}{sep}{m}" if where else m)
    return out


def _parse_value(text: str) -> Any:
    """An override value as YAML scalars read it (``50`` -> int, ``true`` -> bool, ``[1,2]``)."""
    try:
        return yaml.safe_load(text) if text.strip() else text
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: a 5,000-digit integer
        return text


def _field_exists(parts: list[str]) -> str | None:
    """Why the dotted path does not name a scenario field, or None when it does."""
    tp: Any = Scenario
    for depth, part in enumerate(parts):
        where = ".".join(parts[: depth + 1])
        reg = _plugin(tp)
        tp, why = _child(tp, part)
        if why == "not a mapping":
            return f"{where}: {'.'.join(parts[:depth])} is not a mapping"
        if why is not None:
            if reg is not None and why == "no such key":
                why += f" (no {reg.family} takes it)"
            return f"{where}: {why}"
    return None


def _default(tp: Any, part: str) -> Any:
    """The schema default of field ``part`` of a value of type ``tp``, as plain data ({}
    when none)."""
    members = _models(tp) or []
    model = members[0] if len(members) == 1 else None
    if model is not None and part in model.model_fields:
        value = model.model_fields[part].get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        if isinstance(value, list):
            return [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
        if value is not None and value is not PydanticUndefined:
            return value
    return {}


def _discriminator(parts: list[str]) -> Registry[Any] | None:
    """The registry when ``parts`` is the key that names a plug-in (``compression.codec``)."""
    tp: Any = Scenario
    for part in parts[:-1]:
        tp, why = _child(tp, part)
        if why is not None:
            return None
    reg = _plugin(tp)
    return reg if reg is not None and parts[-1] == reg.key else None


def _switch(section: dict[str, Any], reg: Registry[Any], name: Any) -> None:
    """A plug-in switched by an override keeps only the options the new entry takes: the
    document's options for the old one do not follow it (a sweep over codecs)."""
    if isinstance(name, str) and name in reg.names():
        fields = reg.config(name).model_fields
        for k in [k for k in section if k not in fields]:
            del section[k]


def apply_override(doc: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.0.c=value`` to the raw document.

    Sections the document leaves out are filled in from the schema defaults first, so
    ``network.cells.0.sharing=tdma`` edits the default cell. A key of ``MOVED`` is set at its
    new place. Setting the key that names a plug-in (``compression.codec=qsgd``) drops the
    section's options that the new entry does not take.
    """
    if "=" not in assignment:
        raise ScenarioError([f"{assignment}: override must be key=value"], "--set")
    key, _, text = assignment.partition("=")
    key = MOVED.get(key.strip(), key.strip())
    parts = key.split(".")
    if not all(parts):
        raise ScenarioError([f"{key}: empty key segment"], "--set")
    problem = _field_exists(parts)
    if problem:
        raise ScenarioError([problem], "--set")
    switching = _discriminator(parts)
    node: Any = doc
    tp: Any = Scenario
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
                node[part] = value = _parse_value(text)
                if switching is not None:
                    _switch(node, switching, value)
                return
            if node.get(part) is None:
                node[part] = _default(tp, part)
            child = node[part]
        else:
            raise ScenarioError([f"{where}: {'.'.join(parts[:depth])} is not a mapping"],
                                "--set")
        tp, _ = _child(tp, part)
        node = child


def _names_plugin(assignment: str) -> bool:
    key = assignment.partition("=")[0].strip()
    return _discriminator(MOVED.get(key, key).split(".")) is not None


def apply_overrides(doc: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    """Every override, those that switch a plug-in first: an option given beside a switch
    applies to the new entry, whatever the order of the flags."""
    for assignment in sorted(overrides, key=lambda a: not _names_plugin(a)):
        apply_override(doc, assignment)


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
    doc = migrate(_read(path))
    apply_overrides(doc, overrides)
    return validate(doc, str(path))

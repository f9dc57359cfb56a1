"""Device profiles: what a mobile phone, a laptop and a cloud GPU can compute, hold and send.

Every number carries its source. Effective FLOP/s are *training* throughputs (fraction of peak
actually reached by small-batch fp32/fp16 LoRA steps), not datasheet peaks.

A :class:`Fleet` holds one row per client as numpy arrays, so the channel can compute the rates
of thousands of flows at once; per-client values are drawn around the preset with a lognormal
spread (median = preset) from the scenario's seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from fedsim.scenario import Scenario


@dataclass(frozen=True)
class DeviceProfile:
    flops_per_s: float  # effective training FLOP/s
    memory_gib: float  # memory one training job may use
    tx_power_dbm: float  # uplink transmit power
    antenna_gain_dbi: float
    noise_figure_db: float  # receiver noise figure of the device (downlink)
    distance_m: tuple[float, float]  # drawn area-uniformly in this annulus around the cell
    wired_rate_bps: float | None  # None: wireless (shares a cell); else a dedicated wired link
    mean_on_s: float  # availability: on/off Markov chain, exponential holding times
    mean_off_s: float  # 0: always available
    # Energy (fedsim.energy): watts while training, the radio's circuit power and its power
    # amplifier's efficiency while transmitting, watts while receiving, the idle floor.
    train_power_w: float = 0.0
    tx_circuit_w: float = 0.0
    pa_efficiency: float = 1.0
    rx_power_w: float = 0.0
    idle_power_w: float = 0.0
    cpu_hz: float = 1e9  # clock of the κ·f³ compute-energy model
    battery_wh: float | None = None  # None: mains powered


PROFILES: dict[str, DeviceProfile] = {
    "mobile": DeviceProfile(
        # FedScale's device traces (AI-Benchmark compute): flagship phone GPUs peak ~1-2 TFLOP/s
        # fp16; on-device training frameworks reach a few percent of that -> 5e10 FLOP/s.
        flops_per_s=5e10,
        # 8 GiB phones; Android's low-memory killer leaves an app about half -> 4 GiB.
        memory_gib=4.0,
        tx_power_dbm=23.0,  # 3GPP TS 38.101-1 UE power class 3
        antenna_gain_dbi=0.0,  # 3GPP TR 36.814 Table A.2.1.1-3 (UE antenna gain 0 dBi)
        noise_figure_db=9.0,  # 3GPP TR 36.814 Table A.2.1.1-3 (UE noise figure 9 dB)
        distance_m=(35.0, 500.0),  # 3GPP TR 38.901 UMa: min 35 m; 500 m inter-site distance
        wired_rate_bps=None,
        # FedScale availability traces (Yang et al. 2021, 136k phones): short, frequent
        # sessions; on ~1 h, off ~20 min on average.
        mean_on_s=3600.0,
        mean_off_s=1200.0,
        # A flagship SoC's GPU under sustained load draws 3-5 W (AnandTech's Snapdragon 8 Gen
        # 1/2 GPU power measurements) -> 4 W.
        train_power_w=4.0,
        # Huang et al. 2012 ("A close examination of performance and power characteristics of
        # 4G LTE networks", MobiSys): LTE radio base power 1.288 W; a class-3 handset PA is
        # ~35% efficient at full power (23 dBm = 0.2 W out -> 0.57 W in): 1.86 W sending.
        tx_circuit_w=1.288,
        pa_efficiency=0.35,
        rx_power_w=1.8,  # Huang et al. 2012: ~1.8 W receiving at ~10 Mbit/s
        idle_power_w=0.07,  # Carroll & Heiser 2010 (USENIX ATC): a suspended phone ~69 mW
        cpu_hz=2.0e9,  # big cores of a phone SoC; kappa 1e-28 -> 0.8 W (Yang et al. 2021)
        battery_wh=15.4,  # 4000 mAh at 3.85 V
    ),
    "laptop": DeviceProfile(
        # 8-core laptop CPU, AVX2 fp32 peak ~1 TFLOP/s, ~30% in PyTorch GEMMs -> 3e11.
        flops_per_s=3e11,
        memory_gib=8.0,  # half of a 16 GiB laptop
        tx_power_dbm=23.0,  # LTE/NR M.2 modems are power class 3 too (TS 38.101-1)
        antenna_gain_dbi=0.0,
        noise_figure_db=7.0,  # better RF front end than a phone (typical modem datasheets)
        distance_m=(35.0, 300.0),  # indoor, nearer the site on average
        wired_rate_bps=None,
        mean_on_s=7200.0,  # laptops stay up longer than phones (FedScale traces, desktop class)
        mean_off_s=1800.0,
        train_power_w=28.0,  # a U-series laptop CPU's sustained package power (PL1 = 28 W)
        tx_circuit_w=1.288,  # the same LTE modem class as a phone (Huang et al. 2012)
        pa_efficiency=0.35,
        rx_power_w=1.8,
        idle_power_w=2.0,  # a laptop idling with its screen off draws ~1-3 W
        cpu_hz=3.0e9,
        battery_wh=56.0,  # a typical 13-14" laptop battery
    ),
    "cloud": DeviceProfile(
        # One A100: 312 TFLOP/s bf16 peak; small-batch LoRA reaches ~15% -> 5e13.
        flops_per_s=5e13,
        memory_gib=40.0,  # A100-40GB
        tx_power_dbm=0.0,  # unused: wired
        antenna_gain_dbi=0.0,
        noise_figure_db=0.0,
        distance_m=(1.0, 1.0),
        wired_rate_bps=1e9,  # 1 Gbit/s datacenter egress per client VM
        mean_on_s=86400.0,
        mean_off_s=0.0,  # always available
        train_power_w=400.0,  # A100 SXM TDP
        idle_power_w=50.0,  # an idle A100 draws ~50 W
        cpu_hz=1.41e9,  # A100 boost clock (the kappa model is meant for mobile CPUs)
        battery_wh=None,  # mains
    ),
}

ENERGY_FIELDS = ("train_power_w", "tx_circuit_w", "pa_efficiency", "rx_power_w", "idle_power_w",
                 "cpu_hz")
# Numeric fields that a group may draw per client with a lognormal spread.
SPREADABLE_FIELDS = ("flops_per_s", "memory_gib", "wired_rate_bps", "mean_on_s", "mean_off_s")


def resolve_profile(name: str, overrides: dict[str, object]) -> DeviceProfile:
    """The preset with a group's overrides applied (only fields the group set)."""
    base = PROFILES[name]
    known = {f.name for f in fields(DeviceProfile)}
    return replace(base, **{k: v for k, v in overrides.items() if k in known and v is not None})


@dataclass(frozen=True)
class Fleet:
    """Every client of a scenario, one row each (index = client id)."""

    group: np.ndarray  # int: index of the client group
    profile: tuple[str, ...]  # profile name per client
    model: tuple[str, ...]  # model name per client
    cell: np.ndarray  # int: cell index (-1 for wired clients)
    flops_per_s: np.ndarray
    memory_gib: np.ndarray
    tx_power_dbm: np.ndarray
    antenna_gain_dbi: np.ndarray
    noise_figure_db: np.ndarray
    distance_m: np.ndarray
    wired_rate_bps: np.ndarray  # nan for wireless clients
    mean_on_s: np.ndarray
    mean_off_s: np.ndarray
    train_power_w: np.ndarray
    tx_circuit_w: np.ndarray
    pa_efficiency: np.ndarray
    rx_power_w: np.ndarray
    idle_power_w: np.ndarray
    cpu_hz: np.ndarray
    battery_wh: np.ndarray  # inf: mains powered

    @property
    def size(self) -> int:
        return len(self.group)

    @property
    def wired(self) -> np.ndarray:
        return ~np.isnan(self.wired_rate_bps)

    def profile_index(self) -> dict[str, np.ndarray]:
        """Client ids of each profile present."""
        names = np.array(self.profile)
        return {p: np.flatnonzero(names == p) for p in dict.fromkeys(self.profile)}


def _area_uniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    """Distances of points uniform over an annulus (density grows with the radius)."""
    return np.sqrt(rng.uniform(lo * lo, hi * hi, size=n))


def _spread(rng: np.random.Generator, value: float, sigma: float, n: int) -> np.ndarray:
    """Lognormal around ``value`` (its median), sigma of ln; sigma 0 gives the value itself."""
    return value * np.exp(sigma * rng.standard_normal(n)) if sigma > 0 else np.full(n, value)


def build_fleet(scenario: Scenario, rng: np.random.Generator) -> Fleet:
    """Draw every client's device from its group's profile, overrides and spread."""
    n_cells = len(scenario.network.cells)
    cols: dict[str, list[np.ndarray]] = {f: [] for f in Fleet.__dataclass_fields__}
    profiles: list[str] = []
    models: list[str] = []
    rr = 0  # round-robin position over cells, across groups, so cells fill evenly
    for gi, group in enumerate(scenario.clients):
        prof = resolve_profile(group.profile, group.overrides.model_dump())
        n = group.count
        cols["group"].append(np.full(n, gi))
        profiles += [group.profile] * n
        models += [group.model] * n
        if prof.wired_rate_bps is not None:
            cols["cell"].append(np.full(n, -1))
        else:
            allowed = np.array(group.cells if group.cells else range(n_cells))
            cols["cell"].append(allowed[(rr + np.arange(n)) % len(allowed)])
            rr += n
        for f in ("flops_per_s", "memory_gib", "mean_on_s", "mean_off_s"):
            cols[f].append(_spread(rng, getattr(prof, f), group.spread.get(f, 0.0), n))
        wired = np.nan if prof.wired_rate_bps is None else prof.wired_rate_bps
        sigma = group.spread.get("wired_rate_bps", 0.0) if prof.wired_rate_bps else 0.0
        cols["wired_rate_bps"].append(_spread(rng, wired, sigma, n))
        for f in ("tx_power_dbm", "antenna_gain_dbi", "noise_figure_db", *ENERGY_FIELDS):
            cols[f].append(np.full(n, getattr(prof, f)))
        cols["battery_wh"].append(np.full(n, np.inf if prof.battery_wh is None
                                          else prof.battery_wh))
        cols["distance_m"].append(_area_uniform(rng, *prof.distance_m, n))
    arrays = {k: np.concatenate(v) for k, v in cols.items() if v}
    return Fleet(profile=tuple(profiles), model=tuple(models), **arrays)

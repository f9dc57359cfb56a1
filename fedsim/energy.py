"""Energy: what each update costs a device in joules, and the batteries it drains.

Per update and phase (``fedsim.engine`` calls :meth:`Energy.spend` when a phase ends, completed
or cut short by a dropout, crash, deadline or outage):

- compute: ``energy.compute: power`` (default) charges the profile's training power times the
  modelled compute time, P·FLOPs/(FLOP/s); ``kappa`` the CMOS model of the wireless-FL papers,
  E = κ·cycles·f² with cycles = f·t (Mao et al. 2017; Yang et al. 2021, κ = 1e-28), i.e.
  a power of κ·f³ at the profile's clock ``cpu_hz``;
- uplink: the radio's power while it transmits, P_circuit + P_out/η_PA (P_out the transmit
  power ``tx_power_dbm``, η_PA the power amplifier's efficiency), times the airtime;
- downlink: the receive power times the airtime. Wired clients spend no radio energy.

A battery-powered device (``battery_wh``) starts at ``energy.initial_charge`` of its capacity and
drains by what its phases spend plus ``idle_power_w`` at all times (the device's floor); below
``energy.min_charge`` it leaves availability for the rest of the run (nobody recharges here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from fedsim.metrics import percentiles

if TYPE_CHECKING:
    from fedsim.devices import Fleet
    from fedsim.scenario import EnergyConfig

PHASES = ("compute", "uplink", "downlink")
J_PER_WH = 3600.0


def radio_tx_power_w(tx_power_dbm: np.ndarray, circuit_w: np.ndarray,
                     pa_efficiency: np.ndarray) -> np.ndarray:
    """The radio's draw while transmitting (W): circuit power + output power / PA efficiency."""
    out_w = 10.0 ** ((np.asarray(tx_power_dbm, dtype=float) - 30.0) / 10.0)  # dBm -> W
    return np.asarray(circuit_w, dtype=float) + out_w / np.asarray(pa_efficiency, dtype=float)


def compute_power_w(fleet: Fleet, cfg: EnergyConfig) -> np.ndarray:
    """Each client's power while training (W): the profile's figure, or κ·f³."""
    if cfg.compute == "kappa":
        return cfg.kappa * fleet.cpu_hz ** 3
    return fleet.train_power_w.astype(float)


class Energy:
    """Joules per client and phase, per-update samples per device class, battery charge."""

    def __init__(self, fleet: Fleet, cfg: EnergyConfig) -> None:
        self.fleet, self.cfg = fleet, cfg
        wireless = ~fleet.wired
        self.power_w = {
            "compute": compute_power_w(fleet, cfg),
            "uplink": np.where(wireless, radio_tx_power_w(
                fleet.tx_power_dbm, fleet.tx_circuit_w, fleet.pa_efficiency), 0.0),
            "downlink": np.where(wireless, fleet.rx_power_w, 0.0),
        }
        self.spent_j = {p: np.zeros(fleet.size) for p in PHASES}
        self.samples: dict[str, dict[str, list[float]]] = {
            prof: {p: [] for p in PHASES} for prof in dict.fromkeys(fleet.profile)}
        self.capacity_j = fleet.battery_wh * J_PER_WH  # inf: mains powered
        self.depleted = np.zeros(fleet.size, dtype=bool)

    def spend(self, client: int, phase: str, seconds: float) -> float:
        """Charge ``client`` for ``seconds`` of ``phase``; returns the joules."""
        joules = float(self.power_w[phase][client]) * max(seconds, 0.0)
        self.spent_j[phase][client] += joules
        self.samples[self.fleet.profile[client]][phase].append(joules)
        return joules

    def total_j(self) -> float:
        return float(sum(v.sum() for v in self.spent_j.values()))

    def charge(self, clients: np.ndarray, t: float) -> np.ndarray:
        """The charge of ``clients`` at ``t`` as a fraction of capacity (inf capacity: 1)."""
        used = sum(v[clients] for v in self.spent_j.values()) + self.fleet.idle_power_w[clients] * t
        cap = self.capacity_j[clients]
        with np.errstate(invalid="ignore", divide="ignore"):
            left = np.where(np.isinf(cap), 1.0, self.cfg.initial_charge - used / cap)
        return left

    def charged(self, clients: np.ndarray, t: float) -> np.ndarray:
        """Those of ``clients`` whose charge is at least ``min_charge`` (once below, gone)."""
        if not len(clients) or self.cfg.min_charge <= 0:
            return clients
        low = self.charge(clients, t) < self.cfg.min_charge
        self.depleted[clients[low]] = True
        return clients[~self.depleted[clients]]

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """``energy_j``: per device class and phase, p50/p95 per update and the total (J)."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for prof, phases in self.samples.items():
            out[prof] = {}
            for p, xs in phases.items():
                q = percentiles(xs)
                out[prof][p] = {"p50": q["p50"], "p95": q["p95"], "total": float(sum(xs))}
        return out

    def client_columns(self, t: float) -> dict[str, list[float]]:
        """clients.csv, every client: joules per phase and the final charge (fraction; 1:
        mains)."""
        every = np.arange(self.fleet.size)
        return {**{f"energy_{p}_j": self.spent_j[p].tolist() for p in PHASES},
                "battery_charge": self.charge(every, t).tolist()}

    # -- checkpoints ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"spent_j": {p: v.tolist() for p, v in self.spent_j.items()},
                "samples": self.samples, "depleted": self.depleted.tolist()}

    def restore(self, doc: dict[str, Any]) -> None:
        if not doc:
            return
        self.spent_j = {p: np.array(v, dtype=float) for p, v in doc["spent_j"].items()}
        self.samples = {prof: {p: list(xs) for p, xs in ph.items()}
                        for prof, ph in doc["samples"].items()}
        self.depleted = np.array(doc["depleted"], dtype=bool)

"""Mobility: clients that move, their path loss and shadowing following them, handover.

Positions live on the cells' layout (``fedsim.interference``: hexagonal at
``network.interference.inter_site_distance_m``, or each cell's ``position_m``); a client starts
at its drawn distance from its own site at a uniform angle. Every ``update_s`` seconds (an
epoch) each wireless client moves:

- ``random-waypoint``: towards a waypoint drawn uniformly in the disc that holds the layout
  (radius: the farthest site plus the farthest drawn distance), at a speed drawn uniformly in
  ``speed_mps``; on arrival it pauses ``pause_s``, then draws the next waypoint and speed;
- ``trace``: to the position a CSV gives at that time (header ``time_s,x_m,y_m[,client]``;
  linear between rows, the last row held; with a ``client`` column client ``i`` follows series
  ``i mod S``, without one every client follows the one series, as an offset from its start).

Path loss follows the distance to the serving site (128.1 + 37.6 log10(d_km), the channel's);
shadowing is spatially correlated (Gudmundson 1991): after moving Δd metres
``X ← ρ·X + sqrt(1 − ρ²)·σ·N(0, 1)`` with ρ = exp(−Δd / ``decorrelation_m``). With ``handover``
a client whose best site (path loss + its shadowing, taken as common to all sites) beats its
serving one by ``hysteresis_db`` is handed over at that epoch: its next transfers use the new
cell; a transfer in progress finishes on the cell it started on. The channel recomputes the
moved clients' SNR each epoch (vectorized over clients) and its links refresh their flows' rates
then (an epoch is a channel change, like a fading block). With inter-cell interference on, the
clients start where ``fedsim.interference`` placed them and its gains follow them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.devices import Fleet
from fedsim.errors import FedsimError
from fedsim.interference import site_positions_m
from fedsim.scenario import CellConfig, MobilityConfig
from fedsim.traces import read_rows


def read_positions(path: Path) -> tuple[list[np.ndarray], list[np.ndarray], bool]:
    """A position trace: per series its times (s) and (x, y) positions (m), and whether it
    names clients (absolute positions) or not (one path, an offset from each start)."""
    rows = read_rows(path, "network.mobility.trace_path", {"time_s", "x_m", "y_m"},
                     "the columns time_s,x_m,y_m[,client]")
    series: dict[int, list[tuple[float, float, float]]] = {}
    for i, r in enumerate(rows, start=2):
        try:
            key = int(r.get("client") or 0)
            series.setdefault(key, []).append((float(r["time_s"]), float(r["x_m"]),
                                               float(r["y_m"])))
        except ValueError:
            raise FedsimError(f"network.mobility.trace_path: {path} line {i}: not a number"
                              ) from None
    times, points = [], []
    for key in sorted(series):
        a = np.array(sorted(series[key]))
        times.append(a[:, 0])
        points.append(a[:, 1:])
    return times, points, "client" in rows[0]


class Mobility:
    """Where every client is, epoch by epoch, its shadowing there and its serving cell."""

    def __init__(self, cfg: MobilityConfig, cells: list[CellConfig], fleet: Fleet,
                 isd_m: float, shadow_db: np.ndarray, sigma_db: float,
                 rng: np.random.Generator, start_m: np.ndarray | None = None) -> None:
        """``start_m``: the clients' positions where another model placed them already
        (interference); else drawn here as the module text says."""
        self.cfg, self.fleet, self.sigma_db = cfg, fleet, sigma_db
        self.sites_m = site_positions_m(cells, isd_m)
        self.wireless = fleet.cell >= 0
        if start_m is None:
            theta = rng.uniform(0.0, 2.0 * math.pi, fleet.size)
            own = np.clip(fleet.cell, 0, None)
            start_m = self.sites_m[own] + fleet.distance_m[:, None] * np.stack(
                [np.cos(theta), np.sin(theta)], axis=1)
        self.start_m = np.array(start_m, dtype=float)
        self.pos_m = self.start_m.copy()
        self.shadow_db = np.asarray(shadow_db, dtype=float).copy()
        self.radius_m = float(np.linalg.norm(self.sites_m, axis=1).max() + fleet.distance_m.max())
        self.rng = rng
        n = fleet.size
        self.target_m = self._waypoints(n)
        lo, hi = cfg.speed_mps
        self.speed_mps = rng.uniform(lo, hi, n)
        self.pause_until_s = np.zeros(n)
        self.epoch = 0  # positions are those of time epoch * update_s
        self.trace = read_positions(Path(cfg.trace_path)) if cfg.model == "trace" else None

    def _waypoints(self, n: int) -> np.ndarray:
        r = self.radius_m * np.sqrt(self.rng.uniform(0.0, 1.0, n))  # uniform over the disc
        a = self.rng.uniform(0.0, 2.0 * math.pi, n)
        return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)

    def next_change_s(self, t: float) -> float:
        """The next epoch after ``t``."""
        return (math.floor(t / self.cfg.update_s + 1e-9) + 1) * self.cfg.update_s

    def advance_to(self, t: float) -> bool:
        """Move through every epoch up to ``t``; True if any happened."""
        moved = False
        while (self.epoch + 1) * self.cfg.update_s <= t + 1e-9:
            self.epoch += 1
            self._step(self.epoch * self.cfg.update_s)
            moved = True
        return moved

    def distance_m(self) -> np.ndarray:
        """Each client's distance to its serving site (m; wired clients: their drawn one)."""
        own = np.clip(self.fleet.cell, 0, None)
        d = np.linalg.norm(self.pos_m - self.sites_m[own], axis=1)
        return np.where(self.wireless, np.maximum(d, 1.0), self.fleet.distance_m)

    # one epoch

    def _step(self, t: float) -> None:
        before = self.pos_m.copy()
        if self.trace is not None:
            self.pos_m = self._traced(t)
        else:
            self._waypoint_step(t)
        self.pos_m[~self.wireless] = before[~self.wireless]
        moved_m = np.linalg.norm(self.pos_m - before, axis=1)
        rho = np.exp(-moved_m / self.cfg.decorrelation_m)
        fresh = self.rng.standard_normal(len(rho))
        self.shadow_db = rho * self.shadow_db + np.sqrt(1.0 - rho ** 2) * self.sigma_db * fresh
        if self.cfg.handover:
            self._handover()

    def _waypoint_step(self, t: float) -> None:
        dt = self.cfg.update_s
        moving = self.pause_until_s <= t - dt + 1e-9
        gap = self.target_m - self.pos_m
        left_m = np.linalg.norm(gap, axis=1)
        step_m = self.speed_mps * dt
        arrive = moving & (left_m <= step_m)
        go = moving & ~arrive
        self.pos_m[go] += gap[go] * (step_m[go] / left_m[go])[:, None]
        self.pos_m[arrive] = self.target_m[arrive]
        k = int(arrive.sum())
        if k:  # pause there, then head for a fresh waypoint at a fresh speed
            self.pause_until_s[arrive] = t + self.cfg.pause_s
            self.target_m[arrive] = self._waypoints(k)
            self.speed_mps[arrive] = self.rng.uniform(*self.cfg.speed_mps, k)

    def _traced(self, t: float) -> np.ndarray:
        times, points, absolute = self.trace  # type: ignore[misc]
        out = np.empty_like(self.pos_m)
        s = len(times)
        for j in range(s):
            at = np.array([np.interp(t, times[j], points[j][:, 0]),
                           np.interp(t, times[j], points[j][:, 1])])
            mine = np.arange(self.fleet.size) % s == j
            # named clients: absolute; one unnamed path: an offset from each client's start
            out[mine] = at if absolute else self.start_m[mine] + at - points[j][0]
        return out

    def _handover(self) -> None:
        d = np.linalg.norm(self.pos_m[:, None, :] - self.sites_m[None, :, :], axis=2)
        loss_db = 128.1 + 37.6 * np.log10(np.maximum(d, 1.0) / 1000.0)
        best = loss_db.argmin(axis=1)
        own = np.clip(self.fleet.cell, 0, None)
        serving = loss_db[np.arange(len(own)), own]
        switch = self.wireless & (serving - loss_db.min(axis=1) > self.cfg.hysteresis_db)
        self.fleet.cell[switch] = best[switch]

    # checkpoints

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos_m": self.pos_m.tolist(),
                "shadow_db": self.shadow_db.tolist(), "target_m": self.target_m.tolist(),
                "speed_mps": self.speed_mps.tolist(), "pause_until_s": self.pause_until_s.tolist(),
                "cell": self.fleet.cell.tolist(), "rng": self.rng.bit_generator.state}

    def restore(self, doc: dict[str, Any]) -> None:
        self.epoch = int(doc["epoch"])
        for k in ("pos_m", "shadow_db", "target_m", "speed_mps", "pause_until_s"):
            setattr(self, k, np.array(doc[k], dtype=float))
        self.fleet.cell[:] = np.array(doc["cell"], dtype=self.fleet.cell.dtype)
        self.rng.bit_generator.state = doc["rng"]

"""Inter-cell interference on the uplink: cells with positions, co-channel neighbours' load.

Cells sit on a hexagonal layout (cell 0 at the origin, then ring after ring at
``inter_site_distance_m``) or where ``network.cells[i].position_m`` puts them; a client sits at
its drawn distance from its own cell's site, at an angle drawn uniformly (stream
``positions``), and is then served by its nearest site (``network.association: nearest``, the
default; ``drawn`` keeps the cell it was dropped around; ``fedsim.channels.Network``). With
``network.interference.model: load`` the uplink SINR of a flow in cell j counts the received
power, at site j, of every client transmitting in a co-channel cell i ≠ j (the usual
system-level simplification of OFDMA: each active neighbour occupies the band in proportion to
its load, so the band-averaged interference is the sum of their powers):

    I_j = Σ_{i co-channel, i≠j} Σ_{u active in i} P_u · G · 10^(−(PL(d_uj) + X_uj)/10)

with PL the channel's 3GPP path loss, X_uj an independent log-normal shadowing draw of the
channel's sigma per (client, site), no fast fading on interfering links (it averages out over
the band); with moving clients (``fedsim.mobility``) the gains follow the positions every epoch,
the interfering links' shadowing staying as drawn. The flow's full-band SNR becomes
SINR = SNR / (1 + I_j / N_j), N_j the site's thermal noise over the uplink band; OFDMA's
K-fold SNR per subband applies on top as before.
Reuse 1: every other cell is co-channel; reuse 3: a 3-colouring of the hexagonal grid (axial
coordinates (q, r) -> (q − r) mod 3), so co-channel sites are at least √3 ISD apart; explicit
positions take the colour of cell index mod 3. I_j is recomputed whenever a flow joins or
leaves an uplink (vectorized over that cell's clients), and the co-channel links recompute
their rates at that instant. ``model: none`` (default) keeps the noise-limited cells exactly.
The downlink stays noise-limited (the base stations' own power dominates at their users).
"""

from __future__ import annotations

import math

import numpy as np

from fedsim.devices import Fleet
from fedsim.scenario import CellConfig, InterferenceConfig

_AXIAL = ((1, 0), (1, -1), (0, -1), (-1, 0), (-1, 1), (0, 1))  # hex neighbour steps, in ring order


def hex_axial(n: int) -> list[tuple[int, int]]:
    """Axial coordinates of ``n`` hexagonal cells: the centre, then ring after ring."""
    out, ring = [(0, 0)], 1
    while len(out) < n:
        q, r = -ring, ring  # the ring's corner (-r, r), then walk its six sides
        for dq, dr in _AXIAL:
            for _ in range(ring):
                out.append((q, r))
                q, r = q + dq, r + dr
        ring += 1
    return out[:n]


def hex_positions_m(n: int, isd_m: float) -> np.ndarray:
    """(n, 2) site coordinates (m) of a hexagonal layout with inter-site distance ``isd_m``."""
    ax = np.array(hex_axial(n), dtype=float)
    x = isd_m * (ax[:, 0] + ax[:, 1] / 2.0)
    y = isd_m * (math.sqrt(3.0) / 2.0) * ax[:, 1]
    return np.stack([x, y], axis=1)


def site_positions_m(cells: list[CellConfig], isd_m: float) -> np.ndarray:
    """(cells, 2) coordinates of the sites: explicit ``position_m``, else hexagonal."""
    if all(c.position_m is not None for c in cells):
        return np.array([c.position_m for c in cells], dtype=float)
    return hex_positions_m(len(cells), isd_m)


def colours(cells: list[CellConfig]) -> np.ndarray:
    """The reuse-3 colour of each cell (see the module text)."""
    if any(c.position_m is not None for c in cells):
        return np.arange(len(cells)) % 3
    return np.array([(q - r) % 3 for q, r in hex_axial(len(cells))])


class Interference:
    """I/N per cell on the uplink, from the clients active in the co-channel cells."""

    def __init__(self, cfg: InterferenceConfig, cells: list[CellConfig], fleet: Fleet,
                 tx_dbm: np.ndarray, noise_dbm: np.ndarray, shadowing_sigma_db: float,
                 rng: np.random.Generator) -> None:
        """``tx_dbm``: per client its transmit power plus both antenna gains (dBm);
        ``noise_dbm``: per cell the site's thermal noise over its uplink band."""
        n_cells = len(cells)
        self.sites_m = site_positions_m(cells, cfg.inter_site_distance_m)
        wireless = fleet.cell >= 0
        own = np.clip(fleet.cell, 0, None)
        theta = rng.uniform(0.0, 2.0 * math.pi, fleet.size)
        self.clients_m = self.sites_m[own] + fleet.distance_m[:, None] * np.stack(
            [np.cos(theta), np.sin(theta)], axis=1)
        self.tx_dbm = np.asarray(tx_dbm, dtype=float)
        self.wireless = wireless
        # Shadowing of every (client, site) link, as drawn (it does not follow a moving client).
        self.cross_shadow_db = shadowing_sigma_db * rng.standard_normal(
            (fleet.size, n_cells))
        col = colours(cells)
        cochannel = (np.ones((n_cells, n_cells), dtype=bool) if cfg.reuse == 1
                     else col[:, None] == col[None, :])
        np.fill_diagonal(cochannel, False)
        self.cochannel = cochannel  # [i, j]: cell i's transmitters interfere at site j
        self.noise_w = 10.0 ** ((np.asarray(noise_dbm, dtype=float) - 30.0) / 10.0)
        self.received_w = np.zeros((n_cells, n_cells))  # [i, j]: cell i's active power at j
        self.ratio = np.zeros(n_cells)  # I/N at each site
        self.active: dict[int, np.ndarray] = {}  # cell -> its clients sending now
        self.moved(self.clients_m)

    def moved(self, clients_m: np.ndarray) -> None:
        """The clients are at ``clients_m`` now (mobility): every (client, site) gain, and each
        site's I/N from the clients sending now, again."""
        self.clients_m = clients_m
        d_m = np.linalg.norm(clients_m[:, None, :] - self.sites_m[None, :, :], axis=2)
        loss_db = 128.1 + 37.6 * np.log10(np.maximum(d_m, 1.0) / 1000.0) + self.cross_shadow_db
        gain_w = 10.0 ** ((self.tx_dbm[:, None] - loss_db - 30.0) / 10.0)  # at each site (W)
        gain_w[~self.wireless] = 0.0
        self.gain_w = gain_w  # (clients, sites)
        for cell, active in self.active.items():
            self.received_w[cell] = self.gain_w[active].sum(axis=0) if len(active) else 0.0
        self.ratio = (self.received_w * self.cochannel).sum(axis=0) / self.noise_w

    def update(self, cell: int, active: np.ndarray) -> list[int]:
        """Cell ``cell``'s active uplink clients are now ``active``: recompute every site's
        I/N; returns the cells whose interference changed (co-channel with ``cell``)."""
        self.active[cell] = np.array(active, dtype=np.int64)
        self.received_w[cell] = self.gain_w[active].sum(axis=0) if len(active) else 0.0
        total = (self.received_w * self.cochannel).sum(axis=0)
        self.ratio = total / self.noise_w
        return [int(j) for j in np.flatnonzero(self.cochannel[cell])]

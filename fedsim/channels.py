"""Channels and cell sharing: how fast each active flow moves; the cells' links (``Network``).

A :class:`Channel` (registry ``CHANNELS``) turns the set of flows active in one cell and one
direction into one rate per flow (bits/s), vectorized over the flows:

- ``static``: the cell carrier has a fixed rate, split equally among its active flows.
- ``pathloss``: path loss 128.1 + 37.6 log10(d_km) dB (3GPP TR 36.814 macro), log-normal
  shadowing, Rayleigh block fading redrawn every coherence time, Shannon rate
  B log2(1 + SNR) with thermal noise -174 dBm/Hz + the receiver's noise figure, and outage (rate
  0) below an SNR threshold.
- ``trace``: measured rate time series from a CSV (see :class:`TraceChannel`).

Cell sharing: ``ofdma`` gives each of K active flows B/K Hz. On the uplink the device keeps its
transmit power on the narrower band, so its SNR there is K times the full-band SNR; on the
downlink the base station's power is spread over the whole carrier, so the SNR per Hz stays.
``tdma`` gives each flow the whole carrier 1/K of the time. Wired clients bypass the cell.

The flows themselves, advanced as fluids over time, are ``fedsim.links``: a channel says
whether its rates separate as (B / K) x a flow's own spectral efficiency
(:meth:`Channel.separable_band_hz`), which lets a link carry all its flows on one virtual clock.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import simpy

from fedsim.clock import NOOP, Clock, Tag
from fedsim.devices import Fleet
from fedsim.errors import FedsimError
from fedsim.estimation import ChannelKnowledge
from fedsim.interference import Interference
from fedsim.links import OnEnd, SharedLink
from fedsim.mobility import Mobility
from fedsim.plugins import CHANNELS, ChannelConfig
from fedsim.rng import hashed_exponential, hashed_uniform_one, stream
from fedsim.scenario import CellConfig, Scenario
from fedsim.traces import read_rows

THERMAL_NOISE_DBM_PER_HZ = -174.0  # kT at 290 K
UPLINK, DOWNLINK = "uplink", "downlink"
BS_NOISE_FIGURE_DB = 5.0  # 3GPP TR 36.814 Table A.2.1.1-2 (eNB noise figure 5 dB)
BS_ANTENNA_GAIN_DBI = 15.0  # 3GPP TR 36.814 Table A.2.1.1-2 (macro sector antenna 14-15 dBi)



def pathloss_db(distance_m: np.ndarray) -> np.ndarray:
    """3GPP TR 36.814 macro path loss, 128.1 + 37.6 log10(d_km) dB."""
    return 128.1 + 37.6 * np.log10(np.asarray(distance_m, dtype=float) / 1000.0)


def noise_dbm(bandwidth_hz: float, noise_figure_db: float | np.ndarray) -> np.ndarray | float:
    return THERMAL_NOISE_DBM_PER_HZ + 10.0 * math.log10(bandwidth_hz) + noise_figure_db


def rayleigh_power_gain(key: int, clients: np.ndarray, block: int, stream: int) -> np.ndarray:
    """|h|^2 ~ Exp(1) of each client in one coherence block, reproducible from (key, block).

    Counter-based so that a block's draw never depends on which flows happened to be active
    before: the same seed gives the same fading whatever the order of events.
    """
    return hashed_exponential(key, clients, block * 2 + stream)


class Channel(ABC):
    """Rates of the flows that share one cell in one direction."""

    name: str

    def __init__(self, cfg: ChannelConfig, cells: list[CellConfig], fleet: Fleet,
                 rng: np.random.Generator) -> None:
        self.cfg = cfg
        self.cells = cells
        self.fleet = fleet

    @abstractmethod
    def flow_state(self, direction: str, clients: np.ndarray, t: float) -> np.ndarray:
        """Per-flow channel state at ``t`` (e.g. SNR, or the rate alone in the cell).

        It changes only at ``next_change_s``; a link keeps it beside its flows and asks again
        only for joining flows or once the channel has changed.
        """

    @abstractmethod
    def shared_rates(self, cell: int, direction: str, state: np.ndarray) -> np.ndarray:
        """Rate (bits/s) of each flow active together in ``cell``, from their states."""

    def rates_bps(self, cell: int, direction: str, clients: np.ndarray, t: float) -> np.ndarray:
        """Rate (bits/s) of each of ``clients``, all active together in ``cell`` at ``t``."""
        return self.shared_rates(cell, direction, self.flow_state(direction, clients, t))

    def separable_band_hz(self, cell: int, direction: str) -> float | None:
        """The band B when each flow's rate among K is (B / K) x a spectral efficiency of
        its own state alone (:meth:`efficiency`), else None. A link then keeps the
        efficiencies beside the states and a change of K costs one multiply per flow instead
        of a logarithm (ofdma uplinks are not: their SNR per Hz grows with K)."""
        return None

    def efficiency(self, cell: int, direction: str, state: np.ndarray) -> np.ndarray:
        """Bits/s/Hz of each flow of ``state`` (0 in outage), where separable."""
        raise NotImplementedError

    def subband_law(self, cell: int, direction: str) -> tuple[float, float] | None:
        """(B, outage SNR) when a flow among K gets (B / K) log2(1 + K x its state) bits/s
        and none below that SNR (an OFDMA uplink: its power on B / K Hz), else None. A link
        then serves its flows by ``fedsim.subbands``' windows."""
        return None

    def efficiency_one(self, cell: int, direction: str, state: float) -> float:
        """:meth:`efficiency` of one flow."""
        return float(self.efficiency(cell, direction, np.array([state]))[0])

    def next_change_s(self, t: float) -> float:
        """Next time after ``t`` at which rates change by themselves (fading, trace step)."""
        return math.inf

    def previous_block_s(self, t: float) -> float:
        """A time in the channel block before the one at ``t`` (what a client has measured by
        ``t``): ``t`` itself for channels that do not change by themselves."""
        return t

    def flow_state_one(self, direction: str, client: int, t: float) -> float:
        """:meth:`flow_state` of one client (subclasses skip numpy for a single flow)."""
        return float(self.flow_state(direction, np.array([client]), t)[0])

    def rate_among(self, cell: int, direction: str, state: float, k: int) -> float:
        """The rate of a flow of channel ``state`` among ``k`` active flows in ``cell``."""
        return float(self.shared_rates(cell, direction, np.full(k, state))[-1])

    def estimate_rate_bps(self, client: int, direction: str, t: float, active: int,
                          known: ChannelKnowledge | None = None, index: int = 0) -> float:
        """The rate ``client`` would get at ``t`` if it joined ``active`` other flows in its
        cell, as ``known`` sees the channel (``fedsim.estimation``; None: exactly), its
        estimation error drawn for decision ``index``."""
        cell = int(self.fleet.cell[client])
        state = (self.flow_state_one(direction, client, t) if known is None
                 else known.state(self, direction, client, t, index))
        return self.rate_among(cell, direction, state, active + 1)


@CHANNELS.register("static")
class StaticChannel(Channel):
    """The cell carrier has a fixed rate (``cells[i].uplink_rate_bps``), shared equally."""

    def flow_state(self, direction: str, clients: np.ndarray, t: float) -> np.ndarray:
        return np.ones(len(clients))

    def shared_rates(self, cell: int, direction: str, state: np.ndarray) -> np.ndarray:
        return state * (self._total(cell, direction) / max(len(state), 1))

    def flow_state_one(self, direction: str, client: int, t: float) -> float:
        return 1.0

    def rate_among(self, cell: int, direction: str, state: float, k: int) -> float:
        return state * self._total(cell, direction) / max(k, 1)

    def separable_band_hz(self, cell: int, direction: str) -> float | None:
        return self._total(cell, direction)  # the carrier's bits/s, "efficiency" 1 each

    def efficiency(self, cell: int, direction: str, state: np.ndarray) -> np.ndarray:
        return np.asarray(state, dtype=float).copy()

    def efficiency_one(self, cell: int, direction: str, state: float) -> float:
        return state

    def _total(self, cell: int, direction: str) -> float:
        c = self.cells[cell]
        return c.uplink_rate_bps if direction == UPLINK else c.downlink_rate_bps


@CHANNELS.register("pathloss")
class PathlossChannel(Channel):
    """Path loss + shadowing + Rayleigh block fading, Shannon rate, outage below a threshold."""

    def __init__(self, cfg: ChannelConfig, cells: list[CellConfig], fleet: Fleet,
                 rng: np.random.Generator) -> None:
        super().__init__(cfg, cells, fleet, rng)
        self.shadow_db = cfg.shadowing_sigma_db * rng.standard_normal(fleet.size)  # UL = DL
        self._fading_key = int(rng.integers(0, 2**63))
        self._set_snr(fleet.distance_m, self.shadow_db)
        self._outage_lin = 10.0 ** (cfg.outage_snr_db / 10.0)
        self.mobility: Mobility | None = None  # set by Network when clients move
        # For fedsim.interference: each client's EIRP at a site, each cell's uplink noise.
        self.uplink_tx_dbm = fleet.tx_power_dbm + fleet.antenna_gain_dbi + BS_ANTENNA_GAIN_DBI
        self.uplink_noise_dbm = np.array([THERMAL_NOISE_DBM_PER_HZ + 10 * math.log10(
            c.uplink_bandwidth_hz) + BS_NOISE_FIGURE_DB for c in cells])
        self.interference: Interference | None = None  # set by Network when modelled

    def _set_snr(self, distance_m: np.ndarray, shadow_db: np.ndarray) -> None:
        """Full-band SNR without fading, dB and linear, per client and direction, from each
        client's distance to its serving site and its shadowing there."""
        fleet, cells = self.fleet, self.cells
        loss_db = pathloss_db(distance_m) + shadow_db
        cell = np.clip(fleet.cell, 0, None)
        ul_bw = np.array([c.uplink_bandwidth_hz for c in cells])[cell]
        dl_bw = np.array([c.downlink_bandwidth_hz for c in cells])[cell]
        bs_power = np.array([c.bs_tx_power_dbm for c in cells])[cell]
        ul_rx = fleet.tx_power_dbm + fleet.antenna_gain_dbi + BS_ANTENNA_GAIN_DBI - loss_db
        dl_rx = bs_power + BS_ANTENNA_GAIN_DBI + fleet.antenna_gain_dbi - loss_db
        ul_noise = THERMAL_NOISE_DBM_PER_HZ + 10 * np.log10(ul_bw) + BS_NOISE_FIGURE_DB
        dl_noise = THERMAL_NOISE_DBM_PER_HZ + 10 * np.log10(dl_bw) + fleet.noise_figure_db
        self.snr_db = {UPLINK: ul_rx - ul_noise, DOWNLINK: dl_rx - dl_noise}
        self._snr_lin = {d: 10.0 ** (v / 10.0) for d, v in self.snr_db.items()}

    def _sync(self, t: float) -> None:
        """Clients that move: bring positions, shadowing and serving cells up to ``t``."""
        if self.mobility is not None and self.mobility.advance_to(t):
            self._set_snr(self.mobility.distance_m(), self.mobility.shadow_db)
            if self.interference is not None:  # the interfering links moved too
                self.interference.moved(self.mobility.pos_m)

    def _sinr(self, cell: int, direction: str, state: np.ndarray | float) -> np.ndarray | float:
        """The full-band SNR with the co-channel cells' uplink interference: SNR / (1 + I/N)."""
        if self.interference is None or direction != UPLINK:
            return state
        return state / (1.0 + self.interference.ratio[cell])

    def _block(self, t: float) -> int:
        return math.floor(t / self.cfg.coherence_time_s + 1e-9)

    def next_change_s(self, t: float) -> float:
        moves = math.inf if self.mobility is None else self.mobility.next_change_s(t)
        if not self.cfg.fading:
            return moves
        return min((self._block(t) + 1) * self.cfg.coherence_time_s, moves)

    def previous_block_s(self, t: float) -> float:
        return t - self.cfg.coherence_time_s if self.cfg.fading else t

    def flow_state(self, direction: str, clients: np.ndarray, t: float) -> np.ndarray:
        """Full-band SNR (linear) of each client at ``t``, fading included."""
        self._sync(t)
        snr = self._snr_lin[direction][clients]
        if not self.cfg.fading:
            return snr
        stream = 0 if direction == UPLINK else 1
        return snr * rayleigh_power_gain(self._fading_key, clients, self._block(t), stream)

    def flow_state_one(self, direction: str, client: int, t: float) -> float:
        self._sync(t)
        snr = float(self._snr_lin[direction][client])
        if not self.cfg.fading:
            return snr
        stream = 0 if direction == UPLINK else 1
        u = hashed_uniform_one(self._fading_key, client, self._block(t) * 2 + stream)
        return snr * -math.log(u)  # the same Exp(1) draw as rayleigh_power_gain

    def rate_among(self, cell: int, direction: str, state: float, k: int) -> float:
        c = self.cells[cell]
        k = max(k, 1)
        bw = c.uplink_bandwidth_hz if direction == UPLINK else c.downlink_bandwidth_hz
        state = self._sinr(cell, direction, state)
        snr = state * k if c.sharing == "ofdma" and direction == UPLINK else state
        return 0.0 if snr < self._outage_lin else (bw / k) * math.log2(1.0 + snr)

    def separable_band_hz(self, cell: int, direction: str) -> float | None:
        c = self.cells[cell]
        if direction == DOWNLINK:  # the SNR per Hz stays whatever K is
            return c.downlink_bandwidth_hz
        # tdma uplink: full band 1/K of the time; the co-channel I/N would change underneath
        return c.uplink_bandwidth_hz if c.sharing == "tdma" and self.interference is None \
            else None

    def subband_law(self, cell: int, direction: str) -> tuple[float, float] | None:
        c = self.cells[cell]
        if direction != UPLINK or c.sharing != "ofdma" or self.interference is not None:
            return None  # (with interference, the neighbours' flows change the SINR too)
        return c.uplink_bandwidth_hz, self._outage_lin

    def efficiency(self, cell: int, direction: str, state: np.ndarray) -> np.ndarray:
        eff = np.log2(1.0 + state)  # the expression of shared_rates: the same bits
        eff[state < self._outage_lin] = 0.0
        return eff

    def efficiency_one(self, cell: int, direction: str, state: float) -> float:
        return 0.0 if state < self._outage_lin else math.log2(1.0 + state)

    def shared_rates(self, cell: int, direction: str, state: np.ndarray) -> np.ndarray:
        c = self.cells[cell]
        k = max(len(state), 1)
        bw = c.uplink_bandwidth_hz if direction == UPLINK else c.downlink_bandwidth_hz
        state = self._sinr(cell, direction, state)
        snr = state * k if c.sharing == "ofdma" and direction == UPLINK else state
        # ofdma: same transmit power on B/K Hz, so K times the SNR per Hz (uplink only);
        # tdma: the whole band B for 1/K of the time. Either way B/K times the bits/s/Hz.
        rate = (bw / k) * np.log2(1.0 + snr)
        rate[snr < self._outage_lin] = 0.0
        return rate


@CHANNELS.register("trace")
class TraceChannel(Channel):
    """Rates replayed from a CSV with header ``time_s,uplink_bps,downlink_bps[,client]``.

    Each row gives a link's rate from ``time_s`` until the next row's time (a step function,
    the last value held). Without a ``client`` column one series serves every client; with one,
    client ``i`` replays series ``i mod S`` of the S series in the file (so a few measured
    traces can drive many clients). A client's trace rate is its rate alone in the cell; K
    active flows each get 1/K of it.
    """

    def __init__(self, cfg: ChannelConfig, cells: list[CellConfig], fleet: Fleet,
                 rng: np.random.Generator) -> None:
        super().__init__(cfg, cells, fleet, rng)
        series = read_trace(Path(cfg.trace_path or ""))
        keys = sorted(series)
        self._times = [series[k][0] for k in keys]
        self._rates = {UPLINK: [series[k][1] for k in keys], DOWNLINK: [series[k][2] for k in keys]}
        self._all_times = np.unique(np.concatenate(self._times))

    def flow_state(self, direction: str, clients: np.ndarray, t: float) -> np.ndarray:
        """Each client's trace rate at ``t`` (its rate alone in the cell)."""
        s = len(self._times)
        out = np.empty(len(clients))
        for j in np.unique(clients % s):  # one lookup per distinct series, not per client
            i = max(int(np.searchsorted(self._times[j], t, side="right")) - 1, 0)
            out[clients % s == j] = self._rates[direction][j][i]
        return out

    def shared_rates(self, cell: int, direction: str, state: np.ndarray) -> np.ndarray:
        return state / max(len(state), 1)

    def separable_band_hz(self, cell: int, direction: str) -> float | None:
        return 1.0  # a trace rate is the flow's rate alone: K flows get 1/K of it each

    def efficiency(self, cell: int, direction: str, state: np.ndarray) -> np.ndarray:
        return np.asarray(state, dtype=float).copy()

    def efficiency_one(self, cell: int, direction: str, state: float) -> float:
        return state

    def next_change_s(self, t: float) -> float:
        i = int(np.searchsorted(self._all_times, t + 1e-12, side="right"))
        return float(self._all_times[i]) if i < len(self._all_times) else math.inf


def read_trace(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Parse a trace CSV into {series key: (time_s, uplink_bps, downlink_bps)}, sorted by time."""
    need = {"time_s", "uplink_bps", "downlink_bps"}
    rows = read_rows(path, "network.channel.trace_path", need, f"columns {sorted(need)}")
    by_key: dict[str, list[tuple[float, float, float]]] = {}
    for line, row in enumerate(rows, start=2):
        try:
            vals = (float(row["time_s"]), float(row["uplink_bps"]), float(row["downlink_bps"]))
        except (TypeError, ValueError):
            raise FedsimError(f"network.channel.trace_path: {path}:{line}: not a number") from None
        if vals[0] < 0 or vals[1] < 0 or vals[2] < 0 or not all(map(math.isfinite, vals)):
            raise FedsimError(f"network.channel.trace_path: {path}:{line}: values must be >= 0")
        by_key.setdefault(row.get("client") or "", []).append(vals)
    out = {}
    for key, vals in by_key.items():
        arr = np.array(sorted(vals))
        out[key] = (arr[:, 0], arr[:, 1], arr[:, 2])
    return out


def make_channel(cfg: ChannelConfig, cells: list[CellConfig], fleet: Fleet,
                 rng: np.random.Generator) -> Channel:
    return CHANNELS.get(cfg.name)(cfg, cells, fleet, rng)


class WiredLink:
    """A dedicated wired link (cloud clients): no sharing, a fixed rate."""

    def __init__(self, env: Clock, rate_bps: np.ndarray) -> None:
        self.env, self.rate_bps = env, rate_bps
        self.bits_carried = 0.0
        self.contenders = 0  # counted for symmetry with SharedLink; a wired link is not shared
        self.ends: dict[int, float] = {}  # client -> when its transfer ends (checkpoints)
        self._pending: dict[int, simpy.Event] = {}  # client -> its transfer's timer

    def transfer(self, client: int, nbytes: int, tag: Tag = NOOP,
                 on_end: OnEnd | None = None) -> simpy.Event | None:
        self.bits_carried += 8.0 * nbytes
        duration_s = 8.0 * nbytes / float(self.rate_bps[client])
        self.ends[client] = self.env.now + duration_s
        if on_end is None:
            return self.env.timer(duration_s, tag, value=True)
        self._start(client, self.env.timer(duration_s, tag), on_end)
        return None

    def _start(self, client: int, timer: simpy.Event, on_end: OnEnd) -> None:
        self._pending[client] = timer

        def done(ev: simpy.Event) -> None:
            if self._pending.get(client) is ev:
                del self._pending[client]
                on_end(True)

        timer.callbacks.append(done)

    def resume(self, client: int, tag: Tag, on_end: OnEnd) -> None:
        """A restored transfer: the rest of its time, on a timer made now, in the clock's
        order (see ``fedsim.checkpoint``)."""
        self._start(client, self.env.timer_at(self.ends[client], tag), on_end)

    def cancel(self, client: int) -> None:
        """Nothing is shared, so nothing to give back; its owner is no longer told."""
        self._pending.pop(client, None)

    def estimate_rate_bps(self, client: int, known: ChannelKnowledge | None = None,
                          index: int = 0) -> float:
        return float(self.rate_bps[client])  # a wired rate is known exactly


class Network:
    """One shared uplink and downlink per cell, and dedicated wired links."""

    def __init__(self, env: Clock, scenario: Scenario, fleet: Fleet) -> None:
        cells = scenario.network.cells
        channel = make_channel(scenario.network.channel, cells, fleet,
                               stream(scenario.seed, "channel"))
        self.channel = channel
        self.cells = {d: [SharedLink(env, channel, i, d) for i in range(len(cells))]
                      for d in (UPLINK, DOWNLINK)}
        self.wired = WiredLink(env, fleet.wired_rate_bps)
        self.fleet = fleet
        cfg = scenario.network.interference
        self.interference: Interference | None = None
        if cfg.model != "none":  # validated: the channel has an SNR (pathloss)
            assert isinstance(channel, PathlossChannel)
            self.interference = Interference(
                cfg, cells, fleet, channel.uplink_tx_dbm, channel.uplink_noise_dbm,
                scenario.network.channel.shadowing_sigma_db, stream(scenario.seed, "positions"))
            channel.interference = self.interference
            for link in self.cells[UPLINK]:
                link.on_flows_changed = self._interfere
        self.mobility: Mobility | None = None
        moves = scenario.network.mobility
        if moves.model != "static":  # validated: pathloss
            assert isinstance(channel, PathlossChannel)
            self.mobility = Mobility(
                moves, cells, fleet, cfg.inter_site_distance_m, channel.shadow_db,
                scenario.network.channel.shadowing_sigma_db,
                stream(scenario.seed, "mobility" if self.interference else "positions"),
                start_m=None if self.interference is None else self.interference.clients_m)
            channel.mobility = self.mobility
        if scenario.network.association == "nearest":
            self._associate()

    def _associate(self) -> None:
        """Serve every placed wireless client from its nearest site (see NetworkConfig): a
        phone dropped 400 m from its site towards a neighbour 500 m away is the neighbour's."""
        if self.mobility is not None:
            sites_m, pos_m = self.mobility.sites_m, self.mobility.pos_m
        elif self.interference is not None:
            sites_m, pos_m = self.interference.sites_m, self.interference.clients_m
        else:  # no positions: cells are what the groups say
            return
        d_m = np.linalg.norm(pos_m[:, None, :] - sites_m[None, :, :], axis=2)
        wireless = self.fleet.cell >= 0
        nearest = d_m.argmin(axis=1)
        self.fleet.cell[wireless] = nearest[wireless]
        serving_m = np.maximum(d_m[np.arange(len(nearest)), nearest], 1.0)
        self.fleet.distance_m[wireless] = serving_m[wireless]
        assert isinstance(self.channel, PathlossChannel)
        self.channel._set_snr(self.fleet.distance_m, self.channel.shadow_db)

    def _interfere(self, link: SharedLink) -> None:
        """``link``'s flows changed: new I/N at the co-channel sites, whose active flows
        recompute their rates at the end of this instant."""
        assert self.interference is not None
        for j in self.interference.update(link.cell, link.clients):
            other = self.cells[UPLINK][j]
            if other.active:
                other._changed()

    def links(self) -> Iterator[tuple[str, SharedLink]]:
        """Every shared link by name (``uplink:3``)."""
        for d, links in self.cells.items():
            for i, link in enumerate(links):
                yield f"{d}:{i}", link

    def link(self, client: int, direction: str) -> SharedLink | WiredLink:
        cell = int(self.fleet.cell[client])
        return self.wired if cell < 0 else self.cells[direction][cell]

    def holding(self, client: int, direction: str) -> SharedLink | WiredLink:
        """The link that carries ``client``'s flow in ``direction`` now (it may have handed
        over to another cell since the flow began)."""
        for link in self.cells[direction]:
            if client in link.events:
                return link
        return self.wired

    def advance_to(self, t: float) -> None:
        """Bring the clients that move up to ``t`` (what a channel query at ``t`` does)."""
        if self.mobility is not None:
            assert isinstance(self.channel, PathlossChannel)
            self.channel._sync(t)

    def utilization(self, direction: str, sim_time_s: float) -> float:
        links = self.cells[direction]
        return sum(lk.busy_s for lk in links) / (len(links) * sim_time_s) if sim_time_s else 0.0

    # --- snapshot protocol (fedsim.checkpoint): between rounds, when no flow is active ----

    def state(self) -> dict[str, Any]:
        return {**({"mobility": self.mobility.state()} if self.mobility else {}),
                "links": {name: link.state() for name, link in self.links()},
                "wired_bits": self.wired.bits_carried,
                "wired_ends": {str(c): t for c, t in self.wired.ends.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        if self.mobility is not None:
            assert isinstance(self.channel, PathlossChannel)
            self.mobility.restore(state["mobility"])
            self.channel._set_snr(self.mobility.distance_m(), self.mobility.shadow_db)
            if self.interference is not None:
                self.interference.moved(self.mobility.pos_m)
        links = dict(self.links())
        for name, doc in state["links"].items():
            links[name].restore(doc)
        self.wired.bits_carried = state["wired_bits"]
        self.wired.ends = {int(c): t for c, t in state.get("wired_ends", {}).items()}
        if self.interference is not None:  # derived from the restored flows
            for link in self.cells[UPLINK]:
                self.interference.update(link.cell, link.clients)

    def restore_timer(self, tag: tuple[Any, ...]) -> None:
        """A link's pending timer again, from its tag (see ``fedsim.clock``)."""
        kind, direction, cell, *at = tag
        link = self.cells[direction][cell]
        if kind == "wake":
            link.rewake(at[0], exact=True)
        else:  # flush
            link.refresh()

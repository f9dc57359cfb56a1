"""Channels and cell sharing: how fast each active flow moves, and fluid flows over time.

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

A :class:`SharedLink` holds the active flows of one cell and direction as numpy arrays: a flow
joining or leaving, or the fading changing, advances every flow's remaining bits and recomputes
the rates in one vectorized step, O(K) for K flows of that cell (never a Python loop over
flows), then schedules one SimPy wake-up at the next completion or channel change.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import simpy

from fedsim.clock import NOOP, Clock, Tag
from fedsim.devices import Fleet
from fedsim.errors import FedsimError
from fedsim.estimation import ChannelKnowledge
from fedsim.interference import Interference
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

    def efficiency(self, cell: int, direction: str, state: np.ndarray) -> np.ndarray:
        eff = np.log2(1.0 + state)  # the expression of shared_rates: the same bits
        eff[state < self._outage_lin] = 0.0
        return eff

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


# --- fluid flows ---------------------------------------------------------------------------

_DONE_BITS = 1e-6  # a flow with fewer bits left than this has finished (float round-off)
_NO_RATE = 1e-200  # bits/s standing in for 0 (outage) so that finish times stay finite
_NEVER_S = 1e150  # a finish time this far is an outage


class SharedLink:
    """The active flows of one cell in one direction, advanced as fluids.

    ``transfer`` returns a SimPy event that succeeds with ``True`` when the bytes have crossed,
    or ``False`` if the flow is in outage with no change of channel to come.

    Flows sit in the first ``k`` slots of columns with spare capacity; a flow that ends gives
    its slot to the last one (O(1), not a copy of every column), and its join number keeps
    the order in which flows that end at one instant are told (the order they joined in).
    """

    def __init__(self, env: Clock, channel: Channel, cell: int, direction: str):
        self.env, self.channel, self.cell, self.direction = env, channel, cell, direction
        self._k = 0
        self._ids = np.empty(16, dtype=np.int64)
        self._seq = np.empty(16, dtype=np.int64)  # join number of each slot's flow
        self._cols = np.empty((5, 16))  # remaining bits, rate (bits/s), channel state,
        # spectral efficiency (separable channels), scratch
        self._slot: dict[int, int] = {}  # client -> its slot
        self._joins = 0
        self._band_hz: float | None = None  # set while flows are active (separable_band_hz)
        self._state_until = math.inf  # the states are valid until then
        self.events: dict[int, tuple[simpy.Event, float]] = {}  # client -> (done, bits)
        self.busy_s = 0.0  # time with at least one active flow
        self.bits_carried = 0.0
        self._t = 0.0  # time the arrays were last advanced to
        self._wake_at = math.inf  # the pending wake-up; others that fire are stale, ignored
        self._flush_pending = False
        # Clients that will send through this link this round and have not finished yet (the
        # engine counts them): the rate estimate of an early finisher counts the ones to come.
        self.contenders = 0
        self.outage = False  # the cell's base station is down (faults): nothing moves
        # Called (with this link) when its set of active flows changed, once the instant's
        # joins and leaves are in: inter-cell interference recomputes its neighbours.
        self.on_flows_changed: Callable[[SharedLink], None] | None = None
        self._flows_changed = False

    @property
    def active(self) -> int:
        return self._k

    def _order(self) -> np.ndarray:
        """The active slots in the order their flows joined."""
        return np.argsort(self._seq[: self._k], kind="stable")

    @property
    def clients(self) -> np.ndarray:
        """The active flows' clients, in the order they joined."""
        return self._ids[: self._k][self._order()]

    @property
    def remaining_bits(self) -> np.ndarray:
        return self._cols[0, : self._k][self._order()]

    @property
    def rates(self) -> np.ndarray:
        return self._cols[1, : self._k][self._order()]

    @property
    def flow_states(self) -> np.ndarray:
        """Each active flow's channel state (see ``Channel.flow_state``), in join order."""
        return self._cols[2, : self._k][self._order()]

    def transfer(self, client: int, nbytes: int, tag: Tag = NOOP) -> simpy.Event:
        done = self.env.event()
        if nbytes <= 0:
            return done.succeed(True)
        self._advance()
        now, k = self.env.now, self._k
        if not k:
            self._state_until = self.channel.next_change_s(now)
            self._band_hz = self.channel.separable_band_hz(self.cell, self.direction)
        if k == len(self._ids):
            self._ids = np.concatenate([self._ids, np.empty_like(self._ids)])
            self._seq = np.concatenate([self._seq, np.empty_like(self._seq)])
            self._cols = np.concatenate([self._cols, np.empty_like(self._cols)], axis=1)
        self._ids[k], self._seq[k] = client, self._joins
        self._joins += 1
        self._slot[client] = k
        state = self.channel.flow_state_one(self.direction, client, now)
        self._cols[:3, k] = (8.0 * nbytes, 0.0, state)
        if self._band_hz is not None:
            self._cols[3, k:k + 1] = self.channel.efficiency(self.cell, self.direction,
                                                             self._cols[2, k:k + 1])
        self._k = k + 1
        self._flows_changed = True
        self.events[client] = (done, 8.0 * nbytes)
        self._changed()
        return done

    def cancel(self, client: int) -> None:
        """Drop ``client``'s flow (dropout, deadline): the others speed up."""
        if client not in self.events:
            return
        self._advance()
        _, bits = self.events.pop(client)
        slot = self._slot[client]
        self.bits_carried += bits - float(self._cols[0, slot])
        self._remove([slot])
        self._flows_changed = True
        self._changed()

    def estimate_rate_bps(self, client: int, known: ChannelKnowledge | None = None,
                          index: int = 0) -> float:
        """The rate ``client`` can expect now, sharing with every flow active or still to come
        (as ``known`` sees the channel; None: exactly).

        Counting only the flows active now would let the first client out of training expect
        the whole cell and pick a payload that the later flows then slow down.
        """
        others = max(self.active, self.contenders - 1)
        return self.channel.estimate_rate_bps(client, self.direction, self.env.now, others,
                                              known, index)

    def set_outage(self, down: bool) -> None:
        """The base station goes down (flows stall where they are) or comes back up."""
        self._advance()
        self.outage = down
        self._changed()

    # internals

    def _advance(self) -> None:
        dt = self.env.now - self._t
        k = self._k
        if dt > 0 and k and not self.outage:
            rem, rate, tmp = self._cols[0, :k], self._cols[1, :k], self._cols[4, :k]
            np.multiply(rate, dt, out=tmp)  # bits sent since the last advance
            np.subtract(rem, tmp, out=rem)
            self.busy_s += dt
        self._t = self.env.now

    def _remove(self, slots: list[int]) -> None:
        """Free ``slots``: the last active flow moves into each (highest slot first)."""
        ids, seq, cols = self._ids, self._seq, self._cols
        for slot in sorted(slots, reverse=True):
            del self._slot[int(ids[slot])]
            last = self._k - 1
            if slot != last:
                moved = int(ids[last])
                ids[slot], seq[slot] = moved, seq[last]
                cols[:4, slot] = cols[:4, last]
                self._slot[moved] = slot
            self._k = last

    def _end(self, mask: np.ndarray, ok: bool) -> None:
        """Remove the flows in ``mask`` and tell their clients (``ok``: all bits crossed), in
        the order they joined."""
        slots = np.flatnonzero(mask)
        if not len(slots):
            return
        if len(slots) > 1:
            slots = slots[np.argsort(self._seq[slots], kind="stable")]
        ended = self._ids[slots].tolist()
        self._remove(slots.tolist())
        self._flows_changed = True
        for c in ended:
            done, bits = self.events.pop(c)
            if ok:
                self.bits_carried += bits
            done.succeed(ok)

    def _changed(self) -> None:
        """Recompute once at the end of this instant, however many flows joined or left in it."""
        if not self._flush_pending:
            self._flush_pending = True
            self.env.timer(0, ("flush", self.direction, self.cell), self._flush)

    def _flush(self, _event: simpy.Event) -> None:
        self._flush_pending = False
        self._advance()
        self._finish()

    def _wake(self, at: float) -> None:
        if at == self._wake_at:
            self._wake_at = math.inf
            self._advance()
            self._finish()

    def _finish(self) -> None:
        """Complete finished flows, recompute the rates, schedule the next wake-up."""
        k = self._k
        rem, rate, tmp = self._cols[0, :k], self._cols[1, :k], self._cols[4, :k]
        # Finished: less than a bit, or less than a nanosecond at its rate, left (round-off).
        np.multiply(rate, 1e-9, out=tmp)
        np.add(tmp, _DONE_BITS, out=tmp)
        done = rem <= tmp
        if done.any():
            self._end(done, ok=True)
        self._notify()
        k = self._k
        if not k:
            return
        rem, rate, state, tmp = (self._cols[0, :k], self._cols[1, :k], self._cols[2, :k],
                                 self._cols[4, :k])
        if self.outage:  # stalled until set_outage(False) recomputes
            rate[:] = 0.0
            return
        now = self.env.now
        ids = self._ids[:k]
        if now >= self._state_until:  # fading block or trace step changed: every flow's state
            state[:] = self.channel.flow_state(self.direction, ids, now)
            self._state_until = self.channel.next_change_s(now)
            if self._band_hz is not None:
                self._cols[3, :k] = self.channel.efficiency(self.cell, self.direction, state)
        if self._band_hz is not None:  # (B / K) x each flow's bits/s/Hz, as shared_rates has it
            np.multiply(self._band_hz / k, self._cols[3, :k], out=rate)
        else:
            rate[:] = self.channel.shared_rates(self.cell, self.direction, state)
        change_at = self._state_until
        np.maximum(rate, _NO_RATE, out=tmp)
        np.divide(rem, tmp, out=tmp)  # each flow's time to finish at these rates (s)
        first = float(tmp.min())
        if first >= _NEVER_S and math.isinf(change_at):
            self._end(rate <= 0, ok=False)  # outage that nothing will lift
            self._notify()
            return
        wake_at = now + min(first, change_at - now)
        if self._wake_at <= wake_at:
            return  # an earlier wake-up is pending: it will recompute and reschedule
        self._wake_at = wake_at
        self.rewake(wake_at)

    def _notify(self) -> None:
        if self._flows_changed:
            self._flows_changed = False
            if self.on_flows_changed is not None:
                self.on_flows_changed(self)

    def rewake(self, at: float, exact: bool = False) -> None:
        """A wake-up at ``at`` (a checkpoint restores the pending ones with ``exact``)."""
        tag, wake = ("wake", self.direction, self.cell, at), (lambda _e: self._wake(at))
        if exact:
            self.env.timer_at(at, tag, wake)
        else:
            self.env.timer(at - self.env.now, tag, wake)

    def refresh(self) -> None:
        """A pending end-of-instant recomputation (restored from a checkpoint)."""
        self._flush_pending = False
        self._changed()

    def resumed(self, client: int, tag: Tag = NOOP) -> simpy.Event:
        """The done event of ``client``'s flow restored from a checkpoint."""
        return self.events[client][0]

    _SCALARS = ("busy_s", "bits_carried", "_t", "_wake_at", "_state_until", "outage",
                "_flush_pending", "contenders")

    def state(self) -> dict[str, Any]:
        """The link and its active flows (remaining bits, rate, channel state, size), in the
        order they joined."""
        order = self._order()
        ids = self._ids[: self._k][order].tolist()
        return {**{k: getattr(self, k) for k in self._SCALARS},
                "flows_changed": self._flows_changed,
                "ids": ids, "cols": self._cols[:3, : self._k][:, order].tolist(),
                "bits": [self.events[c][1] for c in ids]}

    def restore(self, doc: dict[str, Any]) -> None:
        """Take :meth:`state`'s document; each restored flow gets a new done event, which the
        update's restored process waits on (:meth:`resumed`)."""
        for k in self._SCALARS:
            setattr(self, k, doc[k])
        self._flows_changed = doc.get("flows_changed", False)
        k = len(doc["ids"])
        cap = max(16, k)
        self._ids, self._cols = np.empty(cap, dtype=np.int64), np.empty((5, cap))
        self._seq = np.empty(cap, dtype=np.int64)
        self._ids[:k], self._seq[:k] = doc["ids"], np.arange(k)
        self._joins = k
        self._slot = {int(c): i for i, c in enumerate(doc["ids"])}
        self._band_hz = self.channel.separable_band_hz(self.cell, self.direction)
        if k:
            self._cols[:3, :k] = np.array(doc["cols"], dtype=float)
            if self._band_hz is not None:
                self._cols[3, :k] = self.channel.efficiency(self.cell, self.direction,
                                                            self._cols[2, :k])
        self._k = k
        self.events = {int(c): (self.env.event(), float(b))
                       for c, b in zip(doc["ids"], doc["bits"], strict=True)}


class WiredLink:
    """A dedicated wired link (cloud clients): no sharing, a fixed rate."""

    def __init__(self, env: Clock, rate_bps: np.ndarray) -> None:
        self.env, self.rate_bps = env, rate_bps
        self.bits_carried = 0.0
        self.contenders = 0  # counted for symmetry with SharedLink; a wired link is not shared
        self.ends: dict[int, float] = {}  # client -> when its transfer ends (checkpoints)
        self.waits: dict[int, simpy.Event] = {}  # restored transfers' timers

    def transfer(self, client: int, nbytes: int, tag: Tag = NOOP) -> simpy.Event:
        self.bits_carried += 8.0 * nbytes
        duration_s = 8.0 * nbytes / float(self.rate_bps[client])
        self.ends[client] = self.env.now + duration_s
        return self.env.timer(duration_s, tag, value=True)

    def resumed(self, client: int, tag: Tag = NOOP) -> simpy.Event:
        """A restored transfer: the rest of its time (``restore_wait`` made its timer)."""
        return self.waits.pop(client, None) or self.env.timer_at(self.ends[client], tag,
                                                                  value=True)

    def cancel(self, client: int) -> None:
        """Nothing is shared, so nothing to give back."""

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

"""Fluid flows: the active transfers of one cell in one direction (wired: ``channels``).

A :class:`SharedLink` holds the flows of one cell in one direction and tells each flow's owner
(a callback, or a SimPy event for callers that wait) when its bits have crossed. It keeps one
SimPy wake-up at a time, for the next completion or channel change, whatever the number of flows.
How a flow's rate depends on the others comes from the channel (``fedsim.channels``):

- **separable** links (downlinks, TDMA uplinks, static and trace channels): a flow among K gets
  (B / K) x a spectral efficiency of its own channel state. One virtual clock per link,
  V = integral of B / K dt (processor sharing), carries every flow: a flow with ``rem`` bits
  left and efficiency ``e`` ends when V reaches its target V + rem / e, so the order in which the
  flows end does not change when flows come and go.
- **OFDMA uplinks** (a flow's SNR on its B / K Hz grows with K): no single clock, but a few
  accumulators shared by the cell's flows serve each one exactly while K stays within a window
  (``fedsim.subbands``); each flow's finish is bounded from below for the heap.
- **coupled** links (few flows on an OFDMA uplink; uplinks under inter-cell interference,
  whose rates change with the neighbours' flows): every rate is recomputed when the set of flows
  changes, in one vectorized pass, O(K), once per instant.

In the first two, a join, a leave or a completion costs O(log K) (a heap of the flows nearest
to finishing; the others are only known to lie past a cut) and a change of channel state (a
fading block, a trace step, a move) one vectorized pass over the K flows. All give the times of
integrating each flow's rate between events (the closed-form tests of
``tests/test_channels.py``), to within float rounding.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import simpy

from fedsim import subbands
from fedsim.clock import NOOP, Clock, Tag

if TYPE_CHECKING:
    from fedsim.channels import Channel
    from fedsim.estimation import ChannelKnowledge

OnEnd = Callable[[bool], None]  # told once when a flow ends: True if all its bits crossed
Told = subbands.Told

_NO_RATE = 1e-200  # bits/s standing in for 0 (outage) so that finish times stay finite
_NEVER_S = 1e150  # a finish time this far is an outage
_HEAP = 32  # flows kept in the heap after a change of channel state

# Columns of a link's flow table (slots 0..k-1 active, in no particular order). Row 0 is what
# the heap orders by (a target or a lower bound), row 1 bits left at a reference.
# separable: target V, bits left at V0, channel state, bits/s/Hz, V0
# window:    finish lower bound (s), bits left at its snapshot, state, L, q, snapshot, class
#            (fedsim.subbands)
# coupled:   bits left at the last advance, rate (bits/s), state
_TGT, _REM0, _STATE, _EFF, _V0 = 0, 1, 2, 3, 4
_L, _Q, _SNAP, _CLS = subbands.L, subbands.Q, subbands.SNAP, subbands.CLS
_REM, _RATE = subbands.REM, subbands.RATE
_DONE_BITS, _DONE_S = subbands.DONE_BITS, subbands.DONE_S
_ROWS, _TMP = 7, 7  # rows kept in a checkpoint; a scratch row


class SharedLink(subbands.Windowed):
    """The active flows of one cell in one direction, advanced as fluids (module text).

    ``transfer`` starts a flow; its ``on_end(ok)`` is called once, ``ok`` False if the flow is
    in outage with no change of channel to come. Flows sit in the first ``k`` slots of columns
    with spare capacity; a flow that ends gives its slot to the last one (O(1)), and its join
    number keeps the order in which flows that end at one instant are told (the order they
    joined in).
    """

    def __init__(self, env: Clock, channel: Channel, cell: int, direction: str):
        self.env, self.channel, self.cell, self.direction = env, channel, cell, direction
        # B (Hz, or bits/s for rate channels) when the rates separate; None otherwise. And
        # (B, outage SNR) of an OFDMA uplink whose rates windows serve (fedsim.subbands).
        # Asked when the first flow comes (the network sets up interference after its links).
        self._band_hz: float | None = None
        self._law: tuple[float, float] | None = None
        self._win: subbands.Window | None = None  # the window, while there is one
        # window: the flows followed one by one, client -> [bits left, rate]: the marginal
        # ones and those about to finish (looked at exactly once their bounds came)
        self._near: dict[int, list[float]] = {}
        self._k = 0
        self._ids = np.empty(16, dtype=np.int64)
        self._seq = np.empty(16, dtype=np.int64)  # join number of each slot's flow
        self._cols = np.empty((_TMP + 1, 16))
        self._slot: dict[int, int] = {}  # client -> its slot
        self._joins = 0
        self._state_until = math.inf  # the flows' channel states are valid until then
        self.events: dict[int, tuple[OnEnd | None, float]] = {}  # client -> (on_end, bits)
        self.busy_s = 0.0  # time with at least one active flow
        self.bits_carried = 0.0
        self._t = 0.0  # time the link was last advanced to
        self._v = 0.0  # separable: virtual time since the last change of channel state
        self._heap: list[tuple[float, int, int]] = []  # (row 0, join no., client)
        self._cut = math.inf  # every active flow outside the heap has row 0 >= it
        self._eff_min = math.inf  # separable: a lower bound of the active flows' bits/s/Hz
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
    def separable(self) -> bool:
        return self._band_hz is not None

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

    def _rem_all(self) -> np.ndarray:
        """Bits left of each active slot's flow, as of the last advance."""
        k, cols = self._k, self._cols
        if self.separable:
            eff = cols[_EFF, :k]
            with np.errstate(invalid="ignore"):
                return np.where(eff > 0, eff * (cols[_TGT, :k] - self._v), cols[_REM0, :k])
        if self._win is None:
            return cols[_REM, :k].copy()
        rem = cols[_REM0, :k].copy()
        on = cols[_CLS, :k] == subbands.ON
        rem[on] -= self._win.served(cols[_L, :k][on], cols[_Q, :k][on], cols[_SNAP, :k][on])
        for c, (left, _) in self._near.items():
            rem[self._slot[c]] = left
        return rem

    def _rem_one(self, slot: int) -> float:
        cols = self._cols
        if self.separable:
            eff = cols[_EFF, slot]
            return float(eff * (cols[_TGT, slot] - self._v) if eff > 0 else cols[_REM0, slot])
        if self._win is None:
            return float(cols[_REM, slot])
        near = self._near.get(int(self._ids[slot]))
        if near is not None:
            return near[0]
        _, rem, _, big_l, q, snap, cls = cols[:_ROWS, slot].tolist()
        if cls == subbands.ON:
            return rem - self._win.served_one(big_l, q, int(snap))
        return rem  # (off: nothing served)

    def _rates_all(self) -> np.ndarray:
        k = self._k
        if self.outage or not k:
            return np.zeros(k)
        if self.separable:
            return (self._band_hz / k) * self._cols[_EFF, :k]
        if self._win is None:
            return self._cols[_RATE, :k].copy()
        band, outage = self._law
        return subbands.rates_bps(band, k, self._cols[_STATE, :k], outage)

    @property
    def remaining_bits(self) -> np.ndarray:
        return self._rem_all()[self._order()]

    @property
    def rates(self) -> np.ndarray:
        return self._rates_all()[self._order()]

    @property
    def flow_states(self) -> np.ndarray:
        """Each active flow's channel state (see ``Channel.flow_state``), in join order."""
        return self._cols[_STATE, : self._k][self._order()]

    # --- flows come and go -------------------------------------------------------------------

    def _grow(self, n: int) -> None:
        while self._k + n > len(self._ids):
            self._ids = np.concatenate([self._ids, np.empty_like(self._ids)])
            self._seq = np.concatenate([self._seq, np.empty_like(self._seq)])
            self._cols = np.concatenate([self._cols, np.empty_like(self._cols)], axis=1)

    def _laws(self) -> None:
        self._band_hz = self.channel.separable_band_hz(self.cell, self.direction)
        self._law = self.channel.subband_law(self.cell, self.direction)

    def _fresh(self) -> None:
        """The first flow of an idle link: its states and clocks begin now."""
        self._laws()
        self._state_until = self.channel.next_change_s(self.env.now)
        self._v, self._heap, self._cut, self._eff_min = 0.0, [], math.inf, math.inf
        self._win, self._near = None, {}

    def transfer(self, client: int, nbytes: int, tag: Tag = NOOP,
                 on_end: OnEnd | None = None) -> simpy.Event | None:
        """Start ``client``'s flow of ``nbytes``. ``on_end(ok)`` is called when it ends;
        without one, a SimPy event that succeeds with ``ok`` is returned."""
        done = None
        if on_end is None:
            done = self.env.event()
            on_end = done.succeed
        if nbytes <= 0:
            on_end(True)
            return done
        self._advance()
        now, k, bits = self.env.now, self._k, 8.0 * nbytes
        if not k:
            self._fresh()
        self._grow(1)
        seq = self._joins
        self._ids[k], self._seq[k] = client, seq
        self._joins += 1
        self._slot[client] = k
        state = self.channel.flow_state_one(self.direction, client, now)
        cols = self._cols
        cols[_STATE, k] = state
        self._k = k + 1
        self.events[client] = (on_end, bits)
        self._flows_changed = True
        if self.separable:
            eff = self.channel.efficiency_one(self.cell, self.direction, state)
            tgt = self._v + bits / eff if eff > 0 else math.inf
            cols[_TGT, k], cols[_REM0, k], cols[_EFF, k], cols[_V0, k] = tgt, bits, eff, self._v
            if 0 < eff < self._eff_min:
                self._eff_min = eff
            if tgt < self._cut:
                heapq.heappush(self._heap, (tgt, seq, client))
            self._reschedule()  # O(1): no recomputation to batch
            return done
        if self._win is not None:  # O(N): settled now, not at the end of the instant
            self._join_window(k, client, seq, bits, state)
            self._settle()
            return done
        cols[_REM, k], cols[_RATE, k] = bits, 0.0
        self._changed()
        return done

    def transfer_many(self, clients: list[int], nbytes: list[int], on_ends: list[OnEnd]) -> None:
        """Start several flows at this instant (a round's downloads): their states, targets
        and the heap as vectors, one recomputation for them all."""
        self._advance()
        now, k, n = self.env.now, self._k, len(clients)
        if not k:
            self._fresh()
        self._grow(n)
        ids = np.asarray(clients, dtype=np.int64)
        bits = 8.0 * np.asarray(nbytes, dtype=float)
        new = slice(k, k + n)
        self._ids[new] = ids
        self._seq[new] = np.arange(self._joins, self._joins + n)
        self._joins += n
        self._slot.update(zip(clients, range(k, k + n), strict=True))
        for c, b, on_end in zip(clients, bits.tolist(), on_ends, strict=True):
            self.events[c] = (on_end, b)
        state = self.channel.flow_state(self.direction, ids, now)
        cols = self._cols
        cols[_STATE, new] = state
        self._k = k + n
        self._flows_changed = True
        if not self.separable:
            if self._win is not None:
                for i, c in enumerate(clients):
                    self._join_window(k + i, c, int(self._seq[k + i]), float(bits[i]),
                                      float(state[i]))
            else:
                cols[_REM, new], cols[_RATE, new] = bits, 0.0
            self._changed()
            return
        eff = self.channel.efficiency(self.cell, self.direction, state)
        with np.errstate(divide="ignore"):
            cols[_TGT, new] = np.where(eff > 0, self._v + bits / eff, math.inf)
        cols[_REM0, new], cols[_EFF, new], cols[_V0, new] = bits, eff, self._v
        positive = eff[eff > 0]
        if positive.size:
            self._eff_min = min(self._eff_min, float(positive.min()))
        self._partition()  # O(K), once for them all
        self._reschedule()

    def reattach(self, client: int, on_end: OnEnd) -> None:
        """Who to tell when ``client``'s flow, restored from a checkpoint, ends."""
        self.events[client] = (on_end, self.events[client][1])

    def cancel(self, client: int) -> None:
        """Drop ``client``'s flow (dropout, deadline): the others speed up."""
        if client not in self.events:
            return
        self._advance()
        _, bits = self.events.pop(client)
        slot = self._slot[client]
        self.bits_carried += bits - self._rem_one(slot)
        self._near.pop(client, None)
        self._remove([slot])
        self._flows_changed = True
        self._changed()  # once for the instant: a deadline cancels thousands at once

    def estimate_rate_bps(self, client: int, known: ChannelKnowledge | None = None,
                          index: int = 0) -> float:
        """The rate ``client`` can expect now, sharing with every flow active or still to come
        (as ``known`` sees the channel; None: exactly).

        Counting only the flows active now would let the first client out of training expect
        the whole cell and pick a payload that the later flows then slow down.
        """
        others = max(self._k, self.contenders - 1)
        return self.channel.estimate_rate_bps(client, self.direction, self.env.now, others,
                                              known, index)

    def set_outage(self, down: bool) -> None:
        """The base station goes down (flows stall where they are) or comes back up."""
        self._advance()
        self.outage = down
        self._changed()

    # --- time passes -------------------------------------------------------------------------

    def _advance(self) -> None:
        now = self.env.now
        dt, k = now - self._t, self._k
        if dt > 0 and k and not self.outage:
            if self.separable:
                self._v += self._band_hz / k * dt  # every flow moved e x this many bits
            elif self._win is not None:
                self._win.advance(dt, k)
                for m in self._near.values():
                    m[0] -= m[1] * dt
            else:
                rem, rate, tmp = self._cols[_REM, :k], self._cols[_RATE, :k], \
                    self._cols[_TMP, :k]
                np.multiply(rate, dt, out=tmp)  # bits sent since the last advance
                np.subtract(rem, tmp, out=rem)
            self.busy_s += dt
        self._t = now

    def _remove(self, slots: list[int]) -> None:
        """Free ``slots``: the last active flow moves into each (highest slot first)."""
        ids, seq, cols = self._ids, self._seq, self._cols
        for slot in sorted(slots, reverse=True) if len(slots) > 1 else slots:
            del self._slot[int(ids[slot])]
            last = self._k - 1
            if slot != last:
                moved = int(ids[last])
                ids[slot], seq[slot] = moved, seq[last]
                cols[:_TMP, slot] = cols[:_TMP, last]
                self._slot[moved] = slot
            self._k = last

    def _end(self, slots: np.ndarray | list[int], ok: bool) -> Told:
        """Remove the flows in ``slots``; who to tell, in the order they joined."""
        if not len(slots):
            return []
        if len(slots) == 1:  # (most instants)
            c = int(self._ids[slots[0]])
            self._remove([int(slots[0])])
            self._flows_changed = True
            on_end, bits = self.events.pop(c)
            self._near.pop(c, None)
            if ok:
                self.bits_carried += bits
            return [(on_end, ok)]
        slots = np.asarray(slots, dtype=np.int64)
        if len(slots) > 1:
            slots = slots[np.argsort(self._seq[slots], kind="stable")]
        ended = self._ids[slots].tolist()
        self._remove(slots.tolist())
        self._flows_changed = True
        told = []
        for c in ended:
            on_end, bits = self.events.pop(c)
            self._near.pop(c, None)
            if ok:
                self.bits_carried += bits
            told.append((on_end, ok))
        return told

    def _changed(self) -> None:
        """Recompute once at the end of this instant, however many flows joined or left in it."""
        if not self._flush_pending:
            self._flush_pending = True
            self.env.timer(0, ("flush", self.direction, self.cell), self._flush)

    def _flush(self, _event: simpy.Event) -> None:
        self._flush_pending = False
        self._advance()
        self._settle()

    def _wake(self, at: float) -> None:
        if at == self._wake_at:
            self._wake_at = math.inf
            self._advance()
            self._settle()

    def _settle(self) -> None:
        """Complete the flows that have finished, take a new channel state if it changed,
        schedule the next wake-up; then tell the owners of the ended flows."""
        if self.separable:
            told = self._settle_separable()
        elif self._win is not None:
            told = self._settle_window()
        else:
            told = self._settle_coupled()
        for on_end, ok in told:
            on_end(ok)

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
            self.env.timer(max(at - self.env.now, 0.0), tag, wake)

    def _schedule(self, wake_at: float) -> None:
        if self._wake_at <= wake_at:
            return  # an earlier wake-up is pending: it will recompute and reschedule
        self._wake_at = wake_at
        self.rewake(wake_at)

    # --- the heap: the flows nearest to finishing ---------------------------------------------

    def _valid(self, entry: tuple[float, int, int]) -> bool:
        slot = self._slot.get(entry[2])
        return (slot is not None and int(self._seq[slot]) == entry[1]
                and self._cols[0, slot] == entry[0])

    def _partition(self) -> None:
        """Refill the heap with the ``_HEAP`` flows smallest in row 0 (one pass over K)."""
        k = self._k
        key = self._cols[0, :k]
        if k > _HEAP:
            pick = np.argpartition(key, _HEAP - 1)[:_HEAP]
            self._cut = float(key[pick].max())
        else:
            pick, self._cut = np.arange(k), math.inf
        seq, ids = self._seq, self._ids
        self._heap = sorted(zip(key[pick].tolist(), seq[pick].tolist(), ids[pick].tolist(),
                                strict=True))

    def _top(self) -> tuple[float, int, int] | None:
        """The heap's smallest valid entry (a refill when it ran dry but flows are left)."""
        while True:
            heap = self._heap
            while heap and not self._valid(heap[0]):
                heapq.heappop(heap)
            if heap or math.isinf(self._cut):
                return heap[0] if heap else None
            self._partition()  # (a new heap)

    # --- coupled: every rate recomputed when the set of flows changes ------------------------

    def _settle_coupled(self) -> Told:
        k = self._k
        rem, rate, tmp = self._cols[_REM, :k], self._cols[_RATE, :k], self._cols[_TMP, :k]
        # Finished: less than a bit, or less than a nanosecond at its rate, left (round-off).
        np.multiply(rate, _DONE_S, out=tmp)
        np.add(tmp, _DONE_BITS, out=tmp)
        told = self._end(np.flatnonzero(rem <= tmp), ok=True)
        self._notify()
        k = self._k
        if not k or self.outage:  # (stalled until set_outage(False) recomputes)
            self._cols[_RATE, :k] = 0.0
            return told
        now = self.env.now
        if self._law is not None and k >= subbands.SMALLEST:  # enough flows for a window
            self._open_window(self._cols[_REM, :k].copy())
            return told + self._schedule_window()
        rem, rate, state, tmp = (self._cols[_REM, :k], self._cols[_RATE, :k],
                                 self._cols[_STATE, :k], self._cols[_TMP, :k])
        if now >= self._state_until:  # fading block or trace step changed: every flow's state
            state[:] = self.channel.flow_state(self.direction, self._ids[:k], now)
            self._state_until = self.channel.next_change_s(now)
        rate[:] = self.channel.shared_rates(self.cell, self.direction, state)
        change_at = self._state_until
        np.maximum(rate, _NO_RATE, out=tmp)
        np.divide(rem, tmp, out=tmp)  # each flow's time to finish at these rates (s)
        first = float(tmp.min())
        if first >= _NEVER_S and math.isinf(change_at):
            told += self._end(np.flatnonzero(rate <= 0), ok=False)  # an outage nothing lifts
            self._notify()
            return told
        self._schedule(now + min(first, change_at - now))
        return told

    # --- separable: one virtual clock ---------------------------------------------------------

    def _due(self) -> list[int] | np.ndarray:
        """The slots of the flows that have finished: less than a bit, or less than a
        nanosecond at their rate, left (float round-off)."""
        k, cols, v = self._k, self._cols, self._v
        if not k or self.outage:
            return []
        per_s = self._band_hz / k  # dV/dt
        # A finished flow has target - V <= per_s·1e-9 + 1e-6 / e; e >= _eff_min.
        reach = v + (per_s * _DONE_S + _DONE_BITS / self._eff_min) * (1 + 1e-9) + 1e-12 * abs(v)
        if reach >= self._cut:  # past what the heap is known to hold: look at every flow
            eff, tgt = cols[_EFF, :k], cols[_TGT, :k]
            with np.errstate(invalid="ignore"):
                done = (eff > 0) & (eff * (tgt - v) <= per_s * eff * _DONE_S + _DONE_BITS)
            return np.flatnonzero(done)
        heap, slots, kept = self._heap, [], []
        while heap and heap[0][0] <= reach:
            entry = heapq.heappop(heap)
            if not self._valid(entry):
                continue
            s = self._slot[entry[2]]
            eff = cols[_EFF, s]
            if eff * (cols[_TGT, s] - v) <= per_s * eff * _DONE_S + _DONE_BITS:
                slots.append(s)
            else:
                kept.append(entry)
        for entry in kept:
            heapq.heappush(heap, entry)
        return slots

    def _resync(self) -> None:
        """The channel state changed: each flow's bits left at its old efficiency, its new
        efficiency, its new target (the virtual clock starts again at 0)."""
        k, cols, now = self._k, self._cols, self.env.now
        rem = self._rem_all()
        state = self.channel.flow_state(self.direction, self._ids[:k], now)
        new = self.channel.efficiency(self.cell, self.direction, state)
        cols[_STATE, :k], cols[_EFF, :k], cols[_REM0, :k], cols[_V0, :k] = state, new, rem, 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            cols[_TGT, :k] = np.where(new > 0, rem / new, math.inf)
        self._v = 0.0
        positive = new[new > 0]
        self._eff_min = float(positive.min()) if positive.size else math.inf
        self._state_until = self.channel.next_change_s(now)
        self._partition()

    def _settle_separable(self) -> Told:
        told = self._end(self._due(), ok=True)
        self._notify()
        if self._k and not self.outage and self.env.now >= self._state_until:
            self._resync()
        return told + self._reschedule(tell=False)

    def _reschedule(self, tell: bool = True) -> Told:
        """Schedule the wake-up at the next target or change of state; fail the flows no
        change will lift (all in outage, channel constant)."""
        k = self._k
        if not k:
            self._v, self._heap, self._cut = 0.0, [], math.inf
            return []
        if self.outage:
            return []
        now, change_at = self.env.now, self._state_until
        top = self._top()
        if top is None or math.isinf(top[0]):
            if math.isinf(change_at):
                failed = self._end(np.arange(k), ok=False)  # an outage nothing lifts
                self._notify()
                if tell:
                    for on_end, ok in failed:
                        on_end(ok)
                    return []
                return failed
            self._schedule(change_at)
            return []
        first_s = max((top[0] - self._v) * k / self._band_hz, 0.0)
        self._schedule(now + min(first_s, change_at - now))
        return []

    # --- checkpoints ---------------------------------------------------------------------------

    def refresh(self) -> None:
        """A pending end-of-instant recomputation (restored from a checkpoint)."""
        self._flush_pending = False
        self._changed()

    _SCALARS = ("busy_s", "bits_carried", "_t", "_v", "_wake_at", "_state_until", "outage",
                "_flush_pending", "contenders")

    def state(self) -> dict[str, Any]:
        """The link and its active flows (its columns, exactly), in the order they joined."""
        order = self._order()
        ids = self._ids[: self._k][order].tolist()
        return {**{k: getattr(self, k) for k in self._SCALARS},
                "flows_changed": self._flows_changed,
                "ids": ids, "cols": self._cols[:_ROWS, : self._k][:, order].tolist(),
                "bits": [self.events[c][1] for c in ids],
                "window": self._win.state() if self._win is not None else None,
                "near": {str(c): m for c, m in self._near.items()}}

    def restore(self, doc: dict[str, Any]) -> None:
        """Take :meth:`state`'s document; each restored flow's owner is attached again
        (:meth:`reattach`) by the update it belongs to."""
        self._laws()
        for k in self._SCALARS:
            setattr(self, k, doc[k])
        self._flows_changed = doc.get("flows_changed", False)
        k = len(doc["ids"])
        cap = max(16, k)
        self._ids, self._cols = np.empty(cap, dtype=np.int64), np.empty((_TMP + 1, cap))
        self._seq = np.empty(cap, dtype=np.int64)
        self._ids[:k], self._seq[:k] = doc["ids"], np.arange(k)
        self._joins = k
        self._slot = {int(c): i for i, c in enumerate(doc["ids"])}
        self._k = k
        if k:
            self._cols[:_ROWS, :k] = np.array(doc["cols"], dtype=float)
        self._win = (subbands.Window.restored(*self._law, doc["window"])
                     if doc.get("window") else None)
        self._near = {int(c): list(m) for c, m in doc.get("near", {}).items()}
        self._heap, self._cut = [], math.inf
        if self.separable:
            eff = self._cols[_EFF, :k]
            positive = eff[eff > 0]
            self._eff_min = float(positive.min()) if positive.size else math.inf
        if k and (self.separable or self._win is not None):
            self._partition()
        self.events = {int(c): (None, float(b))
                       for c, b in zip(doc["ids"], doc["bits"], strict=True)}

"""OFDMA uplink sharing, served exactly by a series while the number of flows stays in a window.

On an OFDMA uplink each of K flows gets B/K Hz and keeps its transmit power on it, so its SNR
there is K times its full-band SNR s: a rate of f(K, s) = (B / K) log2(1 + K s) bits/s (0 below
the outage SNR: K s < gamma). Every flow's rate changes differently when K does, so no single
virtual clock carries them all (``fedsim.links`` has one for the separable links). But around
a window's centre K0, with y = (K - K0) / K0 and q = K0 s / (1 + K0 s) in (0, 1),

    log2(1 + K s) = log2(1 + K0 s) + ln(1 + y q) / ln 2
                  = L(s) + sum_n (-1)^(n+1) (y q)^n / (n ln 2),      |y q| < |y|,

so the bits a flow is served over segments of durations dt at K flows are

    L(s) * A_0 + sum_n c_n q^n A_n,   A_0 = sum dt B / K,   A_n = sum dt (B / K) y^n,

with c_n = (-1)^(n+1) / (n ln 2): N + 1 accumulators shared by every flow of the cell, updated
once per change of K (O(N)), give any flow's bits served in O(N). The window is K0 +- max(2,
K0 / 32), so |y| <= 1/16 and N = 13 terms leave less than 1e-17 of the served bits: the same as
integrating each flow's rate between events (``tests/test_subbands.py``), to float rounding. It
moves (a vectorized pass over the flows) when K leaves it or the channel states change (a
fading block).

Within the window a flow is *on* (never in outage: K_lo s >= gamma; its rate is at most
f(K_lo, s), which bounds its finish from below), *off* (K_hi s < gamma: rate 0 throughout) or
*marginal* (it crosses the outage threshold inside the window: a deep fade at the cell's
edge, rare), which the link follows flow by flow.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedsim.channels import Channel

TERMS = 13  # N: (1/16)^(N+1) / (N+1) < 1e-17
SMALLEST = 32  # below this many flows a link recomputes every rate at each change instead
_C = [(-1.0) ** (n + 1) / (n * math.log(2.0)) for n in range(1, TERMS + 1)]  # c_1 .. c_N
_C_ARR = np.array(_C)
ON, OFF, MARGINAL = 0.0, 1.0, 2.0
# A finished flow: fewer bits left than this (float round-off), or than a nanosecond's worth.
DONE_BITS, DONE_S = 1e-6, 1e-9
# The rows of a link's flow table (``fedsim.links``) that a window reads and writes: each
# flow's finish bound (the heap's key), bits left at its snapshot, channel state, L, q, its
# snapshot and its class; a link recomputing every rate keeps bits left and rate in 0 and 1.
LB, REM0, STATE, L, Q, SNAP, CLS = range(7)
REM, RATE = 0, 1
Told = list[tuple[Callable[[bool], None], bool]]


def rate_bps(band_hz: float, k: int, state: float, outage: float) -> float:
    """f(K, s): one flow's rate among ``k`` (its SNR on B/K Hz is K s)."""
    snr = state * k
    return 0.0 if snr < outage else (band_hz / k) * math.log2(1.0 + snr)


def rates_bps(band_hz: float, k: int, state: np.ndarray, outage: float) -> np.ndarray:
    """:func:`rate_bps` of each of ``state``, as ``Channel.shared_rates`` computes it."""
    snr = state * k
    rate = (band_hz / k) * np.log2(1.0 + snr)
    rate[snr < outage] = 0.0
    return rate


class Window:
    """The accumulators of one window of an OFDMA link (module text), and the snapshots of
    them taken when flows joined it."""

    def __init__(self, band_hz: float, k0: int, outage: float) -> None:
        self.band_hz, self.k0, self.outage = band_hz, k0, outage
        half = max(2, k0 // 32)
        self.k_lo, self.k_hi = max(k0 - half, 1), k0 + half
        self.acc = np.zeros(TERMS + 1)  # A_0 .. A_N
        self.snaps = [self.acc.copy()]  # 0: the window's start
        self._powers: dict[int, np.ndarray] = {}  # k -> [1, y, y^2, ...] B / k

    def holds(self, k: int) -> bool:
        return self.k_lo <= k <= self.k_hi

    def advance(self, dt_s: float, k: int) -> None:
        """``dt_s`` seconds at ``k`` flows."""
        pw = self._powers.get(k)
        if pw is None:
            y = (k - self.k0) / self.k0
            pw = self._powers[k] = self.band_hz / k * np.array([y**n for n in range(TERMS + 1)])
        self.acc += dt_s * pw

    def snapshot(self) -> int:
        """The accumulators now, for a flow that joins: its bits are served from here."""
        self.snaps.append(self.acc.copy())
        return len(self.snaps) - 1

    def shape(self, state: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(L, q, class) of flows of channel ``state`` in this window."""
        ks = self.k0 * state
        cls = np.full(len(state), ON)
        cls[state * self.k_lo < self.outage] = MARGINAL
        cls[state * self.k_hi < self.outage] = OFF
        return np.log2(1.0 + ks), ks / (1.0 + ks), cls

    def shape_one(self, state: float) -> tuple[float, float, float]:
        ks = self.k0 * state
        cls = (OFF if state * self.k_hi < self.outage else
               MARGINAL if state * self.k_lo < self.outage else ON)
        return math.log2(1.0 + ks), ks / (1.0 + ks), cls

    def served(self, big_l: np.ndarray, q: np.ndarray, snap: np.ndarray) -> np.ndarray:
        """Bits served to on-flows (L, q) since their snapshots ``snap``."""
        d = self.acc[None, :] - np.array(self.snaps)[snap.astype(np.int64)]
        p = _C_ARR[-1] * d[:, -1]
        for n in range(TERMS - 2, -1, -1):  # Horner in q over c_n A_n
            p = p * q + _C_ARR[n] * d[:, n + 1]
        return big_l * d[:, 0] + p * q

    def served_one(self, big_l: float, q: float, snap: int) -> float:
        d = (self.acc - self.snaps[snap]).tolist()
        p = 0.0
        for n in range(TERMS, 0, -1):
            p = (p + _C[n - 1] * d[n]) * q
        return big_l * d[0] + p

    def rate_lo(self, state: float) -> float:
        """The fastest an on-flow can go while the window holds: f(K_lo, s)."""
        return rate_bps(self.band_hz, self.k_lo, state, self.outage)

    def state(self) -> dict[str, object]:
        return {"k0": self.k0, "acc": self.acc.tolist(), "snaps": [s.tolist() for s in self.snaps]}

    @classmethod
    def restored(cls, band_hz: float, outage: float, doc: dict) -> Window:
        win = cls(band_hz, doc["k0"], outage)
        win.acc = np.array(doc["acc"], dtype=float)
        win.snaps = [np.array(s, dtype=float) for s in doc["snaps"]]
        return win


class Windowed:
    """How a link serves an OFDMA uplink's flows by windows (module text): a mixin of
    ``fedsim.links.SharedLink``, working on its flow table, heap and clock. Flows are *near*
    (followed one by one: bits left and rate) once their bounds come before the next finish;
    the others wait in the heap or past its cut."""

    _win: Window | None
    _near: dict[int, list[float]]
    _law: tuple[float, float]
    _cols: np.ndarray
    _ids: np.ndarray
    _slot: dict[int, int]
    _heap: list[tuple[float, int, int]]
    _cut: float
    _k: int
    _state_until: float
    channel: Channel
    direction: str
    outage: bool
    env: Any

    def _join_window(self, slot: int, client: int, seq: int, bits: float, state: float) -> None:
        win, cols, now = self._win, self._cols, self.env.now
        big_l, q, cls = win.shape_one(state)
        cols[REM0, slot], cols[L, slot], cols[Q, slot] = bits, big_l, q
        cols[SNAP, slot], cols[CLS, slot] = win.snapshot(), cls
        lb = math.inf
        if cls == ON:
            lb = now + bits / win.rate_lo(state)
        elif cls == MARGINAL:
            self._near[client] = [bits, 0.0]  # its rate comes with the instant's flush
        cols[LB, slot] = lb
        if lb < self._cut:
            heapq.heappush(self._heap, (lb, seq, client))

    def _open_window(self, rem: np.ndarray) -> None:
        """A window around K flows now, each with ``rem`` bits left (channel states taken
        again if they changed)."""
        k, cols, now = self._k, self._cols, self.env.now
        if now >= self._state_until:
            cols[STATE, :k] = self.channel.flow_state(self.direction, self._ids[:k], now)
            self._state_until = self.channel.next_change_s(now)
        band, outage = self._law
        self._win = win = Window(band, k, outage)
        state = cols[STATE, :k]
        big_l, q, cls = win.shape(state)
        cols[REM0, :k], cols[L, :k], cols[Q, :k], cols[CLS, :k] = rem, big_l, q, cls
        cols[SNAP, :k] = 0.0
        on = cls == ON
        lb = np.full(k, math.inf)
        lb[on] = now + rem[on] / rates_bps(band, win.k_lo, state[on], outage)
        cols[LB, :k] = lb
        self._near = {int(self._ids[s]): [float(rem[s]), 0.0]
                      for s in np.flatnonzero(cls == MARGINAL).tolist()}
        self._partition()

    def _close_window(self) -> None:
        """Back to recomputing every rate (few flows left)."""
        k = self._k
        rem = self._rem_all()
        self._win, self._near = None, {}
        self._cols[REM, :k], self._cols[RATE, :k] = rem, 0.0
        self._heap, self._cut = [], math.inf

    def _examine(self, top: tuple[float, int, int]) -> float:
        """Take the heap's top flow out to follow it one by one: its bits left now."""
        heapq.heappop(self._heap)
        s = self._slot[top[2]]
        rem = self._rem_one(s)
        self._cols[LB, s] = math.inf  # no longer in the heap
        self._near[top[2]] = [rem, 0.0]  # (its rate comes with the schedule)
        return rem

    def _settle_window(self) -> Told:
        k, now, cols, win = self._k, self.env.now, self._cols, self._win
        band, outage = self._law
        # The flows that finished, at the rates of the segment just ended (K flows): among
        # those followed one by one, and those whose bounds have come (by the series).
        done = [self._slot[c] for c, (left, rate) in self._near.items()
                if left <= rate * DONE_S + DONE_BITS]
        if not self.outage:
            slowest = (band / win.k_hi) * math.log2(1.0 + outage)  # an on-flow's least
            reach = now + 2 * DONE_S + DONE_BITS / slowest
            while (top := self._top()) is not None and top[0] <= reach:
                rem = self._examine(top)
                s = self._slot[top[2]]
                if rem <= rate_bps(band, k, float(cols[STATE, s]), outage) \
                        * DONE_S + DONE_BITS:
                    done.append(s)
        told = self._end(done, ok=True)
        self._notify()
        k = self._k
        if not k:
            self._win, self._near, self._heap, self._cut = None, {}, [], math.inf
            return told
        if k < SMALLEST:
            self._close_window()
            return told + self._settle_coupled()
        if self.outage:
            return told
        if now >= self._state_until or not win.holds(k):
            self._open_window(self._rem_all())
        return told + self._schedule_window()

    def _schedule_window(self) -> Told:
        """The exact next finish among the flows followed one by one and the heap's flows
        whose bounds come before it (then followed too); a wake-up then, or at the next change
        of channel state."""
        k, now, cols, slot = self._k, self.env.now, self._cols, self._slot
        band, outage = self._law
        best = math.inf
        for c, m in self._near.items():
            m[1] = rate = rate_bps(band, k, float(cols[STATE, slot[c]]), outage)
            if rate > 0 and now + m[0] / rate < best:
                best = now + m[0] / rate
        while (top := self._top()) is not None and top[0] < best:
            rem = self._examine(top)
            m = self._near[top[2]]
            m[1] = rate = rate_bps(band, k, float(cols[STATE, slot[top[2]]]), outage)
            best = min(best, now + rem / rate)  # (an on-flow: never in outage here)
        change_at = self._state_until
        if math.isinf(best):
            if math.isinf(change_at):  # every flow in outage, and nothing will change
                told = self._end(list(range(k)), ok=False)
                self._notify()
                self._win, self._near, self._heap, self._cut = None, {}, [], math.inf
                return told
            self._schedule(change_at)
            return []
        self._schedule(min(best, change_at))
        return []

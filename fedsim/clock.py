"""The simulated clock: SimPy's environment, counting the events it processes and keeping a
ledger of the timers fedsim schedules.

Every timeout fedsim creates goes through :meth:`Clock.timer` with a *tag* that says how to
schedule it again: ``("noop",)`` for a wait that only has to fire (a process waiting, a
deadline, a dropout or crash timer that may outlive its update), ``("wake", direction, cell,
at)`` and ``("flush", direction, cell)`` for a shared link's recomputations, ``("fault",)`` for
a fault process's timer (restarted by the process itself). A checkpoint lists
:meth:`Clock.pending` — in SimPy's own order: every timer is a NORMAL-priority event, so the
heap orders them by (time, creation) — without reading SimPy's private queue, and a resumed
run starts its clock at the checkpoint's time through SimPy's public ``initial_time``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from heapq import heappush
from typing import Any

import simpy
from simpy.core import NORMAL
from simpy.events import Timeout

Tag = tuple[Any, ...]
NOOP: Tag = ("noop",)


class Clock(simpy.Environment):
    """A SimPy environment that counts its events and knows its pending timers."""

    def __init__(self, initial_time: float = 0.0) -> None:
        super().__init__(initial_time)
        self._scheduled = 0  # events put on the queue so far
        self._offset = 0  # events_processed as a resumed run had counted them
        self._ids = itertools.count()
        # Pending timer -> (fires at s, creation number, tag); one bound callback forgets a
        # timer as it fires (a closure per timer cost ~1 us each at 10^5 timers a round).
        self._ledger: dict[simpy.Event, tuple[float, int, Tag]] = {}
        self._forget = self._ledger.pop

    def schedule(self, event: simpy.Event, priority: int = NORMAL, delay: float = 0) -> None:
        """SimPy's own, counting: events processed = events scheduled - events still queued
        (no wrapper around every step)."""
        self._scheduled += 1
        heappush(self._queue, (self._now + delay, priority, next(self._eid), event))

    @property
    def events_processed(self) -> int:
        return self._offset + self._scheduled - len(self._queue)

    @events_processed.setter
    def events_processed(self, n: int) -> None:
        self._offset += n - self.events_processed

    def timer(self, delay_s: float, tag: Tag = NOOP,
              callback: Callable[[simpy.Event], None] | None = None,
              value: Any = None) -> simpy.Timeout:
        """A timeout ``delay_s`` from now (succeeding with ``value``), in the ledger until it
        fires; ``callback`` runs when it does (after the ledger forgets it)."""
        ev = Timeout(self, delay_s, value)  # (not self.timeout: SimPy binds that per access)
        self._ledger[ev] = (self._now + delay_s, next(self._ids), tag)
        if callback is None:
            ev.callbacks.append(self._forget)
        else:
            ev.callbacks += (self._forget, callback)
        return ev

    def timer_at(self, at_s: float, tag: Tag = NOOP,
                 callback: Callable[[simpy.Event], None] | None = None,
                 value: Any = None) -> simpy.Timeout:
        """A timer that fires at exactly ``at_s`` (a restored one: ``now + (at - now)`` can
        miss ``at`` by a rounding step and reorder it against its neighbours)."""
        delay_s = max(at_s - self.now, 0.0)
        for _ in range(64):  # a few steps of one ulp at most
            if self.now + delay_s < at_s:
                delay_s = math.nextafter(delay_s, math.inf)
            elif self.now + delay_s > at_s and delay_s > 0:
                delay_s = math.nextafter(delay_s, -math.inf)
            else:
                break
        return self.timer(delay_s, tag, callback, value)

    def pending(self) -> list[tuple[float, Tag]]:
        """The timers still to fire, in the order SimPy will fire them: (time s, tag)."""
        return [(at, tag) for at, _, tag in sorted(self._ledger.values(),
                                                   key=lambda v: (v[0], v[1]))]

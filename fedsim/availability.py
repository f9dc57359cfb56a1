"""Availability of clients: an on/off Markov chain per client (``mean_on_s``, ``mean_off_s``).

Holding times are exponential, drawn counter-based keyed by (client, interval index), so a
client's timeline is fixed by the seed whatever is asked of it and when. Vectorized over the
fleet: asking who is on at ``t`` advances every chain to ``t`` in a few numpy passes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedsim.checkpoint import array, from_array
from fedsim.devices import Fleet
from fedsim.rng import hashed_exponential, hashed_uniform


class Availability:
    """On/off Markov chain per client with exponential holding times (mean_on_s, mean_off_s).

    Holding times are counter-based draws keyed by (client, interval index), so a client's
    timeline is fixed by the seed whatever is asked of it and when.
    """

    def __init__(self, fleet: Fleet, key_: int) -> None:
        n = fleet.size
        self._key = key_
        self._mean = {True: fleet.mean_on_s, False: fleet.mean_off_s}
        self.always_on = fleet.mean_off_s <= 0
        p_on = fleet.mean_on_s / (fleet.mean_on_s + fleet.mean_off_s)  # stationary law
        ids = np.arange(n)
        self.on = self.always_on | (hashed_uniform(key_, ids, -1) < p_on)
        self.count = np.zeros(n, dtype=np.int64)  # intervals begun so far
        # Memoryless: the residual of the interval in progress at t=0 has the same law.
        self.next_switch = self._draw(ids)
        self.next_switch[self.always_on] = math.inf

    def _draw(self, idx: np.ndarray) -> np.ndarray:
        mean = np.where(self.on[idx], self._mean[True][idx], self._mean[False][idx])
        return mean * hashed_exponential(self._key, idx, self.count[idx])

    def _advance(self, idx: np.ndarray, t: float) -> None:
        while True:
            due = idx[self.next_switch[idx] <= t]
            if not due.size:
                return
            self.on[due] = ~self.on[due]
            self.count[due] += 1
            self.next_switch[due] += self._draw(due)

    def available(self, t: float) -> np.ndarray:
        """Ids of the clients on at time ``t`` (t never decreases between calls)."""
        self._advance(np.arange(len(self.on)), t)
        return np.flatnonzero(self.on)

    def next_off_s(self, client: int, t: float) -> float:
        """When ``client``, on at ``t``, next goes off (inf: never)."""
        if self.next_switch[client] <= t:  # rare: most clients have not switched since
            self._advance(np.array([client]), t)
        return float(self.next_switch[client]) if self.on[client] else t

    def next_off_many(self, clients: np.ndarray, t: float) -> np.ndarray:
        """:meth:`next_off_s` of each of ``clients`` (distinct), as a vector."""
        due = clients[self.next_switch[clients] <= t]
        if due.size:
            self._advance(due, t)
        return np.where(self.on[clients], self.next_switch[clients], t)

    def next_on_s(self, t: float) -> float:
        """The earliest time after ``t`` at which some off client comes on."""
        self._advance(np.arange(len(self.on)), t)
        off = ~self.on
        return float(self.next_switch[off].min()) if off.any() else t

    # --- snapshot protocol (fedsim.checkpoint) -------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"on": array(self.on), "count": array(self.count),
                "next_switch": array(self.next_switch)}

    def restore(self, state: dict[str, Any]) -> None:
        self.on, self.count, self.next_switch = (from_array(state[k])
                                                 for k in ("on", "count", "next_switch"))

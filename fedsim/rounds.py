"""Round policies (registry ``ROUND_POLICIES``): how clients are selected and rounds close.

- ``sync``: each round waits for every selected client to arrive, drop out or fail (FedAvg);
- ``deadline``: like sync, but updates not uploaded by the deadline are dropped;
- ``async``: FedBuff (Nguyen et al. 2022): ``concurrency`` clients train at once and the server
  aggregates every ``buffer_size`` arrivals, each weighted (1 + staleness)^-a.

A policy is a SimPy process (:meth:`RoundPolicy.run`) over a :class:`~fedsim.engine.Simulation`:
it starts the life of one update per selected client (``Simulation.client_update``) and closes
rounds with ``Simulation.close_round``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator
from typing import TYPE_CHECKING

import numpy as np
import simpy

from fedsim.engine import Ticket
from fedsim.plugins import ROUND_POLICIES

if TYPE_CHECKING:
    from fedsim.engine import Simulation


class RoundPolicy(ABC):
    """Selects clients, starts their updates and closes rounds (a SimPy process)."""

    name: str

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.cfg = sim.scenario.round_policy

    @abstractmethod
    def run(self) -> Generator[simpy.Event, None, None]: ...

    def start(self, client: int, round_: int, deadline_at: float | None = None
              ) -> tuple[Ticket, simpy.Process]:
        tk = Ticket(client, round_)
        self.sim.rec.emit(self.sim.env.now, round_, client, "select")
        return tk, self.sim.env.process(self.sim.client_update(tk, deadline_at))


@ROUND_POLICIES.register("sync")
class SyncRounds(RoundPolicy):
    """Each round waits for every selected client to arrive, drop out or fail (FedAvg)."""

    deadline_s: float | None = None

    def run(self) -> Generator[simpy.Event, None, None]:
        sim, env = self.sim, self.sim.env
        for r in range(sim.first_round, sim.scenario.rounds):
            candidates = yield from sim.wait_for_clients()
            started = env.now
            deadline_at = None if self.deadline_s is None else started + self.deadline_s
            running = [self.start(c, r, deadline_at)
                       for c in sim.select(candidates, self.cfg.clients_per_round)]
            procs = [p for _, p in running]
            yield from self.wait(running, deadline_at)
            arrivals = [p.value for p in procs if p.value is not None]
            stats = {"selected": len(procs), "arrived": len(arrivals)}
            yield from sim.close_round(r, started, arrivals, stats)
            sim.at_boundary(r)

    def wait(self, running: list[tuple[Ticket, simpy.Process]], deadline_at: float | None
             ) -> Generator[simpy.Event, None, None]:
        yield self.sim.env.all_of([p for _, p in running])


@ROUND_POLICIES.register("deadline")
class DeadlineRounds(SyncRounds):
    """Like ``sync``, but updates not uploaded by the deadline are dropped (deadline misses).

    An update that finished its upload before the deadline is still ingested and aggregated.
    """

    def __init__(self, sim: Simulation) -> None:
        super().__init__(sim)
        self.deadline_s = self.cfg.deadline_s

    def wait(self, running: list[tuple[Ticket, simpy.Process]], deadline_at: float | None
             ) -> Generator[simpy.Event, None, None]:
        env = self.sim.env
        procs = [p for _, p in running]
        left_s = max((deadline_at if deadline_at is not None else env.now) - env.now, 0.0)
        timer = env.timer(left_s)  # may outlive the round, firing into nothing
        yield env.all_of(procs) | timer
        for tk, p in running:
            if p.is_alive and not tk.arrived:
                p.interrupt("deadline_miss")
        yield env.all_of(procs)


@ROUND_POLICIES.register("async")
class AsyncBuffered(RoundPolicy):
    """FedBuff (Nguyen et al. 2022): ``concurrency`` clients train at once; the server
    aggregates every ``buffer_size`` arrivals, each weighted (1 + staleness)^-a."""

    def run(self) -> Generator[simpy.Event, None, None]:
        sim, env, cfg = self.sim, self.sim.env, self.cfg
        version, buffer = 0, []
        in_flight: dict[simpy.Process, Ticket] = {}
        started = env.now
        stats = {"selected": 0, "arrived": 0}
        while version < sim.scenario.rounds:
            busy = {tk.client for tk in in_flight.values()}
            free = [c for c in sim.available() if int(c) not in busy]
            need = cfg.concurrency - len(in_flight)
            for c in sim.select(np.array(free, dtype=np.int64), need) if need > 0 else []:
                tk, p = self.start(c, version)
                in_flight[p] = tk
                stats["selected"] += 1
            if not in_flight:
                yield from sim.wait_for_clients()
                continue
            yield env.any_of(list(in_flight))
            for p in [p for p in in_flight if not p.is_alive]:
                tk = in_flight.pop(p)
                if p.value is not None:
                    arrival = p.value
                    arrival.staleness = version - tk.round
                    arrival.weight = (1.0 + arrival.staleness) ** -cfg.staleness_exponent
                    sim.rec.emit(env.now, version, tk.client, "buffered", 0,
                                 f"staleness={arrival.staleness} weight={arrival.weight:.6g}")
                    buffer.append(arrival)
                    stats["arrived"] += 1
            while len(buffer) >= cfg.buffer_size and version < sim.scenario.rounds:
                batch, buffer = buffer[: cfg.buffer_size], buffer[cfg.buffer_size:]
                yield from sim.close_round(version, started, batch, stats)
                version, started = version + 1, env.now
                stats = {"selected": 0, "arrived": 0}
        for p, tk in in_flight.items():
            if p.is_alive and not tk.arrived:
                p.interrupt("cancelled")

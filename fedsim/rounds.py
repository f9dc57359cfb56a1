"""Round policies (registry ``ROUND_POLICIES``): how clients are selected and rounds close.

- ``sync``: each round waits for every selected client to arrive, drop out or fail (FedAvg);
- ``deadline``: like sync, but updates not uploaded by the deadline are dropped;
- ``async``: FedBuff (Nguyen et al. 2022): ``concurrency`` clients train at once and the server
  aggregates every ``buffer_size`` arrivals, each weighted (1 + staleness)^-a.

A policy is a SimPy process (:meth:`RoundPolicy.run`) over a :class:`~fedsim.engine.Simulation`:
it begins the life of one update per selected client (``Simulation.begin``), is told when each
has ended, and closes rounds with ``Simulation.close_round``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np
import simpy

from fedsim.plugins import ROUND_POLICIES
from fedsim.updates import Ticket
from fedsim.workload import Arrival

if TYPE_CHECKING:
    from fedsim.engine import Simulation


class Cohort:
    """The updates one round began: ``done`` succeeds once all have ended; ``enough`` (with a
    ``target``) once that many were accepted, or none is left running."""

    def __init__(self, env: simpy.Environment, size: int, target: int | None = None) -> None:
        self.left, self.accepted, self.target = size, 0, target
        self.done = env.event()
        self.enough = env.event() if target is not None else None
        if not size:
            self.done.succeed()

    @property
    def short(self) -> bool:
        """Fewer than ``target`` accepted while some are still running."""
        return self.target is not None and self.accepted < self.target and self.left > 0

    def ended(self, tk: Ticket) -> None:
        self.left -= 1
        self.accepted += tk.value is not None
        if self.enough is not None and not self.enough.triggered and not self.short:
            self.enough.succeed()
        if not self.left:
            self.done.succeed()


class RoundPolicy(ABC):
    """Selects clients, begins their updates and closes rounds (a SimPy process)."""

    name: str

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.cfg = sim.scenario.round_policy

    @abstractmethod
    def run(self) -> Generator[simpy.Event, None, None]: ...

    # --- snapshot protocol: sync and deadline rounds end with nothing in flight -------------

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return {}, {}

    def restore(self, state: dict[str, Any], tensors: dict[str, Any]) -> int:
        """Take :meth:`state`'s documents; returns the SimPy events the restore adds that the
        original run did not have."""
        return 0

    def in_flight_tickets(self) -> dict[int, Ticket]:
        """The restored updates still running, by serial."""
        return {}

    def open(self, clients: list[int], round_: int) -> list[Ticket]:
        """A ticket for each of ``clients``' updates in ``round_`` (their ``select`` events)."""
        sim, first = self.sim, self.sim.updates_begun
        tickets = [Ticket(c, round_, serial=first + i) for i, c in enumerate(clients)]
        sim.updates_begun += len(tickets)
        sim.rec.emit_many(sim.env.now, round_, clients, "select",
                          details=[sim.selector.detail(c) for c in clients])
        return tickets


@ROUND_POLICIES.register("sync")
class SyncRounds(RoundPolicy):
    """Each round waits for every selected client to arrive, drop out or fail (FedAvg)."""

    deadline_s: float | None = None

    def run(self) -> Generator[simpy.Event, None, None]:
        sim, env = self.sim, self.sim.env
        for r in range(sim.first_round, sim.scenario.rounds):
            candidates = yield from sim.wait_for_clients()
            if not len(candidates):  # every battery is below energy.min_charge: no more rounds
                sim.rec.emit(env.now, r, -1, "fleet_depleted")
                return
            started = env.now
            deadline_at = None if self.deadline_s is None else started + self.deadline_s
            k = self.cfg.clients_per_round
            tickets = self.open(sim.select(candidates, k, r), r)
            cohort = Cohort(env, len(tickets), sim.selector.target(k))
            sim.updates.begin(tickets, deadline_at, cohort.ended)
            if cohort.target is not None:
                yield from self.first_arrivals(tickets, cohort)
            yield from self.wait(tickets, cohort, deadline_at)
            arrivals = [tk.value for tk in tickets if tk.value is not None]
            stats = {"selected": len(tickets), "arrived": len(arrivals)}
            yield from sim.close_round(r, started, arrivals, stats)
            sim.at_boundary(r)

    def wait(self, tickets: list[Ticket], cohort: Cohort, deadline_at: float | None
             ) -> Generator[simpy.Event, None, None]:
        yield cohort.done

    def first_arrivals(self, tickets: list[Ticket], cohort: Cohort
                       ) -> Generator[simpy.Event, None, None]:
        """Until ``target`` updates are accepted (or none is left running), then stop the
        updates still short of their upload's end (``over_selected``); those past it are
        ingested and aggregated, as at a deadline."""
        if cohort.short:
            yield cohort.enough
        for tk in tickets:
            self.sim.updates.stop(tk, "over_selected")  # (only those still live)


@ROUND_POLICIES.register("deadline")
class DeadlineRounds(SyncRounds):
    """Like ``sync``, but updates not uploaded by the deadline are dropped (deadline misses).

    An update that finished its upload before the deadline is still ingested and aggregated.
    """

    def __init__(self, sim: Simulation) -> None:
        super().__init__(sim)
        self.deadline_s = self.cfg.deadline_s

    def wait(self, tickets: list[Ticket], cohort: Cohort, deadline_at: float | None
             ) -> Generator[simpy.Event, None, None]:
        env = self.sim.env
        left_s = max((deadline_at if deadline_at is not None else env.now) - env.now, 0.0)
        timer = env.timer(left_s)  # may outlive the round, firing into nothing
        yield cohort.done | timer
        for tk in tickets:
            self.sim.updates.stop(tk, "deadline_miss")  # (only those still live)
        yield cohort.done


@ROUND_POLICIES.register("async")
class AsyncBuffered(RoundPolicy):
    """FedBuff (Nguyen et al. 2022): ``concurrency`` clients train at once; the server
    aggregates every ``buffer_size`` arrivals, each weighted (1 + staleness)^-a.

    Checkpoints (after an aggregation) take the updates in flight along: each one's ticket
    (where it is), the arrivals buffered for the next aggregation, the loop's counters.
    """

    def __init__(self, sim: Simulation) -> None:
        super().__init__(sim)
        self.version, self.buffer, self.started = 0, [], 0.0
        self.stats = {"selected": 0, "arrived": 0}
        self.in_flight: dict[Ticket, None] = {}  # in the order they began
        self.ended = 0  # of those, how many have ended (not yet taken out by the loop)
        self._woken: simpy.Event | None = None  # the loop waits for an update's end
        self.resumed = False
        self.depleted = False  # every client's battery ran out: the run ends early

    def run(self) -> Generator[simpy.Event, None, None]:
        sim, env, cfg = self.sim, self.sim.env, self.cfg
        if not self.resumed:
            self.started = env.now
        while self.version < sim.scenario.rounds and not self.depleted:
            if not self.resumed:
                yield from self._gather()
            self.resumed = False
            while len(self.buffer) >= cfg.buffer_size and self.version < sim.scenario.rounds:
                batch = self.buffer[: cfg.buffer_size]
                self.buffer = self.buffer[cfg.buffer_size:]
                yield from sim.close_round(self.version, self.started, batch, self.stats)
                self.version, self.started = self.version + 1, env.now
                self.stats = {"selected": 0, "arrived": 0}
                sim.at_boundary(self.version - 1)
        for tk in self.in_flight:
            sim.updates.stop(tk, "cancelled")  # (only those still live)

    def _ended(self, tk: Ticket) -> None:
        self.ended += 1
        if self._woken is not None and not self._woken.triggered:
            self._woken.succeed()

    def _gather(self) -> Generator[simpy.Event, None, None]:
        """Top up to ``concurrency`` updates in flight, wait for one to end, buffer arrivals."""
        sim, env, cfg, in_flight = self.sim, self.sim.env, self.cfg, self.in_flight
        busy = {tk.client for tk in in_flight}
        free = [c for c in sim.available() if int(c) not in busy]
        need = cfg.concurrency - len(in_flight)
        chosen = sim.select(np.array(free, dtype=np.int64), need, self.version) if need > 0 \
            else []
        tickets = self.open(list(chosen), self.version)
        for tk in tickets:
            in_flight[tk] = None
            self.stats["selected"] += 1
        sim.updates.begin(tickets, None, self._ended)
        if not in_flight:
            if not len((yield from sim.wait_for_clients())):  # every battery is flat
                sim.rec.emit(env.now, self.version, -1, "fleet_depleted")
                self.depleted = True
            return
        if not self.ended:
            self._woken = env.event()
            yield self._woken
            self._woken = None
        for tk in [tk for tk in in_flight if tk.ended]:
            del in_flight[tk]
            self.ended -= 1
            if tk.value is not None:
                arrival = tk.value
                arrival.staleness = self.version - tk.round
                arrival.weight = (1.0 + arrival.staleness) ** -cfg.staleness_exponent
                sim.rec.emit(env.now, self.version, tk.client, "buffered", 0,
                             f"staleness={arrival.staleness} weight={arrival.weight:.6g}")
                self.buffer.append(arrival)
                self.stats["arrived"] += 1

    # --- snapshot protocol: the updates in flight go along ----------------------------------

    _TICKET = ("client", "round", "serial", "arrived", "phase", "attempt", "started_s", "until_s",
               "nbytes", "queued_s", "queued_seq", "wait_s", "asked_s", "num_samples")

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        wl, tensors = self.sim.workload, {}

        def upload(u: Any, key: str) -> dict[str, Any] | None:
            if u is None:
                return None
            doc, t = wl.upload_state(u, key)
            tensors.update(t)
            return doc

        def arrival(a: Arrival, key: str) -> dict[str, Any]:
            return {"client": a.client, "round": a.round, "num_samples": a.num_samples,
                    "staleness": a.staleness, "weight": a.weight,
                    "upload": upload(a.upload, key)}

        flights = []
        for i, tk in enumerate(self.in_flight):
            doc = {k: getattr(tk, k) for k in self._TICKET}
            doc["upload"] = upload(tk.upload, f"flight/{i}")
            doc["ended"] = tk.ended  # ended, not yet taken out by the loop
            doc["value"] = (arrival(tk.value, f"flight/{i}/value")
                            if tk.ended and tk.value is not None else None)
            flights.append(doc)
        doc = {"version": self.version, "started": self.started, "stats": self.stats,
               "buffer": [arrival(a, f"buffer/{i}") for i, a in enumerate(self.buffer)],
               "in_flight": flights}
        return doc, tensors

    def _arrival(self, doc: dict[str, Any], tensors: dict[str, Any], key: str) -> Arrival:
        """A buffered arrival again: its upload decoded and carried again (pure functions)."""
        wl = self.sim.workload
        up = (wl.restore_upload(doc["upload"], tensors, key) if doc["upload"] is not None
              else None)
        ing = wl.ingest(doc["client"], up) if up is not None else None
        return Arrival(client=doc["client"], round=doc["round"], num_samples=doc["num_samples"],
                       staleness=doc["staleness"], weight=doc["weight"],
                       result=ing.result if ing else None, carried=ing.carried if ing else {},
                       upload=up)

    def restore(self, state: dict[str, Any], tensors: dict[str, Any]) -> int:
        sim, wl = self.sim, self.sim.workload
        self.version, self.started = state["version"], state["started"]
        self.stats = dict(state["stats"])
        self.buffer = [self._arrival(a, tensors, f"buffer/{i}")
                       for i, a in enumerate(state["buffer"])]
        self.resumed = True
        docs = state["in_flight"]
        tickets = []
        for i, doc in enumerate(docs):
            tk = Ticket(**{k: doc.get(k) for k in self._TICKET})
            if doc["upload"] is not None:
                tk.upload = wl.restore_upload(doc["upload"], tensors, f"flight/{i}")
            if doc["ended"]:
                tk.ended = True
                tk.value = (self._arrival(doc["value"], tensors, f"flight/{i}/value")
                            if doc["value"] is not None else None)
            tickets.append(tk)
        self.in_flight = dict.fromkeys(tickets)
        self.ended = sum(tk.ended for tk in tickets)
        # Served ones first: they hold their workers again before the queued ones take their
        # places in the queue, in the order they had reached it; then the others.
        rank = {"service": 0, "queue": 1}
        for tk in sorted((tk for tk in tickets if not tk.ended),
                         key=lambda tk: (rank.get(tk.phase, 2), tk.queued_seq)):
            sim.updates.resume(tk, self._ended)
        return 0

    def in_flight_tickets(self) -> dict[int, Ticket]:
        return {tk.serial: tk for tk in self.in_flight if not tk.ended}

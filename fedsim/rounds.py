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
from typing import TYPE_CHECKING, Any

import numpy as np
import simpy

from fedsim.engine import Ticket
from fedsim.plugins import ROUND_POLICIES
from fedsim.workload import Arrival

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

    # --- snapshot protocol: sync and deadline rounds end with nothing in flight -------------

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return {}, {}

    def restore(self, state: dict[str, Any], tensors: dict[str, Any]) -> int:
        """Take :meth:`state`'s documents; returns the SimPy events the restore adds that the
        original run did not have."""
        return 0

    def _release(self, req: simpy.Event) -> Generator[simpy.Event, None, None]:
        """An update that ended at the checkpoint instant gives its worker back, as it did."""
        yield self.sim.ingress.resource.release(req)

    def in_flight_tickets(self) -> dict[int, tuple[Ticket, simpy.Process]]:
        """The restored updates still running, by serial."""
        return {}

    def start(self, client: int, round_: int, deadline_at: float | None = None
              ) -> tuple[Ticket, simpy.Process]:
        tk = Ticket(client, round_, serial=self.sim.updates_begun)
        self.sim.updates_begun += 1
        self.sim.rec.emit(self.sim.env.now, round_, client, "select",
                          0, self.sim.selector.detail(client))
        return tk, self.sim.env.process(self.sim.client_update(tk, deadline_at))


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
            running = [self.start(c, r, deadline_at) for c in sim.select(candidates, k, r)]
            procs = [p for _, p in running]
            target = sim.selector.target(k)
            if target is not None:
                yield from self.first_arrivals(running, target)
            yield from self.wait(running, deadline_at)
            arrivals = [p.value for p in procs if p.value is not None]
            stats = {"selected": len(procs), "arrived": len(arrivals)}
            yield from sim.close_round(r, started, arrivals, stats)
            sim.at_boundary(r)

    def wait(self, running: list[tuple[Ticket, simpy.Process]], deadline_at: float | None
             ) -> Generator[simpy.Event, None, None]:
        yield self.sim.env.all_of([p for _, p in running])

    def first_arrivals(self, running: list[tuple[Ticket, simpy.Process]], target: int
                       ) -> Generator[simpy.Event, None, None]:
        """Until ``target`` updates are accepted (or none is left running), then stop the
        updates still short of their upload's end (``over_selected``); those past it are
        ingested and aggregated, as at a deadline (a deadline still applies meanwhile)."""
        env = self.sim.env
        # One callback per update, counting as they end (an any_of over the ones still alive
        # after every arrival would cost O(k) per arrival: O(k²) a round, minutes at k = 2,600).
        enough = env.event()
        count = {"accepted": 0, "alive": 0}

        def ended(p: simpy.Process) -> None:
            count["alive"] -= 1
            count["accepted"] += p.ok and p.value is not None
            if not enough.triggered and (count["accepted"] >= target or not count["alive"]):
                enough.succeed()

        for _, p in running:
            if p.is_alive:
                count["alive"] += 1
                p.callbacks.append(ended)
            else:
                count["accepted"] += p.ok and p.value is not None
        if count["accepted"] < target and count["alive"]:
            yield enough
        for tk, p in running:
            if p.is_alive and not tk.arrived:
                p.interrupt("over_selected")


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
    aggregates every ``buffer_size`` arrivals, each weighted (1 + staleness)^-a.

    Checkpoints (after an aggregation) take the updates in flight along: each one's ticket
    (where it is), the arrivals buffered for the next aggregation, the loop's counters.
    """

    def __init__(self, sim: Simulation) -> None:
        super().__init__(sim)
        self.version, self.buffer, self.started = 0, [], 0.0
        self.stats = {"selected": 0, "arrived": 0}
        self.in_flight: dict[simpy.Event, Ticket] = {}
        self.resumed = False
        self.depleted = False  # every client's battery ran out: the run ends early
        self._running: dict[int, tuple[Ticket, simpy.Process]] = {}  # restored, by serial

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
        for p, tk in self.in_flight.items():
            if not p.triggered and not tk.arrived:
                p.interrupt("cancelled")

    def _gather(self) -> Generator[simpy.Event, None, None]:
        """Top up to ``concurrency`` updates in flight, wait for one to end, buffer arrivals."""
        sim, env, cfg, in_flight = self.sim, self.sim.env, self.cfg, self.in_flight
        busy = {tk.client for tk in in_flight.values()}
        free = [c for c in sim.available() if int(c) not in busy]
        need = cfg.concurrency - len(in_flight)
        for c in sim.select(np.array(free, dtype=np.int64), need, self.version) if need > 0 else []:
            tk, p = self.start(c, self.version)
            in_flight[p] = tk
            self.stats["selected"] += 1
        if not in_flight:
            if not len((yield from sim.wait_for_clients())):  # every battery is flat
                sim.rec.emit(env.now, self.version, -1, "fleet_depleted")
                self.depleted = True
            return
        yield env.any_of(list(in_flight))
        for p in [p for p in in_flight if p.triggered]:
            tk = in_flight.pop(p)
            if p.value is not None:
                arrival = p.value
                arrival.staleness = self.version - tk.round
                arrival.weight = (1.0 + arrival.staleness) ** -cfg.staleness_exponent
                sim.rec.emit(env.now, self.version, tk.client, "buffered", 0,
                             f"staleness={arrival.staleness} weight={arrival.weight:.6g}")
                self.buffer.append(arrival)
                self.stats["arrived"] += 1

    # --- snapshot protocol: the updates in flight go along ----------------------------------

    _TICKET = ("client", "round", "serial", "arrived", "phase", "attempt", "started_s", "until_s",
               "nbytes", "queued_s", "queued_seq", "wait_s", "num_samples")

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
        for i, (p, tk) in enumerate(self.in_flight.items()):
            doc = {k: getattr(tk, k) for k in self._TICKET}
            doc["upload"] = upload(tk.upload, f"flight/{i}")
            doc["ended"] = p.triggered  # ended, not yet taken out by the loop
            # Ended this instant: its end is an event still to be processed (and counted) and,
            # if it was served, its worker's release too (the queue behind it is served when
            # that release is processed).
            doc["unprocessed"] = p.triggered and not p.processed
            doc["value"] = (arrival(p.value, f"flight/{i}/value")
                            if p.triggered and p.value is not None else None)
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
        sim, env, wl, ing = self.sim, self.sim.env, self.sim.workload, self.sim.ingress
        self.version, self.started = state["version"], state["started"]
        self.stats = dict(state["stats"])
        self.buffer = [self._arrival(a, tensors, f"buffer/{i}")
                       for i, a in enumerate(state["buffer"])]
        self.resumed, added = True, 0
        # Served ones first: they hold the workers again before the queued ones ask.
        rank = {"service": 0, "queue": 1}  # then the queue in its order, then the others
        order = sorted(range(len(state["in_flight"])), key=lambda i: (
            rank.get(state["in_flight"][i]["phase"], 2), state["in_flight"][i]["queued_seq"], i))
        made: dict[int, tuple[Ticket, simpy.Event]] = {}
        # Updates that had ended (not yet taken out by the loop): events that have happened,
        # processed here first (before anything else is on the clock), as they had been.
        ended = [i for i in order if state["in_flight"][i]["ended"]]
        for i in ended:
            doc = state["in_flight"][i]
            value = (self._arrival(doc["value"], tensors, f"flight/{i}/value")
                     if doc["value"] is not None else None)
            made[i] = (Ticket(**{k: doc[k] for k in self._TICKET}), env.event().succeed(value))
        for _ in ended:
            env.step()  # (the restore sets the event count afterwards)
        unprocessed = [i for i in ended if state["in_flight"][i]["unprocessed"]]
        added -= len(unprocessed)  # the original run processed (and counted) them after
        holds = [ing.resource.request(priority=ing.UPDATE, preempt=False) for i in unprocessed
                 if state["in_flight"][i]["phase"] == "service"]
        for i in order:
            if i in made:
                continue
            doc = state["in_flight"][i]
            tk = Ticket(**{k: doc[k] for k in self._TICKET})
            if doc["upload"] is not None:
                tk.upload = wl.restore_upload(doc["upload"], tensors, f"flight/{i}")
            if doc["phase"] == "service" and not doc["ended"]:  # it holds its worker again
                tk.request = ing.resource.request(priority=ing.UPDATE, preempt=False)
            ev = env.process(sim.client_update(tk, None, resumed=True))
            added += 1 if doc["phase"] != "service" else 2  # + the worker granted again
            made[i] = (tk, ev)
        for req in holds:  # after the queued updates asked again: they get it when it lands
            env.process(self._release(req))
            added += 3  # the worker granted again, the process's start and its end
        self.in_flight = {made[i][1]: made[i][0] for i in range(len(made))}
        self._running = {tk.serial: (tk, ev) for tk, ev in made.values()
                         if isinstance(ev, simpy.Process)}
        return added

    def _release(self, req: simpy.Event) -> Generator[simpy.Event, None, None]:
        """An update that ended at the checkpoint instant gives its worker back, as it did."""
        yield self.sim.ingress.resource.release(req)

    def in_flight_tickets(self) -> dict[int, tuple[Ticket, simpy.Process]]:
        return self._running

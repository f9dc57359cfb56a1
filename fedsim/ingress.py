"""The server's ingress: a bounded queue in front of ``server.workers`` workers.

An accepted upload waits here for a worker, which decodes it and carries it into the server
model (``Workload.ingest``: the real work, at the moment the worker takes it) and is held for
that work's FLOPs / server FLOP/s. A full queue drops the update (overload). The large model
itself is ``fedsim.server``; this is only the queue in front of it.

The workers are a preemptive priority resource with SimPy's ``PreemptiveResource`` rules (a
request's key is (priority, time asked, not preempt); the queue is served in key order, ties in
the order asked; a preempting request takes the worker of the user with the largest key), told
by callbacks rather than through a process per update, so that a million updates cost no
million processes. A SimPy process uses it through :meth:`Ingress.serve`.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Generator
from typing import Any

import simpy

from fedsim.clock import Clock


class Hold:
    """A request for a worker, then the worker while it is held."""

    __slots__ = ("key", "note", "on_grant", "on_preempt", "since")

    def __init__(self, key: tuple[int, float, bool], on_grant: Callable[[], None],
                 on_preempt: Callable[[], None] | None, note: bool) -> None:
        self.key, self.on_grant, self.on_preempt, self.note = key, on_grant, on_preempt, note
        self.since = 0.0  # when it got its worker


class Ingress:
    """The server's ingress: ``workers`` parallel workers and a bounded queue (module text).

    ``request`` asks for a worker and calls ``on_grant()`` once it has one (at once if one is
    free); ``release`` gives it back to the next in the queue. A failing worker
    (:meth:`fail_worker`, priority ``FAILURE``) takes a worker ahead of every update, preempting
    the one it was serving (its ``on_preempt()``). ``full()``: a request now would be dropped.
    """

    UPDATE, FAILURE = 1, 0  # request priorities: smaller goes first

    def __init__(self, env: Clock, workers: int, queue_capacity: int,
                 requeue: bool = True) -> None:
        self.env = env
        self.workers = workers
        self.queue_capacity = queue_capacity
        self.requeue = requeue
        self.users: list[Hold] = []  # holding a worker, in the order they got it
        self._queue: list[tuple[tuple[int, float, bool], int, Hold]] = []  # a heap
        self._asked = 0  # requests so far: ties of key go in the order asked
        self.busy_s = 0.0  # worker-seconds of service
        self.queue_max = 0
        self.dropped = 0
        self.waits_s: list[float] = []
        self.queue_series: list[tuple[float, int]] = []

    @property
    def queued(self) -> int:
        return len(self._queue)

    def full(self) -> bool:
        return len(self._queue) >= self.queue_capacity and len(self.users) >= self.workers

    def _note_queue(self) -> None:
        q = len(self._queue)
        self.queue_max = max(self.queue_max, q)
        self.queue_series.append((self.env.now, q))

    def request(self, on_grant: Callable[[], None],
                on_preempt: Callable[[], None] | None = None, *, priority: int = UPDATE,
                preempt: bool = False) -> Hold:
        """Ask for a worker; ``on_grant()`` once it has one (at once if one is free)."""
        hold = Hold((priority, self.env.now, not preempt), on_grant, on_preempt,
                    note=priority == self.UPDATE)
        victim = None
        if preempt and len(self.users) >= self.workers:
            victim = max(self.users, key=lambda h: h.key)  # the first of the largest keys
            if victim.key > hold.key:
                self.users.remove(victim)
            else:
                victim = None
        free = len(self.users) < self.workers
        if not free:
            heapq.heappush(self._queue, (hold.key, self._asked, hold))
        self._asked += 1
        if hold.note:
            self._note_queue()
        if free:
            self._grant(hold)
        if victim is not None and victim.on_preempt is not None:
            victim.on_preempt()  # after the failure holds the worker: a requeue waits
        return hold

    def _grant(self, hold: Hold) -> None:
        self.users.append(hold)
        hold.since = self.env.now
        if hold.note:
            self._note_queue()
        hold.on_grant()

    def release(self, hold: Hold) -> None:
        """Give ``hold``'s worker back (nothing if it was preempted); the queue moves up."""
        if hold in self.users:
            self.users.remove(hold)
        while self._queue and len(self.users) < self.workers:
            self._grant(heapq.heappop(self._queue)[2])

    def fail_worker(self) -> simpy.Event:
        """A worker fails: an event that succeeds once it has taken a worker, ahead of every
        update; its ``hold`` goes back with :meth:`release` after the repair."""
        granted = self.env.event()
        granted.hold = self.request(granted.succeed, priority=self.FAILURE, preempt=True)
        return granted

    # --- restored from a checkpoint, in their order ------------------------------------------

    def hold_again(self, on_preempt: Callable[[], None], asked_s: float,
                   since_s: float) -> Hold:
        """An update that was in service holds its worker again (its service timer is
        restored with the clock's)."""
        hold = Hold((self.UPDATE, asked_s, True), lambda: None, on_preempt, note=True)
        hold.since = since_s
        self.users.append(hold)
        return hold

    def queue_again(self, on_grant: Callable[[], None], on_preempt: Callable[[], None],
                    asked_s: float) -> Hold:
        """An update that was waiting takes its place in the queue again (restored in the
        order they had asked)."""
        hold = Hold((self.UPDATE, asked_s, True), on_grant, on_preempt, note=True)
        heapq.heappush(self._queue, (hold.key, self._asked, hold))
        self._asked += 1
        return hold

    # --- a SimPy process's way in -------------------------------------------------------------

    def serve(self, work: Callable[[], float], on_failure: Callable[[], None] | None = None
              ) -> Generator[simpy.Event, None, float | None]:
        """Wait for a worker, do ``work`` (its service time in seconds) and hold the worker that
        long: the wait in seconds, or None when dropped. A failing worker preempts it: it waits
        again for a whole service (``requeue``) or raises :class:`ServerFailure`."""
        if self.full():
            self.dropped += 1
            return None
        env, arrived, out = self.env, self.env.now, {}
        while True:
            granted, cut = env.event(), env.event()
            hold = self.request(lambda g=granted: g.succeed(),
                                lambda c=cut: c.succeed())
            yield granted
            if "wait" not in out:  # the first service does the work; a requeue only waits
                out["wait"] = env.now - arrived
                self.waits_s.append(out["wait"])
                out["service_s"] = work()
            started = env.now
            ended = yield env.timeout(out["service_s"]) | cut
            if cut in ended:
                self.busy_s += env.now - started
                if on_failure is not None:
                    on_failure()
                if not self.requeue:
                    raise ServerFailure()
                continue
            self.busy_s += out["service_s"]
            self.release(hold)
            return out["wait"]

    # --- snapshot protocol (fedsim.checkpoint): between rounds, when nothing waits ----------

    def state(self) -> dict[str, Any]:
        return {"busy_s": self.busy_s, "queue_max": self.queue_max, "dropped": self.dropped,
                "waits_s": self.waits_s, "queue_series": self.queue_series}

    def restore(self, state: dict[str, Any]) -> None:
        self.busy_s, self.queue_max, self.dropped = (
            state["busy_s"], state["queue_max"], state["dropped"])
        self.waits_s = list(state["waits_s"])
        self.queue_series = [tuple(x) for x in state["queue_series"]]


class ServerFailure(Exception):
    """The server worker serving an update failed and the update is lost."""

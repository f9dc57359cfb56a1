"""The server's ingress: a bounded queue in front of ``server.workers`` workers.

An accepted upload waits here for a worker, which decodes it and carries it into the server
model (``Workload.ingest``: the real work, at the moment the worker takes it) and is held for
that work's FLOPs / server FLOP/s. A full queue drops the update (overload). The large model
itself is ``fedsim.server``; this is only the queue in front of it.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import simpy

from fedsim.clock import NOOP, Clock, Tag


class Ingress:
    """The server's ingress: ``workers`` parallel workers and a bounded queue.

    ``serve(work)`` waits for a worker, calls ``work()`` for the service time in seconds (the
    real decode/projection happens at that moment) and holds the worker that long. A request
    arriving when ``queue_capacity`` updates already wait is dropped (returns None).

    The workers are a ``simpy.PreemptiveResource``: a failing worker (a request at priority
    ``FAILURE`` with ``preempt=True``) takes a worker ahead of every update, preempting the
    one it was serving, which is then queued again (``requeue``) or lost (``serve`` raises
    :class:`ServerFailure`).
    """

    UPDATE, FAILURE = 1, 0  # request priorities: smaller goes first

    def __init__(self, env: Clock, workers: int, queue_capacity: int,
                 requeue: bool = True) -> None:
        self.env = env
        self.workers = workers
        self.queue_capacity = queue_capacity
        self.requeue = requeue
        self.resource = simpy.PreemptiveResource(env, capacity=workers)
        self.busy_s = 0.0  # worker-seconds of service
        self.queue_max = 0
        self.dropped = 0
        self.waits_s: list[float] = []
        self.queue_series: list[tuple[float, int]] = []

    def _note_queue(self) -> None:
        q = len(self.resource.queue)
        self.queue_max = max(self.queue_max, q)
        self.queue_series.append((self.env.now, q))

    def serve(self, work: Callable[[], float], on_failure: Callable[[], None] | None = None,
              tag: Tag = NOOP, *, resumed: str | None = None, arrived_s: float | None = None,
              until_s: float | None = None, wait_s: float | None = None,
              request: simpy.Event | None = None, wake: simpy.Event | None = None
              ) -> Generator[simpy.Event, None, float | None]:
        """Wait for a worker, do ``work`` and hold the worker that long; the wait in seconds,
        or None when dropped. ``resumed``: a checkpointed update takes its place again,
        ``"queue"`` (waiting since ``arrived_s``) or ``"service"`` (served until ``until_s``,
        after a wait of ``wait_s``, on the worker ``request`` and timer ``wake`` the restore
        made); what it did before the checkpoint is not counted twice."""
        if resumed is None and (len(self.resource.queue) >= self.queue_capacity
                                and self.resource.count >= self.workers):
            self.dropped += 1
            return None
        arrived = self.env.now if resumed is None else arrived_s
        wait, service_s = None, 0.0
        while True:
            req = request or self.resource.request(priority=self.UPDATE, preempt=False)
            request = None
            with req:
                if resumed is None:
                    self._note_queue()
                yield req
                if resumed != "service":
                    self._note_queue()
                left_s, again = service_s, False
                if wait is None:  # the first service does the work; a requeue only waits
                    if resumed == "service":  # its wait was counted before the checkpoint
                        wait, service_s, again = wait_s, work(), True
                        left_s = until_s - self.env.now
                    else:
                        wait = self.env.now - arrived
                        self.waits_s.append(wait)
                        service_s = left_s = work()
                resumed = None
                started = self.env.now - (service_s - left_s)
                try:
                    if again:  # it ends when it would have
                        yield wake if wake is not None else self.env.timer_at(until_s, tag)
                    else:
                        yield self.env.timer(left_s, tag)
                except simpy.Interrupt:  # its worker failed mid-service
                    self.busy_s += self.env.now - started
                    if on_failure is not None:
                        on_failure()
                    if not self.requeue:
                        raise ServerFailure() from None
                    continue
                self.busy_s += service_s
            return wait

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

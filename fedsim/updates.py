"""The life of one update: download, train, encode, upload, ingest, as a state machine on the
clock.

Each step ends in a callback — a flow's end on a link, a timer, a server worker granted — that
starts the next: :meth:`Updates.begin` starts a round's updates, :meth:`Updates.stop`
interrupts one (dropout, crash, deadline), and the round policy is told when each has ended.
A generator process per update would cost a frame stack and some five more SimPy events per
update: at a million clients a round, the difference between minutes and an hour. The ML work
comes from the workload (``fedsim.workload``) as data; this module turns it into time (DESIGN.md:
SimPy is the only clock): compute time is FLOPs / device FLOP/s, transfers are flows on the
cells' links (``fedsim.links``), service is FLOPs / server FLOP/s at the ingress.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import simpy

from fedsim.channels import DOWNLINK, UPLINK, SharedLink, WiredLink
from fedsim.executors import Job, JobFailed
from fedsim.ingress import Hold
from fedsim.workload import Arrival, Ingested, JobPlan, Upload

if TYPE_CHECKING:
    from fedsim.engine import Simulation

GIB = 2**30
_START = {UPLINK: "uplink_start", DOWNLINK: "downlink_start"}  # event kinds, made once
_END = {UPLINK: "uplink_end", DOWNLINK: "downlink_end"}
_CONTENDING = ("select", DOWNLINK, "train", "encode", UPLINK, "restart")  # before the upload


@dataclass(slots=True, eq=False)
class Ticket:
    """One update: where it is in its life, as the round policy and a checkpoint see it."""

    client: int
    round: int
    arrived: bool = False  # past the upload: a deadline no longer applies
    phase: str = "select"
    transfer: SharedLink | WiredLink | None = None  # the flow in progress, to cancel
    job: Job | None = None  # the training job in progress, to cancel
    attempt: int = 0  # tries after crashes (faults.on_crash: retry)
    serial: int = 0  # which update of the run this is (a client may send several a round)
    # Where it is, so that a checkpoint can take it along (async rounds) and resume it:
    started_s: float = 0.0  # when the current phase began
    until_s: float | None = None  # when the current wait ends (training, restart, service)
    nbytes: int = 0  # the transfer in progress
    upload: Upload | None = None  # once encoded
    queued_s: float | None = None  # when it reached the server's ingress queue
    queued_seq: int = 0  # its place in the order of arrival there (ties at one instant)
    wait_s: float | None = None  # how long it waited there for a worker
    asked_s: float | None = None  # when it last asked for a worker (its place among equals)
    num_samples: int = 0  # examples its training job saw
    # Its life in progress (not in a checkpoint: rebuilt from the above):
    ended: bool = False
    value: Arrival | None = None  # the accepted arrival, once ended
    deadline_at: float | None = None
    on_end: Callable[[Ticket], None] | None = None  # tells the round policy
    uplink: SharedLink | WiredLink | None = None  # where it counts as a contender
    contending: bool = False
    timer: simpy.Event | None = None  # the wait in progress (one abandoned fires into nothing)
    then: Callable[[Ticket], None] | None = None  # what comes after the wait or flow
    plan: JobPlan | None = None
    ingested: Ingested | None = None
    service_s: float = 0.0
    hold: Hold | None = None  # its server worker, asked for or held

    @property
    def tag(self) -> tuple[str, int, int]:
        """The clock tag of this try's own waits (see ``fedsim.clock``): a wait a crash
        abandoned belongs to an earlier try."""
        return ("update", self.serial, self.attempt)

    @property
    def live(self) -> bool:
        """Not ended and not past its upload: a dropout, crash or deadline still stops it."""
        return not self.ended and not self.arrived


class Updates:
    """The updates of one simulation, each a :class:`Ticket` moved along by callbacks."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self._details: dict[str, tuple[Any, str]] = {}  # see _said

    def begin(self, tickets: list[Ticket], deadline_at: float | None,
              on_end: Callable[[Ticket], None]) -> None:
        """Start each ticket's life: download -> train -> encode -> upload -> ingest.
        ``on_end(tk)`` is called once it has ended, ``tk.value`` then the accepted Arrival or
        None. (The updates a round begins at one instant are set up as vectors: their dropout
        times, counts and downloads, each cell's joining flows at once.)

        A dropout (the client goes offline), a crash or the round's deadline interrupts an
        update (:meth:`stop`); whatever it was doing is cancelled and the interruption
        recorded. After a crash, with ``faults.on_crash: retry``, the client reboots and starts
        over (download included).
        """
        if not tickets:
            return
        now, wl, net = self.sim.env.now, self.sim.workload, self.sim.network
        clients = [tk.client for tk in tickets]
        ids = np.array(clients, dtype=np.int64)
        t_off = self.sim.availability.next_off_many(ids, now)
        np.add.at(self.sim.per_client["updates_sent"], ids, 1)
        down: dict[SharedLink | WiredLink, list[Ticket]] = {}
        for tk in tickets:
            c = tk.client
            tk.deadline_at, tk.on_end = deadline_at, on_end
            tk.uplink = net.link(c, UPLINK)
            tk.uplink.contenders += 1
            tk.contending = True
            down.setdefault(net.link(c, DOWNLINK), []).append(tk)
        last = math.inf if deadline_at is None else deadline_at  # later: it has ended by then
        for i in np.flatnonzero(np.isfinite(t_off) & (t_off <= last)).tolist():
            self._dropout_timer(tickets[i], float(t_off[i]))
        if self.sim.scenario.faults.client_crash_per_h > 0:
            for tk in tickets:
                self.sim.faults.schedule_crash(tk)
        nbytes = [wl.download_bytes(c) for c in clients]
        self.sim.rec.emit_many(now, tickets[0].round, clients, _START[DOWNLINK], nbytes)
        for tk, n in zip(tickets, nbytes, strict=True):
            tk.then, tk.started_s, tk.phase, tk.nbytes = self._train, now, DOWNLINK, n
        for link, group in down.items():
            for tk in group:
                tk.transfer = link
            ends = [partial(self._transferred, tk) for tk in group]
            if isinstance(link, SharedLink) and all(tk.nbytes > 0 for tk in group):
                link.transfer_many([tk.client for tk in group], [tk.nbytes for tk in group],
                                   ends)
                continue
            for tk, end in zip(group, ends, strict=True):  # (a wired link: a timer each)
                link.transfer(tk.client, tk.nbytes, tk.tag, end)

    def _try(self, tk: Ticket) -> None:
        """One try, from the download (after a crash: once the client has rebooted)."""
        self.sim.faults.schedule_crash(tk)
        if not tk.attempt:
            return self._download(tk)
        restart_s = self.sim.scenario.faults.restart_s
        tk.phase, tk.until_s = "restart", self.sim.env.now + restart_s
        self._wait(tk, restart_s, self._download)

    def _wait(self, tk: Ticket, delay_s: float, then: Callable[[Ticket], None]) -> None:
        timer = self.sim.env.timer(delay_s, tk.tag)
        tk.timer, tk.then = timer, then
        timer.callbacks.append(partial(self._woke, tk))

    def _woke(self, tk: Ticket, timer: simpy.Event) -> None:
        if tk.timer is timer:  # not a wait that a stop abandoned
            tk.timer = None
            tk.then(tk)

    def _dropout_timer(self, tk: Ticket, t_off: float, restored: bool = False) -> None:
        """Stop the update when its client goes offline at ``t_off``, unless it has arrived
        by then. (No timer when that is after the round's deadline: by then the update has
        arrived or the deadline has stopped it. One past the update fires into nothing.)"""

        def drop(_event: simpy.Event) -> None:
            if tk.live:
                self.stop(tk, "dropout")

        tag = ("dropout", tk.serial)
        if restored:
            self.sim.env.timer_at(t_off, tag, drop)
        else:
            self.sim.env.timer(t_off - self.sim.env.now, tag, drop)

    def schedule_dropout(self, tk: Ticket, at: float) -> None:
        """A dropout timer restored from a checkpoint, at its exact instant."""
        self._dropout_timer(tk, at, restored=True)

    def _transfer(self, tk: Ticket, direction: str, nbytes: int,
                  then: Callable[[Ticket], None]) -> None:
        c, now = tk.client, self.sim.env.now
        link = self.sim.network.link(c, direction)
        tk.transfer, tk.then = link, then
        tk.started_s, tk.phase, tk.nbytes = now, direction, nbytes
        self.sim.rec.emit(now, tk.round, c, _START[direction], nbytes)
        link.transfer(c, nbytes, tk.tag, partial(self._transferred, tk))  # may end at once

    def _transferred(self, tk: Ticket, ok: bool) -> None:
        c, now, direction = tk.client, self.sim.env.now, tk.phase
        tk.transfer = None
        self.sim.energy.spend(c, direction, now - tk.started_s)  # airtime, delivered or not
        if not ok:
            self.sim.rec.emit(now, tk.round, c, "outage", 0, direction)
            return self._fail(tk)
        nbytes = tk.nbytes
        self.sim.rec.latency("upload" if direction == UPLINK else "download", now - tk.started_s)
        self.sim.rec.emit(now, tk.round, c, _END[direction], nbytes)
        if direction == UPLINK:
            self.sim.per_client["bytes_up"][c] += nbytes
            self.sim.rec.bytes_up += nbytes
        else:
            self.sim.per_client["bytes_down"][c] += nbytes
            self.sim.rec.bytes_down += nbytes
        tk.then(tk)

    def _download(self, tk: Ticket) -> None:
        self._transfer(tk, DOWNLINK, self.sim.workload.download_bytes(tk.client), self._train)

    def _train(self, tk: Ticket) -> None:
        """Step 3: plan the job, fail it if it does not fit, else wait FLOPs / FLOP/s."""
        c, now, wl = tk.client, self.sim.env.now, self.sim.workload
        plan = wl.plan(c, tk.round)
        compute_s = plan.flops / self.sim.fleet.flops_per_s[c]
        tk.phase = "train"
        limit = self.sim.fleet.memory_gib[c] * GIB
        if plan.peak_memory_bytes > limit:
            detail = f"needs {plan.peak_memory_bytes / GIB:.2f} GiB, has {limit / GIB:.2f} GiB"
            self.sim.rec.emit(now, tk.round, c, "oom", 0, detail)
            return self._fail(tk)
        self.sim.rec.emit(now, tk.round, c, "train_start", 0, self._said(plan, "flops"))
        tk.started_s, tk.until_s, tk.plan = now, now + compute_s, plan
        tk.job = self.sim.executor.submit_train(wl, c, tk.round, plan)
        self._wait(tk, compute_s, self._trained)

    def _trained(self, tk: Ticket) -> None:
        """Steps 3-4 end: the job's result, then the codec makes the upload's bytes."""
        c, now, wl, plan = tk.client, self.sim.env.now, self.sim.workload, tk.plan
        compute_s = plan.flops / self.sim.fleet.flops_per_s[c]
        job, tk.job = tk.job, None
        self.sim.compute_s[c] += compute_s
        self.sim.energy.spend(c, "compute", compute_s)
        self.sim.rec.latency("compute", compute_s)
        try:
            update = job.result()
        except JobFailed as e:  # the executor lost the job: a failed update, not a lost run
            self.sim.rec.emit(now, tk.round, c, "job_failed", 0, str(e))
            return self._fail(tk)
        self.sim.rec.emit(now, tk.round, c, "train_end", 0, self._said(plan, "samples"))
        tk.phase, tk.num_samples = "encode", plan.num_samples
        time_left = None if tk.deadline_at is None else tk.deadline_at - now
        if wl.reads_rate:
            rate_bps = tk.uplink.estimate_rate_bps(c, self.sim.codec_knowledge, tk.round)
        else:  # nothing reads it; the clients' positions still move up to now
            rate_bps = None
            self.sim.network.advance_to(now)
        tk.upload = up = wl.encode(c, tk.round, update, rate_bps, time_left)
        self.sim.rec.emit(now, tk.round, c, "encode", up.nbytes, self._said(up, "encode"))
        self._transfer(tk, UPLINK, up.nbytes, self._uploaded)

    def _said(self, what: JobPlan | Upload, kind: str) -> str:
        """The detail of an event about ``what`` (a workload that returns the same plan or
        upload every time, as the synthetic one, formats it once)."""
        last = self._details.get(kind)
        if last is not None and last[0] is what:
            return last[1]
        if kind == "flops":
            text = f"flops={what.flops:.4g}"
        elif kind == "samples":
            text = f"samples={what.num_samples}"
        else:
            text = f"{what.codec} raw={what.raw_bytes} err={what.rel_error:.4g}"
        self._details[kind] = (what, text)
        return text

    def _uploaded(self, tk: Ticket) -> None:
        self._uncontend(tk)
        tk.arrived = True
        self.sim.selector.uploaded(tk.client)
        self._queue(tk)

    def _uncontend(self, tk: Ticket) -> None:
        if tk.contending:
            tk.contending = False
            tk.uplink.contenders -= 1

    def _queue(self, tk: Ticket) -> None:
        """Step 6: wait for a server worker, or be dropped when the queue is full."""
        now = self.sim.env.now
        tk.phase, tk.queued_s, tk.until_s = "queue", now, None
        tk.queued_seq, self.sim.queue_seq = self.sim.queue_seq, self.sim.queue_seq + 1
        if self.sim.ingress.full():
            self.sim.ingress.dropped += 1
            self.sim.rec.emit(now, tk.round, tk.client, "queue_drop", tk.upload.nbytes)
            return self._fail(tk)
        self._ask(tk)

    def _ask(self, tk: Ticket) -> None:
        tk.asked_s = self.sim.env.now
        tk.hold = self.sim.ingress.request(partial(self._serve, tk), partial(self._preempted, tk))

    def _serve(self, tk: Ticket) -> None:
        """Step 7: a worker decodes and projects (the first time; a requeued update only
        waits its whole service again) for FLOPs / server FLOP/s."""
        c, now, upload = tk.client, self.sim.env.now, tk.upload
        if tk.wait_s is None:
            tk.wait_s = now - tk.queued_s
            self.sim.ingress.waits_s.append(tk.wait_s)
            tk.ingested = ing = self.sim.workload.ingest(c, upload)
            tk.service_s = ing.flops / self.sim.scenario.server.flops_per_s
            self.sim.rec.emit(now, tk.round, c, "ingest_start", upload.nbytes, ing.detail)
        tk.phase, tk.started_s, tk.until_s = "service", now, now + tk.service_s
        self._wait(tk, tk.service_s, self._served)

    def _preempted(self, tk: Ticket) -> None:
        """A failing worker took this update's worker mid-service: queued again or lost."""
        now = self.sim.env.now
        tk.timer = None
        self.sim.ingress.busy_s += now - tk.started_s
        how = "requeued" if self.sim.ingress.requeue else "lost"
        self.sim.rec.emit(now, tk.round, tk.client, "server_failure", tk.upload.nbytes, how)
        if not self.sim.ingress.requeue:
            return self._fail(tk)
        tk.phase, tk.until_s = "queue", None
        self._ask(tk)

    def _served(self, tk: Ticket) -> None:
        c, now, upload, ing = tk.client, self.sim.env.now, tk.upload, tk.ingested
        self.sim.ingress.busy_s += tk.service_s
        self.sim.rec.latency("queue", tk.wait_s)
        self.sim.rec.latency("server", tk.service_s)
        hold, tk.hold = tk.hold, None
        if not ing.accepted:
            self.sim.rec.emit(now, tk.round, c, "rejected", upload.nbytes, ing.detail)
            self._fail(tk)
        else:
            self.sim.rec.emit(now, tk.round, c, "ingest_end", upload.nbytes)
            self.sim.rec.bytes_up_accepted += upload.nbytes
            self.sim.rec.bytes_up_raw += upload.raw_bytes  # the same updates: a fair ratio
            self.sim.per_client["updates_accepted"][c] += 1
            self.sim.selector.arrived(c, tk.num_samples, upload.loss_rms)
            self._end(tk, Arrival(client=c, round=tk.round, num_samples=tk.num_samples,
                                  result=ing.result, carried=ing.carried, upload=upload))
        self.sim.ingress.release(hold)  # the next in the queue is served after this one's end

    def stop(self, tk: Ticket, cause: str) -> None:
        """Interrupt ``tk`` (``dropout``, ``crash``, ``deadline_miss``, ``over_selected``,
        ``cancelled``) unless it has ended or arrived: cancel its flow, job or wait, charge
        the cut phase's energy, record the cause; retry after a crash if the faults say so."""
        if not tk.live:
            return
        c, now, faults = tk.client, self.sim.env.now, self.sim.scenario.faults
        if tk.transfer is not None:
            tk.transfer.cancel(c)
            tk.transfer = None
        if tk.job is not None:
            tk.job.cancel()
            tk.job = None
        tk.timer = None
        if tk.phase in (UPLINK, DOWNLINK, "train"):  # the cut phase's energy
            self.sim.energy.spend(c, "compute" if tk.phase == "train" else tk.phase,
                              now - tk.started_s)
        self.sim.rec.emit(now, tk.round, c, cause, 0, tk.phase)
        if cause == "crash" and faults.on_crash == "retry" and tk.attempt < faults.crash_retries:
            tk.attempt += 1
            return self._try(tk)
        self._fail(tk)

    def _fail(self, tk: Ticket) -> None:
        self.sim.per_client["failures"][tk.client] += 1
        self._end(tk, None)

    def _end(self, tk: Ticket, value: Arrival | None) -> None:
        self._uncontend(tk)
        tk.ended, tk.value = True, value
        tk.on_end(tk)

    # --- a checkpointed update goes on (fedsim.checkpoint, async rounds) --------------------

    def resume(self, tk: Ticket, on_end: Callable[[Ticket], None]) -> None:
        """Take up a restored update where its ticket says it was; its own wait, if it was in
        one, comes back with the clock's timers (:meth:`rewait`)."""
        c, wl = tk.client, self.sim.workload
        tk.on_end, tk.uplink = on_end, self.sim.network.link(c, UPLINK)
        tk.contending = tk.phase in _CONTENDING  # the links' counts are restored already
        if tk.phase in (DOWNLINK, UPLINK):
            tk.then = self._train if tk.phase == DOWNLINK else self._uploaded
            tk.transfer = self.sim.network.holding(c, tk.phase)
            if isinstance(tk.transfer, SharedLink):
                tk.transfer.reattach(c, partial(self._transferred, tk))
        elif tk.phase == "train":  # planned and submitted again (pure functions of the seed)
            tk.plan = wl.plan(c, tk.round)
            tk.job = self.sim.executor.submit_train(wl, c, tk.round, tk.plan)
            tk.then = self._trained
        elif tk.phase == "restart":
            tk.then = self._download
        elif tk.phase in ("queue", "service"):  # its decode and projection redone (pure)
            if tk.wait_s is not None:
                tk.ingested = wl.ingest(c, tk.upload)
                tk.service_s = tk.ingested.flops / self.sim.scenario.server.flops_per_s
            serve, cut = partial(self._serve, tk), partial(self._preempted, tk)
            if tk.phase == "service":
                tk.hold = self.sim.ingress.hold_again(cut, tk.asked_s, tk.started_s)
                tk.then = self._served
            else:
                tk.hold = self.sim.ingress.queue_again(serve, cut, tk.asked_s)

    def rewait(self, tk: Ticket, at_s: float, tag: tuple[Any, ...]) -> bool:
        """The restored update's own timer again, if the one pending at ``at_s`` is it
        (False: an abandoned one, which fires into nothing)."""
        if tk.phase in (DOWNLINK, UPLINK):
            wired = self.sim.network.wired
            if tk.transfer is not wired or wired.ends.get(tk.client) != at_s:
                return False
            wired.resume(tk.client, tag, partial(self._transferred, tk))
            return True
        if tk.until_s != at_s or tk.phase not in ("train", "restart", "service"):
            return False
        tk.timer = self.sim.env.timer_at(at_s, tag)
        tk.timer.callbacks.append(partial(self._woke, tk))
        return True

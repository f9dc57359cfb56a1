"""The SimPy world: clients, cells and the server, and the round policies that drive them.

SimPy is the only clock (DESIGN.md): compute time is FLOPs / device FLOP/s, transfer time is
bytes over a rate that changes as flows come and go, server time is FLOPs / server FLOP/s. The
workload (``fedsim.workload``) does the ML and returns data; this module turns it into time.

The life of one update — download, train, encode, upload, ingest — is a state machine driven
by the clock: each step ends in a callback (a flow's end on a link, a timer, a server worker
granted) that starts the next. :meth:`Simulation.begin` starts one, :meth:`Simulation.stop`
interrupts it (dropout, crash, deadline), and the round policy is told when it has ended. A
generator process per update would cost a frame stack and some five more SimPy events per
update: at a million clients a round, the difference between minutes and an hour. A round
policy (registry ``ROUND_POLICIES``: ``sync``, ``deadline``, ``async``) is a SimPy process:
it selects clients, begins their updates and closes rounds by aggregating. ``run(scenario)``
returns a ``RunResult``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import simpy

from fedsim import checkpoint
from fedsim.availability import Availability
from fedsim.channels import DOWNLINK, UPLINK, Network, SharedLink, WiredLink
from fedsim.clock import Clock
from fedsim.devices import PROFILES, Fleet, build_fleet
from fedsim.energy import Energy
from fedsim.errors import FedsimError
from fedsim.estimation import ChannelKnowledge
from fedsim.executors import Executor, Job, JobFailed, make_executor
from fedsim.faults import Faults
from fedsim.ingress import Hold, Ingress
from fedsim.metrics import PHASES, Recorder, Rows, RunResult, percentiles
from fedsim.plugins import ROUND_POLICIES
from fedsim.rng import key, stream
from fedsim.scenario import Scenario
from fedsim.selection import make_selector
from fedsim.workload import Arrival, Deferred, Ingested, JobPlan, Upload, Workload, make_workload

log = logging.getLogger("fedsim")  # what the run is doing, for a progress display

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


class Simulation:
    """The world of one scenario run; ``run()`` plays it to the end."""

    def __init__(self, scenario: Scenario, workload: Workload | None = None,
                 executor: Executor | None = None, start_s: float = 0.0) -> None:
        self.scenario = scenario
        self.env = Clock(start_s)  # a resumed run starts at its checkpoint's time
        self.fleet = _fleet(scenario)
        self.network = Network(self.env, scenario, self.fleet)
        self.ingress = Ingress(self.env, scenario.server.workers, scenario.server.queue_capacity,
                               requeue=scenario.faults.on_server_failure == "requeue")
        self.faults = Faults(self)
        self.availability = Availability(self.fleet, key(scenario.seed, "availability"))
        self.select_rng = stream(scenario.seed, "selection")
        self.rec = Recorder(keep_events=scenario.output.events)
        self.workload = workload or make_workload(scenario, self.fleet)
        self.executor = executor or make_executor(scenario.executor)
        self.policy = ROUND_POLICIES.get(scenario.round_policy.name)(self)
        self.selector = make_selector(scenario.selection, self)
        # What a client knows of its uplink when the adaptive codec picks its payload (the
        # other codecs do not ask): see fedsim.estimation.
        comp = scenario.compression
        tr = scenario.transfer  # distillation's adaptive k asks for the rate too
        knows = (comp if getattr(comp, "codec", None) == "adaptive" else
                 tr.logits if tr.name == "distillation" and tr.logits.adaptive else None)
        self.codec_knowledge = (ChannelKnowledge(knows.estimate, knows.estimate_error_db,
                                                 key(scenario.seed, "codec-estimate"))
                                if knows is not None else None)
        self.energy = Energy(self.fleet, scenario.energy)
        n = self.fleet.size
        self.per_client = {k: np.zeros(n, dtype=np.int64) for k in
                           ("updates_sent", "updates_accepted", "failures", "bytes_up",
                            "bytes_down")}
        self.compute_s = np.zeros(n)
        self.server_aggregate_s = 0.0
        self.quality_by_round: list[dict[str, float]] = []
        self.first_round = 0  # a resumed run starts later
        self.checkpoint_to: Path | None = None  # run directory whose checkpoints/ to write
        self.restore_events = 0  # SimPy events a restore adds that the original run had not
        self.queue_seq = 0  # updates that reached the ingress queue so far
        self.updates_begun = 0  # updates started so far (each ticket's serial)
        self._deferred: list[tuple[int, Deferred]] = []  # rounds whose quality is coming
        self.clients_final: dict[int, dict[str, float]] = {}  # each client's own last model
        self._details: dict[str, tuple[Any, str]] = {}  # see _said

    # --- the life of one update -------------------------------------------------------------

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
        now, wl, net = self.env.now, self.workload, self.network
        clients = [tk.client for tk in tickets]
        ids = np.array(clients, dtype=np.int64)
        t_off = self.availability.next_off_many(ids, now)
        np.add.at(self.per_client["updates_sent"], ids, 1)
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
        if self.scenario.faults.client_crash_per_h > 0:
            for tk in tickets:
                self.faults.schedule_crash(tk)
        nbytes = [wl.download_bytes(c) for c in clients]
        self.rec.emit_many(now, tickets[0].round, clients, _START[DOWNLINK], nbytes)
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
        self.faults.schedule_crash(tk)
        if not tk.attempt:
            return self._download(tk)
        restart_s = self.scenario.faults.restart_s
        tk.phase, tk.until_s = "restart", self.env.now + restart_s
        self._wait(tk, restart_s, self._download)

    def _wait(self, tk: Ticket, delay_s: float, then: Callable[[Ticket], None]) -> None:
        timer = self.env.timer(delay_s, tk.tag)
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
            self.env.timer_at(t_off, tag, drop)
        else:
            self.env.timer(t_off - self.env.now, tag, drop)

    def schedule_dropout(self, tk: Ticket, at: float) -> None:
        """A dropout timer restored from a checkpoint, at its exact instant."""
        self._dropout_timer(tk, at, restored=True)

    def _transfer(self, tk: Ticket, direction: str, nbytes: int,
                  then: Callable[[Ticket], None]) -> None:
        c, now = tk.client, self.env.now
        link = self.network.link(c, direction)
        tk.transfer, tk.then = link, then
        tk.started_s, tk.phase, tk.nbytes = now, direction, nbytes
        self.rec.emit(now, tk.round, c, _START[direction], nbytes)
        link.transfer(c, nbytes, tk.tag, partial(self._transferred, tk))  # may end at once

    def _transferred(self, tk: Ticket, ok: bool) -> None:
        c, now, direction = tk.client, self.env.now, tk.phase
        tk.transfer = None
        self.energy.spend(c, direction, now - tk.started_s)  # airtime, delivered or not
        if not ok:
            self.rec.emit(now, tk.round, c, "outage", 0, direction)
            return self._fail(tk)
        nbytes = tk.nbytes
        self.rec.latency("upload" if direction == UPLINK else "download", now - tk.started_s)
        self.rec.emit(now, tk.round, c, _END[direction], nbytes)
        if direction == UPLINK:
            self.per_client["bytes_up"][c] += nbytes
            self.rec.bytes_up += nbytes
        else:
            self.per_client["bytes_down"][c] += nbytes
            self.rec.bytes_down += nbytes
        tk.then(tk)

    def _download(self, tk: Ticket) -> None:
        self._transfer(tk, DOWNLINK, self.workload.download_bytes(tk.client), self._train)

    def _train(self, tk: Ticket) -> None:
        """Step 3: plan the job, fail it if it does not fit, else wait FLOPs / FLOP/s."""
        c, now, wl = tk.client, self.env.now, self.workload
        plan = wl.plan(c, tk.round)
        compute_s = plan.flops / self.fleet.flops_per_s[c]
        tk.phase = "train"
        limit = self.fleet.memory_gib[c] * GIB
        if plan.peak_memory_bytes > limit:
            detail = f"needs {plan.peak_memory_bytes / GIB:.2f} GiB, has {limit / GIB:.2f} GiB"
            self.rec.emit(now, tk.round, c, "oom", 0, detail)
            return self._fail(tk)
        self.rec.emit(now, tk.round, c, "train_start", 0, self._said(plan, "flops"))
        tk.started_s, tk.until_s, tk.plan = now, now + compute_s, plan
        tk.job = self.executor.submit_train(wl, c, tk.round, plan)
        self._wait(tk, compute_s, self._trained)

    def _trained(self, tk: Ticket) -> None:
        """Steps 3-4 end: the job's result, then the codec makes the upload's bytes."""
        c, now, wl, plan = tk.client, self.env.now, self.workload, tk.plan
        compute_s = plan.flops / self.fleet.flops_per_s[c]
        job, tk.job = tk.job, None
        self.compute_s[c] += compute_s
        self.energy.spend(c, "compute", compute_s)
        self.rec.latency("compute", compute_s)
        try:
            update = job.result()
        except JobFailed as e:  # the executor lost the job: a failed update, not a lost run
            self.rec.emit(now, tk.round, c, "job_failed", 0, str(e))
            return self._fail(tk)
        self.rec.emit(now, tk.round, c, "train_end", 0, self._said(plan, "samples"))
        tk.phase, tk.num_samples = "encode", plan.num_samples
        time_left = None if tk.deadline_at is None else tk.deadline_at - now
        if wl.reads_rate:
            rate_bps = tk.uplink.estimate_rate_bps(c, self.codec_knowledge, tk.round)
        else:  # nothing reads it; the clients' positions still move up to now
            rate_bps = None
            self.network.advance_to(now)
        tk.upload = up = wl.encode(c, tk.round, update, rate_bps, time_left)
        self.rec.emit(now, tk.round, c, "encode", up.nbytes, self._said(up, "encode"))
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
        self.selector.uploaded(tk.client)
        self._queue(tk)

    def _uncontend(self, tk: Ticket) -> None:
        if tk.contending:
            tk.contending = False
            tk.uplink.contenders -= 1

    def _queue(self, tk: Ticket) -> None:
        """Step 6: wait for a server worker, or be dropped when the queue is full."""
        now = self.env.now
        tk.phase, tk.queued_s, tk.until_s = "queue", now, None
        tk.queued_seq, self.queue_seq = self.queue_seq, self.queue_seq + 1
        if self.ingress.full():
            self.ingress.dropped += 1
            self.rec.emit(now, tk.round, tk.client, "queue_drop", tk.upload.nbytes)
            return self._fail(tk)
        self._ask(tk)

    def _ask(self, tk: Ticket) -> None:
        tk.asked_s = self.env.now
        tk.hold = self.ingress.request(partial(self._serve, tk), partial(self._preempted, tk))

    def _serve(self, tk: Ticket) -> None:
        """Step 7: a worker decodes and projects (the first time; a requeued update only
        waits its whole service again) for FLOPs / server FLOP/s."""
        c, now, upload = tk.client, self.env.now, tk.upload
        if tk.wait_s is None:
            tk.wait_s = now - tk.queued_s
            self.ingress.waits_s.append(tk.wait_s)
            tk.ingested = ing = self.workload.ingest(c, upload)
            tk.service_s = ing.flops / self.scenario.server.flops_per_s
            self.rec.emit(now, tk.round, c, "ingest_start", upload.nbytes, ing.detail)
        tk.phase, tk.started_s, tk.until_s = "service", now, now + tk.service_s
        self._wait(tk, tk.service_s, self._served)

    def _preempted(self, tk: Ticket) -> None:
        """A failing worker took this update's worker mid-service: queued again or lost."""
        now = self.env.now
        tk.timer = None
        self.ingress.busy_s += now - tk.started_s
        how = "requeued" if self.ingress.requeue else "lost"
        self.rec.emit(now, tk.round, tk.client, "server_failure", tk.upload.nbytes, how)
        if not self.ingress.requeue:
            return self._fail(tk)
        tk.phase, tk.until_s = "queue", None
        self._ask(tk)

    def _served(self, tk: Ticket) -> None:
        c, now, upload, ing = tk.client, self.env.now, tk.upload, tk.ingested
        self.ingress.busy_s += tk.service_s
        self.rec.latency("queue", tk.wait_s)
        self.rec.latency("server", tk.service_s)
        hold, tk.hold = tk.hold, None
        if not ing.accepted:
            self.rec.emit(now, tk.round, c, "rejected", upload.nbytes, ing.detail)
            self._fail(tk)
        else:
            self.rec.emit(now, tk.round, c, "ingest_end", upload.nbytes)
            self.rec.bytes_up_accepted += upload.nbytes
            self.rec.bytes_up_raw += upload.raw_bytes  # the same updates: a fair ratio
            self.per_client["updates_accepted"][c] += 1
            self.selector.arrived(c, tk.num_samples, upload.loss_rms)
            self._end(tk, Arrival(client=c, round=tk.round, num_samples=tk.num_samples,
                                  result=ing.result, carried=ing.carried, upload=upload))
        self.ingress.release(hold)  # the next in the queue is served after this one's end

    def stop(self, tk: Ticket, cause: str) -> None:
        """Interrupt ``tk`` (``dropout``, ``crash``, ``deadline_miss``, ``over_selected``,
        ``cancelled``) unless it has ended or arrived: cancel its flow, job or wait, charge
        the cut phase's energy, record the cause; retry after a crash if the faults say so."""
        if not tk.live:
            return
        c, now, faults = tk.client, self.env.now, self.scenario.faults
        if tk.transfer is not None:
            tk.transfer.cancel(c)
            tk.transfer = None
        if tk.job is not None:
            tk.job.cancel()
            tk.job = None
        tk.timer = None
        if tk.phase in (UPLINK, DOWNLINK, "train"):  # the cut phase's energy
            self.energy.spend(c, "compute" if tk.phase == "train" else tk.phase,
                              now - tk.started_s)
        self.rec.emit(now, tk.round, c, cause, 0, tk.phase)
        if cause == "crash" and faults.on_crash == "retry" and tk.attempt < faults.crash_retries:
            tk.attempt += 1
            return self._try(tk)
        self._fail(tk)

    def _fail(self, tk: Ticket) -> None:
        self.per_client["failures"][tk.client] += 1
        self._end(tk, None)

    def _end(self, tk: Ticket, value: Arrival | None) -> None:
        self._uncontend(tk)
        tk.ended, tk.value = True, value
        tk.on_end(tk)

    # --- a checkpointed update goes on (fedsim.checkpoint, async rounds) --------------------

    def resume(self, tk: Ticket, on_end: Callable[[Ticket], None]) -> None:
        """Take up a restored update where its ticket says it was; its own wait, if it was in
        one, comes back with the clock's timers (:meth:`rewait`)."""
        c, wl = tk.client, self.workload
        tk.on_end, tk.uplink = on_end, self.network.link(c, UPLINK)
        tk.contending = tk.phase in _CONTENDING  # the links' counts are restored already
        if tk.phase in (DOWNLINK, UPLINK):
            tk.then = self._train if tk.phase == DOWNLINK else self._uploaded
            tk.transfer = self.network.holding(c, tk.phase)
            if isinstance(tk.transfer, SharedLink):
                tk.transfer.reattach(c, partial(self._transferred, tk))
        elif tk.phase == "train":  # planned and submitted again (pure functions of the seed)
            tk.plan = wl.plan(c, tk.round)
            tk.job = self.executor.submit_train(wl, c, tk.round, tk.plan)
            tk.then = self._trained
        elif tk.phase == "restart":
            tk.then = self._download
        elif tk.phase in ("queue", "service"):  # its decode and projection redone (pure)
            if tk.wait_s is not None:
                tk.ingested = wl.ingest(c, tk.upload)
                tk.service_s = tk.ingested.flops / self.scenario.server.flops_per_s
            serve, cut = partial(self._serve, tk), partial(self._preempted, tk)
            if tk.phase == "service":
                tk.hold = self.ingress.hold_again(cut, tk.asked_s, tk.started_s)
                tk.then = self._served
            else:
                tk.hold = self.ingress.queue_again(serve, cut, tk.asked_s)

    def rewait(self, tk: Ticket, at_s: float, tag: tuple[Any, ...]) -> bool:
        """The restored update's own timer again, if the one pending at ``at_s`` is it
        (False: an abandoned one, which fires into nothing)."""
        if tk.phase in (DOWNLINK, UPLINK):
            wired = self.network.wired
            if tk.transfer is not wired or wired.ends.get(tk.client) != at_s:
                return False
            wired.resume(tk.client, tag, partial(self._transferred, tk))
            return True
        if tk.until_s != at_s or tk.phase not in ("train", "restart", "service"):
            return False
        tk.timer = self.env.timer_at(at_s, tag)
        tk.timer.callbacks.append(partial(self._woke, tk))
        return True

    # --- rounds -----------------------------------------------------------------------------

    def available(self) -> np.ndarray:
        """Clients on now whose battery allows them to take part."""
        return self.energy.charged(self.availability.available(self.env.now), self.env.now)

    def wait_for_clients(self) -> Generator[simpy.Event, None, np.ndarray]:
        """Until some client is available (all may be off at once). Empty only when every
        client left is out of battery: nobody recharges, so the run cannot go on."""
        avail = self.available()
        while not avail.size and not self.energy.depleted.all():
            yield self.env.timer(max(self.availability.next_on_s(self.env.now) - self.env.now,
                                     1e-9))
            avail = self.available()
        return avail

    def select(self, candidates: np.ndarray, k: int | None, round_: int) -> list[int]:
        """The clients ``round_`` starts among ``candidates``, by the scenario's selector
        (``uniform``: ``k`` distinct ones drawn uniformly, all when k is None)."""
        return self.selector.select(candidates, k, round_)

    def close_round(self, round_: int, started_s: float, arrivals: list[Arrival],
                    stats: dict[str, int]) -> Generator[simpy.Event, None, None]:
        """Step 8-9: aggregate (server time = FLOPs / server FLOP/s), evaluate, record."""
        env = self.env
        flops = self.workload.aggregate(round_, arrivals)
        agg_s = flops / self.scenario.server.flops_per_s
        yield env.timer(agg_s)
        self.server_aggregate_s += agg_s
        self.rec.emit(env.now, round_, -1, "aggregate", 0, f"updates={len(arrivals)}")
        quality = self.workload.evaluate(round_)
        self.rec.latency("round", env.now - started_s)
        row = {"round": round_, "start_s": started_s, "end_s": env.now,
               "duration_s": env.now - started_s, **stats, "aggregated": len(arrivals),
               "energy_j": self.energy.total_j()}  # all clients' phases so far
        self.rec.rounds.append(row)
        self.quality_by_round.append({})
        if isinstance(quality, Deferred):  # filled in by _settle_quality
            self._deferred.append((len(self.quality_by_round) - 1, quality))
        else:
            self._fill_quality(len(self.quality_by_round) - 1, quality)
        self.rec.emit(env.now, round_, -1, "round_end", 0, f"aggregated={len(arrivals)}")
        self.on_round(len(self.rec.rounds))

    def _fill_quality(self, i: int, quality: dict[str, float]) -> None:
        self.quality_by_round[i] = quality
        self.rec.rounds[i].update({f"server_{k}": v for k, v in quality.items()})

    def _settle_quality(self) -> None:
        """Wait for background evaluations and put their numbers in place."""
        for i, deferred in self._deferred:
            self._fill_quality(i, deferred.result())
        self._deferred.clear()

    def on_round(self, done: int) -> None:
        """Progress hook (the CLI sets a progress bar here)."""

    # --- checkpoints (fedsim.checkpoint) ---------------------------------------------------

    def at_boundary(self, round_: int) -> None:
        """After round ``round_`` closed: checkpoint every ``output.checkpoint_every`` rounds."""
        every = self.scenario.output.checkpoint_every
        if self.checkpoint_to is None or not every or (round_ + 1) % every:
            return
        if round_ + 1 >= self.scenario.rounds:
            return  # the run directory itself comes next
        self._settle_quality()
        checkpoint.save(self.checkpoint_to, round_, *checkpoint.snapshot(self, round_))

    # --- the run ----------------------------------------------------------------------------

    def run(self, progress: Callable[[int], None] | None = None) -> RunResult:
        if progress:
            self.on_round = progress  # type: ignore[method-assign]
        wall0 = time.perf_counter()
        log.info("round %d of %d", self.first_round + 1, self.scenario.rounds)
        try:
            if not self.first_round:
                self.faults.start()
            main = self.env.process(self.policy.run())
            self.env.run(until=main)
            self.clients_final = self.workload.client_metrics(self.executor)  # workers still up
        finally:
            self.executor.close()
        self.env.events_processed -= self.restore_events
        self._settle_quality()
        summary = self.summarize(time.perf_counter() - wall0)
        return RunResult(scenario_yaml=self.scenario.to_yaml(), summary=summary,
                         recorder=self.rec, clients=self.client_rows(),
                         timeseries=[(t, "server_queue", q) for t, q in self.ingress.queue_series])

    def client_rows(self) -> Rows:
        """clients.csv: one row per client, kept as columns (a million clients)."""
        f = self.fleet
        return Rows({"client": list(range(f.size)), "group": f.group.tolist(),
                     "profile": list(f.profile), "model": list(f.model), "cell": f.cell.tolist(),
                     "distance_m": [round(d, 3) for d in f.distance_m.tolist()],
                     "flops_per_s": f.flops_per_s.astype(float).tolist(),
                     **{k: v.tolist() for k, v in self.per_client.items()},
                     "compute_s": self.compute_s.tolist(),
                     **self.energy.client_columns(self.env.now)})

    def summarize(self, wall_time_s: float) -> dict[str, object]:
        rec, T = self.rec, self.env.now
        by_profile = self.fleet.profile_index()
        compute = {p: (float(self.compute_s[by_profile[p]].sum()) / (len(by_profile[p]) * T)
                       if p in by_profile and T > 0 else 0.0) for p in PROFILES}
        server_busy = self.ingress.busy_s + self.server_aggregate_s
        metric = self.workload.primary_metric()
        raw, accepted = rec.bytes_up_raw, rec.bytes_up_accepted
        return {
            "scenario": self.scenario.name,
            "seed": self.scenario.seed,
            "sim_time_s": T,
            "rounds_completed": len(rec.rounds),
            "latency_s": {p: percentiles(rec.latency_s[p]) for p in PHASES},
            "overload": {
                "server_queue_max": self.ingress.queue_max,
                "server_wait_p95_s": percentiles(self.ingress.waits_s)["p95"],
                "dropped_updates": self.ingress.dropped,
                "deadline_misses": rec.counts["deadline_miss"],
                "oom_failures": rec.counts["oom"],
                "dropouts": rec.counts["dropout"],
                "outages": rec.counts["outage"],
                "rejected_updates": rec.counts["rejected"],
                "failed_jobs": rec.counts["job_failed"],
                "crashes": rec.counts["crash"],
                "link_outages": rec.counts["link_down"],
                "server_failures": rec.counts["server_down"],
                "updates_hit_by_server_failures": rec.counts["server_failure"],
            },
            "utilization": {
                "uplink": self.network.utilization(UPLINK, T),
                "downlink": self.network.utilization(DOWNLINK, T),
                "server": server_busy / (self.ingress.workers * T) if T > 0 else 0.0,
                "compute": compute,
            },
            "comm": {
                "bytes_up": rec.bytes_up,  # crossed the uplinks
                "bytes_down": rec.bytes_down,  # crossed the downlinks
                "bytes_up_accepted": accepted,  # of the updates the server accepted
                "bytes_up_raw": raw,  # those updates in fp32
                "compression_ratio": raw / accepted if accepted else 1.0,
            },
            "quality": {
                "metric": metric,
                "server_by_round": [q.get(metric) for q in self.quality_by_round]
                if metric else [],
                "clients_final": self.clients_final,
            },
            "counts": {
                "updates_started": int(self.per_client["updates_sent"].sum()),
                "updates_accepted": int(self.per_client["updates_accepted"].sum()),
                "events": rec.num_events,
                "sim_events": self.env.events_processed,
            },
            "energy_j": self.energy.summary(),
            # What a modelling selector expected of each update against what happened.
            **({"selection": sel} if (sel := self.selector.summary()) is not None else {}),
            "wall_time_s": wall_time_s,
        }


def _fleet(scenario: Scenario) -> Fleet:
    return build_fleet(scenario, stream(scenario.seed, "fleet"))


def prepare(scenario: Scenario) -> None:
    """What a run builds before its first round and nothing after: the fleet, then the workload
    (data set, client and server models, the server's probe, the fitted projection maps). What
    it builds lands in the caches (models, projectors, token maps), so a run, a sweep's
    parallel points or a comparison read them instead of each fitting its own."""
    make_workload(scenario, _fleet(scenario)).close()


def run(scenario: Scenario, workload: Workload | None = None,
        progress: Callable[[int], None] | None = None,
        executor: Executor | None = None, run_dir: str | Path | None = None,
        resume: str | Path | None = None) -> RunResult:
    """Play ``scenario`` to the end and return what it produced (jobs on ``executor``, by
    default the scenario's). With ``run_dir``, checkpoints go to ``run_dir/checkpoints/``
    (``output.checkpoint_every``); with ``resume``, the run continues from that directory's
    latest checkpoint."""
    saved = None
    if resume is not None:
        found = checkpoint.latest(resume)
        if found is None:
            raise FedsimError(f"--resume {resume}: no checkpoint there (a run writes them "
                              "with output.checkpoint_every)")
        saved = checkpoint.load(found)
    sim = Simulation(scenario, workload, executor, start_s=saved[0]["now"] if saved else 0.0)
    try:
        sim.checkpoint_to = Path(run_dir) if run_dir is not None else None
        if saved is not None:
            checkpoint.restore(sim, *saved)
        return sim.run(progress)
    finally:
        sim.workload.close()

"""The SimPy world: clients, cells and the server, and the round policies that drive them.

SimPy is the only clock (DESIGN.md): compute time is FLOPs / device FLOP/s, transfer time is
bytes over a rate that changes as flows come and go, server time is FLOPs / server FLOP/s. The
workload (``fedsim.workload``) does the ML and returns data; this module turns it into time.

``client_update`` is the life of one update: download, train, encode, upload, ingest. A round
policy (registry ``ROUND_POLICIES``: ``sync``, ``deadline``, ``async``) selects clients, starts
their updates and closes rounds by aggregating. ``run(scenario)`` returns a ``RunResult``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simpy

from fedsim import checkpoint
from fedsim.channels import DOWNLINK, UPLINK, SharedLink, WiredLink, make_channel
from fedsim.devices import PROFILES, Fleet, build_fleet
from fedsim.errors import FedsimError
from fedsim.executors import Executor, Job, JobFailed, make_executor
from fedsim.metrics import PHASES, Recorder, RunResult, percentiles
from fedsim.plugins import ROUND_POLICIES
from fedsim.rng import hashed_exponential, hashed_uniform, hashed_uniform_one, key, stream
from fedsim.scenario import Scenario
from fedsim.workload import Arrival, Deferred, JobPlan, Upload, Workload, make_workload

GIB = 2**30


class CountingEnvironment(simpy.Environment):
    """A SimPy environment that counts the events it processes (for benchmarks and summaries)."""

    def __init__(self) -> None:
        super().__init__()
        self.events_processed = 0

    def step(self) -> None:
        self.events_processed += 1
        super().step()


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

    def next_on_s(self, t: float) -> float:
        """The earliest time after ``t`` at which some off client comes on."""
        self._advance(np.arange(len(self.on)), t)
        off = ~self.on
        return float(self.next_switch[off].min()) if off.any() else t


class Server:
    """Server ingress: ``workers`` parallel workers and a bounded queue.

    ``serve(work)`` waits for a worker, calls ``work()`` for the service time in seconds (the
    real decode/projection happens at that moment) and holds the worker that long. A request
    arriving when ``queue_capacity`` updates already wait is dropped (returns None).

    The workers are a ``simpy.PreemptiveResource``: a failing worker (a request at priority
    ``FAILURE`` with ``preempt=True``) takes a worker ahead of every update, preempting the
    one it was serving, which is then queued again (``requeue``) or lost (``serve`` raises
    :class:`ServerFailure`).
    """

    UPDATE, FAILURE = 1, 0  # request priorities: smaller goes first

    def __init__(self, env: simpy.Environment, workers: int, queue_capacity: int,
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

    def serve(self, work: Callable[[], float], on_failure: Callable[[], None] | None = None
              ) -> Generator[simpy.Event, None, float | None]:
        if len(self.resource.queue) >= self.queue_capacity and self.resource.count >= self.workers:
            self.dropped += 1
            return None
        arrived, wait, service_s = self.env.now, None, 0.0
        while True:
            with self.resource.request(priority=self.UPDATE, preempt=False) as req:
                self._note_queue()
                yield req
                self._note_queue()
                if wait is None:  # the first service does the work; a requeue only waits
                    wait = self.env.now - arrived
                    self.waits_s.append(wait)
                    service_s = work()
                started = self.env.now
                try:
                    yield self.env.timeout(service_s)
                except simpy.Interrupt:  # its worker failed mid-service
                    self.busy_s += self.env.now - started
                    if on_failure is not None:
                        on_failure()
                    if not self.requeue:
                        raise ServerFailure() from None
                    continue
                self.busy_s += service_s
            return wait


class ServerFailure(Exception):
    """The server worker serving an update failed and the update is lost."""


class Network:
    """One shared uplink and downlink per cell, and dedicated wired links."""

    def __init__(self, env: simpy.Environment, scenario: Scenario, fleet: Fleet) -> None:
        cells = scenario.network.cells
        channel = make_channel(scenario.network.channel, cells, fleet,
                               stream(scenario.seed, "channel"))
        self.channel = channel
        self.cells = {d: [SharedLink(env, channel, i, d) for i in range(len(cells))]
                      for d in (UPLINK, DOWNLINK)}
        self.wired = WiredLink(env, fleet.wired_rate_bps)
        self.fleet = fleet

    def link(self, client: int, direction: str) -> SharedLink | WiredLink:
        cell = int(self.fleet.cell[client])
        return self.wired if cell < 0 else self.cells[direction][cell]

    def utilization(self, direction: str, sim_time_s: float) -> float:
        links = self.cells[direction]
        return sum(lk.busy_s for lk in links) / (len(links) * sim_time_s) if sim_time_s else 0.0


@dataclass
class Ticket:
    """A running update, as the round policy sees it."""

    client: int
    round: int
    arrived: bool = False  # past the upload: a deadline no longer applies
    phase: str = "select"
    transfer: SharedLink | WiredLink | None = None  # the flow in progress, to cancel
    job: Job | None = None  # the training job in progress, to cancel
    attempt: int = 0  # tries after crashes (faults.on_crash: retry)


class Simulation:
    """The world of one scenario run; ``run()`` plays it to the end."""

    def __init__(self, scenario: Scenario, workload: Workload | None = None,
                 executor: Executor | None = None) -> None:
        self.scenario = scenario
        self.env = CountingEnvironment()
        self.fleet = build_fleet(scenario, stream(scenario.seed, "fleet"))
        self.network = Network(self.env, scenario, self.fleet)
        self.server = Server(self.env, scenario.server.workers, scenario.server.queue_capacity,
                             requeue=scenario.faults.on_server_failure == "requeue")
        self.crash_key = key(scenario.seed, "faults.crash")
        self.availability = Availability(self.fleet, key(scenario.seed, "availability"))
        self.select_rng = stream(scenario.seed, "selection")
        self.rec = Recorder(keep_events=scenario.output.events)
        self.workload = workload or make_workload(scenario, self.fleet)
        self.executor = executor or make_executor(scenario.executor)
        self.policy = ROUND_POLICIES.get(scenario.round_policy.name)(self)
        n = self.fleet.size
        self.per_client = {k: np.zeros(n, dtype=np.int64) for k in
                           ("updates_sent", "updates_accepted", "failures", "bytes_up",
                            "bytes_down")}
        self.compute_s = np.zeros(n)
        self.server_aggregate_s = 0.0
        self.quality_by_round: list[dict[str, float]] = []
        self.faults: dict[str, dict] = {}  # fault process -> its state (see _fault)
        self.first_round = 0  # a resumed run starts later
        self.checkpoint_to: Path | None = None  # run directory whose checkpoints/ to write
        self.restore_events = 0  # SimPy events a restore adds that the original run had not
        self._deferred: list[tuple[int, Deferred]] = []  # rounds whose quality is coming

    # --- the life of one update -------------------------------------------------------------

    def _schedule_dropout(self, tk: Ticket, proc: simpy.Process) -> None:
        """Interrupt the update when its client goes offline, unless it has arrived by then."""
        t_off = self.availability.next_off_s(tk.client, self.env.now)
        if math.isinf(t_off):
            return

        def drop(_event: simpy.Event) -> None:
            if proc.is_alive and not tk.arrived:
                proc.interrupt("dropout")

        ev = self.env.timeout(t_off - self.env.now)
        ev.callbacks.append(drop)
        ev.fedsim_tag = ("noop",)  # after the update, a no-op that still counts as an event

    def _transfer(self, tk: Ticket, direction: str, nbytes: int
                  ) -> Generator[simpy.Event, None, bool]:
        c, env = tk.client, self.env
        link = self.network.link(c, direction)
        started = env.now
        tk.phase = direction
        self.rec.emit(started, tk.round, c, f"{direction}_start", nbytes)
        tk.transfer = link
        ok = yield link.transfer(c, nbytes)
        tk.transfer = None
        if not ok:
            self.rec.emit(env.now, tk.round, c, "outage", 0, direction)
            return False
        phase = "upload" if direction == UPLINK else "download"
        self.rec.latency(phase, env.now - started)
        self.rec.emit(env.now, tk.round, c, f"{direction}_end", nbytes)
        key_ = "bytes_up" if direction == UPLINK else "bytes_down"
        self.per_client[key_][c] += nbytes
        return True

    def _train(self, tk: Ticket) -> Generator[simpy.Event, None, object]:
        """Step 3: plan the job, fail it if it does not fit, else wait FLOPs / FLOP/s."""
        c, env, wl = tk.client, self.env, self.workload
        tk.phase = "train"
        plan = wl.plan(c, tk.round)
        limit = self.fleet.memory_gib[c] * GIB
        if plan.peak_memory_bytes > limit:
            detail = f"needs {plan.peak_memory_bytes / GIB:.2f} GiB, has {limit / GIB:.2f} GiB"
            self.rec.emit(env.now, tk.round, c, "oom", 0, detail)
            return None
        self.rec.emit(env.now, tk.round, c, "train_start", 0, f"flops={plan.flops:.4g}")
        tk.job = self.executor.submit_train(wl, c, tk.round, plan)
        compute_s = plan.flops / self.fleet.flops_per_s[c]
        yield env.timeout(compute_s)
        job, tk.job = tk.job, None
        self.compute_s[c] += compute_s
        self.rec.latency("compute", compute_s)
        try:
            update = job.result()
        except JobFailed as e:  # the executor lost the job: a failed update, not a lost run
            self.rec.emit(env.now, tk.round, c, "job_failed", 0, str(e))
            return None
        self.rec.emit(env.now, tk.round, c, "train_end", 0, f"samples={plan.num_samples}")
        return (plan, update)

    def client_update(self, tk: Ticket, deadline_at: float | None = None
                      ) -> Generator[simpy.Event, None, Arrival | None]:
        """Download -> train -> encode -> upload -> ingest. Returns the accepted Arrival.

        A dropout (the client goes offline), a crash or the round's deadline interrupts it;
        whatever it was doing is cancelled and the interruption recorded. After a crash, with
        ``faults.on_crash: retry``, the client reboots and starts over (download included).
        """
        c, env = tk.client, self.env
        proc = env.active_process
        self._schedule_dropout(tk, proc)
        self.per_client["updates_sent"][c] += 1
        uplink = self.network.link(c, UPLINK)
        uplink.contenders += 1
        faults = self.scenario.faults
        try:
            while True:
                self._schedule_crash(tk, proc)
                try:
                    if tk.attempt:  # rebooting after a crash
                        tk.phase = "restart"
                        yield env.timeout(faults.restart_s)
                    sent = yield from self._attempt(tk, deadline_at, uplink)
                    break
                except simpy.Interrupt as stop:
                    if tk.transfer is not None:
                        tk.transfer.cancel(c)
                    if tk.job is not None:
                        tk.job.cancel()
                    self.rec.emit(env.now, tk.round, c, str(stop.cause), 0, tk.phase)
                    if (stop.cause == "crash" and faults.on_crash == "retry"
                            and tk.attempt < faults.crash_retries):
                        tk.attempt += 1
                        continue
                    return self._failed(c)
        finally:
            uplink.contenders -= 1
        if sent is None:
            return self._failed(c)
        tk.arrived = True
        plan, upload = sent
        return (yield from self._ingest(tk, plan.num_samples, upload))

    def _attempt(self, tk: Ticket, deadline_at: float | None, uplink: SharedLink | WiredLink
                 ) -> Generator[simpy.Event, None, tuple[JobPlan, Upload] | None]:
        """One try at steps 2-5: download, train, encode, upload. None: it failed."""
        c, env, wl = tk.client, self.env, self.workload
        if not (yield from self._transfer(tk, DOWNLINK, wl.download_bytes(c))):
            return None
        trained = yield from self._train(tk)
        if trained is None:
            return None
        plan, update = trained
        tk.phase = "encode"
        time_left = None if deadline_at is None else deadline_at - env.now
        upload = wl.encode(c, tk.round, update, uplink.estimate_rate_bps(c), time_left)
        self.rec.emit(env.now, tk.round, c, "encode", upload.nbytes,
                      f"{upload.codec} raw={upload.raw_bytes} err={upload.rel_error:.4g}")
        if not (yield from self._transfer(tk, UPLINK, upload.nbytes)):
            return None
        return plan, upload

    def _schedule_crash(self, tk: Ticket, proc: simpy.Process) -> None:
        """Interrupt this try at an Exp(client_crash_per_h) time, unless it is over by then.
        The draw is keyed by (client, round, try): the same whatever else happens."""
        rate_per_s = self.scenario.faults.client_crash_per_h / 3600.0
        if rate_per_s <= 0:
            return
        attempt = tk.attempt
        u = hashed_uniform_one(self.crash_key, tk.client, tk.round * 1024 + attempt)
        after_s = -math.log(u) / rate_per_s

        def crash(_event: simpy.Event) -> None:
            if proc.is_alive and not tk.arrived and tk.attempt == attempt:
                proc.interrupt("crash")

        ev = self.env.timeout(after_s)
        ev.callbacks.append(crash)
        ev.fedsim_tag = ("noop",)

    def _ingest(self, tk: Ticket, num_samples: int, upload: Upload
                ) -> Generator[simpy.Event, None, Arrival | None]:
        """Step 6-7: wait for a server worker, decode and project; or be dropped."""
        c, env = tk.client, self.env
        result = {}

        def work() -> float:
            result["ing"] = ing = self.workload.ingest(c, upload)
            self.rec.emit(env.now, tk.round, c, "ingest_start", upload.nbytes, ing.detail)
            return ing.flops / self.scenario.server.flops_per_s

        def lost() -> None:
            how = "requeued" if self.server.requeue else "lost"
            self.rec.emit(env.now, tk.round, c, "server_failure", upload.nbytes, how)

        try:
            wait = yield from self.server.serve(work, lost)
        except ServerFailure:
            return self._failed(c)
        if wait is None:
            self.rec.emit(env.now, tk.round, c, "queue_drop", upload.nbytes)
            return self._failed(c)
        self.rec.latency("queue", wait)
        ing = result["ing"]
        self.rec.latency("server", ing.flops / self.scenario.server.flops_per_s)
        if not ing.accepted:
            self.rec.emit(env.now, tk.round, c, "rejected", upload.nbytes, ing.detail)
            return self._failed(c)
        self.rec.emit(env.now, tk.round, c, "ingest_end", upload.nbytes)
        self.rec.bytes_up += upload.nbytes
        self.rec.bytes_up_raw += upload.raw_bytes  # same updates as bytes_up: a fair ratio
        self.per_client["updates_accepted"][c] += 1
        return Arrival(client=c, round=tk.round, num_samples=num_samples, update=ing.update)

    def _failed(self, client: int) -> None:
        self.per_client["failures"][client] += 1
        return None

    # --- rounds -----------------------------------------------------------------------------

    def available(self) -> np.ndarray:
        return self.availability.available(self.env.now)

    def wait_for_clients(self) -> Generator[simpy.Event, None, np.ndarray]:
        """Until some client is available (all may be off at once)."""
        avail = self.available()
        while not avail.size:
            yield self.env.timeout(max(self.availability.next_on_s(self.env.now) - self.env.now,
                                       1e-9))
            avail = self.available()
        return avail

    def select(self, candidates: np.ndarray, k: int | None) -> list[int]:
        """``k`` distinct clients drawn uniformly among ``candidates`` (all when k is None)."""
        if k is None or len(candidates) <= k:
            return [int(c) for c in candidates]
        return sorted(int(c) for c in self.select_rng.choice(candidates, size=k, replace=False))

    def close_round(self, round_: int, started_s: float, arrivals: list[Arrival],
                    stats: dict[str, int]) -> Generator[simpy.Event, None, None]:
        """Step 8-9: aggregate (server time = FLOPs / server FLOP/s), evaluate, record."""
        env = self.env
        flops = self.workload.aggregate(round_, arrivals)
        agg_s = flops / self.scenario.server.flops_per_s
        yield env.timeout(agg_s)
        self.server_aggregate_s += agg_s
        self.rec.emit(env.now, round_, -1, "aggregate", 0, f"updates={len(arrivals)}")
        quality = self.workload.evaluate(round_)
        self.rec.latency("round", env.now - started_s)
        row = {"round": round_, "start_s": started_s, "end_s": env.now,
               "duration_s": env.now - started_s, **stats, "aggregated": len(arrivals)}
        self.rec.rounds.append(row)
        self.quality_by_round.append({})
        if isinstance(quality, Deferred):  # filled in by _settle_quality
            self._deferred.append((len(self.quality_by_round) - 1, quality))
        else:
            self._fill_quality(len(self.quality_by_round) - 1, quality)
        self.rec.emit(env.now, round_, -1, "round_end", 0, f"aggregated={len(arrivals)}")
        self.on_round(len(self.rec.rounds))

    # --- faults of the world (scenario.faults) ----------------------------------------------
    # Each fault process keeps its state in ``self.faults`` (the next draw's index, whether it
    # is down, until when it waits) so that a checkpoint can restart it where it was.

    def _start_faults(self) -> None:
        f = self.scenario.faults
        if f.link_outage_per_h > 0:
            for cell in range(len(self.scenario.network.cells)):
                self._fault(f"link:{cell}")
        if f.server_failure_per_h > 0:
            for worker in range(self.server.workers):
                self._fault(f"server:{worker}")

    def _fault(self, name: str, state: dict | None = None) -> simpy.Process:
        self.faults[name] = state or {"n": 0, "down": False, "until": None}
        kind, unit = name.split(":")
        body = self._link_outages if kind == "link" else self._worker_failures
        return self.env.process(body(int(unit), self.faults[name]))

    def _exp_s(self, name: str, unit: int, n: int, mean_s: float) -> float:
        """An Exp(mean) draw of fault process ``name`` for ``unit``, keyed by (unit, n)."""
        return -math.log(hashed_uniform_one(key(self.scenario.seed, f"faults.{name}"), unit, n)
                         ) * mean_s

    def _timer(self, at: float) -> simpy.Timeout:
        ev = self.env.timeout(at - self.env.now)
        ev.fedsim_tag = ("fault",)  # restored by restarting its process from self.faults
        return ev

    def _link_outages(self, cell: int, st: dict) -> Generator[simpy.Event, None, None]:
        """Up for Exp(1/rate), down for Exp(link_outage_s), again and again."""
        f, env = self.scenario.faults, self.env
        links = [self.network.cells[d][cell] for d in (UPLINK, DOWNLINK)]
        while True:
            if st["until"] is None:
                st["until"] = env.now + self._exp_s("link_outage", cell, st["n"],
                                                    3600.0 / f.link_outage_per_h)
            yield self._timer(st["until"])
            if st["down"]:
                for link in links:
                    link.set_outage(False)
                st["down"], st["n"], st["until"] = False, st["n"] + 1, None
                self.rec.emit(env.now, -1, -1, "link_up", 0, f"cell={cell}")
            else:
                down_s = self._exp_s("link_outage_s", cell, st["n"], f.link_outage_s)
                self.rec.emit(env.now, -1, -1, "link_down", 0, f"cell={cell} for={down_s:.6g}")
                for link in links:
                    link.set_outage(True)
                st["down"], st["until"] = True, env.now + down_s

    def _worker_failures(self, worker: int, st: dict) -> Generator[simpy.Event, None, None]:
        """Up for Exp(1/rate), then the worker fails (preempting the update it serves) and is
        repaired after server_repair_s, again and again."""
        f, env, server = self.scenario.faults, self.env, self.server
        while True:
            restored_down = st["down"]
            if not restored_down:
                if st["until"] is None:
                    st["until"] = env.now + self._exp_s("server_failure", worker, st["n"],
                                                        3600.0 / f.server_failure_per_h)
                yield self._timer(st["until"])
            with server.resource.request(priority=Server.FAILURE, preempt=True) as req:
                yield req
                if restored_down:  # back under repair: the grant is not an original event
                    self.restore_events += 1
                else:
                    self.rec.emit(env.now, -1, -1, "server_down", 0, f"worker={worker}")
                    st["down"], st["until"] = True, env.now + f.server_repair_s
                yield self._timer(st["until"])
            st["down"], st["n"], st["until"] = False, st["n"] + 1, None
            self.rec.emit(env.now, -1, -1, "server_up", 0, f"worker={worker}")

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
        state, tensors = self.checkpoint_state(round_)
        checkpoint.save(self.checkpoint_to, round_, state, tensors)

    def _pending(self) -> list[list]:
        """The events on the clock now, in their order, as restorable tags."""
        out = []
        for t, prio, _eid, ev in sorted(self.env._queue):
            tag = getattr(ev, "fedsim_tag", None)
            if tag is None and isinstance(ev, simpy.Timeout) and not ev.callbacks:
                tag = ("noop",)  # a wait an interrupt abandoned (deadline, dropout, crash)
            if tag is None:
                raise RuntimeError(f"cannot checkpoint: untagged pending event {ev!r} at {t}")
            out.append([t, prio, *tag])
        return out

    def checkpoint_state(self, round_: int) -> tuple[dict, dict]:
        """Everything the rest of the run depends on, after round ``round_`` (JSON, tensors)."""
        rec, av, A = self.rec, self.availability, checkpoint.array
        wl_state, tensors = self.workload.checkpoint_state()
        state = {
            "scenario": self.scenario.to_yaml(),
            "now": self.env.now,
            "sim_events": self.env.events_processed - self.restore_events,
            "next_round": round_ + 1,
            "select_rng": self.select_rng.bit_generator.state,
            "availability": {"on": A(av.on), "count": A(av.count),
                             "next_switch": A(av.next_switch)},
            "links": {f"{d}:{i}": lk.snapshot() for d, links in self.network.cells.items()
                      for i, lk in enumerate(links)},
            "wired_bits": self.network.wired.bits_carried,
            "server": {"busy_s": self.server.busy_s, "queue_max": self.server.queue_max,
                       "dropped": self.server.dropped, "waits_s": self.server.waits_s,
                       "queue_series": self.server.queue_series},
            "recorder": rec.state(),
            "per_client": {k: A(v) for k, v in self.per_client.items()},
            "compute_s": A(self.compute_s),
            "server_aggregate_s": self.server_aggregate_s,
            "quality_by_round": self.quality_by_round,
            "faults": self.faults,
            "pending": self._pending(),
            "workload": wl_state,
        }
        return state, tensors

    def restore(self, state: dict, tensors: dict) -> None:
        """Put this freshly built world in the checkpointed state (before ``run``)."""
        if state["scenario"] != self.scenario.to_yaml():
            raise FedsimError("--resume: the checkpoint was taken with another scenario "
                              "(compare its state.json 'scenario' with this one's --set)")
        env, av, F = self.env, self.availability, checkpoint.from_array
        env._now = state["now"]
        self.select_rng.bit_generator.state = state["select_rng"]
        av.on, av.count, av.next_switch = (F(state["availability"][k])
                                           for k in ("on", "count", "next_switch"))
        for name, doc in state["links"].items():
            d, i = name.split(":")
            self.network.cells[d][int(i)].restore(doc)
        self.network.wired.bits_carried = state["wired_bits"]
        sv = state["server"]
        self.server.busy_s, self.server.queue_max, self.server.dropped = (
            sv["busy_s"], sv["queue_max"], sv["dropped"])
        self.server.waits_s = list(sv["waits_s"])
        self.server.queue_series = [tuple(x) for x in sv["queue_series"]]
        self.rec.restore(state["recorder"])
        for k, doc in state["per_client"].items():
            self.per_client[k] = F(doc)
        self.compute_s = F(state["compute_s"])
        self.server_aggregate_s = state["server_aggregate_s"]
        self.quality_by_round = list(state["quality_by_round"])
        self.workload.restore_state(state["workload"], tensors)
        self.first_round = state["next_round"]
        # The clock: the pending events again, in their order; fault processes restart.
        self.restore_events = 1  # the policy's new process starts with an Initialize event
        for t, _prio, kind, *rest in state["pending"]:
            if kind == "noop":
                env.timeout(t - env.now).fedsim_tag = ("noop",)
            elif kind == "wake":
                self.network.cells[rest[0]][rest[1]].rewake(rest[2])
            elif kind == "flush":
                self.network.cells[rest[0]][rest[1]].refresh()
        for name, st in state["faults"].items():
            self._fault(name, dict(st))
            self.restore_events += 1  # its Initialize
        self.env.events_processed = state["sim_events"]

    # --- the run ----------------------------------------------------------------------------

    def run(self, progress: Callable[[int], None] | None = None) -> RunResult:
        if progress:
            self.on_round = progress  # type: ignore[method-assign]
        wall0 = time.perf_counter()
        try:
            if not self.first_round:
                self._start_faults()
            main = self.env.process(self.policy.run())
            self.env.run(until=main)
        finally:
            self.executor.close()
        self.env.events_processed -= self.restore_events
        self._settle_quality()
        summary = self.summarize(time.perf_counter() - wall0)
        return RunResult(scenario_yaml=self.scenario.to_yaml(), summary=summary,
                         recorder=self.rec, clients=self.client_rows(),
                         timeseries=[(t, "server_queue", q) for t, q in self.server.queue_series])

    def client_rows(self) -> list[dict[str, object]]:
        f = self.fleet
        return [{"client": i, "group": int(f.group[i]), "profile": f.profile[i],
                 "model": f.model[i], "cell": int(f.cell[i]),
                 "distance_m": round(float(f.distance_m[i]), 3),
                 "flops_per_s": float(f.flops_per_s[i]),
                 **{k: int(v[i]) for k, v in self.per_client.items()},
                 "compute_s": float(self.compute_s[i])} for i in range(f.size)]

    def summarize(self, wall_time_s: float) -> dict[str, object]:
        rec, T = self.rec, self.env.now
        by_profile = self.fleet.profile_index()
        compute = {p: (float(self.compute_s[by_profile[p]].sum()) / (len(by_profile[p]) * T)
                       if p in by_profile and T > 0 else 0.0) for p in PROFILES}
        server_busy = self.server.busy_s + self.server_aggregate_s
        metric = self.workload.primary_metric()
        raw, up = rec.bytes_up_raw, rec.bytes_up
        return {
            "scenario": self.scenario.name,
            "seed": self.scenario.seed,
            "sim_time_s": T,
            "rounds_completed": len(rec.rounds),
            "latency_s": {p: percentiles(rec.latency_s[p]) for p in PHASES},
            "overload": {
                "server_queue_max": self.server.queue_max,
                "server_wait_p95_s": percentiles(self.server.waits_s)["p95"],
                "dropped_updates": self.server.dropped,
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
                "server": server_busy / (self.server.workers * T) if T > 0 else 0.0,
                "compute": compute,
            },
            "comm": {
                "bytes_up": up,
                "bytes_down": int(self.per_client["bytes_down"].sum()),
                "bytes_up_raw": raw,
                "compression_ratio": raw / up if up else 1.0,
            },
            "quality": {
                "metric": metric,
                "server_by_round": [q.get(metric) for q in self.quality_by_round]
                if metric else [],
                "clients_final": self.workload.client_metrics(),
            },
            "counts": {
                "updates_started": int(self.per_client["updates_sent"].sum()),
                "updates_accepted": int(self.per_client["updates_accepted"].sum()),
                "events": rec.num_events,
                "sim_events": self.env.events_processed,
            },
            "wall_time_s": wall_time_s,
        }


def run(scenario: Scenario, workload: Workload | None = None,
        progress: Callable[[int], None] | None = None,
        executor: Executor | None = None, run_dir: str | Path | None = None,
        resume: str | Path | None = None) -> RunResult:
    """Play ``scenario`` to the end and return what it produced (jobs on ``executor``, by
    default the scenario's). With ``run_dir``, checkpoints go to ``run_dir/checkpoints/``
    (``output.checkpoint_every``); with ``resume``, the run continues from that directory's
    latest checkpoint."""
    sim = Simulation(scenario, workload, executor)
    try:
        sim.checkpoint_to = Path(run_dir) if run_dir is not None else None
        if resume is not None:
            found = checkpoint.latest(resume)
            if found is None:
                raise FedsimError(f"--resume {resume}: no checkpoint there (a run writes them "
                                  "with output.checkpoint_every)")
            sim.restore(*checkpoint.load(found))
        return sim.run(progress)
    finally:
        sim.workload.close()

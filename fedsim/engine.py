"""The SimPy world: clients, cells and the server, and the round policies that drive them.

SimPy is the only clock (DESIGN.md): compute time is FLOPs / device FLOP/s, transfer time is
bytes over a rate that changes as flows come and go, server time is FLOPs / server FLOP/s. The
workload (``fedsim.workload``) does the ML and returns data; this module turns it into time.

``client_update`` is the life of one update: download, train, encode, upload, ingest. A round
policy (registry ``ROUND_POLICIES``: ``sync``, ``deadline``, ``async``) selects clients, starts
their updates and closes rounds by aggregating. ``run(scenario)`` returns a ``RunResult``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

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
from fedsim.ingress import Ingress, ServerFailure
from fedsim.metrics import PHASES, Recorder, RunResult, percentiles
from fedsim.plugins import ROUND_POLICIES
from fedsim.rng import key, stream
from fedsim.scenario import Scenario
from fedsim.selection import make_selector
from fedsim.workload import Arrival, Deferred, Upload, Workload, make_workload

log = logging.getLogger("fedsim")  # what the run is doing, for a progress display

GIB = 2**30


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
    serial: int = 0  # which update of the run this is (a client may send several a round)
    # Where it is, so that a checkpoint can take it along (async rounds) and resume it:
    started_s: float = 0.0  # when the current phase began
    until_s: float | None = None  # when the current wait ends (training, restart, service)
    nbytes: int = 0  # the transfer in progress
    upload: Upload | None = None  # once encoded
    queued_s: float | None = None  # when it reached the server's ingress queue
    queued_seq: int = 0  # its place in the order of arrival there (ties at one instant)
    wait_s: float | None = None  # how long it waited there for a worker
    # A restored update's wait and worker, made by the restore in the clock's original order
    # (so that it fires among the events of its instant where it would have):
    wake: simpy.Event | None = None
    request: simpy.Event | None = None
    num_samples: int = 0  # examples its training job saw

    @property
    def tag(self) -> tuple[str, int, int]:
        """The clock tag of this try's own waits (see ``fedsim.clock``): a wait a crash
        abandoned belongs to an earlier try."""
        return ("update", self.serial, self.attempt)


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

    # --- the life of one update -------------------------------------------------------------

    def schedule_dropout(self, tk: Ticket, proc: simpy.Process, at: float | None = None,
                         deadline_at: float | None = None) -> None:
        """Interrupt the update when its client goes offline, unless it has arrived by then
        (``at``: a restored timer's time). No timer when the client goes offline after the
        round's deadline (``deadline_at``): by then the update has arrived or the deadline has
        stopped it, so the timer could only fire into nothing (one SimPy event less per
        update; the other events keep their order)."""
        t_off = self.availability.next_off_s(tk.client, self.env.now) if at is None else at
        if math.isinf(t_off) or (deadline_at is not None and t_off > deadline_at):
            return

        def drop(_event: simpy.Event) -> None:
            if proc.is_alive and not tk.arrived:
                proc.interrupt("dropout")

        # After the update it fires into nothing (still an event).
        tag = ("dropout", tk.serial)
        if at is None:
            self.env.timer(t_off - self.env.now, tag, drop)
        else:
            self.env.timer_at(at, tag, drop)

    def _transfer(self, tk: Ticket, direction: str, nbytes: int, resumed: bool = False
                  ) -> Generator[simpy.Event, None, bool]:
        c, env = tk.client, self.env
        link = self.network.link(c, direction)
        tk.transfer = link
        if resumed:  # restored mid-flow: the flow is in the link's restored state
            done = link.resumed(c, tk.tag)
        else:
            tk.started_s, tk.phase, tk.nbytes = env.now, direction, nbytes
            self.rec.emit(env.now, tk.round, c, f"{direction}_start", nbytes)
            done = link.transfer(c, nbytes, tk.tag)
        started = tk.started_s
        ok = yield done
        tk.transfer = None
        self.energy.spend(c, direction, env.now - started)  # airtime, delivered or not
        if not ok:
            self.rec.emit(env.now, tk.round, c, "outage", 0, direction)
            return False
        phase = "upload" if direction == UPLINK else "download"
        self.rec.latency(phase, env.now - started)
        self.rec.emit(env.now, tk.round, c, f"{direction}_end", nbytes)
        key_ = "bytes_up" if direction == UPLINK else "bytes_down"
        self.per_client[key_][c] += nbytes
        setattr(self.rec, key_, getattr(self.rec, key_) + nbytes)
        return True

    def _train(self, tk: Ticket, resumed: bool = False) -> Generator[simpy.Event, None, object]:
        """Step 3: plan the job, fail it if it does not fit, else wait FLOPs / FLOP/s. A
        restored job is planned and submitted again (both are pure functions of the seed)."""
        c, env, wl = tk.client, self.env, self.workload
        plan = wl.plan(c, tk.round)
        compute_s = plan.flops / self.fleet.flops_per_s[c]
        if not resumed:
            tk.phase = "train"
            limit = self.fleet.memory_gib[c] * GIB
            if plan.peak_memory_bytes > limit:
                detail = (f"needs {plan.peak_memory_bytes / GIB:.2f} GiB, has "
                          f"{limit / GIB:.2f} GiB")
                self.rec.emit(env.now, tk.round, c, "oom", 0, detail)
                return None
            self.rec.emit(env.now, tk.round, c, "train_start", 0, f"flops={plan.flops:.4g}")
            tk.started_s, tk.until_s = env.now, env.now + compute_s
        tk.job = self.executor.submit_train(wl, c, tk.round, plan)
        yield self._restored_wait(tk) if resumed else env.timer(compute_s, tk.tag)
        job, tk.job = tk.job, None
        self.compute_s[c] += compute_s
        self.energy.spend(c, "compute", compute_s)
        self.rec.latency("compute", compute_s)
        try:
            update = job.result()
        except JobFailed as e:  # the executor lost the job: a failed update, not a lost run
            self.rec.emit(env.now, tk.round, c, "job_failed", 0, str(e))
            return None
        self.rec.emit(env.now, tk.round, c, "train_end", 0, f"samples={plan.num_samples}")
        return (plan, update)

    def client_update(self, tk: Ticket, deadline_at: float | None = None,
                      resumed: bool = False) -> Generator[simpy.Event, None, Arrival | None]:
        """Download -> train -> encode -> upload -> ingest. Returns the accepted Arrival.

        A dropout (the client goes offline), a crash or the round's deadline interrupts it;
        whatever it was doing is cancelled and the interruption recorded. After a crash, with
        ``faults.on_crash: retry``, the client reboots and starts over (download included).
        ``resumed``: a checkpointed update goes on from ``tk.phase`` (its dropout and crash
        timers, its flow and its place in the links' counts are restored already).
        """
        c, env = tk.client, self.env
        proc = env.active_process
        uplink = self.network.link(c, UPLINK)
        if not resumed:
            self.schedule_dropout(tk, proc, deadline_at=deadline_at)
            self.per_client["updates_sent"][c] += 1
            uplink.contenders += 1
        elif tk.phase in ("queue", "service"):
            return (yield from self._ingest(tk, tk.upload, resumed=True))
        faults = self.scenario.faults
        try:
            while True:
                if not resumed:
                    self.faults.schedule_crash(tk, proc)
                try:
                    if tk.attempt and not (resumed and tk.phase != "restart"):
                        tk.phase = "restart"  # rebooting after a crash
                        if resumed:
                            yield self._restored_wait(tk)
                        else:
                            tk.until_s = env.now + faults.restart_s
                            yield env.timer(faults.restart_s, tk.tag)
                        resumed = False
                    sent = yield from self._attempt(tk, deadline_at, uplink,
                                                    tk.phase if resumed else None)
                    break
                except simpy.Interrupt as stop:
                    if tk.transfer is not None:
                        tk.transfer.cancel(c)
                    if tk.job is not None:
                        tk.job.cancel()
                    if tk.phase in (UPLINK, DOWNLINK, "train"):  # the cut phase's energy
                        self.energy.spend(c, "compute" if tk.phase == "train" else tk.phase,
                                          env.now - tk.started_s)
                    self.rec.emit(env.now, tk.round, c, str(stop.cause), 0, tk.phase)
                    if (stop.cause == "crash" and faults.on_crash == "retry"
                            and tk.attempt < faults.crash_retries):
                        tk.attempt, resumed = tk.attempt + 1, False
                        continue
                    return self._failed(c)
        finally:
            uplink.contenders -= 1
        if sent is None:
            return self._failed(c)
        tk.arrived = True
        self.selector.uploaded(c)
        return (yield from self._ingest(tk, sent))

    def _attempt(self, tk: Ticket, deadline_at: float | None, uplink: SharedLink | WiredLink,
                 resume: str | None = None) -> Generator[simpy.Event, None, Upload | None]:
        """One try at steps 2-5: download, train, encode, upload. None: it failed.
        ``resume``: the phase a restored update goes on from."""
        c, env, wl = tk.client, self.env, self.workload
        if resume is None or resume == "downlink":
            nbytes = wl.download_bytes(c) if resume is None else tk.nbytes
            if not (yield from self._transfer(tk, DOWNLINK, nbytes, resume is not None)):
                return None
            resume = None
        if resume is None or resume == "train":
            trained = yield from self._train(tk, resume is not None)
            if trained is None:
                return None
            plan, update = trained
            tk.phase, tk.num_samples = "encode", plan.num_samples
            time_left = None if deadline_at is None else deadline_at - env.now
            rate_bps = uplink.estimate_rate_bps(c, self.codec_knowledge, tk.round)
            tk.upload = wl.encode(c, tk.round, update, rate_bps, time_left)
            up = tk.upload
            self.rec.emit(env.now, tk.round, c, "encode", up.nbytes,
                          f"{up.codec} raw={up.raw_bytes} err={up.rel_error:.4g}")
            resume = None
        if not (yield from self._transfer(tk, UPLINK, tk.upload.nbytes, resume is not None)):
            return None
        return tk.upload

    def _restored_wait(self, tk: Ticket) -> simpy.Event:
        """The wait a restored update was in: the timer the restore made (in the clock's
        order), or one ending when it would have."""
        wake, tk.wake = tk.wake, None
        return wake if wake is not None else self.env.timer_at(tk.until_s, tk.tag)

    def _ingest(self, tk: Ticket, upload: Upload, resumed: bool = False
                ) -> Generator[simpy.Event, None, Arrival | None]:
        """Step 6-7: wait for a server worker, decode and project; or be dropped. A restored
        update waits again in its place, or is served again for what its service had left
        (its decode and projection redone: pure functions of the payload)."""
        c, env = tk.client, self.env
        result = {}

        again = resumed and tk.phase == "service"  # its work began before the checkpoint

        def work() -> float:
            result["ing"] = ing = self.workload.ingest(c, upload)
            service_s = ing.flops / self.scenario.server.flops_per_s
            if not again:
                self.rec.emit(env.now, tk.round, c, "ingest_start", upload.nbytes, ing.detail)
                tk.phase, tk.until_s = "service", env.now + service_s
                tk.wait_s = env.now - tk.queued_s
            return service_s

        def lost() -> None:
            how = "requeued" if self.ingress.requeue else "lost"
            self.rec.emit(env.now, tk.round, c, "server_failure", upload.nbytes, how)

        if not resumed:
            tk.phase, tk.queued_s, tk.until_s, tk.upload = "queue", env.now, None, upload
            tk.queued_seq, self.queue_seq = self.queue_seq, self.queue_seq + 1
        elif tk.phase == "queue":
            tk.until_s = None
        try:
            wait = yield from self.ingress.serve(
                work, lost, tk.tag, resumed=tk.phase if resumed else None,
                arrived_s=tk.queued_s, until_s=tk.until_s, wait_s=tk.wait_s,
                request=tk.request, wake=tk.wake)
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
        self.rec.bytes_up_accepted += upload.nbytes
        self.rec.bytes_up_raw += upload.raw_bytes  # the same updates: a fair ratio
        self.per_client["updates_accepted"][c] += 1
        self.selector.arrived(c, tk.num_samples, upload.loss_rms)
        return Arrival(client=c, round=tk.round, num_samples=tk.num_samples,
                       result=ing.result, carried=ing.carried, upload=upload)

    def _failed(self, client: int) -> None:
        self.per_client["failures"][client] += 1
        return None

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

    def client_rows(self) -> list[dict[str, object]]:
        f = self.fleet
        return [{"client": i, "group": int(f.group[i]), "profile": f.profile[i],
                 "model": f.model[i], "cell": int(f.cell[i]),
                 "distance_m": round(float(f.distance_m[i]), 3),
                 "flops_per_s": float(f.flops_per_s[i]),
                 **{k: int(v[i]) for k, v in self.per_client.items()},
                 "compute_s": float(self.compute_s[i]),
                 **self.energy.client_columns(i, self.env.now)} for i in range(f.size)]

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

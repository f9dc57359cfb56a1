"""The SimPy world: clients, cells and the server, and the round policies that drive them.

SimPy is the only clock (DESIGN.md): compute time is FLOPs / device FLOP/s, transfer time is
bytes over a rate that changes as flows come and go, server time is FLOPs / server FLOP/s. The
workload (``fedsim.workload``) does the ML and returns data; the life of each update
(``fedsim.updates``) turns it into time. A round policy (registry ``ROUND_POLICIES``: ``sync``,
``deadline``, ``async``) is a SimPy process: it selects clients, begins their updates and closes
rounds by aggregating. ``run(scenario)`` returns a ``RunResult``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from pathlib import Path

import numpy as np
import simpy

from fedsim import checkpoint
from fedsim.availability import Availability
from fedsim.channels import DOWNLINK, UPLINK, Network
from fedsim.clock import Clock
from fedsim.devices import PROFILES, Fleet, build_fleet
from fedsim.energy import Energy
from fedsim.errors import FedsimError
from fedsim.estimation import ChannelKnowledge
from fedsim.executors import Executor, make_executor
from fedsim.faults import Faults
from fedsim.ingress import Ingress
from fedsim.metrics import PHASES, Recorder, Rows, RunResult, percentiles
from fedsim.plugins import ROUND_POLICIES
from fedsim.rng import key, stream
from fedsim.scenario import Scenario
from fedsim.selection import make_selector
from fedsim.updates import Ticket, Updates
from fedsim.workload import Arrival, Deferred, Workload, make_workload

log = logging.getLogger("fedsim")  # what the run is doing, for a progress display

__all__ = ["Simulation", "Ticket", "prepare", "run"]


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
        # the executor first: a process pool's server process imports torch while this one
        # builds the workload
        self.executor = executor or make_executor(scenario.executor)
        if executor is None and scenario.workload.trains_models:
            self.executor.warm()
        self.workload = workload or make_workload(scenario, self.fleet)
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
        self.updates = Updates(self)  # the life of each update (fedsim.updates)

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

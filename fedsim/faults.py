"""Faults of the simulated world (``scenario.faults``), each a keyed Poisson process.

- a client crashes while it works on an update: :meth:`Faults.schedule_crash` stops the
  update at an Exp(client_crash_per_h) time keyed by (client, round, try);
- a cell's base station goes down (``link:<cell>``): both of its links stall, then resume;
- a server worker fails (``server:<worker>``): a preemptive request takes a worker ahead of
  every update, preempting the one it serves, and holds it for ``server_repair_s``.

Every draw is counter-based, keyed by (unit, n), so a fault's timeline is fixed by the seed.
Each fault process keeps its state (the next draw's index, whether it is down, until when it
waits) in :attr:`Faults.processes`, so that a checkpoint restarts it where it was.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import simpy

from fedsim.channels import DOWNLINK, UPLINK
from fedsim.rng import hashed_uniform_one, key

if TYPE_CHECKING:
    from fedsim.engine import Simulation
    from fedsim.updates import Ticket

FAULT_TIMER = ("fault",)  # restored by restarting its process from its state, not by the clock


class Faults:
    """The fault processes of one simulation and the crash timers of its updates."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.cfg = sim.scenario.faults
        self.seed = sim.scenario.seed
        self.crash_key = key(self.seed, "faults.crash")
        self.processes: dict[str, dict[str, Any]] = {}  # name -> its state

    # --- client crashes ----------------------------------------------------------------------

    def schedule_crash(self, tk: Ticket, at: float | None = None,
                       attempt: int | None = None) -> None:
        """Stop this try at an Exp(client_crash_per_h) time, unless it is over by then.
        The draw is keyed by (client, round, try): the same whatever else happens. ``at``
        and ``attempt``: a timer restored from a checkpoint."""
        rate_per_s = self.cfg.client_crash_per_h / 3600.0
        if rate_per_s <= 0:
            return
        attempt = tk.attempt if attempt is None else attempt
        tag = ("crash", tk.serial, attempt)

        def crash(_event: simpy.Event) -> None:
            if tk.live and tk.attempt == attempt:
                self.sim.updates.stop(tk, "crash")

        if at is None:
            u = hashed_uniform_one(self.crash_key, tk.client, tk.round * 1024 + attempt)
            self.sim.env.timer(-math.log(u) / rate_per_s, tag, crash)
        else:
            self.sim.env.timer_at(at, tag, crash)

    # --- cell outages and server failures --------------------------------------------------

    def start(self) -> None:
        if self.cfg.link_outage_per_h > 0:
            for cell in range(len(self.sim.scenario.network.cells)):
                self._process(f"link:{cell}")
        if self.cfg.server_failure_per_h > 0:
            for worker in range(self.sim.ingress.workers):
                self._process(f"server:{worker}")

    def _process(self, name: str, state: dict[str, Any] | None = None) -> simpy.Process:
        self.processes[name] = state or {"n": 0, "down": False, "until": None}
        kind, unit = name.split(":")
        body = self._link_outages if kind == "link" else self._worker_failures
        return self.sim.env.process(body(int(unit), self.processes[name]))

    def _exp_s(self, name: str, unit: int, n: int, mean_s: float) -> float:
        """An Exp(mean) draw of fault process ``name`` for ``unit``, keyed by (unit, n)."""
        return -math.log(hashed_uniform_one(key(self.seed, f"faults.{name}"), unit, n)) * mean_s

    def _until(self, at: float) -> simpy.Timeout:
        # exactly at ``at``: a restarted process must wait for the very same instant
        return self.sim.env.timer_at(at, FAULT_TIMER)

    def _link_outages(self, cell: int, st: dict[str, Any]) -> Generator[simpy.Event, None, None]:
        """Up for Exp(1/rate), down for Exp(link_outage_s), again and again."""
        f, env, rec = self.cfg, self.sim.env, self.sim.rec
        links = [self.sim.network.cells[d][cell] for d in (UPLINK, DOWNLINK)]
        while True:
            if st["until"] is None:
                st["until"] = env.now + self._exp_s("link_outage", cell, st["n"],
                                                    3600.0 / f.link_outage_per_h)
            yield self._until(st["until"])
            if st["down"]:
                for link in links:
                    link.set_outage(False)
                st["down"], st["n"], st["until"] = False, st["n"] + 1, None
                rec.emit(env.now, -1, -1, "link_up", 0, f"cell={cell}")
            else:
                down_s = self._exp_s("link_outage_s", cell, st["n"], f.link_outage_s)
                rec.emit(env.now, -1, -1, "link_down", 0, f"cell={cell} for={down_s:.6g}")
                for link in links:
                    link.set_outage(True)
                st["down"], st["until"] = True, env.now + down_s

    def _worker_failures(self, worker: int, st: dict[str, Any]
                         ) -> Generator[simpy.Event, None, None]:
        """Up for Exp(1/rate), then the worker fails (preempting the update it serves) and is
        repaired after server_repair_s, again and again."""
        f, env, rec, ingress = self.cfg, self.sim.env, self.sim.rec, self.sim.ingress
        while True:
            restored_down = st["down"]
            if not restored_down:
                if st["until"] is None:
                    st["until"] = env.now + self._exp_s("server_failure", worker, st["n"],
                                                        3600.0 / f.server_failure_per_h)
                yield self._until(st["until"])
            granted = ingress.fail_worker()  # ahead of every update, preempting one
            yield granted
            if restored_down:  # back under repair: the grant is not an original event
                self.sim.restore_events += 1
            else:
                rec.emit(env.now, -1, -1, "server_down", 0, f"worker={worker}")
                st["down"], st["until"] = True, env.now + f.server_repair_s
            yield self._until(st["until"])
            ingress.release(granted.hold)
            st["down"], st["n"], st["until"] = False, st["n"] + 1, None
            rec.emit(env.now, -1, -1, "server_up", 0, f"worker={worker}")

    # --- snapshot protocol (fedsim.checkpoint) -----------------------------------------------

    def state(self) -> dict[str, dict[str, Any]]:
        return {name: dict(st) for name, st in self.processes.items()}

    def restore(self, state: dict[str, dict[str, Any]]) -> int:
        """Restart every fault process where it was; returns how many processes started (each
        adds an Initialize event the original run did not have)."""
        for name, st in state.items():
            self._process(name, dict(st))
        return len(state)

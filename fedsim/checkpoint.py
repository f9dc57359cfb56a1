"""Checkpoints at round boundaries, and resuming from the last one.

A checkpoint is a directory ``<run dir>/checkpoints/round-NNNNN/`` holding ``state.json`` (the
simulated time, every RNG state, the availability chains, the links, the server queue, the
recorder's events and metrics so far, the events still pending on the SimPy clock) and
``tensors.safetensors`` (the workload's tensors: family adapters, error-feedback residuals,
the server model's merged weights, the clients' last updates). Never pickle. Each is written
into a temporary directory and renamed into place, so a ``kill -9`` at any moment leaves the
previous checkpoints intact; ``latest`` is the highest complete round.

``fedsim run FILE --resume DIR`` rebuilds the world from the scenario (models, data, channel
draws and projectors are pure functions of the seed), overwrites its state from DIR's latest
checkpoint and plays the remaining rounds, ending with the same ``events.csv`` and
``summary.json`` (wall time aside) as an uninterrupted run. For ``sync`` and ``deadline``
rounds every client's update has ended at a round boundary. ``async`` rounds checkpoint with
updates in flight: the round policy's state holds each one's ticket (where it is), its upload,
and the buffered arrivals; the links hold their flows; the clock's ledger their timers, which
the restore remakes in their original order, at their exact instants.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsim.atomic import atomic_dir
from fedsim.errors import FedsimError

if TYPE_CHECKING:
    from fedsim.engine import Simulation

CHECKPOINTS = "checkpoints"
STATE = "state.json"
TENSORS = "tensors.safetensors"
FORMAT = 1
_NAME = re.compile(r"^round-(\d{5,})$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def save(run_dir: str | Path, round_: int, state: dict[str, Any], tensors: dict[str, Any]
         ) -> Path:
    """Write the checkpoint of the boundary after ``round_`` atomically; return its path."""
    from safetensors.torch import save_file

    final = checkpoint_dir(run_dir) / f"round-{round_:05d}"
    # A rerun of the same boundary replaces it whole; fsync: a checkpoint must survive a crash.
    with atomic_dir(final, replace=True, fsync=True) as tmp:
        doc = {"format": FORMAT, "round": round_, **state}
        (tmp / STATE).write_text(json.dumps(doc, allow_nan=True), encoding="utf-8")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
    return final


def latest(run_dir: str | Path) -> Path | None:
    """The complete checkpoint of the highest round in ``run_dir``, or None."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and (p / STATE).is_file() and (p / TENSORS).is_file()]
    return max(found)[1] if found else None


def load(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, tensors) of one checkpoint directory."""
    from safetensors.torch import load_file

    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        tensors = load_file(str(path / TENSORS))
    except (OSError, ValueError) as e:
        raise FedsimError(f"--resume: cannot read checkpoint {path}: {e}") from None
    if state.get("format") != FORMAT:
        raise FedsimError(f"--resume: {path}: checkpoint format {state.get('format')!r}, "
                          f"this fedsim reads {FORMAT}")
    return state, tensors


# --- the snapshot protocol: each stateful component's state(), composed -------------------------


def snapshot(sim: Simulation, round_: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Everything the rest of ``sim`` depends on, after round ``round_``: (JSON, tensors).

    Each stateful component gives its own ``state()`` (availability, network links, ingress,
    recorder, fault processes, workload); the clock gives its pending timers (``Clock.pending``).
    """
    wl_state, tensors = sim.workload.state()
    policy_state, policy_tensors = sim.policy.state()
    tensors.update({f"policy/{k}": v for k, v in policy_tensors.items()})
    state = {
        "scenario": sim.scenario.to_yaml(),
        "now": sim.env.now,
        "sim_events": sim.env.events_processed - sim.restore_events,
        "next_round": round_ + 1,
        "select_rng": sim.select_rng.bit_generator.state,
        "selector": sim.selector.state(),
        "energy": sim.energy.state(),
        "availability": sim.availability.state(),
        "network": sim.network.state(),
        "ingress": sim.ingress.state(),
        "recorder": sim.rec.state(),
        "per_client": {k: array(v) for k, v in sim.per_client.items()},
        "compute_s": array(sim.compute_s),
        "server_aggregate_s": sim.server_aggregate_s,
        "queue_seq": sim.queue_seq,
        "updates_begun": sim.updates_begun,
        "quality_by_round": sim.quality_by_round,
        "faults": sim.faults.state(),
        "pending": [[t, *tag] for t, tag in sim.env.pending()],
        "workload": wl_state,
        "policy": policy_state,  # async: the updates in flight, the buffered arrivals
    }
    return state, tensors


def restore(sim: Simulation, state: dict[str, Any], tensors: dict[str, Any]) -> None:
    """Put the freshly built ``sim`` (its clock started at ``state["now"]``) in the
    checkpointed state, before it runs."""
    if state["scenario"] != sim.scenario.to_yaml():
        raise FedsimError("--resume: the checkpoint was taken with another scenario "
                          "(compare its state.json 'scenario' with this one's --set)")
    sim.select_rng.bit_generator.state = state["select_rng"]
    sim.selector.restore(state.get("selector", {}))  # absent in checkpoints before selectors
    sim.energy.restore(state.get("energy", {}))
    sim.availability.restore(state["availability"])
    sim.network.restore(state["network"])
    sim.ingress.restore(state["ingress"])
    sim.rec.restore(state["recorder"])
    for k, doc in state["per_client"].items():
        sim.per_client[k] = from_array(doc)
    sim.compute_s = from_array(state["compute_s"])
    sim.server_aggregate_s = state["server_aggregate_s"]
    sim.queue_seq = state.get("queue_seq", 0)
    sim.updates_begun = state.get("updates_begun", 0)
    sim.quality_by_round = list(state["quality_by_round"])
    sim.workload.restore(state["workload"], tensors)
    sim.first_round = state["next_round"]
    head = "policy/"
    added = sim.policy.restore(state["policy"], {k[len(head):]: v for k, v in tensors.items()
                                                 if k.startswith(head)})
    running = sim.policy.in_flight_tickets()
    # The clock: the pending timers again, in their order; then the fault processes restart
    # (each makes its own timer). A restored update's own wait, dropout and crash timers are
    # bound to its ticket again; those of updates that ended fire into nothing, as they would
    # have. Every process started here adds an Initialize event the original run did not
    # have: the round policy's and each fault process's (``added``: the policy's others).
    for t, kind, *rest in state["pending"]:
        live = running.get(rest[0]) if kind in ("update", "dropout", "crash") else None
        if kind in ("wake", "flush"):
            sim.network.restore_timer((kind, *rest))
        elif (kind == "update" and live is not None and live.attempt == rest[1]
              and sim.updates.rewait(live, t, (kind, *rest))):
            pass  # its own wait, made again in the clock's order
        elif kind == "dropout" and live is not None:
            sim.updates.schedule_dropout(live, at=t)
        elif kind == "crash" and live is not None:
            sim.faults.schedule_crash(live, at=t, attempt=rest[1])
        elif kind != "fault":
            sim.env.timer_at(t)  # fires into nothing, as it would have
    sim.restore_events = 1 + added + sim.faults.restore(state["faults"])
    sim.env.events_processed = state["sim_events"]


# --- JSON form of numpy arrays (exact: floats as repr, ints as ints) ----------------------------


def array(a: np.ndarray) -> dict[str, Any]:
    """An array as JSON: dtype, shape and the values (inf kept: json writes Infinity)."""
    return {"dtype": str(a.dtype), "shape": list(a.shape), "values": a.ravel().tolist()}


def from_array(doc: dict[str, Any]) -> np.ndarray:
    return np.array(doc["values"], dtype=doc["dtype"]).reshape(doc["shape"])

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
checkpoint and plays the remaining rounds. For ``sync`` and ``deadline`` rounds every client's
update has ended at a round boundary, so the resumed run ends with the same ``events.csv`` and
``summary.json`` (wall time aside) as an uninterrupted one. ``async`` runs are not
checkpointed: their updates overlap the aggregations, so no instant has nothing in flight.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.atomic import atomic_dir
from fedsim.errors import FedsimError

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


# --- JSON form of numpy arrays (exact: floats as repr, ints as ints) ----------------------------


def array(a: np.ndarray) -> dict[str, Any]:
    """An array as JSON: dtype, shape and the values (inf kept: json writes Infinity)."""
    return {"dtype": str(a.dtype), "shape": list(a.shape), "values": a.ravel().tolist()}


def from_array(doc: dict[str, Any]) -> np.ndarray:
    return np.array(doc["values"], dtype=doc["dtype"]).reshape(doc["shape"])

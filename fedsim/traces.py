"""Trace files: the CSV rows of a recorded channel (``network.channel.trace_path``) or of
recorded positions (``network.mobility.trace_path``), read once with their key path in every
error."""

from __future__ import annotations

import csv
from pathlib import Path

from fedsim.errors import FedsimError


def read_rows(path: Path, key: str, need: set[str], columns: str) -> list[dict[str, str]]:
    """The rows of the CSV at ``path``; a FedsimError naming ``key`` when it cannot be read or
    its header lacks a column of ``need`` (``columns``: how the message spells them)."""
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise FedsimError(f"{key}: cannot read {path}: {e}") from None
    if not rows or not need <= set(rows[0]):
        raise FedsimError(f"{key}: {path} needs {columns}")
    return rows

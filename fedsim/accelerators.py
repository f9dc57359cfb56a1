"""Where the ML work runs: ``executor.device`` resolved against what torch sees.

``auto`` is CUDA device 0 when torch sees one, else the CPU; ``cpu``; ``cuda`` (device 0) or
``cuda:N``. A CUDA device torch cannot see is a user error (exit 2) that names the key and what
torch reports, never a silent fall-back to the CPU.

Where a device changes numbers and where it does not: the simulated timeline comes from the
modelled FLOPs (``fedsim.training``), not from how fast the device is, so the same scenario has
the same events on any device; the models' outputs are float32 sums whose order the device's
kernels choose, so losses and metrics agree with the CPU's to float precision, not bit for bit.
Adapters, deltas and everything the server aggregates live on the CPU; only the frozen base
models and the tensors of a forward or backward pass live on the device.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from fedsim.errors import FedsimError

_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve(spec: str, key: str = "executor.device") -> torch.device:
    """``spec`` as a torch device, checked against the devices torch sees."""
    if not isinstance(spec, str) or not _SPEC.match(spec):
        raise FedsimError(f"{key}: expected auto, cpu, cuda or cuda:N, got {spec!r}")
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    if spec == "auto":
        return torch.device("cuda:0" if count else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    index = int(spec.split(":")[1]) if ":" in spec else 0
    if index >= count:
        seen = (f"{count} CUDA device(s) (cuda:0..cuda:{count - 1})" if count else
                f"no CUDA device (torch {torch.__version__}, torch.cuda.is_available() = "
                f"{available}, built with CUDA {torch.version.cuda or 'none'})")
        raise FedsimError(f"{key}: {spec} requested, but torch sees {seen}; use auto or cpu")
    return torch.device(f"cuda:{index}")


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A model's keyword arguments with every tensor on ``device`` (a no-op on its own)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def device_of(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s parameters are."""
    return next(model.parameters()).device

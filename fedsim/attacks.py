"""Malicious clients (registry ``ATTACKS``): what a client of a group with ``attack`` sends in
place of its honest update, computed from that update after local training.

- ``scale``: the honest update times ``factor`` (a boosted update, as in model replacement);
- ``sign-flip``: times ``-factor`` (gradient ascent on the task);
- ``random``: Gaussian noise with ``factor`` times the honest update's L2 norm (per tensor).

Randomness comes from the job's generator, so an attack is as reproducible as the training.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fedsim.plugins import ATTACKS

Delta = dict[str, torch.Tensor]
Attack = Callable[[Delta, float, np.random.Generator], Delta]



@ATTACKS.register("scale")
def scale(delta: Delta, factor: float, rng: np.random.Generator) -> Delta:
    return {k: v * factor for k, v in delta.items()}


@ATTACKS.register("sign-flip")
def sign_flip(delta: Delta, factor: float, rng: np.random.Generator) -> Delta:
    return {k: v * -factor for k, v in delta.items()}


@ATTACKS.register("random")
def random_noise(delta: Delta, factor: float, rng: np.random.Generator) -> Delta:
    out = {}
    for k, v in delta.items():
        noise = torch.from_numpy(rng.standard_normal(v.shape)).to(v.dtype)
        norm = float(noise.norm())
        out[k] = noise * (factor * float(v.norm()) / norm) if norm > 0 else noise
    return out


def attack(kind: str, delta: Delta, factor: float, rng: np.random.Generator) -> Delta:
    return ATTACKS.get(kind)(delta, factor, rng)

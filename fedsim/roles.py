"""Module roles: which modules of each architecture play attention q/k/v/o and MLP
up/gate/down, so that LoRA targets the same roles on every client model and a projector pairs
the matching modules of a small and a large model (``fedsim.projection``).

Torch-free: a role map is regexes over module names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from fedsim.errors import FedsimError

ROLES = ("q", "k", "v", "o", "up", "gate", "down")

# Architecture -> role -> regex matched against the END of a module name, at a dot boundary
# (``role_of``). BERT needs the layer index in ``down``: its ``attention.output.dense`` (role o)
# also ends in ``output.dense``.
_DECODER_ROLES = {"q": r"q_proj", "k": r"k_proj", "v": r"v_proj", "o": r"o_proj",
                  "up": r"up_proj", "gate": r"gate_proj", "down": r"down_proj"}
ROLE_MODULES: dict[str, dict[str, str]] = {
    "bert": {"q": r"attention\.self\.query", "k": r"attention\.self\.key",
             "v": r"attention\.self\.value", "o": r"attention\.output\.dense",
             "up": r"intermediate\.dense", "down": r"layer\.\d+\.output\.dense"},
    "mpnet": {"q": r"attn\.q", "k": r"attn\.k", "v": r"attn\.v", "o": r"attn\.o",
              "up": r"intermediate\.dense", "down": r"layer\.\d+\.output\.dense"},
    "llama": dict(_DECODER_ROLES),
    "gemma3": dict(_DECODER_ROLES),
}


def _role_patterns(architecture: str) -> dict[str, str]:
    if architecture not in ROLE_MODULES:
        raise FedsimError(f"no module role map for architecture {architecture!r}; "
                          f"known: {', '.join(ROLE_MODULES)}")
    return ROLE_MODULES[architecture]


def target_modules(architecture: str, roles: Sequence[str]) -> str:
    """peft's ``LoraConfig.target_modules`` for ``roles``: one regex that peft full-matches."""
    patterns = _role_patterns(architecture)
    unknown = [r for r in roles if r not in patterns]
    if unknown or not roles:
        raise FedsimError(f"target_roles for {architecture} must be a non-empty subset of "
                          f"{', '.join(patterns)}, got {list(roles)}")
    return r".*\.(?:" + "|".join(patterns[r] for r in roles) + ")"


def role_of(architecture: str, module_name: str) -> str | None:
    """The role of module ``module_name`` (a name from ``named_modules`` or an adapter key
    without its ``.lora_A.weight`` tail), or None if it has none."""
    for role, pattern in _role_patterns(architecture).items():
        if re.fullmatch(rf"(?:.*\.)?{pattern}", module_name):
            return role
    return None

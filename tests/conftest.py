import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from fedsim.scenario import validate

ROOT = Path(__file__).resolve().parent.parent


def make_scenario(**changes):
    """A small valid scenario document with ``changes`` merged in (dotted keys allowed)."""
    doc = {
        "name": "t",
        "seed": 0,
        "rounds": 1,
        "workload": {"name": "synthetic"},
        "clients": [{"profile": "laptop", "count": 1,
                     "overrides": {"mean_off_s": 0.0}}],
        "network": {"channel": {"name": "static"}, "cells": [{}]},
    }
    for key, value in changes.items():
        node = doc
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return validate(doc)


@pytest.fixture
def scenario_factory():
    return make_scenario

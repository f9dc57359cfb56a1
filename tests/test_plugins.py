"""The plug-in families: every declared entry has an implementation and every implementation
declared options; every config is frozen, rejects unknown keys and round-trips through the
scenario's union; the scenario's plug-in sections are exactly these families."""

import pytest
from pydantic import ValidationError

from fedsim import plugins
from fedsim.plugins import PluginConfig
from fedsim.scenario import Scenario

FAMILIES = {
    "channel": plugins.CHANNELS, "codec": plugins.CODECS, "aggregator": plugins.AGGREGATORS,
    "projector": plugins.PROJECTORS, "transfer": plugins.TRANSFERS,
    "round policy": plugins.ROUND_POLICIES, "executor": plugins.EXECUTORS,
    "attack": plugins.ATTACKS, "partitioner": plugins.PARTITIONERS,
    "workload": plugins.WORKLOADS, "dataset": plugins.DATASETS, "model": plugins.MODELS,
    "task": plugins.TASKS,
}
WITH_OPTIONS = [(f, n) for f, reg in FAMILIES.items() for n in reg.configs() and reg.names()]


@pytest.mark.parametrize("family", FAMILIES)
def test_declared_entries_and_implementations_agree(family):
    reg = FAMILIES[family]
    reg.get(reg.names()[0])  # imports the family's home module
    assert sorted(reg._entries) == reg.names(), f"{family}: declared vs implemented"
    assert reg.family == family


@pytest.mark.parametrize(("family", "name"), WITH_OPTIONS)
def test_every_config_defaults_validates_and_round_trips(family, name):
    reg = FAMILIES[family]
    cls = reg.config(name)
    assert issubclass(cls, PluginConfig) and cls.registry is reg
    required = [k for k, f in cls.model_fields.items() if f.is_required()]
    if required:  # deadline_s, trace_path: the entry's own rule
        with pytest.raises(ValidationError):
            reg.parse({reg.key: name})
        return
    cfg = reg.parse({reg.key: name})
    assert type(cfg) is cls and getattr(cfg, reg.key) == name
    assert reg.parse(cfg.model_dump(mode="json")) == cfg
    assert reg.key not in cfg.options()
    with pytest.raises(ValidationError):  # frozen
        setattr(cfg, reg.key, "x")
    with pytest.raises(ValidationError, match="Extra inputs"):
        reg.parse({reg.key: name, "no_such_option": 1})


@pytest.mark.parametrize(("family", "name"), WITH_OPTIONS)
def test_every_entry_is_built_from_its_config(family, name):
    """The options a config declares are exactly what its implementation is built with."""
    reg = FAMILIES[family]
    impl = reg.get(name)
    assert impl.name == name if isinstance(impl, type) else callable(impl)


def test_the_scenario_sections_are_the_families():
    sections = {"network.channel": plugins.CHANNELS, "compression": plugins.CODECS,
                "aggregation": plugins.AGGREGATORS, "transfer": plugins.TRANSFERS,
                "round_policy": plugins.ROUND_POLICIES, "executor": plugins.EXECUTORS,
                "workload": plugins.WORKLOADS}
    sc = Scenario.model_validate({"name": "x", "rounds": 1,
                                  "clients": [{"profile": "mobile", "count": 1}]})
    for path, reg in sections.items():
        value = sc
        for part in path.split("."):
            value = getattr(value, part)
        assert type(value).registry is reg, path
    assert type(sc.task.partition).registry is plugins.PARTITIONERS
    assert type(sc.transfer.projector).registry is plugins.PROJECTORS


def test_registry_rejects_bad_declarations():
    from typing import Literal

    reg = plugins.Registry("thing")
    with pytest.raises(ValueError, match="lowercase"):
        reg.options("Bad")
    with pytest.raises(ValueError, match="must default to 'b'"):
        @reg.options("b")
        class B(plugins.Config):
            name: Literal["a"] = "a"
    reg.declare("x")
    with pytest.raises(ValueError, match="already registered"):
        reg.declare("x")


def test_validating_a_scenario_imports_neither_torch_nor_transformers():
    """The configs are light: `fedsim validate` and network-only runs stay fast (~0.5 s)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = ("import sys\nfrom fedsim.scenario import load\n"
            f"load({str(root / 'scenarios' / 'quickstart.yaml')!r}, "
            "['compression.codec=adaptive', 'aggregation.name=task-arithmetic'])\n"
            "from fedsim.engine import Simulation\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr

"""Scenario loading, overrides and validation messages."""

import pytest

from fedsim.errors import FedsimError
from fedsim.scenario import ScenarioError, apply_override, load, validate

GOOD = """\
name: demo
rounds: 2
workload: {name: synthetic}
clients:
  - {profile: mobile, count: 3}
  - {profile: cloud, count: 1}
"""


def _write(tmp_path, text, name="s.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_load_with_defaults(tmp_path):
    sc = load(_write(tmp_path, GOOD))
    assert sc.num_clients == 4
    assert sc.network.channel.name == "static"
    assert sc.round_policy.name == "sync"
    # the resolved YAML round-trips
    again = load(_write(tmp_path, sc.to_yaml(), "again.yaml"))
    assert again == sc


def test_overrides_are_typed_by_the_schema(tmp_path):
    sc = load(_write(tmp_path, GOOD), ["clients.0.count=50", "network.channel.fading=false",
                                       "network.cells.0.uplink_bandwidth_hz=5e6",
                                       "round_policy.deadline_s=12.5", "rounds=7"])
    assert sc.clients[0].count == 50 and isinstance(sc.clients[0].count, int)
    assert sc.network.channel.fading is False
    assert sc.network.cells[0].uplink_bandwidth_hz == 5e6
    assert sc.round_policy.deadline_s == 12.5
    assert sc.rounds == 7


@pytest.mark.parametrize(("doc_changes", "expected"), [
    ({"bogus": 1}, "bogus: unknown key"),
    ({"rounds": "many"}, "rounds: Input should be a valid integer"),
    ({"clients": []}, "clients: List should have at least 1 item"),
    ({"clients": [{"profile": "mobile", "count": 0}]}, "clients.0.count: Input should be greater than or equal to 1"),
    ({"clients": [{"profile": "toaster", "count": 1}]}, "clients.0.profile: unknown device profile 'toaster'"),
    ({"network": {"cells": [{"uplink_bandwidth_hz": -3}]}}, "network.cells.0.uplink_bandwidth_hz: Input should be greater than 0"),
    ({"network": {"channel": {"name": "laser"}}}, "network.channel.name: unknown channel 'laser'"),
    ({"round_policy": {"name": "deadline"}}, "round_policy: round policy 'deadline' needs deadline_s"),
    ({"clients": [{"profile": "mobile", "count": 1, "cells": [3]}]}, "clients.0.cells: cell 3 does not exist"),
    ({"clients": [{"profile": "mobile", "count": 1, "spread": {"colour": 1}}]}, "clients.0.spread: cannot spread"),
])
def test_errors_name_the_key(doc_changes, expected):
    doc = {"name": "x", "rounds": 1, "clients": [{"profile": "mobile", "count": 1}]}
    doc.update(doc_changes)
    with pytest.raises(ScenarioError) as e:
        validate(doc)
    assert any(err.startswith(expected) for err in e.value.errors), e.value.errors


def test_every_error_is_reported_at_once():
    with pytest.raises(ScenarioError) as e:
        validate({"name": "x", "rounds": 0, "clients": [{"profile": "mobile", "count": -1}],
                  "extra": 1})
    assert len(e.value.errors) == 3


@pytest.mark.parametrize(("override", "expected"), [
    ("clients.0.colour=red", "clients.0.colour: no such key"),
    ("nothing.here=1", "nothing: no such key"),
    ("rounds", "rounds: override must be key=value"),
    ("clients.x.count=1", "clients.x: list index expected"),
    ("clients.5.count=1", "clients.5: index 5 out of range"),
])
def test_bad_overrides(tmp_path, override, expected):
    with pytest.raises(FedsimError, match=expected.replace(".", r"\.")):
        load(_write(tmp_path, GOOD), [override])


def test_override_creates_missing_sections():
    doc = {"name": "x", "rounds": 1, "clients": [{"profile": "mobile", "count": 1}]}
    apply_override(doc, "network.channel.name=pathloss")
    assert validate(doc).network.channel.name == "pathloss"


@pytest.mark.parametrize(("text", "expected"), [
    ("name: [unclosed\n", "malformed YAML (line"),
    ("", "a scenario is a YAML mapping, got empty"),
    ("- 1\n- 2\n", "a scenario is a YAML mapping, got list"),
    ("!!python/object/apply:os.system ['echo hi']\n", "malformed YAML"),
])
def test_bad_files(tmp_path, text, expected):
    with pytest.raises(FedsimError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        load(_write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(FedsimError, match="no such file"):
        load(tmp_path / "nope.yaml")


def test_configs_are_frozen(tmp_path):
    sc = load(_write(tmp_path, GOOD))
    with pytest.raises(Exception, match="frozen"):
        sc.rounds = 3

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
                                       "network.channel.name=pathloss", "round_policy.name=deadline",
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
    ({"round_policy": {"name": "deadline"}}, "round_policy.deadline_s: Field required"),
    ({"round_policy": {"name": "sync", "deadline_s": 3}}, "round_policy.deadline_s: not an option of round policy 'sync'; round policies that take it: deadline"),
    ({"compression": {"codec": "zstd-magic"}}, "compression.codec: unknown codec 'zstd-magic'; known: adaptive, fp16"),
    ({"compression": {"codec": "qsgd", "rank": 4}}, "compression.rank: not an option of codec 'qsgd'; codecs that take it: lowrank"),
    ({"compression": {"codec": "qsgd", "bits": 3}}, "compression.bits: Input should be 2, 4 or 8"),
    ({"aggregation": {"name": "fedavgg"}}, "aggregation.name: unknown aggregator 'fedavgg'"),
    ({"aggregation": {"name": "fedavg", "eta": 2}}, "aggregation.eta: not an option of aggregator 'fedavg'; aggregators that take it: task-arithmetic"),
    ({"transfer": {"projector": "lsq"}}, "transfer.projector.name: unknown projector 'lsq'; known: lstsq, orthogonal, pad"),
    ({"transfer": {"projector": {"name": "pad", "ridge": 1}}}, "transfer.projector.ridge: not an option of projector 'pad'; projectors that take it: lstsq"),
    ({"aggregation": {"projector": "lsq"}}, "transfer.projector.name: unknown projector 'lsq'"),
    ({"task": {"dataset": "imdb"}}, "task.dataset: unknown dataset 'imdb'; known: bbc-news"),
    ({"task": {"dataset": "wordnet-mc"}}, "task.kind: dataset 'wordnet-mc' has no task 'classification'; its tasks: multiple-choice"),
    ({"task": {"partition": {"name": "shards"}}}, "task.partition.name: unknown partitioner 'shards'"),
    ({"task": {"partition": {"name": "iid", "alpha": 1}}}, "task.partition.alpha: not an option of partitioner 'iid'; partitioners that take it: dirichlet"),
    ({"clients": [{"profile": "mobile", "count": 1, "model": "minilm-l7"}]}, "clients.0.model: unknown model 'minilm-l7'; known: gemma3-270m"),
    ({"clients": [{"profile": "mobile", "count": 1, "model": "local:/nonexistent"}]}, "clients.0.model: /nonexistent is not a model directory"),
    ({"server": {"model": "mpnet"}}, "server.model: unknown model 'mpnet'"),
    ({"clients": [{"profile": "mobile", "count": 1, "attack": {"kind": "flip"}}]}, "clients.0.attack.kind: unknown attack 'flip'; known: random, scale, sign-flip"),
    ({"clients": [{"profile": "mobile", "count": 1, "attack": {"factor": 2}}]}, "clients.0.attack.kind: required: the attack (one of random, scale, sign-flip)"),
    ({"network": {"channel": {"name": "trace"}}}, "network.channel.trace_path: Field required"),
    ({"network": {"channel": {"name": "trace", "trace_path": "/nonexistent.csv"}}}, "network.channel.trace_path: trace file '/nonexistent.csv' not found"),
    ({"executor": {"name": "inline", "workers": 2}}, "executor.workers: not an option of executor 'inline'; executors that take it: process, ray"),
    ({"workload": {"name": "synthetic", "rank": 2}}, "workload.rank: not an option of workload 'synthetic'"),
    ({"round_policy": {"name": "async"}, "output": {"checkpoint_every": 1}, "faults": {"server_failure_per_h": 1}}, "output.checkpoint_every: async runs with server failures (faults.server_failure_per_h) cannot be checkpointed yet"),
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


def test_switching_a_plugin_drops_the_options_it_does_not_take(tmp_path):
    """A sweep over codecs or rules: the file's options for another entry do not follow."""
    path = _write(tmp_path, GOOD + "compression: {codec: lowrank, rank: 4}\n"
                  "aggregation: {name: task-arithmetic, eta: 0.5, max_update_norm: 9}\n")
    sc = load(path, ["compression.codec=qsgd", "aggregation.name=median"])
    assert sc.compression.codec == "qsgd" and sc.compression.bits == 8
    assert sc.aggregation.name == "median" and sc.aggregation.max_update_norm == 9
    # an option given beside the switch applies to the new entry, in either order
    sc = load(path, ["compression.bits=4", "compression.codec=qsgd"])
    assert sc.compression.bits == 4
    # and one the new entry does not take is an error, not silently dropped
    with pytest.raises(ScenarioError, match=r"compression\.rank: not an option of codec 'qsgd'"):
        load(path, ["compression.codec=qsgd", "compression.rank=2"])


def test_moved_keys_are_read_at_their_new_place(tmp_path):
    sc = load(_write(tmp_path, GOOD + "aggregation: {name: fedavg, projector: pad}\n"))
    assert sc.transfer.projector.name == "pad" and "projector" not in type(sc.aggregation).model_fields
    assert load(_write(tmp_path, GOOD), ["aggregation.projector=orthogonal"]
                ).transfer.projector.name == "orthogonal"
    assert "projector:\n    name: orthogonal" in load(
        _write(tmp_path, GOOD), ["transfer.projector=orthogonal"]).to_yaml()


def test_a_hub_model_is_accepted_with_a_note(tmp_path):
    sc = load(_write(tmp_path, GOOD.replace("workload: {name: synthetic}\n", "")),
              ["clients.0.model=org/some-model"])
    assert any("needs network" in n for n in sc.notes())
    assert load(_write(tmp_path, GOOD)).notes() == []

"""The references of ``fedsim compare`` on tiny models: centralized (the server model with LoRA on
the union of the clients' data, as many examples as the federation's updates), standalone
(clients alone, never aggregated) and homogeneous (every client on the server's model)."""

import math
from pathlib import Path

import pytest
from test_scenarios import scenario_test_overrides

from fedsim import references
from fedsim.engine import Simulation
from fedsim.errors import FedsimError
from fedsim.scenario import load
from fedsim.training import FamilyTrainer

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "scenarios/quickstart.yaml"


@pytest.fixture(scope="module")
def workload():
    sc = load(QUICKSTART, [*scenario_test_overrides(QUICKSTART), "rounds=2",
                           "executor.name=inline"])
    sim = Simulation(sc)
    yield sim.workload
    sim.workload.close()


def test_centralized_trains_the_server_model_on_the_examples_asked(workload, monkeypatch):
    seen = []
    train = FamilyTrainer.train

    def spy(self, adapter, examples, plan, seed):
        seen.append((self.spec.name, sum(len(b) for b in plan.batches), len(examples)))
        return train(self, adapter, examples, plan, seed)

    monkeypatch.setattr(FamilyTrainer, "train", spy)
    per_round = references.examples_by_round([3, 2], local_steps=2, batch_size=8)
    assert per_round == [48, 32]
    head = references.start_head(workload)
    assert head and not any(".lora_" in k for k in head)
    values = references.centralized(workload, head, per_round, "accuracy")
    assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)
    union = sum(len(p) for p in workload.parts)
    assert seen == [("tiny-mpnet", 48, union), ("tiny-mpnet", 32, union)]


def test_standalone_trains_each_client_alone_every_round(workload, monkeypatch):
    calls = []
    train = FamilyTrainer.train

    def spy(self, adapter, examples, plan, seed):
        calls.append(len(examples))
        return train(self, adapter, examples, plan, seed)

    monkeypatch.setattr(FamilyTrainer, "train", spy)
    values = references.standalone(workload, 2, "accuracy")
    assert len(values) == 2 and all(math.isfinite(v) for v in values)
    own = [len(workload.parts[c]) for f in workload.families.values()
           for c in f.clients[:references.STANDALONE_CLIENTS] if len(workload.parts[c])]
    assert calls == [n for n in own for _ in range(2)]  # its own examples, once a round


def test_homogeneous_puts_every_client_on_the_server_model():
    sc = load(QUICKSTART, scenario_test_overrides(QUICKSTART))
    homo = references.homogeneous_scenario(sc)
    assert {g.model for g in homo.clients} == {sc.server.model}
    assert homo.server.model is None and homo.aggregation.name == "fedavg"
    assert [g.count for g in homo.clients] == [g.count for g in sc.clients]
    # (it runs in test_compare_writes_the_references_beside_the_variants)


def test_unknown_reference_is_a_user_error():
    assert references.parse_references("centralized,start") == ["centralized", "start"]
    assert references.parse_references("none") == []
    with pytest.raises(FedsimError, match="--references: unknown oracle"):
        references.parse_references("oracle")


@pytest.mark.slow
def test_compare_writes_the_references_beside_the_variants(tmp_path):
    import csv

    from fedsim.cli import main

    args = [a for o in [*scenario_test_overrides(QUICKSTART), "rounds=2", "executor.name=inline"]
            for a in ("--set", o)]
    out = tmp_path / "cmp"
    assert main(["compare", str(QUICKSTART), *args, "--projectors", "lstsq", "--lars", "off",
                 "--quiet", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    rounds = {}
    for r in rows:
        rounds.setdefault(r["variant"], []).append(float(r["accuracy"]))
    assert list(rounds) == ["start", "lstsq", "standalone", "centralized", "homogeneous"]
    assert [len(v) for v in rounds.values()] == [1, 2, 2, 2, 2]
    assert all(0.0 <= x <= 1.0 for v in rounds.values() for x in v)
    table = (out / "comparison.md").read_text()
    assert "| centralized |" in table and "| homogeneous |" in table


def test_compare_refuses_an_unknown_reference(tmp_path, capsys):
    from fedsim.cli import main

    assert main(["compare", str(QUICKSTART), "--references", "oracle",
                 "--out", str(tmp_path / "cmp")]) == 2
    assert "--references: unknown oracle" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()

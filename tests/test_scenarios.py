"""Every scenario in ``scenarios/`` validates and runs, shrunk by its own ``# test:`` line.

Each scenario file carries one comment line ``# test: --set KEY=VALUE --set ...``: the overrides
that make it quick (tiny models, one round, few clients). The scenarios are globbed, so one
added later is picked up; one without a ``# test:`` line fails here, so none goes untested.
"""

import json
import math
import re
import shlex
from pathlib import Path

import pytest

from fedsim.cli import main
from fedsim.engine import run
from fedsim.metrics import write_run_dir
from fedsim.scenario import load

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted((ROOT / "scenarios").glob("*.yaml"))
TEST_LINE = re.compile(r"^#\s*test:(.*)$")
QUALITY_REL = 1e-5  # relative tolerance of recorded model metrics (see assert_same_summary)
GOLDEN = ROOT / "tests" / "golden"  # summaries recorded before a refactoring (wall time aside)


def assert_same_summary(summary: dict, golden_path: Path, rel: float = 1e-9) -> None:
    """``summary`` equals the recorded one: every key, every count, floats within ``rel``."""
    golden = json.loads(golden_path.read_text(encoding="utf-8"))
    mine = json.loads(json.dumps({k: v for k, v in summary.items() if k != "wall_time_s"}))

    def same(a, b, where):
        if isinstance(b, dict):
            assert isinstance(a, dict) and sorted(a) == sorted(b), f"{where}: keys differ"
            for k in b:
                same(a[k], b[k], f"{where}.{k}")
        elif isinstance(b, list):
            assert isinstance(a, list) and len(a) == len(b), f"{where}: lengths differ"
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                same(x, y, f"{where}.{i}")
        elif isinstance(b, float) and isinstance(a, float):
            # Model outputs are float32 sums whose order the CPU's kernels choose (an AMD and an
            # Intel machine differ by ~1e-8): quality within float32's precision, the engine's
            # own numbers (times, bytes, rates) within ``rel``.
            tol = max(rel, QUALITY_REL) if ".quality." in where + "." else rel
            assert math.isclose(a, b, rel_tol=tol, abs_tol=1e-12), f"{where}: {a} != {b}"
        else:
            assert a == b, f"{where}: {a!r} != {b!r}"

    same(mine, golden, golden_path.stem)


def scenario_test_overrides(path: Path) -> list[str] | None:
    """The ``--set`` values of the scenario's ``# test:`` line; None when it has none."""
    found = [m.group(1) for line in path.read_text(encoding="utf-8").splitlines()
             if (m := TEST_LINE.match(line.strip()))]
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"{path.name}: {len(found)} '# test:' lines, expected one")
    tokens = shlex.split(found[0])
    if len(tokens) % 2 or any(flag != "--set" for flag in tokens[::2]):
        raise ValueError(f"{path.name}: '# test:' line must be '--set KEY=VALUE' pairs, "
                         f"got {found[0].strip()!r}")
    return tokens[1::2]


def required_overrides(path: Path) -> list[str]:
    overrides = scenario_test_overrides(path)
    if overrides is None:
        pytest.fail(f"{path.name} has no '# test: --set KEY=VALUE ...' comment "
                    "line: every scenario must say how the test suite runs it quickly (tiny "
                    "models, rounds=1, few clients); see scenarios/quickstart.yaml")
    return overrides


def test_there_are_scenarios():
    assert SCENARIOS, f"no scenarios in {ROOT / 'scenarios'}"


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_validates_as_is(path, capsys):
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_has_header_and_test_line(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#"), f"{path.name}: start with a comment saying what it studies"
    assert "Look at" in text, f"{path.name}: the header should say what to look at"
    required_overrides(path)


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_runs_with_its_test_overrides(path, tmp_path, capsys):
    overrides = required_overrides(path)
    args = [a for o in overrides for a in ("--set", o)]
    assert main(["validate", str(path), *args]) == 0, capsys.readouterr().err
    scenario = load(path, overrides)
    result = run(scenario)
    assert result.summary["rounds_completed"] == scenario.rounds
    out = write_run_dir(result, tmp_path / "run")
    assert (out / "summary.json").is_file()
    if path.stem in TABLE_1:  # the server's metric, every round, finite
        quality = result.summary["quality"]
        assert quality["metric"] == TABLE_1[path.stem][1]
        assert len(quality["server_by_round"]) == scenario.rounds
        assert all(math.isfinite(x) for x in quality["server_by_round"])
    golden = GOLDEN / f"{path.stem}.json"
    if golden.is_file():  # the refactorings of the architecture issue change no number
        assert_same_summary(result.summary, golden)


def test_overrides_parser(tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text("# what\n# test: --set rounds=1 --set 'name=a b'\nname: x\n")
    assert scenario_test_overrides(ok) == ["rounds=1", "name=a b"]
    missing = tmp_path / "missing.yaml"
    missing.write_text("# what\nname: x\n")
    assert scenario_test_overrides(missing) is None
    with pytest.raises(pytest.fail.Exception, match=r"missing.yaml has no '# test: --set"):
        required_overrides(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("# test: rounds=1\nname: x\n")
    with pytest.raises(ValueError, match="--set KEY=VALUE"):
        scenario_test_overrides(bad)


# The evaluation tasks of the Jajoo proposal's Table 1 (offline stand-ins), one scenario each,
# all through the server path (a server model fed by lstsq-projected task vectors); each is run
# by test_scenario_runs_with_its_test_overrides, which checks the metric it reports.
TABLE_1 = {"quickstart": ("classification", "accuracy"),  # topic (bbc-news)
           "sentiment": ("classification", "accuracy"),  # binary (rotten-tomatoes, for Ethos)
           "multiple-choice": ("multiple-choice", "accuracy"),  # wordnet-mc, for COPA
           "generative": ("generation", "rougeL"),  # bbc-news headlines, for XL-Sum
           "translation": ("generation", "chrf")}  # freedict-en-de, for FLORES / IN22


@pytest.mark.parametrize("stem", sorted(TABLE_1))
def test_table_1_scenario_goes_through_the_server_with_lstsq(stem):
    path = ROOT / "scenarios" / f"{stem}.yaml"
    for overrides in ([], required_overrides(path)):
        scenario = load(path, overrides)
        assert scenario.task.kind == TABLE_1[stem][0] and scenario.server.model is not None
        assert scenario.transfer.name == "projection"
        assert scenario.transfer.projector.name == "lstsq"

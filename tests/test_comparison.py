"""The output side of ``fedsim compare``: intervals over seeds, the csv files, the table, the plot.

The comparisons are built by hand (known metric values) around the result of a synthetic run,
so the files can be checked against a hand computation in milliseconds; the CLI end to end on
tiny real models is in test_cli.py.
"""

import csv
import math

import pytest

from fedsim.comparison import START, Comparison, RepeatedComparison, write_comparison
from fedsim.engine import run
from fedsim.plots import plot_dir
from fedsim.scenario import validate

T975_DF2 = 4.3027  # Student t(0.975, 2) from a printed table


def synthetic_result(seed):
    return run(validate({"name": "cmp", "seed": seed, "rounds": 2,
                         "workload": {"name": "synthetic"},
                         "clients": [{"profile": "laptop", "count": 2}]}))


# Per seed: start, then two rounds of each variant. "pad" differs across seeds; "lstsq" agrees.
VALUES = {0: {START: [0.40], "pad": [0.50, 0.60], "lstsq": [0.55, 0.65]},
          1: {START: [0.40], "pad": [0.52, 0.66], "lstsq": [0.55, 0.65]},
          2: {START: [0.40], "pad": [0.47, 0.63], "lstsq": [0.55, 0.65]}}


@pytest.fixture(scope="module")
def repeated():
    return RepeatedComparison([Comparison("accuracy", VALUES[s], synthetic_result(s))
                               for s in VALUES])


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_intervals_per_variant_and_round_by_hand(repeated):
    ivs = repeated.intervals()
    assert list(ivs) == [START, "pad", "lstsq"] and repeated.seeds == [0, 1, 2]
    for r in range(2):
        xs = [VALUES[s]["pad"][r] for s in VALUES]
        mean = sum(xs) / 3
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / 2)
        iv = ivs["pad"][r]
        assert iv.mean == pytest.approx(mean, rel=1e-12) and iv.n == 3
        assert iv.std == pytest.approx(std, rel=1e-9)
        assert iv.half_width == pytest.approx(T975_DF2 * std / math.sqrt(3), rel=1e-4)
    # the seeds agree: zero width at the value
    assert [(iv.mean, iv.low, iv.high) for iv in ivs["lstsq"]] == [(0.55,) * 3, (0.65,) * 3]
    assert (ivs[START][0].mean, ivs[START][0].half_width) == (0.40, 0.0)


def test_write_repeated_comparison_files(repeated, tmp_path):
    out = tmp_path / "cmp"
    paths = write_comparison(repeated, out)
    assert [p.name for p in paths] == ["comparison.csv", "comparison_by_seed.csv",
                                       "comparison.md", "comparison.png"]
    assert sorted(p.name for p in out.iterdir() if (p / "summary.json").is_file()) == [
        "seed=0", "seed=1", "seed=2"]
    assert not (out / "run").exists()

    rows = read(out / "comparison.csv")
    assert list(rows[0]) == ["variant", "round", "accuracy", "accuracy.std",
                             "accuracy.ci95_low", "accuracy.ci95_high", "accuracy.n"]
    assert [(r["variant"], r["round"]) for r in rows] == [
        (START, "0"), ("pad", "0"), ("pad", "1"), ("lstsq", "0"), ("lstsq", "1")]
    pad1 = repeated.intervals()["pad"][1]
    assert float(rows[2]["accuracy"]) == pytest.approx(pad1.mean)
    assert float(rows[2]["accuracy.ci95_low"]) == pytest.approx(pad1.low)
    assert float(rows[2]["accuracy.ci95_high"]) == pytest.approx(pad1.high)
    assert rows[2]["accuracy.n"] == "3"
    assert (rows[3]["accuracy.std"], rows[3]["accuracy.ci95_low"]) == ("0.0", "0.55")

    by_seed = read(out / "comparison_by_seed.csv")
    assert list(by_seed[0]) == ["seed", "variant", "round", "accuracy"]
    assert len(by_seed) == 3 * 5
    assert {(r["seed"], r["variant"], r["round"]): float(r["accuracy"]) for r in by_seed} == {
        (str(s), v, str(i)): x for s, vs in VALUES.items() for v, xs in vs.items()
        for i, x in enumerate(xs)}

    md = (out / "comparison.md").read_text()
    assert md.startswith("server accuracy per round (start: before any update): mean ± 95% "
                         "half-width over 3 seeds (0, 1, 2; Student t, n=3)")
    assert f"| pad | {repeated.intervals()['pad'][0].text()} |" in md
    assert "| lstsq | 0.550 ± 0.000 | 0.650 ± 0.000 |" in md
    assert "| start | 0.400 ± 0.000 | 0.400 ± 0.000 |" in md

    png = out / "plots" / "comparison.png"
    assert png.stat().st_size > 10_000
    assert plot_dir(out) == [png]


def test_one_comparison_keeps_run_dir_and_bare_table(tmp_path):
    one = Comparison("accuracy", VALUES[1], synthetic_result(1))
    out = tmp_path / "cmp"
    write_comparison(one, out)
    assert (out / "run" / "summary.json").is_file() and not (out / "seed=1").exists()
    rows = read(out / "comparison.csv")
    assert [float(r["accuracy"]) for r in rows if r["variant"] == "pad"] == [0.52, 0.66]
    assert rows[1]["accuracy.n"] == "1" and rows[1]["accuracy.ci95_low"] == "nan"
    assert [r["seed"] for r in read(out / "comparison_by_seed.csv")] == ["1"] * 5
    md = (out / "comparison.md").read_text()
    assert md == one.markdown() + "\n" and "±" not in md
    assert md.splitlines()[2] == "| start | 0.400 | 0.400 |"


def test_seeds_that_measured_different_metrics_are_refused():
    from fedsim.errors import FedsimError

    res = synthetic_result(0)
    with pytest.raises(FedsimError, match="different metrics"):
        RepeatedComparison([Comparison("accuracy", VALUES[0], res),
                            Comparison("macro_f1", VALUES[0], res)])

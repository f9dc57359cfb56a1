"""The output side of ``fedsim compare``: intervals over seeds, the csv files, the table, the plot.

The comparisons are built by hand (known metric values) around the result of a synthetic run,
so the files can be checked against a hand computation in milliseconds; the CLI end to end on
tiny real models is in test_cli.py.
"""

import csv
import math

import pytest

from fedsim import comparison as comparison_mod
from fedsim.comparison import (
    START,
    Comparison,
    RepeatedComparison,
    Variant,
    compare_kept,
    run_cost,
    write_comparison,
)
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


# Per seed: what the shared run and the homogeneous federation cost (bytes up, sim seconds).
COSTS = {0: {"pad": {"bytes_up": 2.0e6, "sim_time_s": 10.0},
             "homogeneous": {"bytes_up": 8.0e6, "sim_time_s": 30.0}},
         1: {"pad": {"bytes_up": 3.0e6, "sim_time_s": 12.0},
             "homogeneous": {"bytes_up": 9.0e6, "sim_time_s": 33.0}},
         2: {"pad": {"bytes_up": 4.0e6, "sim_time_s": 14.0},
             "homogeneous": {"bytes_up": 10.0e6, "sim_time_s": 36.0}}}


def comparison(seed, metric="accuracy"):
    values = {**VALUES[seed], "homogeneous": [0.6, 0.7]}
    return Comparison(metric, values, seed, COSTS[seed], synthetic_result(seed))


@pytest.fixture(scope="module")
def repeated():
    return RepeatedComparison([comparison(s) for s in VALUES])


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_intervals_per_variant_and_round_by_hand(repeated):
    ivs = repeated.intervals()
    assert list(ivs) == [START, "pad", "lstsq", "homogeneous"] and repeated.seeds == [0, 1, 2]
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
    assert not (out / "run").exists()  # run directories are compare_kept's

    rows = read(out / "comparison.csv")
    assert list(rows[0]) == ["variant", "round", "accuracy", "accuracy.std",
                             "accuracy.ci95_low", "accuracy.ci95_high", "accuracy.n"]
    assert [(r["variant"], r["round"]) for r in rows] == [
        (START, "0"), ("pad", "0"), ("pad", "1"), ("lstsq", "0"), ("lstsq", "1"),
        ("homogeneous", "0"), ("homogeneous", "1")]
    pad1 = repeated.intervals()["pad"][1]
    assert float(rows[2]["accuracy"]) == pytest.approx(pad1.mean)
    assert float(rows[2]["accuracy.ci95_low"]) == pytest.approx(pad1.low)
    assert float(rows[2]["accuracy.ci95_high"]) == pytest.approx(pad1.high)
    assert rows[2]["accuracy.n"] == "3"
    assert (rows[3]["accuracy.std"], rows[3]["accuracy.ci95_low"]) == ("0.0", "0.55")

    by_seed = read(out / "comparison_by_seed.csv")
    assert list(by_seed[0]) == ["seed", "variant", "round", "accuracy"]
    assert len(by_seed) == 3 * 7
    assert {(r["seed"], r["variant"], r["round"]): float(r["accuracy"]) for r in by_seed
            if r["variant"] != "homogeneous"} == {
        (str(s), v, str(i)): x for s, vs in VALUES.items() for v, xs in vs.items()
        for i, x in enumerate(xs)}

    md = (out / "comparison.md").read_text()
    assert md.startswith("server accuracy per round (start: before any update): mean ± 95% "
                         "half-width over 3 seeds (0, 1, 2; Student t, n=3)")
    assert f"| pad | {repeated.intervals()['pad'][0].text()} |" in md
    # Costs: pad's run sent 2, 3, 4 MB (mean 3, s = 1) in 10, 12, 14 s (mean 12, s = 2); lstsq
    # has no cost of its own recorded here, start none at all.
    h_mb, h_s = T975_DF2 * 1 / math.sqrt(3), T975_DF2 * 2 / math.sqrt(3)
    assert md.splitlines()[2].endswith(" | MB up | sim time s | final − start (paired) |")
    assert (f"| pad | {repeated.intervals()['pad'][0].text()} | "
            f"{repeated.intervals()['pad'][1].text()} | 3.00 ± {h_mb:.2f} | 12.0 ± {h_s:.1f} |"
            in md)
    assert "| homogeneous | 0.600 ± 0.000 | 0.700 ± 0.000 | 9.00 ± " in md
    assert "| lstsq | 0.550 ± 0.000 | 0.650 ± 0.000 | - | - | +0.250 ± 0.000 |" in md
    assert "| start | 0.400 ± 0.000 | 0.400 ± 0.000 | - | - | - |" in md
    # pad's final - start per seed: 0.20, 0.26, 0.23 (each seed's start is 0.40)
    d = [0.20, 0.26, 0.23]
    m = sum(d) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / 2)
    gain = repeated.gains()["pad"]
    assert gain.mean == pytest.approx(m) and gain.half_width == pytest.approx(
        T975_DF2 * sd / math.sqrt(3), rel=1e-4)
    assert md.splitlines()[5].startswith("| pad |") and f"| +{gain.text()} |" in md.splitlines()[5]

    png = out / "plots" / "comparison.png"
    assert png.stat().st_size > 10_000
    assert plot_dir(out) == [png]


def test_one_comparison_bare_table(tmp_path):
    one = Comparison("accuracy", VALUES[1], 1, {"pad": COSTS[1]["pad"]}, synthetic_result(1))
    out = tmp_path / "cmp"
    write_comparison(one, out)
    rows = read(out / "comparison.csv")
    assert [float(r["accuracy"]) for r in rows if r["variant"] == "pad"] == [0.52, 0.66]
    assert rows[1]["accuracy.n"] == "1" and rows[1]["accuracy.ci95_low"] == "nan"
    assert [r["seed"] for r in read(out / "comparison_by_seed.csv")] == ["1"] * 5
    md = (out / "comparison.md").read_text()
    assert md == one.markdown() + "\n" and "±" not in md
    assert md.splitlines()[2] == "| start | 0.400 | 0.400 | - | - | - |"
    assert md.splitlines()[3].endswith("| 0.520 | 0.660 | 3.00 | 12.0 | +0.260 |")


def test_run_cost_reads_bytes_up_and_sim_time_of_a_summary():
    res = synthetic_result(0)
    assert run_cost(res.summary) == {"bytes_up": float(res.summary["comm"]["bytes_up"]),
                                     "sim_time_s": float(res.summary["sim_time_s"])}
    assert run_cost(res.summary)["bytes_up"] > 0 and run_cost(res.summary)["sim_time_s"] > 0


def test_a_finished_seed_is_kept_and_a_changed_one_reruns(tmp_path, monkeypatch):
    """compare_kept writes the run directory, then comparison.json; the same key reads it back
    without running; another key (here lars_eta) or a missing run directory runs again."""
    calls = []

    def fake_compare(scenario, chosen, lars_eta, progress, refs):
        calls.append(lars_eta)
        return comparison(scenario.seed)

    monkeypatch.setattr(comparison_mod, "compare", fake_compare)
    scen = validate({"name": "cmp", "seed": 2, "rounds": 2, "workload": {"name": "synthetic"},
                     "clients": [{"profile": "laptop", "count": 2}]})
    chosen, run_dir = [Variant("pad", False)], tmp_path / "seed=2"
    first, kept = compare_kept(scen, chosen, 0.01, ["homogeneous"], run_dir)
    assert not kept and calls == [0.01]
    assert (run_dir / "summary.json").is_file() and (run_dir / "comparison.json").is_file()
    again, kept = compare_kept(scen, chosen, 0.01, ["homogeneous"], run_dir)
    assert kept and calls == [0.01] and again.result is None
    assert (again.metric, again.seed, again.by_variant, again.costs) == (
        first.metric, first.seed, first.by_variant, first.costs)
    assert list(again.by_variant) == list(first.by_variant) == [START, "pad", "lstsq",
                                                                "homogeneous"]  # row order
    _, kept = compare_kept(scen, chosen, 0.02, ["homogeneous"], run_dir)
    assert not kept and calls == [0.01, 0.02]
    (run_dir / "summary.json").unlink()
    _, kept = compare_kept(scen, chosen, 0.02, ["homogeneous"], run_dir)
    assert not kept and calls == [0.01, 0.02, 0.02]


def test_seeds_that_measured_different_metrics_are_refused():
    from fedsim.errors import FedsimError

    with pytest.raises(FedsimError, match="different metrics"):
        RepeatedComparison([comparison(0), comparison(1, "macro_f1")])


def test_variants_from_projectors_lars_flags_and_plus_lars_names():
    from fedsim.comparison import variants
    from fedsim.errors import FedsimError

    names = [v.name for v in variants(["pad", "lstsq"], "both")]
    assert names == ["pad", "pad+lars", "lstsq", "lstsq+lars"]
    names = [v.name for v in variants(["pad", "orthogonal", "lstsq", "lstsq+lars"], "off")]
    assert names == ["pad", "orthogonal", "lstsq", "lstsq+lars"]
    assert [v.name for v in variants(["lstsq", "lstsq+lars"], "on")] == ["lstsq+lars"]
    for bad, msg in ((["lsq"], "unknown lsq"), (["lstsq+clip"], r"unknown lstsq\+clip")):
        with pytest.raises(FedsimError, match=msg):
            variants(bad, "off")
    with pytest.raises(FedsimError, match="--lars: expected off, on or both"):
        variants(["pad"], "sometimes")

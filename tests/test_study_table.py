"""scripts/study_table.py: mean ± 95% half-width per variant, by hand on two fake seeds."""

import json
import runpy
from pathlib import Path

from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
table = runpy.run_path(str(ROOT / "scripts" / "study_table.py"))["table"]


def _seed(d: Path, final: float, first: float, up: int) -> None:
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({
        "quality": {"metric": "accuracy", "server_by_round": [first, final],
                    "clients_final": {"0": {"accuracy": 0.5}, "1": {"accuracy": 0.7}}},
        "comm": {"bytes_up": up, "bytes_down": 2000}, "rounds_completed": 2,
        "sim_time_s": 10.0, "wall_time_s": 3.0}))
    (d / "rounds.csv").write_text("round,end_s,server_accuracy\n"
                                  f"0,4.0,{first}\n1,9.0,{final}\n")


def test_table_rows_are_t_intervals_over_the_seeds(tmp_path):
    _seed(tmp_path / "a" / "seed=0", 0.40, 0.30, 4000)
    _seed(tmp_path / "a" / "seed=1", 0.50, 0.10, 6000)
    text = table(tmp_path, ["a"], target=0.3)
    half = stats.t.ppf(0.975, 1) * stats.sem([0.40, 0.50])
    row = text.splitlines()[2]
    assert row.startswith("| a (n=2) | ")
    assert f"0.450 ± {half:.3f}" in row  # the final server accuracy
    assert "| 0.600 ± 0.000 |" in row  # the clients' mean agrees across seeds: zero width
    assert "| 2.5 ± " in row  # kB up per round: (2 + 3) / 2
    # Seed 0 reaches 0.3 after round 0 (4 s), seed 1 after round 1 (9 s).
    assert f"6.5 ± {stats.t.ppf(0.975, 1) * stats.sem([4.0, 9.0]):.1f} (2/2)" in row
    assert "(0/2)" in table(tmp_path, ["a"], target=0.9)

"""benchmarks/bench_peers.py --smoke: fedsim (process, ray), Flower's simulation engine and
Apple's pfl play the same client work and agree on it. Runs where the ``bench`` extra is
installed (``make bench-setup``: .venv-bench); skipped otherwise (CI's default install has no
Flower)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the bench extra (Flower) is not installed")
pytest.importorskip("ray", reason="Flower's simulation engine runs on Ray")

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_peers_smoke_agree_and_report_every_figure():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_peers.py"), "--smoke"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peers = {"process", "ray", "flower"} | ({"pfl"} if importlib.util.find_spec("pfl") else set())
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()
            if line.split() and line.split()[0] in peers and len(line.split()) == 8}
    assert set(rows) == peers, proc.stdout
    # start-up, round 1, steady, PSS, accuracy, loss: numbers; same: every peer agrees
    for name, cols in rows.items():
        startup, round1, steady, pss_gib = (float(x) for x in cols[1:5])
        assert startup > 0 and round1 > 0 and steady > 0 and pss_gib > 0.05, (name, cols)
        assert cols[7] == "True", (name, cols)
    assert len({cols[6] for cols in rows.values()}) == 1  # the same final loss, printed
    assert "process / flower: steady round" in proc.stdout
    assert ("process / pfl: steady round" in proc.stdout) == ("pfl" in peers)

"""Quickstart wall time: when `fedsim run scenarios/quickstart.yaml` prints its summary.

    python benchmarks/bench_quickstart.py [--set KEY=VALUE ...]

Runs the command in a child process (caches as `make setup` leaves them) and prints the
seconds from its start to the summary's first line, to its end (the figures drawn after the
summary), and the CPU seconds of its process tree by the summary (user + system, the workers
included; sampled every 0.5 s), with that as a share of every core over the same time. One
run: compare two settings back to back, on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = "run quickstart"  # the summary's first line starts so


def tree_cpu_s(proc: psutil.Process, seen: dict[int, float]) -> float:
    """CPU seconds of ``proc`` and its descendants; ``seen`` keeps those that have exited."""
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # exited since the listing: its last reading
            t = p.cpu_times()
            seen[p.pid] = t.user + t.system
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a scenario override, as fedsim run takes it")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fedsim", "run", str(ROOT / "scenarios/quickstart.yaml"),
               "--out", str(Path(tmp) / "run"), *(a for kv in args.set for a in ("--set", kv))]
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        proc, seen, marks = psutil.Process(child.pid), {}, {}
        cpu_s = [0.0]
        lines: list[str] = []

        def read() -> None:
            for line in child.stdout:
                lines.append(line)
                if line.startswith(SUMMARY) and "summary" not in marks:
                    marks["summary"] = time.perf_counter() - t0
                    marks["cpu"] = cpu_s[0]

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while child.poll() is None:
            with contextlib.suppress(psutil.Error):
                cpu_s[0] = tree_cpu_s(proc, seen)
            time.sleep(0.5)
        reader.join()
        end_s = time.perf_counter() - t0
    if child.returncode or "summary" not in marks:
        sys.exit(f"fedsim run failed (exit {child.returncode}):\n{''.join(lines)[-2000:]}")
    cores = os.cpu_count() or 1
    print("".join(line for line in lines if line.startswith(("run ", "server accuracy"))),
          end="")
    print(f"summary after       {marks['summary']:7.1f} s")
    print(f"command ends after  {end_s:7.1f} s (the figures drawn after the summary)")
    share = marks["cpu"] / (marks["summary"] * cores)
    print(f"CPU by the summary  {marks['cpu']:7.1f} s, {share:.0%} of {cores} cores "
          "(process tree, sampled every 0.5 s)")


if __name__ == "__main__":
    main()

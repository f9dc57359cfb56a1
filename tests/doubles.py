"""Test doubles for the engine: a workload with fixed, known sizes and FLOPs (tests only)."""

from __future__ import annotations

from typing import Any

from fedsim.workload import Arrival, Ingested, JobPlan, Upload, Workload


class FixedWorkload(Workload):
    """Every job: ``download_bytes`` down, ``flops`` of training, ``upload_bytes`` up."""

    name = "fixed"

    def __init__(self, scenario, fleet, *, download_bytes: int = 1000, upload_bytes: int = 1000,
                 flops: float = 1e9, memory_bytes: int = 0, server_flops: float = 0.0,
                 aggregate_flops: float = 0.0, per_client_flops: dict[int, float] | None = None):
        super().__init__(scenario, fleet)
        self.down, self.up, self.flops, self.mem = download_bytes, upload_bytes, flops, memory_bytes
        self.server_flops, self.aggregate_flops = server_flops, aggregate_flops
        self.per_client_flops = per_client_flops or {}
        self.trained: list[tuple[int, int]] = []
        self.encoded: list[tuple[int, float, float | None]] = []
        self.aggregated: list[tuple[int, list[Arrival]]] = []

    def primary_metric(self) -> str:
        return "accuracy"

    def download_bytes(self, client: int) -> int:
        return self.down

    def download_bytes_estimate(self, client: int) -> int:
        return self.down

    def upload_bytes_estimate(self, client: int) -> int:
        return self.up

    def plan(self, client: int, round_: int) -> JobPlan:
        return JobPlan(flops=self.per_client_flops.get(client, self.flops),
                       peak_memory_bytes=self.mem, num_samples=10)

    def train(self, client: int, round_: int, plan: JobPlan) -> Any:
        self.trained.append((client, round_))
        return {"client": client}

    def encode(self, client, round_, update, rate_bps, time_left_s) -> Upload:
        self.encoded.append((client, rate_bps, time_left_s))
        return Upload(nbytes=self.up, raw_bytes=4 * self.up, codec="fixed")

    def ingest(self, client: int, upload: Upload) -> Ingested:
        return Ingested(flops=self.server_flops, accepted=True)

    def aggregate(self, round_: int, arrivals: list[Arrival]) -> float:
        self.aggregated.append((round_, list(arrivals)))
        return self.aggregate_flops

    def evaluate(self, round_: int) -> dict[str, float]:
        return {"accuracy": 0.5 + 0.01 * round_}


# --- remote jobs for the executors (they run in worker processes; state goes through files) ---


class EchoJob:
    """Returns its value, the worker's pid and what the worker's cache held before."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def run(self, cache) -> tuple[Any, int, int]:
        import os

        calls = cache.get("calls", lambda: [0])
        calls[0] += 1
        return self.value, os.getpid(), calls[0]


class MappedLibrariesJob:
    """The shared libraries mapped into the worker that runs it (file names)."""

    def run(self, cache) -> list[str]:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            return sorted({line.split()[-1].rsplit("/", 1)[-1] for line in f
                           if ".so" in line.split()[-1]})


class CrashJob:
    """Kills its worker while the marker file holds a positive count (decremented each time),
    then returns ``value``: a job whose worker dies ``crashes`` times."""

    def __init__(self, marker: str, value: Any = "ok") -> None:
        self.marker, self.value = marker, value

    def run(self, cache) -> Any:
        import os
        from pathlib import Path

        path = Path(self.marker)
        left = int(path.read_text())
        if left > 0:
            path.write_text(str(left - 1))
            os._exit(1)  # a worker killed mid-job, as by the OOM killer
        return self.value


class SleepJob:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def run(self, cache) -> float:
        import time

        time.sleep(self.seconds)
        return self.seconds


class RemoteFixedWorkload(FixedWorkload):
    """FixedWorkload whose jobs run in workers; ``crash_clients`` kill their worker every try."""

    def __init__(self, scenario, fleet, *, marker: str, crash_clients=(), **kw) -> None:
        super().__init__(scenario, fleet, **kw)
        self.marker, self.crash_clients = marker, set(crash_clients)

    def remote_job(self, client: int, round_: int, plan: JobPlan) -> Any:
        if client in self.crash_clients:
            return CrashJob(self.marker)
        return EchoJob({"client": client})


class RemoteGroupedWorkload(RemoteFixedWorkload):
    """RemoteFixedWorkload whose clients form one family that ``batch_clients`` groups: a
    group job holding a ``crash_clients`` member kills its worker every try."""

    def batch_key(self, client: int) -> Any:
        return "family"

    def remote_group(self, jobs) -> Any:
        if any(client in self.crash_clients for client, _, _ in jobs):
            return CrashJob(self.marker)
        return ValueJob([{"client": client} for client, _, _ in jobs])


class ValueJob:
    """Returns its value (a group's list of results)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def run(self, cache) -> Any:
        return self.value

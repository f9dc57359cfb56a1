"""Where the heavy jobs run (registry ``EXECUTORS``): ``inline`` here; more in later issues.

The engine submits a job when a client starts it in simulated time, waits the job's modelled
duration on the SimPy clock, then collects the result. Results are pure functions of the
(client, round) and the seed, so they do not depend on where or in which order jobs ran.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from fedsim.registry import Registry
from fedsim.scenario import ExecutorConfig

EXECUTORS: Registry[type[Executor]] = Registry("executor")


class Job(ABC):
    @abstractmethod
    def result(self) -> Any: ...

    def cancel(self) -> None:
        """The client dropped out: the result will not be collected."""


class Executor(ABC):
    name: str

    def __init__(self, cfg: ExecutorConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def submit(self, fn: Callable[..., Any], *args: Any) -> Job: ...

    def close(self) -> None:
        """Release workers."""


class _LazyJob(Job):
    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._fn, self._args = fn, args

    def result(self) -> Any:
        return self._fn(*self._args)


@EXECUTORS.register("inline")
class InlineExecutor(Executor):
    """Runs a job in this process when its result is collected (a dropped job never runs)."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Job:
        return _LazyJob(fn, args)


def make_executor(cfg: ExecutorConfig) -> Executor:
    return EXECUTORS.get(cfg.name)(cfg)

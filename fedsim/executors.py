"""Where the heavy jobs run (registry ``EXECUTORS``): ``inline``, ``process`` and ``ray``.

The engine submits a client's training job when the client starts it in simulated time, waits
the job's modelled duration on the SimPy clock, then collects the result; clients whose jobs
overlap in simulated time therefore train in parallel on ``process`` and ``ray`` workers while
SimPy stays the only clock. Results are pure functions of the (client, round) and the seed, so
they do not depend on where or in which order jobs ran: the same scenario and seed give the
same ``events.csv`` and ``summary.json`` under every executor.

A job that leaves this process is a :class:`RemoteJob`: picklable data (the client's start
adapter, its example indices, the batch plan and the seed) whose ``run(cache)`` executes in a
worker. A worker keeps a :class:`WorkerCache` between jobs, so a family's frozen base model and
the dataset are loaded once per worker and each job ships adapter bytes, not model bytes. A
workload that has nothing to ship (``synthetic``) runs its jobs here whatever the executor.

With ``executor.batch_clients > 1`` training jobs of one model family wait until a result is
collected and then run several to a batched pass (:mod:`fedsim.batching`): inline the
collected job's family's pending jobs, out of process every pending job in groups.

A worker that dies mid-job (killed, out of memory) is replaced and the job resubmitted, up to
``executor.max_retries`` times; after that, or after ``executor.job_timeout_s``, the job fails
with :class:`JobFailed`, which the engine records as a ``job_failed`` event and a failed
update. Never a hang.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import multiprocessing
import multiprocessing.forkserver
import os
import resource
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, Protocol

from fedsim.allocators import worker_environment
from fedsim.errors import FedsimError
from fedsim.plugins import EXECUTORS, ExecutorConfig

if TYPE_CHECKING:
    from fedsim.workload import JobPlan, Workload


class JobFailed(Exception):
    """A job could not produce a result (its worker died past the retries, or it timed out)."""


class RemoteJob(Protocol):
    """A job as picklable data; ``run`` executes it in a worker with that worker's cache."""

    def run(self, cache: WorkerCache) -> Any: ...


class WorkerCache:
    """What a worker keeps between jobs: base models, data sets, built on first use by key."""

    def __init__(self) -> None:
        self._items: dict[Any, Any] = {}

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        if key not in self._items:
            self._items[key] = build()
        return self._items[key]


def peak_rss_bytes() -> int:
    """This process's peak resident set size, bytes. On Linux VmHWM (``ru_maxrss`` would
    count the parent's pages a spawned worker held between fork and exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes


class Job(ABC):
    @abstractmethod
    def result(self) -> Any:
        """The job's result, waiting for it; raises :class:`JobFailed`."""

    def cancel(self) -> None:
        """The client dropped out: the result will not be collected."""


class Executor(ABC):
    name: str

    def __init__(self, cfg: ExecutorConfig) -> None:
        self.cfg = cfg
        self.worker_peak_rss: dict[int, int] = {}  # worker pid -> peak RSS bytes seen
        self.batch_clients = cfg.batch_clients
        self.pending: list[_GroupedJob] = []  # jobs to batch, not yet sent, in submission order
        self.groups: list[int] = []  # the size of each batched pass sent or run

    def submit_train(self, workload: Workload, client: int, round_: int, plan: JobPlan) -> Job:
        """Start ``client``'s training job of ``round_``: out of process when the workload can
        ship it, else here (lazily, when its result is collected). With ``batch_clients > 1``
        it waits, with the family's other jobs, until a result is collected (``_run_group``)."""
        key = workload.batch_key(client) if self.batch_clients > 1 else None
        if key is not None:
            grouped = _GroupedJob(self, workload, key, (client, round_, plan))
            self.pending.append(grouped)
            return grouped
        job = workload.remote_job(client, round_, plan)
        if job is None:
            return _LazyJob(workload.train, (client, round_, plan))
        return self.submit(job)

    @abstractmethod
    def submit(self, job: RemoteJob) -> Job: ...

    def _run_group(self, job: _GroupedJob) -> None:
        """A pending job's result is wanted: every pending job leaves now, each family's cut
        into groups of at most ``batch_clients`` and at least one per worker where it has as
        many jobs, one batched pass per group on the workers."""
        pending, self.pending = self.pending, []
        families: dict[tuple[int, Any], list[_GroupedJob]] = {}
        for j in pending:
            families.setdefault((id(j.workload), j.key), []).append(j)
        workers = getattr(self.cfg, "workers", 1)
        for members in families.values():
            size = min(self.batch_clients, math.ceil(len(members) / workers))
            for i in range(0, len(members), size):
                self._send(members[i:i + size])

    def _send(self, members: list[_GroupedJob]) -> None:
        workload = members[0].workload
        remote = workload.remote_group([m.args for m in members])
        if remote is None:  # nothing to ship: here, now
            values = workload.train_many([m.args for m in members])
            for m, value in zip(members, values, strict=True):
                m.value, m.done = value, True
        else:
            shared = _Shared(self.submit(remote))
            for i, m in enumerate(members):
                m.group, m.index = shared, i
        self.groups.append(len(members))

    def warm(self) -> None:
        """Start the workers now (jobs will come): their start-up overlaps what this process
        does until the first job."""

    def close(self) -> None:
        """Release workers."""

    def _seen(self, pid: int, rss: int) -> None:
        self.worker_peak_rss[pid] = max(rss, self.worker_peak_rss.get(pid, 0))




class _LazyJob(Job):
    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._fn, self._args = fn, args

    def result(self) -> Any:
        return self._fn(*self._args)


class _Shared:
    """One job's result shared by its group's members (fetched once; its failure, each's)."""

    def __init__(self, job: Job) -> None:
        self.job, self._value, self._error, self._done = job, None, None, False

    def result(self) -> Any:
        if not self._done:
            try:
                self._value = self.job.result()
            except JobFailed as e:
                self._error = e
            self._done = True
        if self._error is not None:
            raise self._error
        return self._value


class _GroupedJob(Job):
    """A training job its executor runs in one batched pass with other jobs of its family
    (``executor.batch_clients``), once some job's result is collected."""

    def __init__(self, executor: Executor, workload: Workload, key: Any,
                 args: tuple[int, int, JobPlan]) -> None:
        self.executor, self.workload, self.key, self.args = executor, workload, key, args
        self.done, self.value = False, None
        self.group: _Shared | None = None  # sent to the workers: its group's job, and place
        self.index = 0

    def result(self) -> Any:
        if not self.done and self.group is None:
            self.executor._run_group(self)
        if self.group is not None:
            return self.group.result()[self.index]
        return self.value

    def cancel(self) -> None:
        with contextlib.suppress(ValueError):
            self.executor.pending.remove(self)


@EXECUTORS.register("inline")
class InlineExecutor(Executor):
    """Runs a job in this process when its result is collected (a dropped job never runs);
    with ``batch_clients > 1``, together with the other jobs of its family submitted by
    then (fedsim.batching)."""

    def submit_train(self, workload: Workload, client: int, round_: int, plan: JobPlan) -> Job:
        if self.batch_clients > 1 and workload.batch_key(client) is not None:
            return super().submit_train(workload, client, round_, plan)
        return _LazyJob(workload.train, (client, round_, plan))

    def _run_group(self, job: _GroupedJob) -> None:
        """``job`` and the earliest pending jobs of its family, up to ``batch_clients``."""
        others = [j for j in self.pending if j is not job and j.key == job.key
                  and j.workload is job.workload]
        group = [job, *others[: self.batch_clients - 1]]
        for j in group:
            with contextlib.suppress(ValueError):
                self.pending.remove(j)
        results = job.workload.train_many([j.args for j in group])
        for j, value in zip(group, results, strict=True):
            j.value, j.done = value, True
        self.groups.append(len(group))

    def submit(self, job: RemoteJob) -> Job:
        cache = WorkerCache()
        return _LazyJob(job.run, (cache,))


# --- process: a local pool of workers forked from a server process ------------------------------

# What the workers' server process imports once (multiprocessing's forkserver): a worker forks
# from it with torch, transformers and peft in place — up without importing them again, their
# pages shared with its siblings, so the pool's memory (PSS) holds them once. Not a plain fork
# of this process: it holds torch/OpenMP threads that a forked child would inherit in a locked
# state; the server process only imports, it never runs a torch op.
_PRELOAD = ("torch", "transformers", "peft", "fedsim.federation")


_SERVER_ENV: dict[str, str] | None = None  # what the running forkserver was started with


def _forkserver(environ: Mapping[str, str]) -> multiprocessing.context.BaseContext:
    """The forkserver context, its server started now (its imports overlap what this process
    does next, loading models) with ``environ`` added to this process's environment for its
    start alone (a worker's allocator, ``fedsim.allocators``: loaded when a process starts).
    A server started with other variables is stopped first: its next workers need these."""
    global _SERVER_ENV
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows: spawned workers
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(_PRELOAD))
    want = dict(environ)
    if _SERVER_ENV is not None and want != _SERVER_ENV:
        multiprocessing.forkserver._forkserver._stop()  # its running workers live on
    saved = {k: os.environ.get(k) for k in want}
    os.environ.update(want)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:  # this process, and what it starts later, keep their own environment
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    _SERVER_ENV = want
    return ctx


_CACHE: WorkerCache | None = None  # the worker process's cache (set by _init_worker)


def _init_worker(threads: int, environ: dict[str, str] | None = None) -> None:
    global _CACHE
    import torch  # a worker exists to run torch jobs; pin its share of the cores

    # the environment of this process when the pool started (FEDSIM_CACHE, HF_HUB_OFFLINE...),
    # as a spawned worker would have it, not the server process's from its own start
    if environ is not None:
        os.environ.clear()
        os.environ.update(environ)

    torch.set_num_threads(threads)
    _CACHE = WorkerCache()


def _run_in_worker(job: RemoteJob) -> tuple[Any, int, int]:
    assert _CACHE is not None, "worker not initialised"
    result = job.run(_CACHE)
    return result, os.getpid(), peak_rss_bytes()


class _RetriedJob(Job):
    """A remote job that its executor may submit again (``attempts`` counts the tries)."""

    def __init__(self, executor: Any, job: RemoteJob) -> None:
        self.executor, self.job, self.attempts = executor, job, 0
        self._submit()

    @abstractmethod
    def _submit(self) -> None: ...


class _PoolJob(_RetriedJob):
    executor: ProcessExecutor

    def _submit(self) -> None:
        self.attempts += 1
        self.slot, self.generation, self.future = self.executor._submit(self)

    def result(self) -> Any:
        ex, timeout = self.executor, self.executor.cfg.job_timeout_s
        while True:
            try:
                result, pid, rss = self.future.result(timeout=timeout)
            except BrokenProcessPool as e:  # the worker died: under this job or another
                culprit = ex._revive(self.slot, self.generation)
                if culprit is self:  # only the job the worker died running counts a try
                    if self.attempts > ex.cfg.max_retries:
                        raise JobFailed(f"worker died {self.attempts} times: {e}") from None
                else:
                    self.attempts -= 1
                self._submit()
                continue
            except FutureTimeout:
                ex._revive(self.slot, self.generation, kill=True)
                raise JobFailed(f"no result after job_timeout_s={timeout:g}") from None
            except CancelledError:  # queued behind a hung job whose worker was killed
                self.attempts -= 1
                self._submit()
                continue
            ex._seen(pid, rss)
            return result

    def cancel(self) -> None:
        self.future.cancel()  # a running job finishes in its worker; its result is dropped


class _Slot:
    """One worker process (a single-process pool, so its jobs run in submission order and the
    job it died under is known) and the jobs submitted to its current generation."""

    def __init__(self) -> None:
        self.pool: ProcessPoolExecutor | None = None
        self.generation = 0
        self.jobs: list[_PoolJob] = []
        self.culprits: dict[int, _PoolJob | None] = {}  # generation -> the job it died under

    def load(self) -> int:
        return sum(1 for j in self.jobs if not j.future.done())


@EXECUTORS.register("process")
class ProcessExecutor(Executor):
    """``workers`` processes on this machine (forked from a server process that has imported
    torch once), each with ``threads_per_job`` torch threads and its own cache of base models;
    a job goes to the worker with the fewest jobs queued."""

    def __init__(self, cfg: ExecutorConfig) -> None:
        super().__init__(cfg)
        self.threads = cfg.threads_per_job
        self.slots = [_Slot() for _ in range(cfg.workers)]
        self._ctx = _forkserver(worker_environment(cfg.allocator))

    def _submit(self, job: _PoolJob) -> tuple[_Slot, int, Future]:
        slot = min(self.slots, key=_Slot.load)
        if slot.pool is None:
            slot.pool = ProcessPoolExecutor(max_workers=1, mp_context=self._ctx,
                                            initializer=_init_worker,
                                            initargs=(self.threads, dict(os.environ)))
        try:
            future = slot.pool.submit(_run_in_worker, job.job)
        except BrokenProcessPool:  # it died since its last job: a fresh worker takes this one
            self._revive(slot, slot.generation)
            return self._submit(job)
        slot.jobs = [j for j in slot.jobs if not j.future.done()] + [job]
        return slot, slot.generation, future

    def _revive(self, slot: _Slot, generation: int, kill: bool = False) -> _PoolJob | None:
        """Replace ``slot``'s dead (or, with ``kill``, hung) worker once; return the job it
        died running: the first of its generation that failed (the queue is FIFO)."""
        if generation == slot.generation and slot.pool is not None:
            old, slot.pool = slot.pool, None
            slot.generation += 1
            if kill:  # a hung worker: nothing else frees it
                for proc in list((getattr(old, "_processes", None) or {}).values()):
                    proc.kill()
            slot.culprits[generation] = next(
                (j for j in slot.jobs if j.future.done() and not j.future.cancelled()
                 and isinstance(j.future.exception(), BrokenProcessPool)), None)
            old.shutdown(wait=False, cancel_futures=True)
            slot.jobs = []
        return slot.culprits.get(generation)

    def submit(self, job: RemoteJob) -> Job:
        return _PoolJob(self, job)

    def close(self) -> None:
        for slot in self.slots:
            if slot.pool is not None:
                slot.pool.shutdown(wait=True, cancel_futures=True)
                slot.pool = None


# --- ray: long-lived actors, local or on a cluster -----------------------------------------------


class RayWorker:
    """A Ray actor's body: a cache of base models and data that outlives its jobs."""

    def __init__(self, threads: int) -> None:
        _init_worker(threads)
        for name in _PRELOAD:  # what a job needs, imported before the first one arrives
            importlib.import_module(name)

    def run(self, job: RemoteJob) -> tuple[Any, int, int]:
        return _run_in_worker(job)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise FedsimError("executor.name: ray needs Ray: pip install 'fedsim[ray]'") from None
    return ray


class _RayJob(_RetriedJob):
    executor: RayExecutor

    def _submit(self) -> None:
        self.attempts += 1
        self.actor, self.handle, self.ref = self.executor._dispatch(self.job)

    def result(self) -> Any:
        ray, ex = self.executor.ray, self.executor
        while True:
            try:
                result, pid, rss = ray.get(self.ref, timeout=ex.cfg.job_timeout_s)
            except ray.exceptions.GetTimeoutError:
                ex._replace(self.actor, self.handle)
                raise JobFailed(f"no result after job_timeout_s={ex.cfg.job_timeout_s:g}") \
                    from None
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                ex._replace(self.actor, self.handle)
                if self.attempts > ex.cfg.max_retries:
                    raise JobFailed(f"actor died {self.attempts} times: "
                                    f"{type(e).__name__}") from None
                self._submit()
                continue
            finally:
                ex._done(self.actor)
            ex._seen(pid, rss)
            return result

    def cancel(self) -> None:
        self.executor._done(self.actor)
        # A queued actor task is cancelled; one already running finishes and is dropped.
        # Best effort: the result is dropped anyway.
        with contextlib.suppress(Exception):
            self.executor.ray.cancel(self.ref)


def gpu_share(cfg: ExecutorConfig) -> float:
    """The GPUs one Ray actor requests: 1/workers_per_gpu on a CUDA device, else 0."""
    from fedsim.accelerators import resolve

    if resolve(cfg.device).type != "cuda":
        return 0.0
    return 1.0 / getattr(cfg, "workers_per_gpu", 1)


@EXECUTORS.register("ray")
class RayExecutor(Executor):
    """``workers`` Ray actors (``threads_per_job`` CPUs each, and a ``gpu_share`` of a GPU
    when ``device`` is one: several small-model actors share it), on the cluster at
    ``address`` or on a local Ray started here. Each job goes to the actor with the fewest in
    flight."""

    def __init__(self, cfg: ExecutorConfig) -> None:
        super().__init__(cfg)
        self.ray = ray = import_ray()
        self._owns_ray = not ray.is_initialized()
        share = gpu_share(cfg)
        if self._owns_ray:
            ray.init(address=cfg.address,
                     num_cpus=None if cfg.address else cfg.workers * cfg.threads_per_job,
                     num_gpus=None if cfg.address or not share else
                     math.ceil(cfg.workers * share), include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        self.threads = cfg.threads_per_job
        # the actors' allocator: the library path is this machine's, so on a cluster only
        # where asked for by name (auto keeps the system's there)
        env = worker_environment("system" if cfg.address and cfg.allocator == "auto"
                                 else cfg.allocator)
        options = {"runtime_env": {"env_vars": env}} if env else {}
        self._actor_class = ray.remote(num_cpus=self.threads, num_gpus=share,
                                       max_restarts=0, **options)(RayWorker)
        self.actors: list[Any] = [None] * cfg.workers
        self.in_flight = [0] * cfg.workers

    def _actor(self, i: int) -> Any:
        if self.actors[i] is None:
            self.actors[i] = self._actor_class.remote(self.threads)
        return self.actors[i]

    def _dispatch(self, job: RemoteJob) -> tuple[int, Any, Any]:
        i = min(range(len(self.actors)), key=lambda k: (self.in_flight[k], k))
        self.in_flight[i] += 1
        actor = self._actor(i)
        return i, actor, actor.run.remote(job)

    def _done(self, i: int) -> None:
        self.in_flight[i] = max(self.in_flight[i] - 1, 0)

    def _replace(self, i: int, handle: Any = None) -> None:
        """Kill actor ``i`` (dead or hung) unless it was replaced already; the next job there
        starts a fresh one."""
        actor = self.actors[i]
        if actor is not None and (handle is None or actor is handle):
            self.ray.kill(actor, no_restart=True)
            self.actors[i] = None

    def submit(self, job: RemoteJob) -> Job:
        return _RayJob(self, job)

    def warm(self) -> None:
        for i in range(len(self.actors)):
            self._actor(i)

    def close(self) -> None:
        for i in range(len(self.actors)):
            self._replace(i)
        if self._owns_ray:
            self.ray.shutdown()


def make_executor(cfg: ExecutorConfig) -> Executor:
    return EXECUTORS.get(cfg.name)(cfg)

"""The workers' allocator: mimalloc preloaded into process workers alone, the same results."""

import os
import sys
from pathlib import Path

import pytest
from doubles import MappedLibrariesJob

from fedsim import allocators
from fedsim.errors import FedsimError
from fedsim.executors import make_executor
from fedsim.plugins import EXECUTORS as EXECUTOR_CONFIGS

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")


def _mimalloc_mapped(allocator: str) -> bool:
    before = os.environ.get("LD_PRELOAD")
    ex = make_executor(EXECUTOR_CONFIGS.parse({"name": "process", "workers": 1,
                                               "allocator": allocator}))
    try:
        assert os.environ.get("LD_PRELOAD") == before  # this process's environment is its own
        libraries = ex.submit(MappedLibrariesJob()).result()
    finally:
        ex.close()
    assert any(name.startswith("libtorch") for name in libraries)  # a real worker's map
    return any(name.startswith("libmimalloc") for name in libraries)


@linux
def test_process_workers_run_on_the_allocator_asked_for():
    assert allocators.mimalloc_library() is not None, "cmeel-mimalloc is a Linux dependency"
    assert _mimalloc_mapped("mimalloc")
    assert not _mimalloc_mapped("system")  # the forkserver is restarted for other variables
    assert _mimalloc_mapped("auto")
    main = Path("/proc/self/maps").read_text(encoding="ascii", errors="replace")
    assert "libmimalloc" not in main  # the driver keeps the allocator it started with


def test_worker_environment_per_choice(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert allocators.worker_environment("system") == {}
    monkeypatch.setattr(allocators, "mimalloc_library", lambda: None)
    assert allocators.worker_environment("auto") == {}  # not installed: the system's
    with pytest.raises(FedsimError, match=r"executor\.allocator: mimalloc is not installed"):
        allocators.worker_environment("mimalloc")
    with pytest.raises(FedsimError, match=r"executor\.allocator: expected one of auto"):
        allocators.worker_environment("tcmalloc")
    monkeypatch.setattr(allocators, "mimalloc_library", lambda: "/lib/libmimalloc.so.3")
    assert allocators.worker_environment("auto") == {"LD_PRELOAD": "/lib/libmimalloc.so.3"}
    monkeypatch.setenv("LD_PRELOAD", "/lib/libjemalloc.so.2")  # the user's own allocator
    assert allocators.worker_environment("auto") == {}
    assert allocators.worker_environment("mimalloc") == {
        "LD_PRELOAD": "/lib/libmimalloc.so.3:/lib/libjemalloc.so.2"}


@linux
@pytest.mark.slow
def test_ray_actors_run_on_mimalloc():
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    import doubles

    ray.cloudpickle.register_pickle_by_value(doubles)  # the test's module, unknown to workers
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    ex = make_executor(EXECUTOR_CONFIGS.parse({"name": "ray", "workers": 1}))
    try:
        libraries = ex.submit(MappedLibrariesJob()).result()
    finally:
        ex.close()
        ray.shutdown()
    assert any(name.startswith("libmimalloc") for name in libraries)


def test_run_asking_for_a_missing_mimalloc_exits_2_and_writes_nothing(tmp_path, capsys,
                                                                      monkeypatch):
    from fedsim.cli import main

    monkeypatch.setattr(allocators, "mimalloc_library", lambda: None)
    out = tmp_path / "run"
    rc = main(["run", "scenarios/network-only.yaml", "--set", "executor.name=process",
               "--set", "executor.allocator=mimalloc", "--set", "rounds=1",
               "--quiet", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "executor.allocator: mimalloc is not installed" in err
    assert "Traceback" not in err and not out.exists()

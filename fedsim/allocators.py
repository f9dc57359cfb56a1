"""The memory allocator of worker processes: ``executor.allocator`` (process and Ray pools).

A CPU training job allocates and frees its activations every step. glibc's malloc serves
tensors of that size from its heap once its mmap threshold has risen, and the heap fragments
and stays large between jobs; mimalloc (the ``cmeel-mimalloc`` wheel, a dependency on Linux)
does not. ``benchmarks/bench_peers.py --only process [--set executor.allocator=system]``: peak
PSS of the 2-worker pool 1.54 GiB with mimalloc, 1.84 with glibc, at the same speed. It is
loaded into the workers alone, by ``LD_PRELOAD`` when they start: the driver process keeps the
allocator it was started with.

``auto``: mimalloc where the library is installed (Linux) and ``LD_PRELOAD`` is not set
already (a user's own choice of allocator stands), else the system's; ``system``; ``mimalloc``
(before what ``LD_PRELOAD`` holds; a user error, exit 2, where it is not installed). Results
do not depend on it: torch aligns every CPU tensor itself (64 bytes), so kernels see the same
layouts.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

from fedsim.errors import FedsimError

CHOICES = ("auto", "system", "mimalloc")


def mimalloc_library() -> Path | None:
    """The shared library of the ``cmeel-mimalloc`` wheel, if installed (Linux only: the
    preloading below is the Linux loader's)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        dist = metadata.distribution("cmeel-mimalloc")
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name.startswith("libmimalloc.so."):  # the versioned file the loader opens
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    return None


def worker_environment(choice: str, key: str = "executor.allocator") -> dict[str, str]:
    """Environment variables that give a newly started worker process ``choice``'s allocator:
    ``{"LD_PRELOAD": ...}`` for mimalloc, nothing for the system's."""
    if choice not in CHOICES:
        raise FedsimError(f"{key}: expected one of {', '.join(CHOICES)}, got {choice!r}")
    preloaded = os.environ.get("LD_PRELOAD", "")
    if choice == "system" or (choice == "auto" and preloaded):  # the user's preload stands
        return {}
    library = mimalloc_library()
    if library is None:
        if choice == "auto":
            return {}
        raise FedsimError(f"{key}: mimalloc is not installed here (pip install cmeel-mimalloc, "
                          f"Linux only); use auto or system")
    return {"LD_PRELOAD": ":".join(p for p in (str(library), preloaded) if p)}

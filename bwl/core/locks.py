"""Locks that let several runs share one folder of results: whoever claims a result first makes it, the others wait
and then reuse it.

A claim is an OS file lock (``filelock``, ``flock`` on Linux) on ``.locks/<name>.lock`` beside ``path``, out of the
way of anything that lists the results. The operating system releases it when its process ends, however it ends, so
a lock file left behind by a killed run never blocks the next one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout


@contextmanager
def claim(path: Path, what: str, say: Callable[[str], object] = lambda _: None) -> Iterator[None]:
    """Hold the lock of ``path`` for the body. If another process holds it, ``say`` one line naming ``what`` and wait
    for it; the body should then check whether the result now exists."""
    path = Path(path)
    locks = path.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(locks / f"{path.name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        say(f"{what}: another run is making it; waiting for it")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()

"""A lock file beside catalog.duckdb that every open holds until its close has finished.

DuckDB's own file lock is not enough across processes: under load, a process opening
the catalog while another was closing it read past the end of the file ("Could not read
enough bytes ... attempted to read 262144 bytes"), and one committed row was lost, with
DuckDB 2.0.1. The closing process's shutdown checkpoint still rewrites (and truncates)
the file after the next process got in. So the catalog takes this lock first and lets it
go only once `close()` has returned: shared for read-only opens, exclusive for writes.

`flock` locks belong to an open file description, so two opens in one process would
shut each other out; DuckDB shares one database instance between the connections of a
process, so the lock is counted per process instead and taken from the OS once.
"""

from __future__ import annotations

import fcntl
import os
import random
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def retry_until(attempt: Callable[[], T], retryable: Callable[[Exception], bool], deadline: float,
                first_wait_s: float, max_wait_s: float, on_wait: Callable[[], None] = lambda: None) -> T:
    """`attempt()` until it returns. An error `retryable` accepts is retried after a jittered
    wait that doubles up to `max_wait_s` (jitter keeps waiting processes from retrying in
    step); at `deadline` it is raised, for the caller to name. `on_wait` counts the waits."""
    wait = first_wait_s
    while True:
        try:
            return attempt()
        except Exception as e:
            if not retryable(e) or time.monotonic() >= deadline:
                raise
        on_wait()
        time.sleep(wait * random.uniform(0.5, 1.5))
        wait = min(wait * 2, max_wait_s)


class LockTimeout(TimeoutError):
    """The lock file stayed held by another process past the deadline."""


class ProcessLock:
    """One per lock path in a process: a counted shared or exclusive `flock`."""

    _by_path: dict[str, "ProcessLock"] = {}
    _registry = threading.Lock()

    @classmethod
    def at(cls, path: Path) -> "ProcessLock":
        key = os.path.abspath(path)
        with cls._registry:
            if key not in cls._by_path or cls._by_path[key]._pid != os.getpid():
                cls._by_path[key] = cls(key)  # a forked child must take its own lock
            return cls._by_path[key]

    def __init__(self, path: str):
        self.path = path
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._count = 0
        self._exclusive = False
        self._fd: int | None = None

    def acquire(self, exclusive: bool, deadline: float, first_wait_s: float = 0.005,
                max_wait_s: float = 0.5) -> int:
        """Hold the lock (shared or exclusive) until `release`; returns how many times it waited."""
        waits = 0

        def count_wait() -> None:
            nonlocal waits
            waits += 1

        with self._cond:
            # Held here already: a shared hold serves readers; a writer waits for this
            # process's readers to close (DuckDB would refuse its open meanwhile anyway).
            while self._count and exclusive and not self._exclusive:
                waits += 1
                if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise LockTimeout(f"{self.path}: this process's own read-only opens stayed open")
            if self._count:
                self._count += 1
                return waits
            fd = self._open_file(exclusive)
            if fd is None:  # a reader of a workspace it may not write: DuckDB's lock alone
                self._count, self._exclusive = 1, False
                return waits
            mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
            try:
                retry_until(lambda: fcntl.flock(fd, mode), lambda e: isinstance(e, BlockingIOError), deadline,
                            first_wait_s, max_wait_s, on_wait=count_wait)
            except BlockingIOError:
                os.close(fd)
                raise LockTimeout(f"{self.path} stayed held by another process") from None
            except BaseException:
                os.close(fd)
                raise
            self._fd, self._count, self._exclusive = fd, 1, exclusive
            return waits

    def _open_file(self, exclusive: bool) -> int | None:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:  # read-only mount or another user's workspace
            if exclusive:
                raise
        try:
            return os.open(self.path, os.O_RDONLY)  # flock works on a read-only descriptor
        except FileNotFoundError:
            return None

    def release(self) -> None:
        with self._cond:
            if not self._count:
                raise RuntimeError(f"{self.path}: released more often than acquired")
            self._count -= 1
            if not self._count:
                fd, self._fd = self._fd, None
                if fd is not None:
                    os.close(fd)  # closing the description drops the flock
                self._cond.notify_all()

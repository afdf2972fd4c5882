"""Many small units of work over Ray tasks, each committed exactly once.

A Prefect task stays coarse (one per stage); inside it the units go to Ray in chunks,
with a bound on chunks in flight, and the driver commits what each finished chunk returns.
prefect-ray users report flows that hang between 1,000 and 15,000 submitted tasks and
results lost when Ray re-runs a task whose worker was killed; here Prefect sees one task,
Ray sees at most `max_in_flight` chunks, and a chunk's results reach `commit` only from
the driver:

- a chunk whose worker dies is re-run by Ray (`max_retries`); its units are committed
  when the re-run returns, once: only the driver commits, and it reads each finished chunk once;
- a unit that raises is quarantined (committed with its error), never retried forever;
- a chunk that still fails after Ray's retries is left uncommitted and named in
  `FanoutReport.unfinished`, so the caller's retry (a Prefect task's `retries`) redoes
  only it: pass what was committed as `done` and it is skipped.

    report = fan_out(fn, [(unit_id, payload), ...], commit, done=already_committed)

`fn(payload)` runs in a Ray worker and returns something picklable; `commit(results)`
gets [(unit_id, value, error)] in the driver, error None for a finished unit. A unit
whose payload is a `BadUnit` (its input could not be read) is quarantined with its reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

Result = tuple[str, Any, "str | None"]


@dataclass(frozen=True)
class BadUnit:
    """A unit whose input could not be read: committed as quarantined with `reason`, never run."""

    reason: str


@dataclass
class FanoutReport:
    units: int = 0  # distinct units asked for
    skipped: int = 0  # committed by an earlier run (`done`)
    committed: int = 0
    quarantined: int = 0  # committed with an error
    chunks: int = 0
    unfinished: list[str] = field(default_factory=list)  # units of chunks that failed past Ray's retries
    errors: list[str] = field(default_factory=list)  # why those chunks failed
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.unfinished


def run_chunk(fn: Callable[[Any], Any], chunk: Sequence[tuple[str, Any]]) -> list[Result]:
    """One chunk's units, each caught on its own: a bad unit quarantines itself, not its chunk."""
    out: list[Result] = []
    for uid, payload in chunk:
        if isinstance(payload, BadUnit):
            out.append((uid, None, payload.reason))
            continue
        try:
            out.append((uid, fn(payload), None))
        except Exception as e:  # noqa: BLE001 - the error is the unit's record
            out.append((uid, None, f"{type(e).__name__}: {e}"))
    return out


def _chunks(units: Iterable[tuple[str, Any]], done: set[str], size: int, report: FanoutReport):
    seen: set[str] = set()
    chunk: list[tuple[str, Any]] = []
    for uid, payload in units:
        if uid in seen:
            continue  # a unit named twice is one unit
        seen.add(uid)
        report.units += 1
        if uid in done:
            report.skipped += 1
            continue
        chunk.append((uid, payload))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def fan_out(fn: Callable[[Any], Any], units: Iterable[tuple[str, Any]], commit: Callable[[list[Result]], None],
            done: Iterable[str] = (), chunk_size: int = 64, max_in_flight: int | None = None,
            max_retries: int = 3, num_cpus: float = 1, progress: Callable[[int], None] | None = None,
            ray_address: str | None = None) -> FanoutReport:
    """Run `fn` over `units` ((id, payload) pairs) as Ray tasks of `chunk_size` units, at most
    `max_in_flight` chunks at once (default: twice the cluster's CPUs), committing each
    chunk's results once through `commit`. `progress(n)` hears of n more units committed."""
    import ray

    from dataengine.cluster import ensure_ray

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    t0 = time.perf_counter()
    resources = ensure_ray(ray_address)
    bound = max_in_flight or max(2, 2 * int(resources.get("CPU", 1)))
    report = FanoutReport()
    done = set(done)
    remote = ray.remote(num_cpus=num_cpus, max_retries=max_retries, retry_exceptions=False)(run_chunk)
    fn_ref = ray.put(fn)  # shipped once, not once per chunk
    pending: dict[Any, list[tuple[str, Any]]] = {}
    source = _chunks(units, done, chunk_size, report)

    def submit() -> bool:
        chunk = next(source, None)
        if chunk is None:
            return False
        pending[remote.remote(fn_ref, chunk)] = chunk
        report.chunks += 1
        return True

    while len(pending) < bound and submit():
        pass
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            chunk = pending.pop(ref)
            try:
                results = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the worker died past its retries, or the node
                report.unfinished += [uid for uid, _ in chunk]
                report.errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            # Chunks are disjoint and a finished ref is read once: each unit lands here once.
            commit(results)
            report.committed += len(results)
            report.quarantined += sum(r[2] is not None for r in results)
            if progress:
                progress(len(results))
            submit()
    report.seconds = round(time.perf_counter() - t0, 3)
    return report

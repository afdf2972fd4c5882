"""Several processes write the catalog at once on a loaded machine: count the rows lost.

Each round starts `--procs` writer processes that upsert `--rows` job rows each (one
connection per row, a read between), while `--hogs` busy processes load the CPUs; then
it counts the committed rows the catalog is missing and the writers that failed. `--without-lock-file`
runs the writers with the catalog's lock file turned off (DuckDB's own lock alone), the
baseline the lock file was added against.

    .venv/bin/python benchmarks/catalog_writers.py --rounds 20
    .venv/bin/python benchmarks/catalog_writers.py --rounds 20 --without-lock-file
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataengine.catalog import Catalog, LockRetry  # noqa: E402
from dataengine.schema import JOBS  # noqa: E402
from dataengine.workspace import Workspace  # noqa: E402


class _NoLock:
    def acquire(self, *args, **kwargs) -> int:
        return 0

    def release(self) -> None:
        pass


def _writer(root: str, proc: int, rows: int, lock_file: bool, committed) -> None:
    if not lock_file:
        import dataengine.catalog as catalog

        catalog.ProcessLock.at = classmethod(lambda cls, path: _NoLock())
    cat = Catalog(Workspace.at(root), LockRetry(timeout_s=300))
    now = dt.datetime.now(dt.timezone.utc)
    for j in range(rows):
        row = dict(job_id=f"p{proc}-j{j}", kind="bench", status="queued", trigger="bench", params="{}",
                   result=None, created_at=now, updated_at=now)
        cat.upsert("jobs", pa.Table.from_pylist([row], schema=JOBS))
        committed[proc] = j + 1  # upsert returned: the row is committed
        cat.query("SELECT count(*) FROM jobs")


def _hog() -> None:
    while True:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--hogs", type=int, default=2, help="busy processes beside the writers")
    ap.add_argument("--without-lock-file", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep each round's workspace (paths are printed)")
    args = ap.parse_args()

    ctx = mp.get_context("spawn")
    hogs = [ctx.Process(target=_hog, daemon=True) for _ in range(args.hogs)]
    for h in hogs:
        h.start()
    lost_rounds = failed_rounds = lost_rows = 0
    t0 = time.perf_counter()
    try:
        for r in range(args.rounds):
            ws = Workspace.at(tempfile.mkdtemp(prefix="bench-catalog-"))
            Catalog(ws).migrate()
            committed = ctx.Array("i", args.procs)
            procs = [ctx.Process(target=_writer, args=(str(ws.root), i, args.rows, not args.without_lock_file,
                                                       committed)) for i in range(args.procs)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            failed = sum(p.exitcode != 0 for p in procs)
            want = {f"p{i}-j{j}" for i in range(args.procs) for j in range(committed[i])}
            try:
                got = set(Catalog(ws).query("SELECT job_id FROM jobs")["job_id"].to_pylist())
            except Exception as e:  # a broken file is a loss too
                print(f"round {r}: catalog unreadable: {e}", flush=True)
                got = set()
            lost = len(want - got)
            lost_rounds += bool(lost)
            failed_rounds += bool(failed)
            lost_rows += lost
            print(f"round {r}: {failed} writers failed, {lost} of {len(want)} committed rows missing"
                  + (f" ({ws.root})" if args.keep else ""), flush=True)
            if not args.keep:
                shutil.rmtree(ws.root, ignore_errors=True)
    finally:
        for h in hogs:
            h.terminate()
    mode = "DuckDB's lock alone" if args.without_lock_file else "with the lock file"
    print(f"catalog writers ({mode}): {failed_rounds}/{args.rounds} rounds with a failed writer, "
          f"{lost_rounds}/{args.rounds} rounds with committed rows missing ({lost_rows} rows), "
          f"{time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()

"""Catalog: every table queryable by name, migrations, and several writers at once."""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import subprocess
import sys
import textwrap
import time

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import good_sample
from dataengine import lake
from dataengine.catalog import Catalog, CatalogBusy, LockRetry
from dataengine.ingest import IngestConfig, ingest
from dataengine.schema import ALL_TABLES, FEEDBACK, JOBS
from dataengine.shards import write_shards
from dataengine.workspace import Workspace


def test_every_design_table_is_queryable_by_name_in_the_file(ws):
    # What a DuckDB shell does: the views name lake paths relative to the workspace.
    con = duckdb.connect(str(ws.catalog_path), read_only=True, config={"file_search_path": str(ws.root)})
    try:
        for name in ALL_TABLES:
            con.execute(f"SELECT * FROM {name} LIMIT 0")
        names = {r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables").fetchall()}
    finally:
        con.close()
    for name in ("samples", "quarantine", "embeddings", "pairs", "feedback", "triage",
                 "reviews", "patches", "jobs", "model_versions", "shards"):
        assert name in names


def test_migrate_adds_missing_columns_and_lake_schema(ws, catalog):
    with catalog.transaction() as con:
        con.execute("ALTER TABLE jobs DROP COLUMN result")
    old = FEEDBACK.remove(FEEDBACK.get_field_index("comment"))
    pq.write_table(old.empty_table(), ws.lake / "feedback" / "_schema.parquet")
    # A part written by an older version, without the new column.
    pq.write_table(pa.table({n: pa.array([None], old.field(n).type) for n in old.names})
                   .set_column(0, "feedback_id", pa.array(["f1"])), ws.lake / "feedback" / "old.parquet")
    catalog.migrate()
    cols = catalog.query("SELECT * FROM jobs LIMIT 0").column_names
    assert "result" in cols
    rows = catalog.query("SELECT feedback_id, comment FROM feedback").to_pylist()
    assert rows == [{"feedback_id": "f1", "comment": None}]


def test_lake_write_is_schema_checked_and_leaves_no_temp_files(ws):
    with pytest.raises(ValueError, match="feedback.*missing columns"):
        lake.write_part(ws.lake, "feedback", pa.table({"feedback_id": ["x"]}))
    assert not list(ws.lake.rglob("*.tmp"))


def _hold_lock(path: str, seconds: float) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import duckdb, sys, time
        con = duckdb.connect({path!r})
        print("held", flush=True)
        time.sleep({seconds})
        con.close()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_lock_conflict_is_waited_out(ws):
    holder = _hold_lock(str(ws.catalog_path), 1.0)
    cat = Catalog(ws, LockRetry(timeout_s=30))
    t0 = time.monotonic()
    assert cat.counts()["samples"] == 0
    assert cat.lock_waits > 0 and time.monotonic() - t0 > 0.3
    holder.wait()


def test_lock_held_too_long_raises_catalog_busy(ws):
    holder = _hold_lock(str(ws.catalog_path), 3.0)
    with pytest.raises(CatalogBusy, match="stayed locked"):
        Catalog(ws, LockRetry(timeout_s=0.3)).counts()
    holder.wait()


def test_retry_until_retries_only_what_it_is_told_and_gives_up_at_the_deadline():
    from dataengine.catalog_lock import retry_until

    busy = lambda e: isinstance(e, BlockingIOError)  # noqa: E731
    tries, waits = [], []

    def twice_busy():
        tries.append(1)
        if len(tries) < 3:
            raise BlockingIOError
        return "got it"

    far = time.monotonic() + 30
    assert retry_until(twice_busy, busy, far, 0.001, 0.002, on_wait=lambda: waits.append(1)) == "got it"
    assert (len(tries), len(waits)) == (3, 2)
    with pytest.raises(ValueError):  # another error is raised at once, not waited on
        retry_until(lambda: int("x"), busy, far, 10.0, 10.0)

    def always_busy():
        raise BlockingIOError

    t0 = time.monotonic()
    with pytest.raises(BlockingIOError):
        retry_until(always_busy, busy, t0 + 0.2, 0.01, 0.05)
    assert 0.2 <= time.monotonic() - t0 < 2.0


def _try_lock_file(path: str, exclusive: bool) -> bool:
    """Whether another process could take the catalog's lock file right now."""
    code = textwrap.dedent(f"""
        import fcntl, os, sys
        fd = os.open({path!r}, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, {"fcntl.LOCK_EX" if exclusive else "fcntl.LOCK_SH"} | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit(3)
    """)
    rc = subprocess.run([sys.executable, "-c", code]).returncode
    assert rc in (0, 3), rc
    return rc == 0


def test_an_open_holds_the_lock_file_until_its_close_has_returned(ws, catalog, monkeypatch):
    lock = str(ws.catalog_path) + ".lock"
    closed = []
    real_close = duckdb.DuckDBPyConnection.close

    def close_then_probe(con):  # still inside Catalog.connect's close: no other process may be in
        real_close(con)
        closed.append(_try_lock_file(lock, exclusive=False))

    with catalog.transaction() as con:
        con.execute("SELECT 1")
        assert not _try_lock_file(lock, exclusive=False)  # a writer shuts readers out
    with catalog.connect(read_only=True):
        assert _try_lock_file(lock, exclusive=False)  # readers share
        assert not _try_lock_file(lock, exclusive=True)
    monkeypatch.setattr(duckdb.DuckDBPyConnection, "close", close_then_probe)
    catalog.upsert("jobs", pa.Table.from_pylist([_job("j1")], schema=JOBS))
    monkeypatch.undo()
    assert closed == [False]
    assert _try_lock_file(lock, exclusive=True)  # and let go once closed


def test_a_reader_that_cannot_write_the_workspace_still_reads(ws, catalog, monkeypatch):
    import errno
    import os

    real_open = os.open

    def read_only_mount(path, flags, *args):
        if str(path).endswith(".lock") and flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only_mount)
    assert catalog.counts()["jobs"] == 0  # no lock file yet: DuckDB's lock alone
    monkeypatch.undo()
    catalog.upsert("jobs", pa.Table.from_pylist([_job("j1")], schema=JOBS))  # makes the lock file
    monkeypatch.setattr(os, "open", read_only_mount)
    with catalog.connect(read_only=True):  # holds it shared through a read-only descriptor
        assert not _try_lock_file(str(ws.catalog_path) + ".lock", exclusive=True)
    with pytest.raises(OSError, match="Read-only"):
        catalog.upsert("jobs", pa.Table.from_pylist([_job("j2")], schema=JOBS))


def test_threads_of_one_process_write_at_once_without_waiting_for_each_other(ws, catalog):
    # DuckDB shares one database between a process's connections, so the lock file is
    # counted per process: a lock per connection would make the second writer wait.
    import threading

    order: list[str] = []
    writing = threading.Event()

    def slow_writer():
        with catalog.transaction() as con:
            catalog.upsert("jobs", pa.Table.from_pylist([_job("slow")], schema=JOBS), con)
            writing.set()
            time.sleep(1.0)
            order.append("slow committed")

    t = threading.Thread(target=slow_writer)
    t.start()
    writing.wait()
    catalog.upsert("jobs", pa.Table.from_pylist([_job("quick")], schema=JOBS))
    order.append("quick committed")
    t.join()
    assert order == ["quick committed", "slow committed"]
    assert sorted(catalog.query("SELECT job_id FROM jobs")["job_id"].to_pylist()) == ["quick", "slow"]


def _job(job_id: str) -> dict:
    now = dt.datetime.now(dt.timezone.utc)
    return dict(job_id=job_id, kind="retrain-dit", status="queued", trigger="test", params="{}", result=None,
                created_at=now, updated_at=now)


# ---------------------------------------------------------------------------------------
# Several processes writing at once
# ---------------------------------------------------------------------------------------

N_PROC, N_JOBS, N_SHARDS = 4, 25, 2


def _writer(root: str, shard_dir: str, i: int) -> None:
    ws = Workspace.at(root)
    cat = Catalog(ws, LockRetry(timeout_s=120))
    for j in range(N_JOBS):
        cat.upsert("jobs", pa.Table.from_pylist([_job(f"p{i}-j{j}")], schema=JOBS))
        if j == N_JOBS // 2:
            ingest(ws, [shard_dir], IngestConfig(use_ray=False), cat)


def test_four_processes_write_at_once_nothing_lost_or_duplicated(ws, tmp_path):
    dirs = []
    for i in range(N_PROC):
        d = tmp_path / f"p{i}"
        samples = [good_sample(f"p{i}-s{k}") for k in range(10)] + [good_sample("shared-key")]
        write_shards(samples, d, f"p{i}", maxcount=6)
        dirs.append(str(d))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(ws.root), dirs[i], i)) for i in range(N_PROC)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    cat = Catalog(ws)
    jobs = cat.query("SELECT job_id FROM jobs")["job_id"].to_pylist()
    assert sorted(jobs) == sorted(f"p{i}-j{j}" for i in range(N_PROC) for j in range(N_JOBS))
    keys = cat.query("SELECT key FROM samples")["key"].to_pylist()
    assert len(keys) == len(set(keys)), "a key was accepted twice"
    assert set(keys) == {f"p{i}-s{k}" for i in range(N_PROC) for k in range(10)} | {"shared-key"}
    dup = cat.query("SELECT key, reason FROM quarantine").to_pylist()
    assert [d["key"] for d in dup] == ["shared-key"] * (N_PROC - 1)
    assert all(d["reason"].startswith("duplicate key: already ingested from") for d in dup)
    totals = cat.query("SELECT sum(read) r, sum(accepted) a, sum(quarantined) q FROM shards").to_pylist()[0]
    assert totals == {"r": N_PROC * 11, "a": len(keys), "q": N_PROC - 1}


def test_a_copied_workspace_reads_its_own_lake(ws, catalog, tmp_path):
    import shutil

    [url] = write_shards([good_sample(f"k{i}") for i in range(3)], tmp_path / "src", "c", 10)
    ingest(ws, [url], IngestConfig(use_ray=False), catalog)
    copy = Workspace.at(tmp_path / "copy")
    shutil.copytree(ws.root, copy.root)
    # Change the original after the copy: the copy must not see it.
    [url2] = write_shards([good_sample(f"n{i}") for i in range(2)], tmp_path / "src2", "d", 10)
    ingest(ws, [url2], IngestConfig(use_ray=False), catalog)
    assert Catalog(copy).counts()["samples"] == 3
    shutil.rmtree(ws.root)
    assert Catalog(copy).counts()["samples"] == 3

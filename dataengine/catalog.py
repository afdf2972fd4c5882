"""The DuckDB catalog: views over the Parquet lake plus small mutable tables.

DuckDB lets one process hold a database file at a time (measured with 2.0.1: while one
process has it open read-write, every other open fails, read-only too). So the catalog
is opened per operation, for as short as possible, and an open that meets a lock is
retried with jittered exponential back-off until `lock_timeout_s`. Every open holds the
lock file beside the catalog (`catalog_lock`) until its close has returned: DuckDB's own
lock let a second process in before the first had finished closing. Bulk rows never go
through the catalog file: they are Parquet parts in the lake, seen through views.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterator

import duckdb
import pyarrow as pa

from dataengine import lake
from dataengine.catalog_lock import LockTimeout, ProcessLock, retry_until
from dataengine.schema import CATALOG_TABLES, CATALOG_VIEWS, LAKE_TABLES, conform
from dataengine.workspace import Workspace

SCHEMA_VERSION = 5  # 2: quarantine.stage; 3: quarantine members, offsets, sizes, model_id;
# 4: the feedback contract, quarantine.raw, remedies; 5: users, claims, reviews as events

_DUCK_TYPES = {
    pa.string(): "VARCHAR",
    pa.int64(): "BIGINT",
    pa.int32(): "INTEGER",
    pa.int8(): "TINYINT",
    pa.float64(): "DOUBLE",
    pa.float32(): "FLOAT",
    pa.bool_(): "BOOLEAN",
}


class CatalogBusy(TimeoutError):
    """Another process held the catalog for longer than the lock timeout."""


class CatalogMissing(FileNotFoundError):
    """The workspace has no catalog yet (run `dataengine init`)."""


@dataclass(frozen=True)
class LockRetry:
    timeout_s: float = 120.0
    first_wait_s: float = 0.005
    max_wait_s: float = 0.5


LOCK_FILE_POLL_S = 0.01  # the longest wait between tries of the lock file


_DUCK_OPEN_ERRORS = (duckdb.IOException, duckdb.ConnectionException)


def _is_lock_conflict(err: Exception) -> bool:
    if not isinstance(err, _DUCK_OPEN_ERRORS):
        return False
    msg = str(err)
    # Another process holds the file, or another thread of this one holds it open read-write
    # while we ask read-only (or the other way round): both clear when that connection closes.
    return ("lock" in msg.lower() and ("Could not set lock" in msg or "Conflicting lock" in msg)) or \
        "different configuration than existing connections" in msg


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    if pa.types.is_list(t):
        return f"{_duck_type(t.value_type)}[]"
    try:
        return _DUCK_TYPES[t]
    except KeyError:
        raise TypeError(f"no DuckDB type for {t}") from None


class Catalog:
    """Opens catalog.duckdb for one short operation at a time, retrying lock conflicts."""

    def __init__(self, workspace: Workspace, retry: LockRetry | None = None):
        self.ws = workspace
        self.retry = retry or LockRetry()
        self.lock_waits = 0  # how many opens met a lock; for stats and tests

    # -- connections -----------------------------------------------------------------

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection held only for the `with` block."""
        if read_only and not self.ws.catalog_path.exists():
            raise CatalogMissing(f"no catalog at {self.ws.catalog_path}; run `dataengine init`")
        lock = ProcessLock.at(self.ws.catalog_path.with_name(self.ws.catalog_path.name + ".lock"))
        deadline = time.monotonic() + self.retry.timeout_s
        try:
            # Polled every few ms, not backed off like DuckDB's open: a process that writes in a
            # loop releases the file for moments only, and long sleeps left it all the work.
            self.lock_waits += lock.acquire(not read_only, deadline, self.retry.first_wait_s,
                                            min(self.retry.max_wait_s, LOCK_FILE_POLL_S))
        except LockTimeout as e:
            raise CatalogBusy(f"{self.ws.catalog_path} stayed locked for {self.retry.timeout_s:.0f}s: {e}") from e
        try:
            con = self._open(read_only, deadline)
            try:
                yield con
            finally:
                con.close()  # the shutdown checkpoint runs here, still under the lock
        finally:
            lock.release()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Read-write connection in one transaction: committed on success, rolled back on error."""
        with self.connect(read_only=False) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def _open(self, read_only: bool, deadline: float) -> duckdb.DuckDBPyConnection:
        def count_wait() -> None:
            self.lock_waits += 1

        try:
            # The views name lake paths relative to the workspace (see `migrate`).
            return retry_until(lambda: duckdb.connect(str(self.ws.catalog_path), read_only=read_only,
                                                      config={"file_search_path": str(self.ws.root)}),
                               _is_lock_conflict, deadline, self.retry.first_wait_s, self.retry.max_wait_s,
                               on_wait=count_wait)
        except _DUCK_OPEN_ERRORS as e:
            if not _is_lock_conflict(e):
                raise
            raise CatalogBusy(f"{self.ws.catalog_path} stayed locked for {self.retry.timeout_s:.0f}s: {e}") from e

    # -- schema ----------------------------------------------------------------------

    def migrate(self) -> int:
        """Create or bring up to date every table and view; idempotent. Returns the version."""
        self.ws.create_dirs()
        lake.ensure_tables(self.ws.lake)
        with self.transaction() as con:
            con.execute("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"catalog schema v{version} is newer than this dataengine (v{SCHEMA_VERSION})"
                )
            for name, (schema, pkey) in CATALOG_TABLES.items():
                self._sync_table(con, name, schema, pkey)
            for name in LAKE_TABLES:
                # Relative to the workspace, which every connection sets as DuckDB's
                # file_search_path: a copied or moved workspace reads its own lake, not the
                # original's. (A DuckDB shell: `SET file_search_path = '<workspace>'`, or
                # start it in the workspace.)
                glob = lake.table_glob(self.ws.lake, name)
                glob = str(Path(glob).relative_to(self.ws.root)).replace("'", "''")
                con.execute(
                    f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM "
                    f"read_parquet('{glob}', union_by_name = true)"
                )
            for name, sql in CATALOG_VIEWS.items():
                con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
            if version < 5:  # the queue table is new: fill it from the triage already in the lake
                from dataengine.review_queue import refresh_queue

                refresh_queue(self, None, con)
            for key, value in (("schema_version", str(SCHEMA_VERSION)), ("root", str(self.ws.root))):
                con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, value])
        return SCHEMA_VERSION

    @staticmethod
    def _sync_table(con, name: str, schema: pa.Schema, pkey: tuple[str, ...]) -> None:
        cols = ", ".join(f"{f.name} {_duck_type(f.type)}" for f in schema)
        key = f", PRIMARY KEY ({', '.join(pkey)})" if pkey else ""
        con.execute(f"CREATE TABLE IF NOT EXISTS {name} ({cols}{key})")
        have = {r[0] for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [name]
        ).fetchall()}
        for f in schema:  # additive migrations: new columns arrive as NULL in old rows
            if f.name not in have:
                con.execute(f"ALTER TABLE {name} ADD COLUMN {f.name} {_duck_type(f.type)}")

    # -- reads and writes ------------------------------------------------------------

    def query(self, sql: str, params: list[Any] | None = None) -> pa.Table:
        """Run a read-only query and return an Arrow table."""
        with self.connect(read_only=True) as con:
            return con.sql(sql, params=params).to_arrow_table()

    def upsert(self, name: str, rows: pa.Table, con: duckdb.DuckDBPyConnection | None = None) -> int:
        """Insert or replace rows (by primary key) of a catalog table; returns the row count."""
        schema, pkey = CATALOG_TABLES[name]
        if not pkey:
            raise ValueError(f"catalog table {name!r} has no primary key to upsert by")
        rows = conform(rows, schema, name)
        if con is None:
            with self.transaction() as own:
                return self.upsert(name, rows, own)
        con.register("_rows", rows)
        try:
            con.execute(f"INSERT OR REPLACE INTO {name} SELECT * FROM _rows")
        finally:
            con.unregister("_rows")
        return rows.num_rows

    def counts(self) -> dict[str, int]:
        """Row count of every table and view."""
        with self.connect(read_only=True) as con:
            return {
                name: con.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
                for name in (*LAKE_TABLES, *CATALOG_TABLES)
            }

"""The Parquet lake: one folder per table, files written whole and renamed into place.

A reader never sees a half-written file: a part is written to `NAME.parquet.tmp` in the
same folder (so the rename stays on one file system) and then renamed over
`NAME.parquet`, which is atomic on POSIX. Rewriting a part under the same name replaces
it whole, which is what makes re-ingesting a shard idempotent.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dataengine.schema import LAKE_TABLES, conform

SCHEMA_PART = "_schema"  # an empty file that gives each table's view its full schema
_PART_RE = re.compile(r"^[A-Za-z0-9_.=-]+$")


def table_dir(lake: Path, name: str) -> Path:
    if name not in LAKE_TABLES:
        raise KeyError(f"unknown lake table {name!r}; known: {sorted(LAKE_TABLES)}")
    return lake / name


def table_glob(lake: Path, name: str) -> str:
    return str(table_dir(lake, name) / "*.parquet")


def ensure_tables(lake: Path) -> None:
    """Create each table's folder and (re)write its schema part when the schema changed."""
    for name, schema in LAKE_TABLES.items():
        d = table_dir(lake, name)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{SCHEMA_PART}.parquet"
        if path.exists() and pq.read_schema(path).remove_metadata().equals(schema):
            continue
        _atomic_write(schema.empty_table(), path)


def write_part(lake: Path, name: str, table: pa.Table, part: str | None = None) -> Path:
    """Write `table` as one part of lake table `name` (schema-checked); returns its path."""
    part = part or uuid.uuid4().hex
    if not _PART_RE.match(part) or part == SCHEMA_PART:
        raise ValueError(f"bad part name {part!r}")
    table = conform(table, LAKE_TABLES[name], name)
    path = table_dir(lake, name) / f"{part}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)  # a table newer than this workspace's migration
    _atomic_write(table, path)
    return path


def _atomic_write(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

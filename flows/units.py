"""A stage of many small units as one coarse Prefect task over Ray (dataengine/fanout.py).

    report = units_flow(root, "degrade-captions", degrade_one, JsonlUnits("captions.jsonl"))

Units are read inside the task by a small source object (Prefect refuses flow parameters
over 512 KB, and a flow's parameters should name its data, not carry it): `JsonlUnits`
reads one unit per line of a JSONL file; any callable that yields (id, payload) will do.

Each finished unit is a `stage_units` row (stage, unit, done | quarantined, its result as
JSON); a run started again skips the units already there, so a flow killed mid-run and
restarted does only what is left and writes no duplicates. The task retries with back-off
when chunks fail past Ray's own retries (a node lost), redoing only their units.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
from prefect import flow, task
from prefect.cache_policies import NONE

from dataengine.catalog import Catalog
from dataengine.fanout import BadUnit, FanoutReport, Result, fan_out
from dataengine.schema import STAGE_UNITS
from dataengine.workspace import Workspace


Units = Callable[[], Iterable[tuple[str, Any]]]


@dataclass(frozen=True)
class JsonlUnits:
    """One unit per line of a JSONL file: (record[id_field], record). A line that is not a
    JSON object with that field is a unit of its own ("FILE:LINE"), quarantined with why."""

    path: str
    id_field: str = "id"

    def __call__(self) -> Iterator[tuple[str, Any]]:
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{Path(self.path).name}:{n}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, BadUnit(f"{where}: not JSON ({e.msg})")
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get(self.id_field), str) or not rec[self.id_field]:
                    yield where, BadUnit(f"{where}: no string {self.id_field!r} field")
                    continue
                yield rec[self.id_field], rec


class UnfinishedUnits(RuntimeError):
    """Chunks failed past Ray's retries; the task's retry redoes them."""


def finished_units(catalog: Catalog, stage: str) -> set[str]:
    """Units of `stage` committed by any earlier run."""
    rows = catalog.query("SELECT unit FROM stage_units WHERE stage = ?", [stage]).column("unit").to_pylist()
    return set(rows)


def committer(catalog: Catalog, stage: str) -> Callable[[list[Result]], None]:
    """Commit a chunk's results as `stage_units` rows, in one short transaction."""

    def commit(results: list[Result]) -> None:
        now = datetime.now(timezone.utc)
        rows = [{"stage": stage, "unit": uid, "status": "done" if err is None else "quarantined",
                 "result": json.dumps(value if err is None else {"error": err}, default=str), "finished_at": now}
                for uid, value, err in results]
        catalog.upsert("stage_units", pa.Table.from_pylist(rows, schema=STAGE_UNITS))

    return commit


@task(cache_policy=NONE, retries=2, retry_delay_seconds=[2, 10])
def run_units(root: str, stage: str, fn: Callable[[Any], Any], units: Units,
              chunk_size: int = 64, max_in_flight: int | None = None, max_retries: int = 3,
              ray_address: str | None = None) -> dict:
    catalog = Catalog(Workspace.at(root))
    catalog.migrate()
    report = fan_out(fn, units(), committer(catalog, stage), done=finished_units(catalog, stage),
                     chunk_size=chunk_size, max_in_flight=max_in_flight, max_retries=max_retries,
                     ray_address=ray_address)
    if not report.complete:
        raise UnfinishedUnits(f"{stage}: {len(report.unfinished)} units in chunks that failed past Ray's retries "
                              f"({report.errors[0]}); a retry redoes only them")
    return _summary(report)


def _summary(report: FanoutReport) -> dict:
    return {k: getattr(report, k) for k in ("units", "skipped", "committed", "quarantined", "chunks",
                                            "seconds")}


@flow(name="dataengine-units", validate_parameters=False)
def units_flow(root: str, stage: str, fn: Callable[[Any], Any], units: Units,
               chunk_size: int = 64, max_in_flight: int | None = None, max_retries: int = 3,
               ray_address: str | None = None) -> dict:
    """`fn` over every unit of `stage` not finished yet, each committed once."""
    return run_units(root, stage, fn, units, chunk_size, max_in_flight, max_retries, ray_address)

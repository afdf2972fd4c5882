"""Feedback intake: failure and rating records -> the `feedback` table, bad ones -> quarantine.

The record is a contract other tools write to (README, "Feedback records"): one JSON
object per failure or rating,

    {"id", "time", "prompt", "enhanced_prompt", "model_version", "image" | "image_b64",
     "task", "source_image", "instruction", "scores", "rating", "comment"}

`validate` turns one raw record into a feedback row or raises `BadRecord` naming the
field; `store` writes a batch: valid rows once per id (a repeat is counted, not stored
again), rejects to quarantine with their raw text, so accepted + duplicates + quarantined
always equals what came in.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import io
import json
import math
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import duckdb
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from dataengine import lake
from dataengine.schema import FEEDBACK, QUARANTINE
from dataengine.workspace import Workspace

FIELDS = ("id", "time", "prompt", "enhanced_prompt", "model_version", "image", "image_b64", "task",
          "source_image", "instruction", "scores", "rating", "comment")
TASKS = ("gen", "edit")
MAX_TEXT = 20_000  # characters: a prompt longer than this is a broken writer, not a prompt


class BadRecord(ValueError):
    """A record that breaks the contract: `field` is the offending field (None: the whole record)."""

    def __init__(self, where: str, field_name: str | None, problem: str):
        self.where, self.field, self.problem = where, field_name, problem
        super().__init__(f"{where}: {field_name + ': ' if field_name else ''}{problem}")


@dataclass
class RawRecord:
    """A record as it arrived: its text (for quarantine), where from, and the parsed object
    (None when the text was not JSON)."""

    origin: str  # FILE:LINE, FILE#ROW, http#N
    text: str
    obj: Any = None
    parse_error: str | None = None
    base: Path | None = None  # relative image paths resolve against this folder


@dataclass
class IntakeReport:
    """What one intake call did with each record it was given."""

    received: int = 0
    accepted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    errors: list[str] = field(default_factory=list)  # one line per quarantined record
    ingest_id: str = ""

    @property
    def balanced(self) -> bool:
        return self.received == self.accepted + self.duplicates + self.quarantined

    def to_dict(self) -> dict:
        return dict(received=self.received, accepted=self.accepted, duplicates=self.duplicates,
                    quarantined=self.quarantined, errors=self.errors, ingest_id=self.ingest_id)

    def merge(self, other: "IntakeReport") -> None:
        self.received += other.received
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        self.quarantined += other.quarantined
        self.errors += other.errors


# ---------------------------------------------------------------------------------------
# One record
# ---------------------------------------------------------------------------------------


def _text(obj: dict, name: str, where: str, required: bool) -> str | None:
    v = obj.get(name)
    if v is None:
        if required:
            raise BadRecord(where, name, "missing (required)")
        return None
    if not isinstance(v, str):
        raise BadRecord(where, name, f"must be a string, got {type(v).__name__}")
    if required and not v.strip():
        raise BadRecord(where, name, "is empty")
    if len(v) > MAX_TEXT:
        raise BadRecord(where, name, f"is {len(v)} characters (limit {MAX_TEXT})")
    if "\x00" in v:
        raise BadRecord(where, name, "contains a NUL character")
    return v


def _time(v: Any, where: str) -> datetime:
    if not isinstance(v, str):
        raise BadRecord(where, "time", f"must be an ISO-8601 string, got {type(v).__name__}")
    try:
        t = datetime.fromisoformat(v.replace("Z", "+00:00") if v.endswith("Z") else v)
    except ValueError:
        raise BadRecord(where, "time", f"{v[:40]!r} is not ISO-8601") from None
    # A time without a zone is taken as UTC: writers that omit it almost always mean UTC.
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _scores(v: Any, where: str) -> str | None:
    if v is None:
        return None
    if not isinstance(v, dict) or not v:
        raise BadRecord(where, "scores", "must be a non-empty object {head: number} or null")
    out = {}
    for head, s in v.items():
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s):
            raise BadRecord(where, "scores", f"{head!r} must be a finite number, got {s!r}")
        out[str(head)] = float(s)
    return json.dumps(out, sort_keys=True)


def _rating(v: Any, where: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or not 1 <= v <= 5:
        raise BadRecord(where, "rating", f"must be an integer 1-5 or null, got {v!r}")
    return int(v)


def _image_ref(v: Any, name: str, where: str, base: Path | None) -> str:
    if not isinstance(v, str) or not v.strip():
        raise BadRecord(where, name, "must be a non-empty path or URI")
    if "://" in v and not v.startswith("file://"):
        return v  # a remote URI: read when it is needed (it may not be reachable from here)
    p = Path(v.removeprefix("file://")).expanduser()
    if not p.is_absolute():
        if base is None:
            raise BadRecord(where, name, f"relative path {v!r} has no folder to resolve against")
        p = base / p
    if not p.is_file():
        raise BadRecord(where, name, f"no such file: {p}")
    return str(p.resolve())


def _save_b64(v: Any, where: str, ws: Workspace) -> str:
    if not isinstance(v, str) or not v:
        raise BadRecord(where, "image_b64", "must be a non-empty base64 string")
    try:
        data = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise BadRecord(where, "image_b64", "is not valid base64") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
            fmt = (im.format or "png").lower()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise BadRecord(where, "image_b64", f"does not decode to an image ({e})") from None
    # Named by content: the same image sent twice is one file.
    path = feedback_dir(ws) / "images" / f"{hashlib.sha1(data).hexdigest()}.{fmt}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return str(path)


def validate(raw: RawRecord, ws: Workspace, ingest_id: str = "", now: datetime | None = None) -> dict:
    """The feedback row of one raw record, or `BadRecord` naming where and which field."""
    if raw.parse_error is not None:
        raise BadRecord(raw.origin, None, f"not JSON ({raw.parse_error})")
    obj = raw.obj
    if not isinstance(obj, dict):
        raise BadRecord(raw.origin, None, f"must be a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    if not isinstance(rid, str) or not rid.strip() or len(rid) > 256:
        raise BadRecord(raw.origin, "id", "must be a non-empty string of at most 256 characters")
    where = f"{raw.origin} (id {rid!r})"
    task = obj.get("task")
    if task not in TASKS:
        raise BadRecord(where, "task", f"must be one of {TASKS}, got {task!r}")
    has_path, has_b64 = obj.get("image") is not None, obj.get("image_b64") is not None
    if has_path == has_b64:
        raise BadRecord(where, "image", "give exactly one of image (path or URI) and image_b64")
    row = dict(
        feedback_id=rid,
        time=_time(obj.get("time"), where),
        prompt=_text(obj, "prompt", where, required=True),
        enhanced_prompt=_text(obj, "enhanced_prompt", where, required=False),
        model_version=_text(obj, "model_version", where, required=True),
        task=task,
        instruction=_text(obj, "instruction", where, required=False),
        scores=_scores(obj.get("scores"), where),
        rating=_rating(obj.get("rating"), where),
        comment=_text(obj, "comment", where, required=False),
    )
    source = obj.get("source_image")
    if task == "edit":
        if source is None or row["instruction"] is None:
            raise BadRecord(where, "source_image" if source is None else "instruction",
                            "an edit needs source_image and instruction")
        row["source_image_ref"] = _image_ref(source, "source_image", where, raw.base)
    else:
        row["source_image_ref"] = None
    row["image_ref"] = (_image_ref(obj["image"], "image", where, raw.base) if has_path
                        else _save_b64(obj["image_b64"], where, ws))
    extra = {k: v for k, v in obj.items() if k not in FIELDS}
    row.update(extra=json.dumps(extra, sort_keys=True, default=str) if extra else None,
               origin=raw.origin, ingest_id=ingest_id, received_at=now or datetime.now(timezone.utc))
    return row


# ---------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------


def feedback_dir(ws: Workspace) -> Path:
    return ws.root / "feedback"


@contextmanager
def _intake_lock(ws: Workspace) -> Iterator[None]:
    """One writer at a time decides which ids are new (a watcher and a server may both run)."""
    path = feedback_dir(ws) / ".intake.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def stored_ids(ws: Workspace, ids: Iterable[str]) -> set[str]:
    """Which of `ids` the feedback table already holds (read from the lake's Parquet parts)."""
    ids = list(set(ids))
    if not ids or not any(lake.table_dir(ws.lake, "feedback").glob("*.parquet")):
        return set()
    con = duckdb.connect()
    try:
        con.register("_ids", pa.table({"id": ids}))
        rows = con.execute(
            f"SELECT DISTINCT f.feedback_id FROM read_parquet('{lake.table_glob(ws.lake, 'feedback')}', "
            "union_by_name = true) f JOIN _ids ON f.feedback_id = _ids.id"
        ).fetchall()
    finally:
        con.close()
    return {r[0] for r in rows}


def store(ws: Workspace, records: Iterable[RawRecord]) -> IntakeReport:
    """Validate and store a batch: new ids to `feedback`, repeats counted, rejects to quarantine."""
    ingest_id = uuid.uuid4().hex
    now = datetime.now(timezone.utc)
    report = IntakeReport(ingest_id=ingest_id)
    rows, bad = [], []
    for raw in records:
        report.received += 1
        try:
            rows.append(validate(raw, ws, ingest_id, now))
        except BadRecord as e:
            report.errors.append(str(e))
            obj = raw.obj if isinstance(raw.obj, dict) else {}
            bad.append(dict(shard=raw.origin.rpartition(":")[0] or raw.origin, shard_uid=None,
                            key=str(obj.get("id")) if obj.get("id") is not None else raw.origin,
                            reason=f"feedback: {e.field or 'record'}: {e.problem}",
                            fields=sorted(map(str, obj)), ingest_id=ingest_id, ingested_at=now,
                            stage="feedback", raw=raw.text))
    with _intake_lock(ws):
        seen = stored_ids(ws, [r["feedback_id"] for r in rows])
        fresh = []
        for r in rows:
            if r["feedback_id"] in seen:
                report.duplicates += 1
            else:
                seen.add(r["feedback_id"])
                fresh.append(r)
        if fresh:
            lake.write_part(ws.lake, "feedback", pa.Table.from_pylist(fresh, schema=FEEDBACK),
                            part=f"feedback-{ingest_id}")
        if bad:
            lake.write_part(ws.lake, "quarantine", pa.Table.from_pylist(bad, schema=QUARANTINE),
                            part=f"feedback-{ingest_id}")
    report.accepted, report.quarantined = len(fresh), len(bad)
    assert report.balanced, report
    return report

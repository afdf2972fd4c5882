"""The curators' review of triaged failures: claims, verdicts as append-only events, undo,
bulk verdicts, and the paged queue the dashboard shows.

- A curator claims an item before reviewing it; the claim lapses after `ttl_s`, so an
  abandoned item returns to the queue. Claims and verdicts are written in one catalog
  transaction that checks who holds the item, so two curators never review it at once.
- A verdict is a `reviews` row, never changed or deleted. Its `review_id` is chosen by the
  client once per action (the dashboard: one per form it shows), so a verdict sent twice
  (a double click, a retried request) is stored and applied once. An undo is a row of its
  own naming the verdict it takes back; the view `review_state` is each item's current
  verdict. The learned triager trains on that view (dataengine/triage_run.py).
- A verdict may also decide the item's remedy (approve, edit, reject) in the same
  transaction, which is what fires retraining (dataengine/triggers.py).

Every write re-reads the acting user's role (dataengine/accounts.require); filters and free
text reach SQL only as bound parameters, and the sort column comes from a fixed list.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Iterable

import pyarrow as pa

from dataengine.accounts import require
from dataengine.catalog import Catalog
from dataengine.remedies import VERDICTS as REMEDY_VERDICTS
from dataengine.remedies import RemedyError, decide_in
from dataengine.schema import CLAIMS, REVIEWS
from dataengine.triage import CAUSES

VERDICTS = ("accept", "reassign", "reject")  # the triaged cause is right / is another / not a failure
CLAIM_TTL_S = 15 * 60
# Streamlit serves every session from threads of one process, which share one DuckDB
# instance: two transactions there conflict instead of waiting on the file lock.
_WRITES = threading.Lock()


class ReviewError(ValueError):
    """A review that cannot be applied; the message says which item and why."""


class ClaimTaken(ReviewError):
    """Another curator holds the item."""


def new_review_id() -> str:
    return uuid.uuid4().hex


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _write(catalog: Catalog, fn):
    """`fn(con)` in one transaction, serialised with this process's other review writes
    (other processes wait on the catalog's file lock)."""
    with _WRITES, catalog.transaction() as con:
        return fn(con)


def _one(con, sql: str, params: list) -> dict | None:
    rows = con.sql(sql, params=params).to_arrow_table().to_pylist()
    return rows[0] if rows else None


def _live_claim(con, feedback_id: str, now: datetime) -> dict | None:
    return _one(con, "SELECT * FROM claims WHERE feedback_id = ? AND expires_at > ?", [feedback_id, now])


def _current(con, feedback_id: str) -> dict | None:
    return _one(con, "SELECT * FROM review_state WHERE feedback_id = ?", [feedback_id])


def _triaged(con, feedback_id: str) -> bool:
    return con.execute("SELECT count(*) FROM queue WHERE feedback_id = ?", [feedback_id]).fetchall()[0][0] > 0


def _claim_in(catalog: Catalog, con, feedback_id: str, username: str, ttl_s: float, now: datetime) -> dict:
    if not _triaged(con, feedback_id):
        raise ReviewError(f"{feedback_id}: no triaged failure by that id")
    held = _live_claim(con, feedback_id, now)
    if held and held["curator"] != username:
        raise ClaimTaken(f"{feedback_id}: claimed by {held['curator']} until {held['expires_at']:%H:%M:%S} UTC")
    done = _current(con, feedback_id)
    if done:
        raise ReviewError(f"{feedback_id}: already reviewed ({done['verdict']} by {done['curator']}); undo it first")
    row = {"feedback_id": feedback_id, "curator": username, "claimed_at": now,
           "expires_at": now + timedelta(seconds=ttl_s)}
    catalog.upsert("claims", pa.Table.from_pylist([row], schema=CLAIMS), con)
    return row


def claim(catalog: Catalog, feedback_id: str, username: str, ttl_s: float = CLAIM_TTL_S) -> dict:
    """Hold an unreviewed item for `ttl_s` seconds (renewing one's own claim); ClaimTaken if
    another curator holds it."""
    def run(con):
        require(catalog, username, "curator", con)
        return _claim_in(catalog, con, feedback_id, username, ttl_s, _now())
    return _write(catalog, run)


def release(catalog: Catalog, feedback_id: str, username: str) -> None:
    def run(con):
        require(catalog, username, "curator", con)
        con.execute("DELETE FROM claims WHERE feedback_id = ? AND curator = ?", [feedback_id, username])
    _write(catalog, run)


@dataclass
class Verdict:
    feedback_id: str
    verdict: str  # accept | reassign | reject
    cause: str | None = None  # reassign: the right cause
    note: str | None = None
    remedy_verdict: str | None = None  # approve | reject | edit the item's remedy, or leave it
    remedy_edit: dict | None = None
    review_id: str = field(default_factory=new_review_id)

    def check(self) -> None:
        fid = self.feedback_id
        if self.verdict not in VERDICTS:
            raise ReviewError(f"{fid}: verdict must be one of {VERDICTS}, got {self.verdict!r}")
        if self.verdict == "reassign" and self.cause not in CAUSES:
            raise ReviewError(f"{fid}: reassign needs a cause in {CAUSES}, got {self.cause!r}")
        if self.remedy_verdict is not None and self.remedy_verdict not in REMEDY_VERDICTS:
            raise ReviewError(f"{fid}: remedy verdict must be one of {REMEDY_VERDICTS}, got {self.remedy_verdict!r}")


def remedy_of(con, feedback_id: str) -> dict | None:
    """The newest remedy that answers this failure."""
    return _one(con, "SELECT * FROM remedies WHERE list_contains(feedback_ids, ?) ORDER BY created_at DESC LIMIT 1",
                [feedback_id])


def _submit_in(catalog: Catalog, con, v: Verdict, username: str, now: datetime,
               need_claim: bool = True) -> tuple[dict, bool]:
    same = _one(con, "SELECT * FROM reviews WHERE review_id = ?", [v.review_id])
    if same:
        return same, False  # sent before: stored and applied once
    v.check()
    held = _live_claim(con, v.feedback_id, now)
    if need_claim and (not held or held["curator"] != username):
        who = f"it is claimed by {held['curator']}" if held else "the claim lapsed or was never made"
        raise ClaimTaken(f"{v.feedback_id}: {username} does not hold this item ({who}); claim it again")
    done = _current(con, v.feedback_id)
    if done:
        raise ReviewError(f"{v.feedback_id}: already reviewed ({done['verdict']} by {done['curator']})")
    remedy_id = None
    if v.remedy_verdict:
        remedy = remedy_of(con, v.feedback_id)
        if remedy is None:
            raise ReviewError(f"{v.feedback_id}: no remedy answers this failure yet")
        remedy_id = remedy["remedy_id"]
        try:
            decide_in(catalog, con, remedy_id, v.remedy_verdict, username, v.note, v.remedy_edit)
        except RemedyError as e:
            raise ReviewError(f"{v.feedback_id}: {e}") from e
    row = {"review_id": v.review_id, "feedback_id": v.feedback_id, "verdict": v.verdict,
           "cause": v.cause if v.verdict == "reassign" else None, "curator": username, "note": v.note,
           "reviewed_at": now, "remedy_id": remedy_id, "remedy_verdict": v.remedy_verdict,
           "remedy_edit": json.dumps(v.remedy_edit) if v.remedy_edit else None, "undoes": None}
    con.register("_review", pa.Table.from_pylist([row], schema=REVIEWS))
    try:
        con.execute("INSERT INTO reviews SELECT * FROM _review")  # append-only: never OR REPLACE
    finally:
        con.unregister("_review")
    con.execute("DELETE FROM claims WHERE feedback_id = ?", [v.feedback_id])
    return row, True


def submit(catalog: Catalog, v: Verdict, username: str) -> tuple[dict, bool]:
    """Record a verdict on an item the user holds; (the review row, whether this call applied
    it). Resending the same review_id returns the stored row and applies nothing."""
    def run(con):
        require(catalog, username, "curator", con)
        return _submit_in(catalog, con, v, username, _now())
    return _write(catalog, run)


def undo(catalog: Catalog, review_id: str, username: str, note: str | None = None,
         undo_id: str | None = None) -> dict:
    """Take back a verdict: an undo row naming it; its remedy verdict, if the remedy was
    not used yet, goes back to pending. The item returns to the open queue."""
    undo_id = undo_id or new_review_id()

    def run(con):
        require(catalog, username, "curator", con)
        same = _one(con, "SELECT * FROM reviews WHERE review_id = ?", [undo_id])
        if same:
            return same
        target = _one(con, "SELECT * FROM reviews WHERE review_id = ?", [review_id])
        if target is None or target["verdict"] == "undo":
            raise ReviewError(f"no verdict {review_id!r} to undo")
        if _one(con, "SELECT 1 AS x FROM reviews WHERE verdict = 'undo' AND undoes = ?", [review_id]):
            raise ReviewError(f"{target['feedback_id']}: verdict {review_id} was undone already")
        if target["remedy_id"]:
            remedy = _one(con, "SELECT status, job_id FROM remedies WHERE remedy_id = ?", [target["remedy_id"]])
            if remedy and remedy["status"] == "used":
                raise ReviewError(f"{target['feedback_id']}: its remedy was used by job {remedy['job_id']}; "
                                  "the verdict can no longer be undone")
            con.execute("UPDATE remedies SET status = 'pending', curator = NULL, decided_at = NULL "
                        "WHERE remedy_id = ?", [target["remedy_id"]])
        row = {"review_id": undo_id, "feedback_id": target["feedback_id"], "verdict": "undo", "cause": None,
               "curator": username, "note": note, "reviewed_at": _now(), "remedy_id": target["remedy_id"],
               "remedy_verdict": None, "remedy_edit": None, "undoes": review_id}
        con.register("_review", pa.Table.from_pylist([row], schema=REVIEWS))
        try:
            con.execute("INSERT INTO reviews SELECT * FROM _review")
        finally:
            con.unregister("_review")
        return row
    return _write(catalog, run)


@dataclass
class BulkReport:
    applied: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # feedback_id -> why


def bulk(catalog: Catalog, feedback_ids: Iterable[str], verdict: str, username: str, cause: str | None = None,
         note: str | None = None, ttl_s: float = CLAIM_TTL_S) -> BulkReport:
    """One verdict on many items in one transaction: each item is claimed and decided in
    turn; one held by another curator or already reviewed is skipped with the reason."""
    ids = list(dict.fromkeys(feedback_ids))
    Verdict("(bulk)", verdict, cause).check()  # a bad verdict fails before any item is claimed

    def run(con):
        require(catalog, username, "curator", con)
        report, now = BulkReport(), _now()
        for fid in ids:
            try:
                _claim_in(catalog, con, fid, username, ttl_s, now)
                _submit_in(catalog, con, Verdict(fid, verdict, cause, note), username, now)
                report.applied += 1
            except ReviewError as e:
                report.skipped[fid] = str(e)
        return report
    return _write(catalog, run)


def history(catalog: Catalog, feedback_id: str) -> list[dict]:
    """Every review event of an item, oldest first: the audit trail."""
    return catalog.query("SELECT * FROM reviews WHERE feedback_id = ? ORDER BY reviewed_at, review_id",
                         [feedback_id]).to_pylist()


# ---------------------------------------------------------------------------------------
# The queue
# ---------------------------------------------------------------------------------------

SORTS = {"confidence": "q.confidence", "age": "q.time", "triaged": "q.triaged_at", "cause": "q.cause",
         "rating": "q.rating"}
STATES = ("open", "claimed", "reviewed", "all")


@dataclass
class QueueFilter:
    causes: tuple[str, ...] = ()  # empty: every cause
    min_confidence: float = 0.0
    max_confidence: float = 1.0
    max_age_days: float | None = None  # the failure's own time
    text: str | None = None  # plain text in the prompt or enhanced prompt (no wildcards)
    state: str = "open"  # open (no verdict, unclaimed or claimed), claimed, reviewed, all

    def where(self, now: datetime) -> tuple[str, list]:
        if self.state not in STATES:
            raise ReviewError(f"state must be one of {STATES}, got {self.state!r}")
        bad = [c for c in self.causes if c not in CAUSES]
        if bad:
            raise ReviewError(f"unknown causes {bad}; choose from {CAUSES}")
        parts, params = ["q.confidence BETWEEN ? AND ?"], [self.min_confidence, self.max_confidence]
        if self.causes:
            parts.append("list_contains(?, q.cause)")
            params.append(list(self.causes))
        if self.max_age_days is not None:
            parts.append("q.time >= ?")
            params.append(now - timedelta(days=self.max_age_days))
        if self.text:
            parts.append("(strpos(lower(q.prompt), lower(?)) > 0 OR strpos(lower(coalesce(q.enhanced_prompt, '')), "
                         "lower(?)) > 0)")
            params += [self.text, self.text]
        parts.append({"open": "q.verdict IS NULL", "claimed": "q.claimed_by IS NOT NULL",
                      "reviewed": "q.verdict IS NOT NULL", "all": "TRUE"}[self.state])
        return " AND ".join(parts), params


QUEUE_SQL = """
WITH q AS (
    SELECT qu.*, s.verdict, s.cause AS reviewed_cause, s.curator AS reviewer,
           c.curator AS claimed_by, c.expires_at AS claim_expires
    FROM queue qu
    LEFT JOIN review_state s USING (feedback_id)
    LEFT JOIN (SELECT * FROM claims WHERE expires_at > ?) c USING (feedback_id))
"""


def queue_page(catalog: Catalog, flt: QueueFilter = QueueFilter(), sort: str = "confidence", descending: bool = True,
               limit: int = 50, offset: int = 0) -> tuple[list[dict], int]:
    """One page of the queue, filtered, sorted and paged in the database; (rows, total)."""
    if sort not in SORTS:
        raise ReviewError(f"sort must be one of {tuple(SORTS)}, got {sort!r}")
    if not 1 <= limit <= 1000 or offset < 0:
        raise ReviewError(f"page of {limit} from {offset}: limit 1-1000, offset >= 0")
    now = _now()
    where, params = flt.where(now)
    order = f"{SORTS[sort]} {'DESC' if descending else 'ASC'} NULLS LAST, q.feedback_id"
    with catalog.connect(read_only=True) as con:  # one open for both: the page and its count agree
        rows = con.sql(QUEUE_SQL + f"SELECT * FROM q WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?",
                       params=[now, *params, limit, offset]).to_arrow_table().to_pylist()
        total = con.sql(QUEUE_SQL + f"SELECT count(*) AS n FROM q WHERE {where}",
                        params=[now, *params]).fetchall()[0][0]
    return rows, total


def selection(catalog: Catalog, flt: QueueFilter, cap: int = 10_000) -> list[str]:
    """The ids a filter selects (for a bulk action), at most `cap`."""
    now = _now()
    where, params = flt.where(now)
    sql = QUEUE_SQL + f"SELECT feedback_id FROM q WHERE {where} ORDER BY feedback_id LIMIT ?"
    return catalog.query(sql, [now, *params, cap]).column("feedback_id").to_pylist()


def item(catalog: Catalog, feedback_id: str) -> dict | None:
    """Everything the review page shows about one failure: the feedback record, its latest
    triage (cause, confidence, evidence), its remedy, its current verdict and claim."""
    with catalog.connect(read_only=True) as con:
        out = _one(con, """
            SELECT f.*, t.cause, t.confidence, t.evidence, t.triager, t.triaged_at
            FROM feedback f JOIN (SELECT * FROM triage WHERE feedback_id = ? ORDER BY triaged_at DESC LIMIT 1) t
            USING (feedback_id)""", [feedback_id])
        if out is None:
            return None
        out["remedy"] = remedy_of(con, feedback_id)
        out["review"] = _current(con, feedback_id)
        out["claim"] = _live_claim(con, feedback_id, _now())
    return out

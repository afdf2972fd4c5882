"""Retrain triggers: per cause, a policy that decides when approved remedies or a rising
failure rate are worth a retrain job, with a cooldown between jobs.

    verdicts = check(ws, dry_run=True)     # what each policy would fire, and why
    verdicts = check(ws)                   # fire: a queued `jobs` row per cause that fired

A fired job records the cause, the remedies it uses and the failures behind them; the
remedies are marked used by it. Running the job (models/stack.py) and gating its
version on the failures that caused it is the job runner's part.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone

import pyarrow as pa

from dataengine.catalog import Catalog
from dataengine.schema import JOBS, REMEDIES
from dataengine.workspace import Workspace

# The job each cause fires, by the name models/stack.py trains.
JOB_KIND = {"rl": "retrain-reward", "knowledge": "retrain-dit", "prompt": "retrain-enhancer"}


@dataclass(frozen=True)
class TriggerPolicy:
    """Fire when `min_approved` approved remedies wait, or when more than `max_failure_rate`
    of the feedback in the last `window_h` hours was triaged to this cause (over at least
    `min_window_feedback` records); never within `cooldown_h` of the cause's last job."""

    min_approved: int = 20
    max_failure_rate: float = 0.10
    window_h: float = 24.0
    min_window_feedback: int = 50
    cooldown_h: float = 6.0

    def __post_init__(self) -> None:
        if self.min_approved < 1 or self.min_window_feedback < 1:
            raise ValueError("min_approved and min_window_feedback must be >= 1")
        if not 0.0 < self.max_failure_rate <= 1.0:
            raise ValueError(f"max_failure_rate must be in (0, 1], got {self.max_failure_rate}")
        if self.window_h <= 0 or self.cooldown_h < 0:
            raise ValueError("window_h must be > 0 and cooldown_h >= 0")


@dataclass(frozen=True)
class TriggerConfig:
    rl: TriggerPolicy = field(default_factory=TriggerPolicy)
    knowledge: TriggerPolicy = field(default_factory=TriggerPolicy)
    prompt: TriggerPolicy = field(default_factory=TriggerPolicy)

    @classmethod
    def from_dict(cls, d: dict) -> "TriggerConfig":
        unknown = sorted(set(d) - set(JOB_KIND))
        if unknown:
            raise ValueError(f"[triggers]: unknown cause(s) {unknown}; known: {sorted(JOB_KIND)}")
        return cls(**{c: TriggerPolicy(**v) for c, v in d.items()})


@dataclass
class Counts:
    """What a policy reads for one cause."""

    approved: int  # approved remedies no job has used
    window_cause: int  # feedback in the window triaged to this cause
    window_total: int  # all feedback in the window
    last_fired: datetime | None


@dataclass
class Verdict:
    cause: str
    fire: bool
    why: str
    counts: Counts
    job_id: str | None = None


def evaluate(cause: str, policy: TriggerPolicy, c: Counts, now: datetime) -> Verdict:
    """Whether `policy` fires for `cause` on counts `c` at `now`, and why (or why not)."""
    rate = c.window_cause / c.window_total if c.window_total else 0.0
    by_count = c.approved >= policy.min_approved
    by_rate = c.window_total >= policy.min_window_feedback and rate > policy.max_failure_rate
    reasons = []
    if by_count:
        reasons.append(f"{c.approved} approved remedies >= {policy.min_approved}")
    if by_rate:
        reasons.append(f"failure rate {rate:.1%} over {policy.window_h:g} h > {policy.max_failure_rate:.1%} "
                       f"({c.window_cause}/{c.window_total})")
    if not reasons:
        return Verdict(cause, False, f"below threshold: {c.approved}/{policy.min_approved} approved, rate "
                                     f"{rate:.1%} (limit {policy.max_failure_rate:.1%}, {c.window_total}/"
                                     f"{policy.min_window_feedback} records in the window)", c)
    if c.last_fired is not None and now - c.last_fired < timedelta(hours=policy.cooldown_h):
        left = timedelta(hours=policy.cooldown_h) - (now - c.last_fired)
        return Verdict(cause, False, f"cooling down ({left.total_seconds() / 3600:.1f} h left) though "
                                     + "; ".join(reasons), c)
    return Verdict(cause, True, "; ".join(reasons), c)


def counts(catalog: Catalog, cause: str, policy: TriggerPolicy, now: datetime) -> Counts:
    since = now - timedelta(hours=policy.window_h)
    approved = catalog.query("SELECT count(*) AS n FROM remedies WHERE cause = ? AND status = 'approved' "
                             "AND job_id IS NULL", [cause]).to_pylist()[0]["n"]
    window = catalog.query("""
        SELECT count(*) AS total, count(*) FILTER (WHERE t.cause = ?) AS hit
        FROM feedback f LEFT JOIN (SELECT feedback_id, arg_max(cause, triaged_at) AS cause FROM triage
                                   GROUP BY feedback_id) t USING (feedback_id)
        WHERE f.time >= ?""", [cause, since]).to_pylist()[0]
    last = catalog.query("SELECT max(created_at) AS t FROM jobs WHERE kind = ?", [JOB_KIND[cause]]).to_pylist()[0]["t"]
    return Counts(approved, window["hit"] or 0, window["total"] or 0, last)


def check(ws: Workspace, cfg: TriggerConfig = TriggerConfig(), dry_run: bool = False,
          now: datetime | None = None) -> list[Verdict]:
    """Evaluate every cause's policy; unless `dry_run`, queue a job for each that fires and
    mark the remedies it takes as used by it."""
    catalog = Catalog(ws)
    catalog.migrate()
    now = now or datetime.now(timezone.utc)
    out = []
    for cause in JOB_KIND:
        policy = getattr(cfg, cause)
        v = evaluate(cause, policy, counts(catalog, cause, policy, now), now)
        if v.fire and not dry_run:
            v.job_id = _fire(catalog, cause, v, policy, now)
        out.append(v)
    return out


def _fire(catalog: Catalog, cause: str, v: Verdict, policy: TriggerPolicy, now: datetime) -> str:
    job_id = f"{JOB_KIND[cause]}-{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    with catalog.transaction() as con:
        rows = con.sql("SELECT * FROM remedies WHERE cause = ? AND status = 'approved' AND job_id IS NULL "
                       "ORDER BY created_at", params=[cause]).to_arrow_table().to_pylist()
        failures = sorted({fid for r in rows for fid in r["feedback_ids"]})
        params = {"cause": cause, "remedies": [r["remedy_id"] for r in rows], "failures": failures,
                  "policy": asdict(policy)}
        catalog.upsert("jobs", pa.Table.from_pylist([dict(
            job_id=job_id, kind=JOB_KIND[cause], status="queued", trigger=v.why, params=json.dumps(params),
            result=None, created_at=now, updated_at=now)], schema=JOBS), con)
        for r in rows:
            r.update(status="used", job_id=job_id)
        if rows:
            catalog.upsert("remedies", pa.Table.from_pylist(rows, schema=REMEDIES), con)
    return job_id

"""Retrain triggers: a policy fires at its threshold and not before, and keeps its cooldown."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest

from dataengine.catalog import Catalog
from dataengine.schema import REMEDIES
from dataengine.triggers import Counts, TriggerConfig, TriggerPolicy, check, evaluate

NOW = datetime(2026, 12, 6, 12, tzinfo=timezone.utc)
P = TriggerPolicy(min_approved=5, max_failure_rate=0.2, window_h=24, min_window_feedback=50, cooldown_h=6)


def test_fires_at_the_approved_count_and_not_one_before():
    assert not evaluate("rl", P, Counts(4, 0, 0, None), NOW).fire
    v = evaluate("rl", P, Counts(5, 0, 0, None), NOW)
    assert v.fire and "5 approved remedies >= 5" in v.why


def test_fires_on_a_failure_rate_over_the_window_only_with_enough_feedback():
    assert not evaluate("prompt", P, Counts(0, 10, 50, None), NOW).fire  # 20% is not above 20%
    assert evaluate("prompt", P, Counts(0, 11, 50, None), NOW).fire
    assert not evaluate("prompt", P, Counts(0, 40, 49, None), NOW).fire  # too few records to trust a rate


def test_cooldown_holds_a_policy_that_would_fire():
    v = evaluate("rl", P, Counts(9, 0, 0, NOW - timedelta(hours=5)), NOW)
    assert not v.fire and "cooling down (1.0 h left)" in v.why
    assert evaluate("rl", P, Counts(9, 0, 0, NOW - timedelta(hours=6)), NOW).fire


def test_bad_policies_are_refused():
    with pytest.raises(ValueError):
        TriggerPolicy(max_failure_rate=0)
    with pytest.raises(ValueError, match="unknown cause"):
        TriggerConfig.from_dict({"vae": {}})


def _approved(ws, n: int, cause: str = "prompt") -> None:
    rows = [dict(remedy_id=f"{cause}{i}", cause=cause, kind="enhancer-pair", title="t", feedback_ids=[f"f{i}"],
                 proposal="{}", status="approved", curator="c", note=None, job_id=None, created_at=NOW,
                 decided_at=NOW) for i in range(n)]
    Catalog(ws).upsert("remedies", pa.Table.from_pylist(rows, schema=REMEDIES))


def test_check_queues_a_job_with_its_failures_marks_remedies_used_and_then_cools_down(ws):
    cfg = TriggerConfig(prompt=P)
    _approved(ws, 4)
    assert not any(v.fire for v in check(ws, cfg, now=NOW))
    _approved(ws, 5)
    dry = check(ws, cfg, dry_run=True, now=NOW)
    assert [v.cause for v in dry if v.fire] == ["prompt"]
    assert Catalog(ws).query("SELECT * FROM jobs").num_rows == 0  # a dry run fires nothing
    fired = [v for v in check(ws, cfg, now=NOW) if v.fire]
    job = Catalog(ws).query("SELECT * FROM jobs").to_pylist()
    assert len(fired) == 1 and len(job) == 1 and job[0]["job_id"] == fired[0].job_id
    params = json.loads(job[0]["params"])
    assert job[0]["kind"] == "retrain-enhancer" and job[0]["status"] == "queued"
    assert params["failures"] == [f"f{i}" for i in range(5)] and len(params["remedies"]) == 5
    used = Catalog(ws).query("SELECT DISTINCT status, job_id FROM remedies").to_pylist()
    assert used == [{"status": "used", "job_id": job[0]["job_id"]}]
    rows = [dict(remedy_id=f"new{i}", cause="prompt", kind="enhancer-pair", title="t", feedback_ids=[f"n{i}"],
                 proposal="{}", status="approved", curator="c", note=None, job_id=None, created_at=NOW,
                 decided_at=NOW) for i in range(6)]
    Catalog(ws).upsert("remedies", pa.Table.from_pylist(rows, schema=REMEDIES))
    v = next(v for v in check(ws, cfg, now=NOW + timedelta(hours=1)) if v.cause == "prompt")
    assert not v.fire and "cooling down" in v.why
    v = next(v for v in check(ws, cfg, now=NOW + timedelta(hours=7)) if v.cause == "prompt")
    assert v.fire

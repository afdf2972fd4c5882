"""Curators' review: accounts and roles, claims, verdicts as append-only events, undo, bulk
verdicts, and the paged queue with bound parameters."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest

from dataengine import lake
from dataengine.accounts import AccountError, Forbidden, add_user, authenticate, list_users, remove_user, require
from dataengine.catalog import Catalog
from dataengine.review import (ClaimTaken, QueueFilter, ReviewError, Verdict, bulk, claim, history, item,
                               queue_page, release, selection, submit, undo)
from dataengine.review_queue import refresh_queue
from dataengine.schema import FEEDBACK, REMEDIES, TRIAGE

INJECTION = "x'); DROP TABLE reviews; --"


def seed_failures(ws, n: int, start: int = 0, causes=("rl", "knowledge", "prompt"), prompt=None) -> list[str]:
    """n triaged failures written to the lake as intake and triage write them."""
    now = datetime.now(timezone.utc)
    fb, tr = [], []
    for i in range(start, start + n):
        fid = f"fb-{i:05d}"
        fb.append({"feedback_id": fid, "time": now - timedelta(days=i % 10), "prompt": prompt or f"prompt {i}",
                   "enhanced_prompt": f"prompt {i}, enhanced", "model_version": "dit/v0001", "image_ref": "/x.png",
                   "task": "gen", "rating": 1 + i % 2, "origin": "test", "received_at": now})
        tr.append({"feedback_id": fid, "cause": causes[i % len(causes)], "confidence": (i % 100) / 100,
                   "evidence": json.dumps({"why": f"because {i}"}), "triager": "rules/v1", "triaged_at": now})
    lake.write_part(ws.lake, "feedback", pa.Table.from_pylist(fb, schema=FEEDBACK))
    lake.write_part(ws.lake, "triage", pa.Table.from_pylist(tr, schema=TRIAGE))
    refresh_queue(Catalog(ws), [r["feedback_id"] for r in fb])  # as triage does after writing
    return [r["feedback_id"] for r in fb]


@pytest.fixture
def people(catalog):
    add_user(catalog, "ana", "correct horse 1", "curator")
    add_user(catalog, "ben", "correct horse 2", "curator")
    add_user(catalog, "val", "correct horse 3", "viewer")
    add_user(catalog, "root", "correct horse 4", "admin")
    return catalog


def test_passwords_are_argon2_hashed_checked_and_roles_enforced_on_the_current_role(catalog):
    add_user(catalog, "ana", "correct horse", "curator")
    stored = catalog.query("SELECT password_hash FROM users").column(0)[0].as_py()
    assert stored.startswith("$argon2id$") and "correct horse" not in stored
    assert authenticate(catalog, "ana", "correct horse").role == "curator"
    assert authenticate(catalog, "ana", "wrong horse") is None and authenticate(catalog, "nobody", "x") is None
    assert require(catalog, "ana", "viewer").username == "ana"
    with pytest.raises(Forbidden):
        require(catalog, "ana", "admin")
    with pytest.raises(Forbidden):
        require(catalog, None, "viewer")
    with pytest.raises(AccountError):
        add_user(catalog, "ana", "another one", "viewer")  # exists
    for bad in (dict(username="a b", password="long enough", role="viewer"),
                dict(username="eve", password="short", role="viewer"),
                dict(username="eve", password="long enough", role="owner")):
        with pytest.raises(AccountError):
            add_user(catalog, **bad)
    add_user(catalog, "ana", "a new password", "viewer", replace=True)
    assert authenticate(catalog, "ana", "correct horse") is None
    remove_user(catalog, "ana")
    assert list_users(catalog) == []
    with pytest.raises(Forbidden):  # a removed user's open session can no longer act
        require(catalog, "ana", "viewer")


def test_a_claimed_item_is_reviewed_once_by_its_holder_and_a_resent_verdict_applies_nothing(ws, people):
    catalog = people
    fid = seed_failures(ws, 3)[0]
    claim(catalog, fid, "ana")
    with pytest.raises(ClaimTaken):
        claim(catalog, fid, "ben")
    with pytest.raises(ClaimTaken):  # ben never held it
        submit(catalog, Verdict(fid, "accept"), "ben")
    with pytest.raises(Forbidden):  # a viewer reads only
        claim(catalog, seed_failures(ws, 1, start=10)[0], "val")
    v = Verdict(fid, "reassign", cause="knowledge", note="the concept is missing")
    row, applied = submit(catalog, v, "ana")
    assert applied and row["curator"] == "ana" and row["cause"] == "knowledge"
    again, applied = submit(catalog, v, "ana")  # a double click: same review_id
    assert not applied and again["review_id"] == row["review_id"]
    assert catalog.query("SELECT count(*) FROM reviews").column(0)[0].as_py() == 1
    state = catalog.query("SELECT verdict, cause, curator FROM review_state").to_pylist()
    assert state == [{"verdict": "reassign", "cause": "knowledge", "curator": "ana"}]
    with pytest.raises(ReviewError, match="already reviewed"):
        claim(catalog, fid, "ben")
    assert catalog.query("SELECT count(*) FROM claims").column(0)[0].as_py() == 0  # the verdict freed it


def test_a_lapsed_claim_frees_the_item_and_its_holder_can_no_longer_review(ws, people):
    catalog = people
    fid = seed_failures(ws, 1)[0]
    claim(catalog, fid, "ana", ttl_s=-1)  # lapsed at once
    claim(catalog, fid, "ben")
    with pytest.raises(ClaimTaken, match="claimed by ben"):
        submit(catalog, Verdict(fid, "accept"), "ana")
    release(catalog, fid, "ben")
    claim(catalog, fid, "ana")
    assert submit(catalog, Verdict(fid, "accept"), "ana")[1]


def test_undo_is_an_event_the_state_view_honours_and_it_reopens_the_item_and_its_remedy(ws, people):
    catalog = people
    fid = seed_failures(ws, 1, causes=("prompt",))[0]
    remedy = {"remedy_id": "rem-1", "cause": "prompt", "kind": "enhancer-pair", "title": "keep the words",
              "feedback_ids": [fid], "proposal": json.dumps({"less": "a cat", "more": "a cat on a mat"}),
              "status": "pending", "created_at": datetime.now(timezone.utc)}
    catalog.upsert("remedies", pa.Table.from_pylist([remedy], schema=REMEDIES))
    claim(catalog, fid, "ana")
    row, _ = submit(catalog, Verdict(fid, "accept", remedy_verdict="approve"), "ana")
    assert catalog.query("SELECT status, curator FROM remedies").to_pylist() == [{"status": "approved", "curator": "ana"}]
    undo(catalog, row["review_id"], "ben", note="approved by mistake")
    assert catalog.query("SELECT count(*) FROM review_state").column(0)[0].as_py() == 0
    assert catalog.query("SELECT status FROM remedies").column(0)[0].as_py() == "pending"
    with pytest.raises(ReviewError, match="undone already"):
        undo(catalog, row["review_id"], "ana")
    claim(catalog, fid, "ben")  # open again
    submit(catalog, Verdict(fid, "reject", note="not a failure"), "ben")
    trail = [(e["verdict"], e["curator"]) for e in history(catalog, fid)]
    assert trail == [("accept", "ana"), ("undo", "ben"), ("reject", "ben")]  # nothing rewritten
    assert item(catalog, fid)["review"]["verdict"] == "reject"


def test_bulk_verdict_claims_each_item_and_skips_what_another_curator_holds(ws, people):
    catalog = people
    ids = seed_failures(ws, 12, causes=("rl",))
    claim(catalog, ids[0], "ben")
    with pytest.raises(ReviewError):  # a bad verdict touches nothing
        bulk(catalog, ids, "reassign", "ana")
    report = bulk(catalog, ids, "reassign", "ana", cause="knowledge")
    assert report.applied == 11 and list(report.skipped) == [ids[0]] and "ben" in report.skipped[ids[0]]
    assert bulk(catalog, ids, "accept", "ana").applied == 0  # all reviewed or held


def test_the_queue_filters_sorts_and_pages_in_sql_and_treats_every_filter_as_plain_text(ws, people):
    catalog = people
    seed_failures(ws, 60)
    seed_failures(ws, 2, start=100, prompt="100% pure sugar_cube")
    rows, total = queue_page(catalog, QueueFilter(causes=("rl",)), sort="confidence", limit=5)
    assert total == 20 and len(rows) == 5  # every third of 60 (the two extra are knowledge, prompt)
    assert all(r["cause"] == "rl" for r in rows)
    assert [r["confidence"] for r in rows] == sorted((r["confidence"] for r in rows), reverse=True)
    page2, _ = queue_page(catalog, QueueFilter(causes=("rl",)), sort="confidence", limit=5, offset=5)
    assert not {r["feedback_id"] for r in rows} & {r["feedback_id"] for r in page2}
    assert queue_page(catalog, QueueFilter(max_age_days=2.5))[1] == 18 + 2  # days 0, 1, 2 of each 10
    # Wildcards and quotes are text: '%' matches a percent sign, '_' an underscore.
    assert queue_page(catalog, QueueFilter(text="100%"))[1] == 2
    assert queue_page(catalog, QueueFilter(text="%"))[1] == 2
    assert queue_page(catalog, QueueFilter(text="sugar_cube"))[1] == 2
    assert queue_page(catalog, QueueFilter(text=INJECTION))[1] == 0
    with pytest.raises(ReviewError):
        queue_page(catalog, sort="confidence; DROP TABLE reviews")
    with pytest.raises(ReviewError):
        QueueFilter(causes=(INJECTION,)).where(datetime.now(timezone.utc))
    # A note with SQL in it is stored as written.
    fid = rows[0]["feedback_id"]
    claim(catalog, fid, "ana")
    submit(catalog, Verdict(fid, "accept", note=INJECTION), "ana")
    assert catalog.query("SELECT note FROM reviews").column(0)[0].as_py() == INJECTION
    assert queue_page(catalog, QueueFilter(state="reviewed"))[1] == 1
    assert queue_page(catalog, QueueFilter(state="open"))[1] == 61
    assert len(selection(catalog, QueueFilter(causes=("prompt",)))) == 21


def test_users_cli_adds_lists_and_removes_and_the_dashboard_refuses_a_remote_host_unasked(ws):
    from typer.testing import CliRunner

    from cli.app import app

    run = CliRunner()
    r = run.invoke(app, ["users", "add", "ana", "--role", "admin", "-w", str(ws.root), "--password-stdin"],
                   input="correct horse battery\n")
    assert r.exit_code == 0 and "ana: admin" in r.output, r.output
    r = run.invoke(app, ["users", "add", "bob", "--role", "owner", "-w", str(ws.root), "--password-stdin"],
                   input="correct horse battery\n")
    assert r.exit_code == 2 and "role must be one of" in r.output
    r = run.invoke(app, ["users", "add", "bob", "-w", str(ws.root), "--password-stdin"], input="short\n")
    assert r.exit_code == 2 and "shorter than" in r.output
    assert "ana" in run.invoke(app, ["users", "list", "-w", str(ws.root)]).output
    assert authenticate(Catalog(ws), "ana", "correct horse battery").role == "admin"
    r = run.invoke(app, ["dashboard", "-w", str(ws.root), "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "--allow-remote" in r.output
    assert run.invoke(app, ["users", "remove", "ana", "-w", str(ws.root)]).exit_code == 0
    assert run.invoke(app, ["users", "remove", "ana", "-w", str(ws.root)]).exit_code == 2

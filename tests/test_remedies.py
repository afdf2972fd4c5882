"""Remedies: each cause's proposal on hand-made failures, and the curator's verdicts."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from dataengine.catalog import Catalog
from dataengine.remedies import (RemedyError, concept_groups, corrected_prompt, decide, propose, prompt_remedies,
                                 rl_remedies)
from dataengine.signals import drift
from models.clip import load_clip

NOW = datetime(2026, 12, 6, tzinfo=timezone.utc)


def fail(fid, prompt="p", enhanced=None, top=None, scores=None, phrase=None):
    return dict(feedback_id=fid, prompt=prompt, enhanced_prompt=enhanced, scores=scores,
                evidence={"reward_top": top, "weakest_phrase": phrase})


def test_rl_proposes_one_adjustment_per_overrating_head_with_wrongly_ordered_pairs():
    fails = [fail("f1", top="fidelity", scores={"fidelity": 0.9}), fail("f2", top="fidelity", scores={"fidelity": 0.4}),
             fail("f3", top="aesthetics", scores={"aesthetics": 2.0})]
    good = [dict(feedback_id="g1", scores={"fidelity": 0.5, "aesthetics": 1.0}),
            dict(feedback_id="g2", scores={"fidelity": 0.95})]
    rows = {r["title"].split(":")[0]: r for r in rl_remedies(fails, good, NOW)}
    fid = json.loads(rows["fidelity"]["proposal"])
    assert fid["head"] == "fidelity" and rows["fidelity"]["feedback_ids"] == ["f1", "f2"]
    assert [(p["win"], p["lose"]) for p in fid["pairs"]] == [("g1", "f1")]  # g1 0.5 <= f1 0.9 only
    assert json.loads(rows["aesthetics"]["proposal"])["pairs_found"] == 1


def test_knowledge_failures_group_by_the_phrase_they_miss_and_are_named_by_its_shared_words():
    fails = [fail("a", phrase="two small teal kites"), fail("b", phrase="a teal kite flying"),
             fail("c", phrase="three teal kites"), fail("d", phrase="one large brass anchor"),
             fail("e", phrase="brass anchors on sand")]
    groups = concept_groups(fails)
    assert [(name, sorted(f["feedback_id"] for f in m)) for name, m in groups] == [
        ("teal kite", ["a", "b", "c"]), ("brass anchor", ["d", "e"])]


@pytest.mark.parametrize("prompt, enhanced, fixed, dropped", [
    ("a red star on grass", "A large blue star on soft grass.", "A large red star on soft grass.", []),
    ("two Cats on a sofa", "Three cats resting on a sofa", "two cats resting on a sofa", []),
    ("a red star and a ring", "A red star, glowing.", "A red star, and a ring", ["ring"]),
    ("a red star next to a ring", "A star glowing next to a ring.", "A red star glowing next to a ring.", ["red"]),
    ("a small red star", "An image of a large blue circle on grass", "An image of a small red star",
     ["small", "red", "star"]),
])
def test_a_prompt_failure_gets_the_users_words_put_back(prompt, enhanced, fixed, dropped):
    text, lost = corrected_prompt(prompt, enhanced)
    assert text == fixed and lost == dropped
    assert drift(prompt, text).lost == 0  # the pair it makes keeps every word of the user's
    row = prompt_remedies([fail("f", prompt, enhanced)], NOW)[0]
    assert json.loads(row["proposal"])["needs_edit"] is False


def _queue(ws, tmp_path):
    from connectors.feedback import ingest_files
    from dataengine.triage_run import triage_workspace
    from conftest import image_bytes

    (tmp_path / "o.png").write_bytes(image_bytes())
    recs = [dict(id="p1", prompt="a red star", enhanced_prompt="a big blue star", rating=1),
            dict(id="p2", prompt="a red star and a ring", enhanced_prompt="a red star", rating=1),
            dict(id="r1", prompt="a red star", enhanced_prompt="a big red star", rating=1),
            dict(id="g1", prompt="a red star", enhanced_prompt="a red star", rating=5)]
    with open(tmp_path / "f.jsonl", "w") as f:
        for i, r in enumerate(recs):
            f.write(json.dumps(r | {"time": "2026-12-06T00:00:00Z", "model_version": "g", "image": "o.png",
                                    "task": "gen", "scores": {"fidelity": [0.9, 0.8, 0.7, 0.6][i]}}) + "\n")
    ingest_files(ws, [tmp_path / "f.jsonl"])
    triage_workspace(ws, load_encoder=load_clip, scorer=None)


def test_propose_queues_each_failure_once_and_curators_decide(ws, tmp_path):
    _queue(ws, tmp_path)
    r = propose(ws, load_encoder=load_clip)
    assert r.made == {"rl": 1, "knowledge": 0, "prompt": 2} and r.failures["prompt"] == 2
    assert propose(ws, load_encoder=load_clip).made == {"rl": 0, "knowledge": 0, "prompt": 0}  # nothing new
    rows = {r["title"]: r for r in Catalog(ws).query("SELECT * FROM remedies").to_pylist()}
    rl = next(r for t, r in rows.items() if r["cause"] == "rl")
    assert json.loads(rl["proposal"])["pairs"][0] == {"win": "g1", "lose": "r1", "win_score": 0.6, "lose_score": 0.7}
    needs = next(r for r in rows.values() if r["cause"] == "prompt" and json.loads(r["proposal"])["dropped"])
    assert json.loads(needs["proposal"])["more"] == "a red star and a ring"  # the dropped words put back
    with pytest.raises(RemedyError, match="still loses"):  # a curator's edit is checked the same way
        decide(ws, needs["remedy_id"], "edit", "ann", edit={"more": "a red star, glowing"})
    done = decide(ws, needs["remedy_id"], "edit", "ann", edit={"more": "a red star and a ring, glowing"})
    assert done["status"] == "approved" and json.loads(done["proposal"])["needs_edit"] is False
    assert decide(ws, rl["remedy_id"], "reject", "ann", "the head is fine")["status"] == "rejected"
    with pytest.raises(RemedyError, match="verdict"):
        decide(ws, rl["remedy_id"], "maybe", "ann")
    with pytest.raises(RemedyError, match="no remedy"):
        decide(ws, "nope", "approve", "ann")


def test_a_failure_still_failing_after_its_remedy_was_used_gets_a_new_one(ws, tmp_path):
    from dataengine.triage_run import triage_workspace

    _queue(ws, tmp_path)
    first = propose(ws, load_encoder=load_clip)
    rows = Catalog(ws).query("SELECT * FROM remedies WHERE cause = 'rl'").to_pylist()
    import pyarrow as pa
    from dataengine.schema import REMEDIES

    rows[0].update(status="used", job_id="job-1")
    Catalog(ws).upsert("remedies", pa.Table.from_pylist(rows, schema=REMEDIES))
    assert propose(ws, load_encoder=load_clip).made["rl"] == 0  # used, but not triaged again since
    triage_workspace(ws, retriage=True, load_encoder=load_clip, scorer=None)  # after the job: still failing
    again = propose(ws, load_encoder=load_clip)
    assert again.made["rl"] == 1 and again.made["prompt"] == 0  # pending prompt remedies still answer theirs
    assert Catalog(ws).query("SELECT count(*) AS n FROM remedies WHERE cause = 'rl'").to_pylist()[0]["n"] == 2
    assert first.made["rl"] == 1


def test_a_failure_the_loop_found_fixed_gets_no_new_remedy(ws, tmp_path):
    import pyarrow as pa

    from dataengine.remedies import mark_resolved
    from dataengine.schema import REMEDIES
    from dataengine.triage_run import triage_workspace

    _queue(ws, tmp_path)
    propose(ws, load_encoder=load_clip)
    rows = Catalog(ws).query("SELECT * FROM remedies WHERE cause = 'rl'").to_pylist()
    rows[0].update(status="used", job_id="job-1")
    Catalog(ws).upsert("remedies", pa.Table.from_pylist(rows, schema=REMEDIES))
    triage_workspace(ws, retriage=True, load_encoder=load_clip, scorer=None)  # the loop's evaluate step
    assert mark_resolved(ws, {"r1": "rl"}) == 1 and mark_resolved(ws, {"r1": "rl"}) == 0  # once
    assert propose(ws, load_encoder=load_clip).made["rl"] == 0  # fixed: nothing to propose
    assert Catalog(ws).query("SELECT feedback_id, cause FROM resolved").to_pylist() == [
        {"feedback_id": "r1", "cause": "rl"}]


def test_a_weakest_phrase_of_function_words_still_names_its_group():
    groups = concept_groups([fail("a", prompt="a teal kite", phrase="image"), fail("b", prompt="the", phrase=None)])
    assert [name for name, _ in groups] == ["teal kite", "the"] and all(name.strip() for name, _ in groups)

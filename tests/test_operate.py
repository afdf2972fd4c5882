"""The deployable flows run as their deployments would run them: the intake takes the inbox's
feedback, triages it, queues remedies and the jobs its policies fire; a retrain flow runs
only the queued jobs of its kind."""

from __future__ import annotations

import json

from dataengine.catalog import Catalog

from conftest import image_bytes
from test_feedback import record, write_jsonl


def test_intake_triages_the_inbox_and_queues_what_its_policies_fire_and_retrain_runs_only_its_kind(ws):
    from flows.operate import inbox, intake_flow, retrain_flow

    box = inbox(ws)
    box.mkdir(parents=True)
    (box / "out.png").write_bytes(image_bytes())
    write_jsonl(box / "a.jsonl", [record(1, enhanced_prompt="a big blue star number 1", rating=1),
                                  record(2, enhanced_prompt="a red star number 2 at dusk", rating=2)])
    policy = {"min_approved": 1, "cooldown_h": 0}
    out = intake_flow(str(ws.root), triggers={"prompt": policy}, auto_approve=True, settle_s=0.2)
    assert out["intake"]["accepted"] == 2 and out["triaged"]["prompt"] == 1 and out["triaged"]["rl"] == 1
    assert out["approved"] == 2
    assert [j["kind"] for j in out["jobs"]] == ["retrain-enhancer"]  # rl's policy keeps its default (20)

    again = intake_flow(str(ws.root), triggers={"prompt": policy}, auto_approve=True, settle_s=0.2)
    assert again["intake"]["received"] == 0 and sum(again["triaged"].values()) == 0 and again["jobs"] == []

    # A retrain flow of another kind leaves the enhancer's job queued.
    assert retrain_flow(str(ws.root), kind="retrain-reward") == []
    jobs = Catalog(ws).query("SELECT kind, status, params FROM jobs").to_pylist()
    assert [(j["kind"], j["status"]) for j in jobs] == [("retrain-enhancer", "queued")]
    assert json.loads(jobs[0]["params"])["failures"] == ["fb-1"]

"""Triage: the rules on hand-made signals, the learned triager replacing them only when it
wins on held-out reviews, and a workspace's failures triaged end to end."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from dataengine import lake
from dataengine.signals import drift as sg_drift
from dataengine.catalog import Catalog
from dataengine.schema import REVIEWS, TRIAGE
from dataengine.triage import (FEATURES, LearnedTriager, RuleTriager, SignalTable, accuracy, compare, gather,
                               rows_of)
from dataengine.triage_run import current_triager, learn_triager, triage_workspace

from conftest import image_bytes
from models.clip import load_clip


def table(**cols) -> SignalTable:
    n = len(next(iter(cols.values())))
    f = np.full((n, len(FEATURES)), np.nan)
    for k, v in cols.items():
        f[:, FEATURES.index(k)] = v
    return SignalTable([f"f{i}" for i in range(n)], f, [{}] * n)


def test_rules_bin_drift_to_prompt_gaps_to_knowledge_and_the_rest_to_rl():
    s = table(has_enhanced=[1, 1, 1, 0, 1], drift_lost=[1, 0, 0, 0, 2], drift_share=[0.5, 0, 0, 0, 1],
              is_gap=[0, 1, 0, 0, 1], coverage_margin=[0.3, -0.04, 0.2, 0.2, -0.1],
              reward_pct=[0.5, 0.5, 0.95, 0.1, 0.5])
    d = RuleTriager().decide(s)
    assert d.causes == ["prompt", "knowledge", "rl", "rl", "prompt"]
    assert d.triager == "rules/v1"
    assert d.confidence[2] > d.confidence[3]  # the reward liked that failure: rl is surer
    assert d.confidence[4] < d.confidence[0] + 0.3  # drift and a gap at once: less sure
    assert (d.confidence > 0).all() and (d.confidence < 1).all()


def test_without_coverage_rl_is_only_the_remainder_and_says_so():
    s = table(has_enhanced=[1, 1], drift_lost=[0, 0], drift_share=[0, 0], reward_pct=[0.9, 0.9])
    known = table(has_enhanced=[1, 1], drift_lost=[0, 0], drift_share=[0, 0], reward_pct=[0.9, 0.9],
                  is_gap=[0, 0], coverage_margin=[0.2, 0.2])
    assert RuleTriager().decide(s).causes == ["rl", "rl"]
    assert RuleTriager().decide(s).confidence[0] < RuleTriager().decide(known).confidence[0]


def test_evidence_reads_as_a_sentence_with_the_deciding_values():
    s = gather(["a"], ["a red star on grass"], ["a large blue star on grass"], [1], [{"fidelity": 0.9}],
               {"fidelity": np.linspace(0, 1, 11)})
    row = rows_of(s, RuleTriager().decide(s))[0]
    ev = json.loads(row["evidence"])
    assert row["cause"] == "prompt" and row["triager"] == "rules/v1"
    assert "replaces 'red' with 'blue'" in ev["text"] and "fidelity at the 86% percentile on a rating of 1" in ev["text"]
    assert "coverage unknown" in ev["text"] and ev["signals"]["drift_lost"] == 1.0


def _learnable(n: int, seed: int, rules_right: bool) -> tuple[SignalTable, list[str]]:
    """Signals whose truth the rules get right (`rules_right`) or where it hangs on a signal
    the rules ignore (the output matches the enhanced prompt better: the enhancer's fault)."""
    rng = np.random.default_rng(seed)
    s = table(has_enhanced=np.ones(n), drift_lost=np.zeros(n), drift_share=np.zeros(n),
              is_gap=(rng.random(n) < 0.3).astype(float), coverage_margin=rng.normal(0, 0.1, n),
              reward_pct=rng.random(n), sim_gap=rng.normal(0, 0.05, n), disagreement=rng.random(n))
    truth = RuleTriager().decide(s).causes
    if not rules_right:
        truth = ["prompt" if g > 0.03 else t for g, t in zip(s.col("sim_gap"), truth)]
    return s, truth


def test_a_learned_triager_wins_only_where_the_rules_are_wrong():
    s, truth = _learnable(400, 0, rules_right=False)
    model, m = compare(s, truth)
    assert m["wins"] and m["learned_accuracy"] > m["rules_accuracy"] + 0.1
    s, truth = _learnable(400, 1, rules_right=True)
    model, m = compare(s, truth)
    assert not m["wins"] and m["rules_accuracy"] == 1.0
    _, m = compare(SignalTable(s.feedback_ids[:20], s.features[:20]), truth[:20])
    assert not m["wins"] and "too few reviews" in m["why"]


def test_learned_triager_round_trips_through_json():
    s, truth = _learnable(300, 2, rules_right=False)
    model = LearnedTriager.fit(s, truth)
    again = LearnedTriager.from_json(json.loads(json.dumps(model.to_json())), "learned/v0001")
    assert again.decide(s).causes == model.decide(s).causes
    assert accuracy(again.decide(s), truth) > 0.9


def _write_reviews(ws, s: SignalTable, truth: list[str]) -> None:
    d = RuleTriager().decide(s)
    now = datetime.now(timezone.utc)
    lake.write_part(ws.lake, "triage", pa.Table.from_pylist(rows_of(s, d, now), schema=TRIAGE))
    reviews = [dict(review_id=f"r{i}", feedback_id=fid, verdict="accept" if t == c else "reassign",
                    cause=None if t == c else t, curator="test", note=None, reviewed_at=now)
               for i, (fid, t, c) in enumerate(zip(s.feedback_ids, truth, d.causes))]
    Catalog(ws).upsert("reviews", pa.Table.from_pylist(reviews, schema=REVIEWS))


def test_learning_from_reviews_promotes_only_a_winner_and_triage_then_uses_it(ws):
    s, truth = _learnable(300, 3, rules_right=True)
    _write_reviews(ws, s, truth)
    m = learn_triager(ws)
    assert m["status"] == "candidate" and not m["wins"]
    assert isinstance(current_triager(ws), RuleTriager)
    s, truth = _learnable(300, 4, rules_right=False)
    s.feedback_ids = [f"g{i}" for i in range(len(s))]
    _write_reviews(ws, s, truth)
    m = learn_triager(ws)
    assert m["status"] == "promoted" and m["wins"], m
    cur = current_triager(ws)
    assert isinstance(cur, LearnedTriager) and cur.version == f"learned/{m['version']}"
    rows = Catalog(ws).query("SELECT version, status FROM model_versions WHERE model = 'triager' ORDER BY version").to_pylist()
    assert [r["status"] for r in rows] == ["candidate", "promoted"]


def test_a_workspace_without_an_index_triages_its_failures_once_and_skips_good_ratings(ws, tmp_path):
    from connectors.feedback import ingest_files

    (tmp_path / "out.png").write_bytes(image_bytes())
    recs = [
        {"id": "drifted", "prompt": "a red star", "enhanced_prompt": "a big blue star", "rating": 1},
        {"id": "kept", "prompt": "a red star", "enhanced_prompt": "a big red star at dusk", "rating": 2},
        {"id": "eval", "prompt": "a red star", "enhanced_prompt": None, "rating": None},
        {"id": "liked", "prompt": "a red star", "enhanced_prompt": None, "rating": 5},
    ]
    with open(tmp_path / "f.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(r | {"time": "2026-12-01T00:00:00Z", "model_version": "g1", "image": "out.png",
                                    "task": "gen", "scores": {"fidelity": 0.5}}) + "\n")
    ingest_files(ws, [tmp_path / "f.jsonl"])
    r = triage_workspace(ws, load_encoder=load_clip, scorer=None)
    assert r.failures == 3 and r.triaged == 3 and r.by_cause == {"rl": 2, "knowledge": 0, "prompt": 1}
    assert "not measured" in r.signals["coverage"]
    rows = {x["feedback_id"]: x for x in Catalog(ws).query("SELECT * FROM triage").to_pylist()}
    assert set(rows) == {"drifted", "kept", "eval"} and rows["drifted"]["cause"] == "prompt"
    assert "coverage unknown" in json.loads(rows["kept"]["evidence"])["text"]
    assert triage_workspace(ws, load_encoder=load_clip, scorer=None).failures == 0  # nothing new
    assert triage_workspace(ws, retriage=True, load_encoder=load_clip, scorer=None).triaged == 3


def test_drift_counts_only_beyond_what_the_enhancer_does_on_well_rated_outputs():
    """A rewording enhancer loses words on outputs people liked too: that much is its style."""
    prompts = ["a small red star on grass", "a small red star on grass"]
    enhanced = ["A little red star sits on a lawn", "A little blue star sits on a lawn, a ring beside it"]
    good = np.array([sg_drift(p, e).share for p, e in [("a small cat on a sofa", "A little cat rests on a couch"),
                                                        ("a big dog in snow", "A large dog in the snow")] * 10])
    s = gather(["a", "b"], prompts, enhanced, [1, 1], [None, None], {}, drift_reference=[good, good])
    assert RuleTriager().decide(s).causes == ["rl", "prompt"]
    s = gather(["a", "b"], prompts, enhanced, [1, 1], [None, None], {})  # no reference: every lost word counts
    assert RuleTriager().decide(s).causes == ["prompt", "prompt"]


def test_a_promoted_triager_of_other_signals_gives_way_to_the_rules(ws):
    s, truth = _learnable(300, 4, rules_right=False)
    _write_reviews(ws, s, truth)
    m = learn_triager(ws)
    assert m["status"] == "promoted"
    path = Path(Catalog(ws).query("SELECT path FROM model_versions WHERE model = 'triager'").to_pylist()[0]["path"])
    stored = json.loads((path / "model.json").read_text())
    assert stored["features"] == list(FEATURES)
    stored["features"] = stored["features"][:10]  # as saved before the coverage sides were signals
    (path / "model.json").write_text(json.dumps(stored))
    assert isinstance(current_triager(ws), RuleTriager)


def test_reviews_teach_only_accepts_and_reassigns_on_each_items_latest_triage(ws):
    from dataengine.triage_run import reviewed

    s, truth = _learnable(30, 5, rules_right=True)
    _write_reviews(ws, s, truth)
    # Triaged again later (two triage rows), and one review rejected outright.
    d = RuleTriager().decide(s)
    lake.write_part(ws.lake, "triage", pa.Table.from_pylist(rows_of(s, d, datetime.now(timezone.utc)), schema=TRIAGE))
    Catalog(ws).upsert("reviews", pa.Table.from_pylist([dict(
        review_id="r0", feedback_id=s.feedback_ids[0], verdict="reject", cause=None, curator="test", note=None,
        reviewed_at=datetime.now(timezone.utc))], schema=REVIEWS))
    table, got = reviewed(Catalog(ws))
    assert sorted(table.feedback_ids) == sorted(s.feedback_ids[1:])
    assert len(got) == len(s) - 1

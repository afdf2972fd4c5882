"""The dashboard's pages and actions under Streamlit's AppTest (the script runs for real,
without a browser): sign-in, the queue, claim and review, bulk, undo, overview, pairs, admin."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from dataengine import lake
from dataengine.accounts import add_user
from dataengine.catalog import Catalog
from dataengine.schema import PAIRS, QUARANTINE

from test_review import INJECTION, seed_failures

APP = str(Path(__file__).resolve().parents[1] / "dashboards" / "app.py")


@pytest.fixture
def site(ws, monkeypatch):
    monkeypatch.setenv("DATAENGINE_WORKSPACE", str(ws.root))
    cat = Catalog(ws)
    add_user(cat, "ana", "correct horse 1", "curator")
    add_user(cat, "val", "correct horse 3", "viewer")
    add_user(cat, "root", "correct horse 4", "admin")
    seed_failures(ws, 30)
    return cat


def app():
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(APP, default_timeout=60)


def signed_in(user: str, password: str):
    at = app().run()
    at.text_input(key="login_user").input(user)
    at.text_input(key="login_password").input(password)
    at.button[0].click().run()
    assert not at.exception, at.exception
    return at


def texts(at) -> str:
    return "\n".join([m.value for m in at.markdown] + [c.value for c in at.caption] + [e.value for e in at.error]
                     + [s.value for s in at.success] + [w.value for w in at.warning] + [i.value for i in at.info]
                     + [t.value for t in at.text])


def test_nothing_shows_before_sign_in_and_a_wrong_password_is_refused(site):
    at = app().run()
    assert not at.exception
    assert len(at.dataframe) == 0 and "Password" in [t.label for t in at.text_input]
    at.text_input(key="login_user").input("ana")
    at.text_input(key="login_password").input("wrong password")
    at.button[0].click().run()
    assert "wrong username or password" in texts(at) and len(at.dataframe) == 0


def test_a_session_expires(site):
    at = signed_in("ana", "correct horse 1")
    assert len(at.dataframe) == 1
    at.session_state["since"] -= 8 * 3600 + 1  # signed in past the default 8 hours
    at.run()
    assert "session expired" in texts(at) and len(at.dataframe) == 0


def test_a_curator_filters_claims_and_reviews_an_item_and_the_verdict_lands_in_the_catalog(site):
    at = signed_in("ana", "correct horse 1")
    assert "30 items match" in texts(at)
    at.multiselect(key="f_causes").select("knowledge").run()
    assert "10 items match" in texts(at)
    fid = at.selectbox(key="item").value
    at.button(key=f"claim-{fid}").click().run()
    assert site.query("SELECT curator FROM claims WHERE feedback_id = ?", [fid]).column(0).to_pylist() == ["ana"]
    at.radio(key=f"v-{fid}").set_value("reassign")
    at.selectbox(key=f"c-{fid}").set_value("rl")
    at.text_area(key=f"n-{fid}").input(INJECTION)
    at.button[[b.label for b in at.button].index("Submit verdict")].click().run()
    assert not at.exception and "verdict recorded" in texts(at)
    rows = site.query("SELECT feedback_id, verdict, cause, curator, note FROM review_state").to_pylist()
    assert rows == [{"feedback_id": fid, "verdict": "reassign", "cause": "rl", "curator": "ana", "note": INJECTION}]
    # The reviewed item left the open queue; in "reviewed" it shows its history and can be undone.
    at.run()
    assert "9 items match" in texts(at)
    at.selectbox(key="f_state").set_value("reviewed").run()
    assert at.selectbox(key="item").value == fid
    undo = [b for b in at.button if b.key and b.key.startswith("undo-")]
    assert len(undo) == 1
    undo[0].click().run()
    assert site.query("SELECT count(*) FROM review_state").column(0)[0].as_py() == 0
    assert [r["verdict"] for r in site.query("SELECT verdict FROM reviews ORDER BY reviewed_at").to_pylist()] == [
        "reassign", "undo"]


def test_a_viewer_reads_but_cannot_claim_review_or_administer(site):
    at = signed_in("val", "correct horse 3")
    assert "30 items match" in texts(at) and "viewers read only" in texts(at)
    assert not [b for b in at.button if b.key and (b.key.startswith("claim-") or b.key == "bulk_ask")]
    at.sidebar.radio(key="nav").set_value("Admin").run()
    assert "admins only" in texts(at)


def test_bulk_asks_for_confirmation_with_the_count_then_applies(site):
    at = signed_in("ana", "correct horse 1")
    at.multiselect(key="f_causes").select("prompt").run()
    at.button(key="bulk_ask").click().run()
    assert "This will accept 10 items" in texts(at)
    assert site.query("SELECT count(*) FROM reviews").column(0)[0].as_py() == 0  # nothing until confirmed
    at.button(key="bulk_confirm").click().run()
    assert "10 items decided" in texts(at)
    assert site.query("SELECT count(*) FROM review_state WHERE verdict = 'accept'").column(0)[0].as_py() == 10


def test_overview_pairs_and_admin_pages_render_from_the_catalog(site, ws):
    lake.write_part(ws.lake, "pairs", pa.Table.from_pylist([
        {"pair_id": "p1", "source_id": "cap-1", "step": 1, "category": "lighting", "less": "a cat",
         "more": "a cat in warm light", "removed": "in warm light", "policy": "test"}], schema=PAIRS))
    lake.write_part(ws.lake, "quarantine", pa.Table.from_pylist([
        {"shard": "s.tar", "key": "k1", "reason": "image does not decode", "stage": "ingest"}], schema=QUARANTINE))
    at = signed_in("root", "correct horse 4")
    at.sidebar.radio(key="nav").set_value("Overview").run()
    assert not at.exception, at.exception
    assert len(at.get("vega_lite_chart")) >= 2  # failure rate and quarantine (no gaps searched here)
    at.sidebar.radio(key="nav").set_value("Enhancer pairs").run()
    assert "removed: *in warm light*" in texts(at)
    at.sidebar.radio(key="nav").set_value("Admin").run()
    at.text_input(key="new_user").input("ben")
    at.text_input(key="new_password").input("correct horse 2")
    at.selectbox(key="new_role").set_value("curator")
    at.button[[b.label for b in at.button].index("Add user")].click().run()
    assert "added ben (curator)" in texts(at)
    assert set(site.query("SELECT username FROM users").column(0).to_pylist()) == {"ana", "val", "root", "ben"}


def test_the_prompt_diff_marks_dropped_and_added_words_and_escapes_html():
    from dashboards.data import marked_diff

    left, right = marked_diff("a red <script>x</script> cat", "a blue <script>x</script> cat, on a mat")
    assert "<script>" not in left + right and "&lt;script&gt;" in left
    assert '<del style="background:#fdd">red</del>' in left
    assert ">blue</ins>" in right and ">on a mat</ins>" in right and "cat," in right  # "cat," is "cat"


def test_a_knowledge_item_shows_its_nearest_training_samples_read_from_the_shard_by_offset(site, ws, tmp_path):
    from PIL import Image

    from conftest import good_sample
    from dashboards.data import nearest_samples, thumbnail
    from dataengine.ingest import IngestConfig, ingest
    from dataengine.schema import GAPS
    from dataengine.shards import write_shards

    urls = write_shards([good_sample(f"train-{i}", f"caption {i}") for i in range(4)], tmp_path / "shards", "t", 10)
    ingest(ws, urls, IngestConfig(use_ray=False), site)
    fid = "fb-00001"  # a knowledge failure of the seeded queue
    evidence = {"neighbours": [{"key": "train-2", "similarity": 0.41, "caption": "caption 2"},
                               {"key": "train-0", "similarity": 0.37, "caption": "caption 0"}]}
    lake.write_part(ws.lake, "gaps", pa.Table.from_pylist([
        {"gap_id": "g1", "feedback_id": fid, "concept": "prompt 1", "kind": "text", "coverage": -0.2,
         "similarity": 0.4, "is_gap": True, "evidence": json.dumps(evidence)}], schema=GAPS))
    shown = nearest_samples(site, fid)
    assert [n["key"] for n in shown] == ["train-2", "train-0"] and all(n["image_offset"] > 0 for n in shown)
    import io

    thumb = Image.open(io.BytesIO(thumbnail(shown[0]["shard"], shown[0]["image_offset"], shown[0]["image_size"])))
    assert thumb.size == (32, 24)  # the sample's own image, decoded from its bytes in the tar
    at = signed_in("ana", "correct horse 1")
    at.text_input(key="f_text").input("prompt 1").run()  # it, and prompts 10-19
    at.selectbox(key="item").set_value(fid).run()
    assert not at.exception and "Nearest training samples" in texts(at) and "0.41 caption 2" in texts(at)
    at.sidebar.radio(key="nav").set_value("Overview").run()
    assert len(at.get("vega_lite_chart")) >= 2  # failure rate and the gap map


def test_sql_in_every_text_box_is_matched_or_stored_as_plain_text(site):
    at = signed_in("ana", "correct horse 1")
    at.text_input(key="f_text").input(INJECTION).run()
    assert not at.exception and "0 items match" in texts(at)
    at.text_input(key="f_text").input("").run()
    fid = at.selectbox(key="item").value
    at.button(key=f"claim-{fid}").click().run()
    at.text_area(key=f"e-{fid}").input(INJECTION)  # not JSON: refused, nothing written
    at.selectbox(key=f"r-{fid}").set_value("edit")
    at.button[[b.label for b in at.button].index("Submit verdict")].click().run()
    assert "not JSON" in texts(at) and site.query("SELECT count(*) FROM reviews").column(0)[0].as_py() == 0
    at.text_area(key=f"e-{fid}").input("")
    at.selectbox(key=f"r-{fid}").set_value("leave")
    at.text_area(key=f"n-{fid}").input(INJECTION)
    at.button[[b.label for b in at.button].index("Submit verdict")].click().run()
    assert site.query("SELECT note FROM reviews").column(0).to_pylist() == [INJECTION]
    at.sidebar.radio(key="nav").set_value("Enhancer pairs").run()
    at.text_input(key="pairs_text").input(INJECTION).run()
    assert not at.exception and "no degradation chains match" in texts(at)
    assert site.query("SELECT count(*) FROM users").column(0)[0].as_py() == 3  # every table still there


def test_the_jobs_table_says_each_kinds_measure_before_and_after(site):
    from datetime import datetime, timezone

    from dashboards.data import jobs
    from dataengine.schema import JOBS

    now = datetime.now(timezone.utc)
    results = {
        "retrain-dit": {"prompts_uncovered_before": 4, "prompts_uncovered_after": 1, "fixed_share": 0.75,
                        "dit": {"promoted": True, "gate": "fixed 75%", "eval_loss": 0.1, "current_eval_loss": 0.12}},
        "retrain-enhancer": {"promoted": False, "gate": "fixed 20% < 50%", "fixed_share": 0.2,
                             "heldout_loss_rate_before": 0.5, "heldout_loss_rate_after": 0.25},
        "retrain-reward": {"promoted": True, "gate": "ok", "fixed_share": 0.6,
                           "heldout_before": {"aesthetics": {"accuracy": 0.77}},
                           "heldout_after": {"aesthetics": {"accuracy": 0.83}}},
    }
    site.upsert("jobs", pa.Table.from_pylist([
        {"job_id": kind, "kind": kind, "status": "done", "trigger": "20 approved", "result": json.dumps(r),
         "created_at": now, "updated_at": now} for kind, r in results.items()], schema=JOBS))
    got = {j["kind"]: j for j in jobs(site)}
    assert got["retrain-dit"]["before -> after"] == "uncovered prompts 4 -> 1; eval loss 0.1200 -> 0.1000"
    assert got["retrain-dit"]["promoted"] is True and got["retrain-dit"]["gate"] == "fixed 75%"
    assert got["retrain-enhancer"]["before -> after"] == "held-out prompts losing a word 50% -> 25%"
    assert got["retrain-enhancer"]["promoted"] is False
    assert got["retrain-reward"]["before -> after"] == "aesthetics accuracy 0.770 -> 0.830"


def test_a_demoted_admin_loses_the_admin_page_at_the_next_click(site):
    at = signed_in("root", "correct horse 4")
    at.sidebar.radio(key="nav").set_value("Admin").run()
    assert "Run the trigger policies now" in [b.label for b in at.button]
    add_user(site, "root", "correct horse 4", "viewer", replace=True)  # another admin demotes them
    at.run()
    assert "admins only" in texts(at) and "Run the trigger policies now" not in [b.label for b in at.button]

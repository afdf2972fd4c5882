"""The curators' dashboard (Streamlit): `dataengine dashboard -w WS`.

Pages: Queue (triaged failures, filtered and paged in the database; one item at a time
for review), Overview (failure rate, gap map, jobs, quarantine), Enhancer pairs, and
Admin (users, trigger policies). Nobody sees anything before signing in; every write
goes through dataengine/review.py or accounts.py, which check the signed-in user's role
in the catalog at the moment of writing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import streamlit as st

from dashboards import data
from dataengine import review as rv
from dataengine.accounts import ROLES, AccountError, Forbidden, add_user, authenticate, list_users, remove_user, require
from dataengine.catalog import Catalog
from dataengine.triage import CAUSES
from dataengine.workspace import Workspace

SESSION_TTL_S = float(os.environ.get("DATAENGINE_SESSION_TTL_S", 8 * 3600))
PAGES = ("Queue", "Overview", "Enhancer pairs", "Admin")


def catalog() -> Catalog:
    root = os.environ.get("DATAENGINE_WORKSPACE")
    if not root or not Workspace.at(root).catalog_path.exists():
        st.error(f"no workspace catalog at {root!r}: start with `dataengine dashboard -w WS`")
        st.stop()
    return Catalog(Workspace.at(root))


# ---------------------------------------------------------------------------------------
# Sign-in
# ---------------------------------------------------------------------------------------

def signed_in(cat: Catalog) -> str | None:
    """The signed-in user, after checking the session has not expired and the user still
    exists; None (and the session cleared) otherwise."""
    user, since = st.session_state.get("user"), st.session_state.get("since", 0.0)
    if user and time.time() - since > SESSION_TTL_S:
        st.session_state.clear()
        st.session_state["flash"] = "your session expired: sign in again"
        return None
    if user:
        try:
            st.session_state["role"] = require(cat, user, "viewer").role
        except Forbidden:
            st.session_state.clear()
            return None
    return user


def sign_in_form(cat: Catalog) -> None:
    st.title("dataengine")
    if msg := st.session_state.pop("flash", None):
        st.info(msg)
    with st.form("sign-in"):
        name = st.text_input("Username", key="login_user")
        password = st.text_input("Password", type="password", key="login_password")
        if st.form_submit_button("Sign in"):
            user = authenticate(cat, name, password)
            if user is None:
                st.error("wrong username or password")
            else:
                st.session_state.update(user=user.username, role=user.role, since=time.time())
                st.rerun()


# ---------------------------------------------------------------------------------------
# Queue and review
# ---------------------------------------------------------------------------------------

def queue_filter() -> tuple[rv.QueueFilter, str, bool, int]:
    sb = st.sidebar
    sb.subheader("Filter")
    causes = sb.multiselect("Cause", CAUSES, key="f_causes")
    lo, hi = sb.slider("Confidence", 0.0, 1.0, (0.0, 1.0), 0.05, key="f_conf")
    age = sb.number_input("Newer than (days, 0 = any)", 0.0, 3650.0, 0.0, key="f_age")
    text = sb.text_input("Prompt contains", key="f_text")
    state = sb.selectbox("State", rv.STATES, key="f_state")
    sort = sb.selectbox("Sort by", tuple(rv.SORTS), key="f_sort")
    desc = sb.checkbox("Descending", True, key="f_desc")
    size = sb.selectbox("Page size", (25, 50, 100), key="f_size")
    flt = rv.QueueFilter(tuple(causes), lo, hi, age or None, text or None, state)
    return flt, sort, desc, size


def queue_page(cat: Catalog, user: str) -> None:
    flt, sort, desc, size = queue_filter()
    page = st.number_input("Page", 1, 1_000_000, 1, key="page") - 1
    rows, total = rv.queue_page(cat, flt, sort, desc, size, page * size)
    st.caption(f"{total} items match; page {page + 1} of {max(1, -(-total // size))}")
    now = time.time()
    st.dataframe([{"id": r["feedback_id"], "cause": r["cause"], "confidence": round(r["confidence"], 3),
                   "age (days)": round((now - r["time"].timestamp()) / 86400, 1) if r["time"] else None,
                   "rating": r["rating"], "prompt": r["prompt"], "claimed by": r["claimed_by"],
                   "verdict": r["verdict"], "reviewer": r["reviewer"]} for r in rows],
                 width="stretch", hide_index=True)
    if st.session_state.get("role") in ("curator", "admin"):
        bulk_form(cat, user, flt, total)
    ids = [r["feedback_id"] for r in rows]
    if ids:
        chosen = st.selectbox("Item", ids, key="item")
        item_view(cat, user, chosen)


def bulk_form(cat: Catalog, user: str, flt: rv.QueueFilter, total: int) -> None:
    with st.expander(f"Bulk verdict on all {total} items of this filter"):
        verdict = st.selectbox("Verdict", rv.VERDICTS, key="bulk_verdict")
        cause = st.selectbox("Cause (reassign)", CAUSES, key="bulk_cause") if verdict == "reassign" else None
        note = st.text_input("Note", key="bulk_note")
        if st.button("Apply to the selection", key="bulk_ask"):
            st.session_state["bulk_pending"] = True
        if st.session_state.get("bulk_pending"):
            ids = rv.selection(cat, flt)
            st.warning(f"This will {verdict} {len(ids)} items (held or reviewed ones are skipped).")
            if st.button(f"Confirm: {verdict} {len(ids)} items", key="bulk_confirm"):
                st.session_state["bulk_pending"] = False
                try:
                    rep = rv.bulk(cat, ids, verdict, user, cause, note or None)
                except (rv.ReviewError, Forbidden) as e:
                    st.error(str(e))
                    return
                st.success(f"{rep.applied} items decided; {len(rep.skipped)} skipped")


def item_view(cat: Catalog, user: str, fid: str) -> None:
    it = rv.item(cat, fid)
    if it is None:
        st.warning(f"{fid} is no longer in the queue")
        return
    st.subheader(f"{fid}: {it['cause']} ({it['confidence']:.2f})")
    img, text = st.columns([1, 2])
    path = it.get("image_ref")
    if path and Path(path).exists():
        img.image(path, caption="output", width=256)
    else:
        img.caption(f"output image not readable here: {path}")
    left, right = data.marked_diff(it["prompt"], it.get("enhanced_prompt"))
    text.markdown("**User prompt** (dropped words struck through)")
    text.markdown(left or "-", unsafe_allow_html=True)  # escaped in marked_diff
    text.markdown("**Enhanced prompt** (added words marked)")
    text.markdown(right or "(no enhancer ran)", unsafe_allow_html=True)
    evidence = json.loads(it.get("evidence") or "{}")
    st.markdown(f"**Why {it['cause']}:** {evidence.get('text', '(no evidence recorded)')}")
    scores = json.loads(it.get("scores") or "null")
    if scores:
        st.markdown("**Reward scores:** " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    if it.get("rating") is not None:
        st.markdown(f"**Rating:** {it['rating']} / 5" + (f"; comment: {it['comment']}" if it.get("comment") else ""))
    if it["cause"] == "knowledge":
        nearest(cat, fid)
    remedy = it.get("remedy")
    if remedy:
        st.markdown(f"**Remedy** ({remedy['status']}): {remedy['title']}")
        st.json(json.loads(remedy["proposal"]), expanded=False)
    review_form(cat, user, it)
    audit(cat, user, fid)


def nearest(cat: Catalog, fid: str) -> None:
    shown = data.nearest_samples(cat, fid)
    if not shown:
        st.caption("no gap search recorded for this prompt")
        return
    st.markdown("**Nearest training samples**")
    cols = st.columns(len(shown))
    for col, n in zip(cols, shown):
        try:
            col.image(data.thumbnail(n["shard"], n["image_offset"], n["image_size"]), width=128)
        except Exception as e:  # noqa: BLE001 - a moved shard must not break the page
            col.caption(f"(image unreadable: {type(e).__name__})")
        col.caption(f"{n['similarity']:.2f} {n['caption'][:80]}")


def review_form(cat: Catalog, user: str, it: dict) -> None:
    fid, claim = it["feedback_id"], it.get("claim")
    if it.get("review"):
        r = it["review"]
        st.info(f"reviewed: {r['verdict']}{' -> ' + r['cause'] if r['cause'] else ''} by {r['curator']}")
        return
    if st.session_state.get("role") not in ("curator", "admin"):
        st.caption("viewers read only")
        return
    if not claim or claim["curator"] != user:
        if claim:
            st.warning(f"claimed by {claim['curator']} until {claim['expires_at']:%H:%M:%S} UTC")
        if st.button("Claim for review", key=f"claim-{fid}"):
            try:
                rv.claim(cat, fid, user)
                st.rerun()
            except (rv.ReviewError, Forbidden) as e:
                st.error(str(e))
        return
    # One review id per form shown: a resubmitted form is recorded once.
    rid = st.session_state.setdefault(f"rid-{fid}", rv.new_review_id())
    with st.form(f"review-{fid}"):
        verdict = st.radio("Verdict", rv.VERDICTS, horizontal=True, key=f"v-{fid}",
                           captions=("the cause is right", "another cause", "not a failure"))
        cause = st.selectbox("Cause, if reassigned", CAUSES, key=f"c-{fid}")
        remedy = st.selectbox("Remedy", ("leave", "approve", "edit", "reject"), key=f"r-{fid}")
        edit = st.text_area("Edit (JSON of proposal fields to change)", key=f"e-{fid}")
        note = st.text_area("Note", key=f"n-{fid}")
        sent = st.form_submit_button("Submit verdict")
        released = st.form_submit_button("Release")
    if released:
        rv.release(cat, fid, user)
        st.rerun()
    if sent:
        try:
            v = rv.Verdict(fid, verdict, cause if verdict == "reassign" else None, note or None,
                           None if remedy == "leave" else remedy, json.loads(edit) if edit.strip() else None, rid)
            _, applied = rv.submit(cat, v, user)
        except json.JSONDecodeError as e:
            st.error(f"the edit is not JSON: {e}")
            return
        except (rv.ReviewError, Forbidden) as e:
            st.error(str(e))
            return
        st.session_state.pop(f"rid-{fid}", None)
        st.success("verdict recorded" if applied else "that verdict was already recorded")


def audit(cat: Catalog, user: str, fid: str) -> None:
    events = rv.history(cat, fid)
    if not events:
        return
    with st.expander(f"History ({len(events)} events)"):
        undone = {e["undoes"] for e in events if e["verdict"] == "undo"}
        for e in events:
            line = f"{e['reviewed_at']:%Y-%m-%d %H:%M:%S} {e['curator']}: {e['verdict']}"
            if e["cause"]:
                line += f" -> {e['cause']}"
            if e["remedy_verdict"]:
                line += f"; remedy {e['remedy_verdict']}"
            if e["note"]:
                line += f" ({e['note']})"
            st.text(line)
            can = st.session_state.get("role") in ("curator", "admin")
            if can and e["verdict"] != "undo" and e["review_id"] not in undone:
                if st.button("Undo", key=f"undo-{e['review_id']}"):
                    try:
                        rv.undo(cat, e["review_id"], user)
                        st.rerun()
                    except (rv.ReviewError, Forbidden) as err:
                        st.error(str(err))


# ---------------------------------------------------------------------------------------
# Overview, pairs, admin
# ---------------------------------------------------------------------------------------

def overview_page(cat: Catalog) -> None:
    import altair as alt
    import pandas as pd

    st.header("Failure rate per cause")
    rate = pd.DataFrame(data.failure_rate(cat))
    if rate.empty:
        st.caption("no triaged failures yet")
    else:
        st.altair_chart(alt.Chart(rate).mark_line(point=True).encode(
            x="day:T", y=alt.Y("rate:Q", axis=alt.Axis(format="%")), color="cause:N",
            tooltip=["day:T", "cause:N", "failures:Q", "feedback:Q"]), width="stretch")
    st.header("Gap map")
    gaps = pd.DataFrame(data.gap_map(cat))
    if gaps.empty:
        st.caption("no gap searches yet")
    else:
        gaps["state"] = gaps.apply(lambda r: "patched" if r.patched else ("gap" if r.is_gap else "covered"), axis=1)
        st.altair_chart(alt.Chart(gaps).mark_circle(size=80).encode(
            x=alt.X("similarity:Q", title="similarity to nearest training images"),
            y=alt.Y("coverage:Q", title="coverage"), color="state:N",
            tooltip=["concept", "coverage", "failures", "patched"]), width="stretch")
    st.header("Retrain jobs")
    jobs = data.jobs(cat)
    if jobs:
        st.dataframe(jobs, width="stretch", hide_index=True)
    else:
        st.caption("no jobs yet")
    st.header("Quarantine")
    q = pd.DataFrame(data.quarantine(cat))
    if q.empty:
        st.caption("nothing quarantined")
    else:
        st.altair_chart(alt.Chart(q).mark_bar().encode(x="sum(n):Q", y=alt.Y("reason:N", sort="-x"), color="stage:N",
                                                       tooltip=["stage", "shard", "reason", "n"]),
                        width="stretch")
        st.dataframe(q, width="stretch", hide_index=True)


def pairs_page(cat: Catalog) -> None:
    st.header("Enhancer pairs")
    text = st.text_input("Caption contains", key="pairs_text")
    sources = data.pair_sources(cat, text or None)
    if not sources:
        st.caption("no degradation chains match")
        return
    source = st.selectbox("Caption", sources, key="pairs_source")
    for step in data.chain(cat, source):
        st.markdown(f"**step {step['step']}** · `{step['category']}` · removed: *{step['removed']}*")
        st.text(f"{step['more']}\n-> {step['less']}")


def admin_page(cat: Catalog, user: str) -> None:
    if st.session_state.get("role") != "admin":
        st.warning("admins only")
        return
    st.header("Users")
    st.dataframe(list_users(cat), width="stretch", hide_index=True)
    with st.form("add-user"):
        name = st.text_input("New username", key="new_user")
        password = st.text_input("Password", type="password", key="new_password")
        role = st.selectbox("Role", ROLES, key="new_role")
        if st.form_submit_button("Add user"):
            try:
                require(cat, user, "admin")
                add_user(cat, name, password, role, created_by=user)
                st.success(f"added {name} ({role})")
            except (AccountError, Forbidden) as e:
                st.error(str(e))
    gone = st.selectbox("Remove user", [u["username"] for u in list_users(cat) if u["username"] != user],
                        key="rm_user", index=None)
    if gone and st.button(f"Remove {gone}", key="rm_confirm"):
        try:
            require(cat, user, "admin")
            remove_user(cat, gone)
            st.rerun()
        except (AccountError, Forbidden) as e:
            st.error(str(e))
    st.header("Trigger policies")
    from dataengine.triggers import check

    fire = st.button("Run the trigger policies now", key="fire")
    if fire:
        try:
            require(cat, user, "admin")
        except Forbidden as e:
            st.error(str(e))
            fire = False
    for v in check(cat.ws, dry_run=not fire):
        st.text(f"{v.cause:<10} {'FIRES' if v.fire else 'waits'}{' -> ' + v.job_id if v.job_id else ''}: {v.why}")


def main() -> None:
    st.set_page_config(page_title="dataengine", layout="wide")
    cat = catalog()
    user = signed_in(cat)
    if not user:
        sign_in_form(cat)
        return
    st.sidebar.markdown(f"**{user}** ({st.session_state['role']})")
    if st.sidebar.button("Sign out", key="sign_out"):
        st.session_state.clear()
        st.rerun()
    page = st.sidebar.radio("Page", PAGES, key="nav")
    if page == "Queue":
        queue_page(cat, user)
    elif page == "Overview":
        overview_page(cat)
    elif page == "Enhancer pairs":
        pairs_page(cat)
    else:
        admin_page(cat, user)


# Streamlit runs this file as __main__; a multiprocessing child that re-imports the parent's
# main module (spawn, after AppTest ran it in-process) runs it as __mp_main__ and must not draw.
if __name__ == "__main__":
    main()

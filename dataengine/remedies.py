"""Remedies: what each triaged cause proposes, as rows of a review queue (`remedies`).

- rl -> a reward adjustment per head that overrated failures: which head, which way, and
  recalibration pairs (a well-rated output that head scored no higher than a failure);
- knowledge -> failures grouped into the concepts they miss (by the weakest phrase gap
  search found in each prompt, named by the words the group's phrases share), each with
  its gap report and a patch shard drawn from the pool (`patch.py`);
- prompt -> an enhancer training pair per failure: the user's prompt and the enhanced
  prompt with the user's replaced and dropped words put back in their slots.

A curator approves, edits or rejects each row (`decide`); triggers count approved rows.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Sequence

import pyarrow as pa

from dataengine import signals as sg
from dataengine.catalog import Catalog
from dataengine.schema import REMEDIES, RESOLVED
from dataengine.workspace import Workspace

KINDS = {"rl": "reward-adjustment", "knowledge": "knowledge-patch", "prompt": "enhancer-pair"}
VERDICTS = ("approve", "reject", "edit")
MAX_PAIRS = 1000  # recalibration pairs per head proposal, spread over its failures (~100 kB of JSON)


class RemedyError(ValueError):
    pass


@dataclass
class RemedyReport:
    made: dict[str, int] = field(default_factory=lambda: {c: 0 for c in KINDS})
    failures: dict[str, int] = field(default_factory=lambda: {c: 0 for c in KINDS})
    titles: list[str] = field(default_factory=list)


def _rid(cause: str, key: str, now: datetime) -> str:
    # The time is part of it: a failure a used remedy did not fix gets a new remedy, not its old row.
    return hashlib.sha1(f"{cause}\0{key}\0{now.isoformat()}".encode()).hexdigest()[:16]


def _row(cause: str, key: str, title: str, ids: Sequence[str], proposal: dict, now: datetime,
         status: str = "pending") -> dict:
    return dict(remedy_id=_rid(cause, key, now), cause=cause, kind=KINDS[cause], title=title, feedback_ids=list(ids),
                proposal=json.dumps(proposal, default=str), status=status, curator=None, note=None, job_id=None,
                created_at=now, decided_at=None)


# ---------------------------------------------------------------------------------------
# Per cause
# ---------------------------------------------------------------------------------------


def rl_remedies(failures: Sequence[dict], good: Sequence[dict], now: datetime) -> list[dict]:
    """One reward-adjustment proposal per head that rated rl failures highest."""
    by_head: dict[str, list[dict]] = defaultdict(list)
    for f in failures:
        by_head[f["evidence"].get("reward_top") or "(no scores)"].append(f)
    out = []
    for head, group in sorted(by_head.items()):
        per_failure: list[list[dict]] = []
        if head != "(no scores)":
            for f in group:
                s_fail = (f["scores"] or {}).get(head)
                mine = [{"win": g["feedback_id"], "lose": f["feedback_id"], "win_score": s_good, "lose_score": s_fail}
                        for g in good if s_fail is not None and (s_good := (g["scores"] or {}).get(head)) is not None
                        and s_good <= s_fail]
                mine.sort(key=lambda p: (p["win_score"] - p["lose_score"], p["win"]))  # the most wrongly ordered first
                per_failure.append(mine)
        found = sum(len(m) for m in per_failure)
        # Every failure gets its share of the kept pairs: a recalibration learns from many failures,
        # not from the few the head overrated most.
        pairs = [m[k] for k in range(max(map(len, per_failure), default=0)) for m in per_failure
                 if k < len(m)][:MAX_PAIRS]
        ids = [f["feedback_id"] for f in group]
        proposal = {"head": head, "direction": "lower on outputs like these failures",
                    "failures": ids, "pairs": pairs, "pairs_found": found,
                    "why": (f"{head} rated {len(group)} failed outputs highest among its heads; "
                            f"{found} pairs where a well-rated output scored no higher than a failure")}
        out.append(_row("rl", f"{head}\0{min(ids)}\0{len(ids)}", f"{head}: {len(group)} failures it overrated; "
                        f"{len(pairs)} recalibration pairs", ids, proposal, now))
    return out


def concept_groups(failures: Sequence[dict]) -> list[tuple[str, list[dict]]]:
    """Knowledge failures grouped by the content words of their weakest phrase: two
    failures share a group when their phrases share a content word pair; a group is
    named by the words most of its phrases hold."""
    def key_words(f: dict) -> list[str]:
        # A phrase of function words only ("image") names nothing: fall back to the prompt.
        return sg.content_words(f["evidence"].get("weakest_phrase") or "") or sg.content_words(f["prompt"]) \
            or [f["prompt"].strip().lower() or f["feedback_id"]]

    groups: list[tuple[Counter, list[dict]]] = []
    for f in failures:
        words = key_words(f)
        best, best_overlap = None, 1
        for g in groups:
            overlap = sum(1 for w in set(words) if g[0][w] * 2 >= len(g[1]))  # words most of the group has
            if overlap > best_overlap:
                best, best_overlap = g, overlap
        if best is None:
            groups.append((Counter(set(words)), [f]))
        else:
            best[0].update(set(words))
            best[1].append(f)
    out = []
    for counts, members in groups:
        shared = [w for w, n in counts.most_common() if n * 2 > len(members)]
        order = key_words(members[0])  # name in the phrase's own word order
        name = " ".join(w for w in dict.fromkeys(order) if w in shared) or " ".join(order[:3])
        out.append((name, members))
    return sorted(out, key=lambda g: -len(g[1]))


def knowledge_remedies(ws: Workspace, failures: Sequence[dict], now: datetime, searcher=None,
                       patch_size: int = 32, load_encoder=None) -> list[dict]:
    """Per missing concept: its gap report and a patch shard from the pool. The gap search
    is `searcher`, or the workspace's, with its model loaded by `load_encoder`."""
    from dataengine.patch import PatchConfig, patch_found_gap

    out = []
    groups = concept_groups(failures)
    if groups and searcher is None:
        from dataengine.gaps import GapSearcher

        if load_encoder is None:
            raise ValueError("knowledge remedies search the gap index: pass a GapSearcher or load_encoder "
                             "(models.clip.load_clip)")
        searcher = GapSearcher(ws, load_encoder=load_encoder)
    for name, members in groups:
        ids = [f["feedback_id"] for f in members]
        reports, vecs = searcher.prompts([name], [ids[0]])
        rep = reports[0]
        patch = patch_found_gap(searcher, rep, vecs[0], PatchConfig(size=patch_size)) if rep.is_gap else None
        proposal = {"concept": name, "failures": ids, "prompts": [f["prompt"] for f in members[:10]],
                    "gap": {"gap_id": rep.gap_id, "is_gap": rep.is_gap, "percentile": rep.percentile,
                            "threshold": rep.threshold, "explain": rep.explain()},
                    "patch": ({"shard": patch.shard, "written": patch.written, "summary": patch.summary()}
                              if patch else None)}
        state = (f"patch of {patch.written} pool samples" if patch and patch.written else
                 "a gap, but the pool had nothing to patch it with" if rep.is_gap else
                 "not a gap when searched by name: review the grouping")
        out.append(_row("knowledge", f"{name}\0{min(ids)}", f"missing concept {name!r}: {len(ids)} failures; {state}",
                        ids, proposal, now))
    return out


def corrected_prompt(prompt: str, enhanced: str) -> tuple[str, list[str]]:
    """The enhanced prompt with the user's words put back where the enhancer lost them, and
    the words it had dropped outright (put back at their slot; a curator may move them).

    Aligned word by word (as `signals.drift` aligns them): what the enhancer only added
    stays; a slot where it wrote other words in place of the user's gets the user's words
    back, after any extra detail it put in front of them (right-aligned: "a large blue star"
    for "a red star" becomes "a large red star"); words it dropped come back in their slot."""
    d = sg.drift(prompt, enhanced)
    user, theirs = prompt.split(), enhanced.split()
    key = lambda tokens: [" ".join(sg.words(t)) for t in tokens]  # noqa: E731
    out: list[str] = []
    sm = difflib.SequenceMatcher(None, key(user), key(theirs), autojunk=False)
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op in ("equal", "insert"):
            out += theirs[j1:j2]
        elif op == "delete":
            out += user[i1:i2]
        else:  # replace: the enhancer's words stood in the user's place; a cut-off end keeps none
            extra = (j2 - j1) - (i2 - i1) if i2 < len(user) else 0
            out += theirs[j1:j1 + max(0, extra)] + user[i1:i2]
    return " ".join(out), d.dropped


def prompt_remedies(failures: Sequence[dict], now: datetime) -> list[dict]:
    out = []
    for f in failures:
        if not f["enhanced_prompt"]:
            continue
        fixed, dropped = corrected_prompt(f["prompt"], f["enhanced_prompt"])
        proposal = {"less": f["prompt"], "more": fixed, "was": f["enhanced_prompt"], "dropped": dropped,
                    "needs_edit": bool(sg.drift(f["prompt"], fixed).lost)}
        title = (f"enhancer pair: {', '.join(dropped)} put back in their slot (check the wording)" if dropped
                 else f"enhancer pair: {f['prompt'][:60]!r} -> corrected enhanced prompt")
        out.append(_row("prompt", f["feedback_id"], title, [f["feedback_id"]], proposal, now))
    return out


# ---------------------------------------------------------------------------------------
# The queue
# ---------------------------------------------------------------------------------------


def _unanswered(catalog: Catalog) -> dict[str, list[dict]]:
    """Latest triage of each failure no remedy answers: none waits for a curator or a job
    (pending, approved), none was rejected, and none was used since it was last triaged (a
    failure triaged again after its remedy's job still fails, and gets a new one), and the
    loop has not found it fixed (`resolved`)."""
    rows = catalog.query("""
        SELECT t.feedback_id, t.cause, t.evidence, t.triaged_at, f.prompt, f.enhanced_prompt, f.scores, f.rating
        FROM (SELECT *, row_number() OVER (PARTITION BY feedback_id ORDER BY triaged_at DESC) AS n FROM triage) t
        JOIN feedback f USING (feedback_id) WHERE t.n = 1 ORDER BY t.feedback_id""").to_pylist()
    resolved = set(catalog.query("SELECT feedback_id FROM resolved").column(0).to_pylist())
    rows = [r for r in rows if r["feedback_id"] not in resolved]
    answered: dict[str, list[tuple[str, datetime]]] = defaultdict(list)
    for r in catalog.query("SELECT feedback_ids, status, created_at FROM remedies").to_pylist():
        for fid in r["feedback_ids"]:
            answered[fid].append((r["status"], r["created_at"]))
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if any(status != "used" or made >= r["triaged_at"] for status, made in answered.get(r["feedback_id"], ())):
            continue
        r["evidence"] = json.loads(r["evidence"])
        r["scores"] = sg.parse_scores(r["scores"])
        out[r["cause"]].append(r)
    return out


def mark_resolved(ws: Workspace, fixed: dict[str, str]) -> int:
    """Record failures (id -> the cause they were fixed for) as fixed by the versions promoted
    now; `propose` skips them from then on. Returns how many were new."""
    if not fixed:
        return 0
    catalog = Catalog(ws)
    with catalog.transaction() as con:
        versions = json.dumps(dict(con.execute(
            "SELECT model, version FROM model_versions WHERE status = 'promoted' ORDER BY model").fetchall()))
        have = {r[0] for r in con.execute("SELECT feedback_id FROM resolved").fetchall()}
        now = datetime.now(timezone.utc)
        rows = [{"feedback_id": f, "cause": c, "versions": versions, "resolved_at": now}
                for f, c in sorted(fixed.items()) if f not in have]
        if rows:
            catalog.upsert("resolved", pa.Table.from_pylist(rows, schema=RESOLVED), con)
    return len(rows)


def propose(ws: Workspace, causes: Sequence[str] = tuple(KINDS), searcher=None, patch_size: int = 32,
            load_encoder=None) -> RemedyReport:
    """Queue remedies for every triaged failure no remedy answers yet (knowledge remedies
    search gaps with `searcher`, or one whose model `load_encoder` loads)."""
    catalog = Catalog(ws)
    catalog.migrate()
    now = datetime.now(timezone.utc)
    todo = _unanswered(catalog)
    report = RemedyReport()
    rows: list[dict] = []
    if "rl" in causes and todo.get("rl"):
        good = [dict(feedback_id=r["feedback_id"], scores=sg.parse_scores(r["scores"])) for r in catalog.query(
            "SELECT feedback_id, scores FROM feedback WHERE rating >= 4 AND scores IS NOT NULL "
            "ORDER BY feedback_id LIMIT 500").to_pylist()]
        rows += rl_remedies(todo["rl"], good, now)
    if "knowledge" in causes and todo.get("knowledge"):
        rows += knowledge_remedies(ws, todo["knowledge"], now, searcher, patch_size, load_encoder)
    if "prompt" in causes and todo.get("prompt"):
        rows += prompt_remedies(todo["prompt"], now)
    if rows:
        catalog.upsert("remedies", pa.Table.from_pylist(rows, schema=REMEDIES))
    for r in rows:
        report.made[r["cause"]] += 1
        report.failures[r["cause"]] += len(r["feedback_ids"])
        report.titles.append(f"[{r['cause']}] {r['title']}")
    return report


def decide(ws: Workspace, remedy_id: str, verdict: str, curator: str, note: str | None = None,
           edit: dict | None = None) -> dict:
    """A curator's verdict on one remedy: approve, reject, or edit (merge `edit` into its
    proposal, then approve). Used remedies cannot change."""
    catalog = Catalog(ws)
    with catalog.transaction() as con:
        return decide_in(catalog, con, remedy_id, verdict, curator, note, edit)


def decide_in(catalog: Catalog, con, remedy_id: str, verdict: str, curator: str, note: str | None = None,
              edit: dict | None = None) -> dict:
    """`decide` inside the caller's transaction (a dashboard review writes its event with it)."""
    if verdict not in VERDICTS:
        raise RemedyError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    rows = con.sql("SELECT * FROM remedies WHERE remedy_id = ?", params=[remedy_id]).to_arrow_table().to_pylist()
    if not rows:
        raise RemedyError(f"no remedy {remedy_id!r}")
    row = rows[0]
    if row["status"] == "used":
        raise RemedyError(f"remedy {remedy_id} was used by job {row['job_id']}; it cannot change")
    if verdict == "edit":
        if not edit:
            raise RemedyError("an edit needs the fields to change")
        proposal = json.loads(row["proposal"]) | edit
        if row["cause"] == "prompt":
            proposal["needs_edit"] = bool(sg.drift(proposal["less"], proposal["more"]).lost)
            if proposal["needs_edit"]:
                raise RemedyError(f"the edited prompt still loses the user's words: "
                                  f"{sg.drift(proposal['less'], proposal['more']).explain()}")
        row["proposal"] = json.dumps(proposal, default=str)
    row.update(status="rejected" if verdict == "reject" else "approved", curator=curator, note=note,
               decided_at=datetime.now(timezone.utc))
    catalog.upsert("remedies", pa.Table.from_pylist([row], schema=REMEDIES), con)
    return row


def approve_all(ws: Workspace, curator: str = "auto-approve") -> int:
    """Approve every pending remedy that needs no edit (`--auto-approve`: stands in for a curator)."""
    catalog = Catalog(ws)
    n = 0
    for r in catalog.query("SELECT remedy_id, proposal FROM remedies WHERE status = 'pending'").to_pylist():
        if json.loads(r["proposal"]).get("needs_edit"):
            continue
        decide(ws, r["remedy_id"], "approve", curator)
        n += 1
    return n

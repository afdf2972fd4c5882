"""Triage a workspace's failures, and learn a triager from curators' reviews.

    report = triage_workspace(ws)          # untriaged failures -> triage table
    outcome = learn_triager(ws)            # reviews -> a learned version, promoted if it wins

A failure is a feedback record rated 1-2, or one with no rating (an evaluation flagged
it). Records rated 3-5 are not triaged: their logged scores calibrate the reward signal.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from dataengine import lake
from dataengine import signals as sg
from dataengine.catalog import Catalog
from dataengine.embed import Loader
from dataengine.schema import MODEL_VERSIONS, TRIAGE
from dataengine.review_queue import refresh_queue
from dataengine.triage import (CAUSES, FEATURES, LearnedTriager, RuleTriager, SignalTable, compare, gather,
                               rows_of, table_from_evidence)
from dataengine.workspace import Workspace

log = logging.getLogger(__name__)

TRIAGER = "triager"
FAILURE_SQL = "(rating IS NULL OR rating <= 2)"
MIN_DRIFT_REFERENCE = 20  # well-rated outputs needed before drift is judged against theirs


@dataclass
class TriageReport:
    failures: int = 0  # untriaged failures found
    triaged: int = 0
    by_cause: dict[str, int] = field(default_factory=dict)
    triager: str = ""
    signals: dict[str, str] = field(default_factory=dict)  # signal -> how it was measured, or why not
    examples: list[str] = field(default_factory=list)  # a few evidence lines


def current_triager(ws: Workspace, catalog: Catalog | None = None):
    """The newest promoted learned triager, or the rules when none has won yet."""
    catalog = catalog or Catalog(ws)
    rows = catalog.query("SELECT version, path, metrics FROM model_versions WHERE model = ? AND status = 'promoted' "
                         "ORDER BY created_at DESC, version DESC LIMIT 1", [TRIAGER]).to_pylist()
    if not rows:
        return RuleTriager()
    r = rows[0]
    stored = json.loads((Path(r["path"]) / "model.json").read_text())
    if stored.get("features") != list(FEATURES):
        # Trained on another signal set: the rules decide until a triager of today's signals wins.
        log.warning("triager %s was trained on other signals (%s); using the rules until one learned on "
                    "today's wins", r["version"], stored.get("features"))
        return RuleTriager()
    return LearnedTriager.from_json(stored, f"learned/{r['version']}", json.loads(r["metrics"] or "{}"))


def _gap_searcher(ws: Workspace, model: str, load_encoder: Loader | None):
    """The workspace's gap searcher, or (None, why) when it has no index to search."""
    from dataengine.gaps import GapSearcher

    if load_encoder is None:
        return None, "no embedding model loader given"
    try:
        return GapSearcher(ws, model, load_encoder=load_encoder), None
    except (FileNotFoundError, ValueError) as e:
        return None, str(e).splitlines()[0]


def _image_vectors(encoder, refs: list[str]) -> tuple[np.ndarray, list[str]]:
    """CLIP vectors of the outputs that are local files (NaN rows for the rest), and the errors."""
    from dataengine.images import to_square

    vecs = np.full((len(refs), encoder.embed_dim), np.nan, np.float32)
    arrays, rows, errors = [], [], []
    for i, ref in enumerate(refs):
        if "://" in ref and not ref.startswith("file://"):
            errors.append(f"{ref}: remote image not fetched")
            continue
        try:
            arrays.append(to_square(Path(ref.removeprefix("file://")).read_bytes(), encoder.image_size))
            rows.append(i)
        except (OSError, ValueError) as e:
            errors.append(f"{ref}: {e}")
    if arrays:
        vecs[rows] = encoder.encode_images(np.stack(arrays))
    return vecs, errors


def triage_workspace(ws: Workspace, model: str = "default", retriage: bool = False, limit: int | None = None,
                     triager=None, *, load_encoder: Loader | None, scorer: Callable[..., Any] | None) -> TriageReport:
    """Compute the signals of every untriaged failure, decide its cause, write the triage rows.

    The models come as arguments: `load_encoder` (spec -> encoder, models.clip.load_clip)
    embeds for coverage and similarity; `scorer(ws, catalog)` (models.feedback_rewards.
    WorkspaceRewards) scores failures that came without logged scores, and raises
    LookupError when the workspace has no reward model. None leaves that signal out."""
    catalog = Catalog(ws)
    catalog.migrate()
    skip = "" if retriage else "AND feedback_id NOT IN (SELECT feedback_id FROM triage)"
    rows = catalog.query(f"SELECT * FROM feedback WHERE {FAILURE_SQL} {skip} ORDER BY time, feedback_id"
                         + (f" LIMIT {int(limit)}" if limit else "")).to_pylist()
    report = TriageReport(failures=len(rows))
    triager = triager or current_triager(ws, catalog)
    report.triager = triager.version
    if not rows:
        return report
    ids = [r["feedback_id"] for r in rows]
    prompts = [r["prompt"] for r in rows]
    enhanced = [r["enhanced_prompt"] for r in rows]
    ratings = [r["rating"] for r in rows]
    scores = [sg.parse_scores(r["scores"]) for r in rows]

    # Reward: logged scores ranked against the feedback's own (the good ones when there are
    # enough); records without scores are scored by the workspace's heads, ranked against
    # the heads' scores of the evaluation set.
    every = catalog.query("SELECT scores, rating FROM feedback WHERE scores IS NOT NULL").to_pylist()
    reference = sg.reference_from_feedback([sg.parse_scores(r["scores"]) for r in every], [r["rating"] for r in every])
    report.signals["reward"] = f"logged scores of {sum(s is not None for s in scores)} failures vs {len(every)} logged records"
    missing = [i for i, s in enumerate(scores) if s is None]
    if missing and scorer is not None:
        try:
            heads = scorer(ws, catalog)
            got = heads.score_rows([rows[i] for i in missing])
            ref = heads.reference()
            for k, i in enumerate(missing):
                # Kept apart from logged scores: other heads, other scale, their own reference.
                scores[i] = {f"ws:{h}": float(v[k]) for h, v in got.items()}
            reference |= {f"ws:{h}": v for h, v in ref.items()}
            report.signals["reward"] += f"; {len(missing)} scored by {heads.version} vs its eval-set scores"
        except LookupError as e:  # no reward model in this workspace
            report.signals["reward"] += f"; {len(missing)} unscored ({e})"

    # How much the enhancer rewords on outputs people rated well: drift beyond that is a fault.
    # Per serving version: two stacks may run different enhancers.
    good = catalog.query("SELECT model_version, prompt, enhanced_prompt FROM feedback WHERE rating >= 4 "
                         "AND enhanced_prompt IS NOT NULL ORDER BY feedback_id").to_pylist()
    shares: dict[str, list[float]] = {}
    for g in good:
        shares.setdefault(g["model_version"], []).append(sg.drift(g["prompt"], g["enhanced_prompt"]).share)
    drift_refs = [np.array(shares[v]) if len(shares.get(v, ())) >= MIN_DRIFT_REFERENCE else None
                  for v in (r["model_version"] for r in rows)]
    report.signals["drift"] = (f"word alignment; against well-rated outputs of the same model_version for "
                               f"{sum(d is not None for d in drift_refs)} of {len(rows)} (the rest: every lost word counts)")

    searcher, why = _gap_searcher(ws, model, load_encoder)
    reports = image_vecs = prompt_vecs = enh_vecs = None
    if searcher is not None:
        reports, prompt_vecs = searcher.prompts(prompts, ids, record=True)
        enh_vecs = searcher.encoder.encode_texts([e if e and e.strip() else p for e, p in zip(enhanced, prompts)])
        image_vecs, errors = _image_vectors(searcher.encoder, [r["image_ref"] for r in rows])
        report.signals["coverage"] = f"gap search ({searcher.encoder.model_id})"
        report.signals["similarity"] = f"CLIP {searcher.encoder.model_id}" + (f"; {len(errors)} images unread" if errors else "")
    else:
        report.signals["coverage"] = report.signals["similarity"] = f"not measured: {why}"
    table = gather(ids, prompts, enhanced, ratings, scores, reference, reports, image_vecs, prompt_vecs, enh_vecs,
                   drift_refs)
    decision = triager.decide(table)
    out = rows_of(table, decision)
    lake.write_part(ws.lake, "triage", pa.Table.from_pylist(out, schema=TRIAGE))
    refresh_queue(catalog, [r["feedback_id"] for r in out])  # what the dashboard pages
    report.triaged = len(out)
    report.by_cause = {c: decision.causes.count(c) for c in CAUSES}
    report.examples = [json.loads(r["evidence"])["text"] for r in out[:5]]
    return report


# ---------------------------------------------------------------------------------------
# Learning from reviews
# ---------------------------------------------------------------------------------------


def reviewed(catalog: Catalog) -> tuple[SignalTable, list[str]]:
    """Each reviewed failure's latest triage signals and the cause its curator settled on
    (accepted: the triaged cause; reassigned: the curator's; rejected reviews say the item
    was not a failure and teach nothing about causes)."""
    rows = catalog.query("""
        WITH t AS (SELECT *, row_number() OVER (PARTITION BY feedback_id ORDER BY triaged_at DESC) AS n FROM triage),
        SELECT t.feedback_id, t.evidence, t.cause AS triaged, r.verdict, r.cause AS curator
        FROM t JOIN review_state r USING (feedback_id)  -- each item's current verdict (undone ones are gone)
        WHERE t.n = 1 AND r.verdict IN ('accept', 'reassign')
        ORDER BY t.feedback_id""").to_pylist()
    truth = [r["triaged"] if r["verdict"] == "accept" else r["curator"] for r in rows]
    keep = [i for i, c in enumerate(truth) if c in CAUSES]
    rows = [rows[i] for i in keep]
    return table_from_evidence(rows), [truth[i] for i in keep]


def learn_triager(ws: Workspace, min_reviews: int = 30) -> dict:
    """Fit a learned triager on the reviews; save it as the next version, promoted only if
    it beats the rules on the held-out reviews (else a candidate, with the reason)."""
    from dataengine.versions import save_version

    catalog = Catalog(ws)
    catalog.migrate()
    table, truth = reviewed(catalog)
    model, metrics = compare(table, truth, min_reviews=min_reviews)
    if model is None:
        return metrics | {"version": None, "status": None}
    version, path = save_version(ws.models, TRIAGER,
                                 lambda d: (d / "model.json").write_text(json.dumps(model.to_json())),
                                 config={"kind": "logistic-regression"}, metrics=metrics)
    status = "promoted" if metrics["wins"] else "candidate"
    now = datetime.now(timezone.utc)
    catalog.upsert("model_versions", pa.Table.from_pylist([dict(
        model=TRIAGER, version=version, path=str(path), status=status, metrics=json.dumps(metrics),
        job_id=None, created_at=now)], schema=MODEL_VERSIONS))
    return metrics | {"version": version, "status": status}

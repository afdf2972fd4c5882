"""What the dashboard reads, as plain functions over the catalog (no Streamlit here, so
each one is tested on its own).

Every read opens the catalog for one query and closes it (dataengine.catalog.Catalog):
DuckDB lets one process hold the file at a time, so a dashboard that kept a connection
open would stall every flow that writes. Bulk views aggregate in SQL and return a few
hundred rows at most; the queue pages in SQL (dataengine/review.queue_page).
"""

from __future__ import annotations

import difflib
import html
import io
import json
import re

from dataengine.catalog import Catalog

_WORD = re.compile(r"\S+")


def marked_diff(prompt: str, enhanced: str | None) -> tuple[str, str]:
    """The user's prompt and the enhanced prompt as HTML, words the enhancer dropped struck
    through on the left and words it added highlighted on the right (both escaped)."""
    a, b = _WORD.findall(prompt or ""), _WORD.findall(enhanced or "")
    left, right = [], []
    def norm(w: str) -> str:  # "39," and "39" are the same word
        return re.sub(r"\W", "", w.lower()) or w

    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=[norm(w) for w in a], b=[norm(w) for w in b],
                                                      autojunk=False).get_opcodes():
        la, rb = " ".join(html.escape(w) for w in a[i1:i2]), " ".join(html.escape(w) for w in b[j1:j2])
        if op == "equal":
            left.append(la)
            right.append(rb)
            continue
        if la:
            left.append(f'<del style="background:#fdd">{la}</del>')
        if rb:
            right.append(f'<ins style="background:#dfd;text-decoration:none">{rb}</ins>')
    return " ".join(left), " ".join(right)


def failure_rate(catalog: Catalog, days: int = 30) -> list[dict]:
    """Per day and cause: failures triaged there (latest triage) and the day's share of all
    feedback; the failure-rate chart."""
    return catalog.query("""
        WITH f AS (SELECT feedback_id, date_trunc('day', time) AS day FROM feedback
                   WHERE time >= (SELECT max(time) FROM feedback) - to_days(?)),
             n AS (SELECT day, count(*) AS total FROM f GROUP BY day)
        SELECT f.day, q.cause, count(*) AS failures, any_value(n.total) AS feedback,
               count(*) / any_value(n.total) AS rate
        FROM f JOIN queue q USING (feedback_id) JOIN n USING (day)  -- queue: each failure's latest triage
        GROUP BY f.day, q.cause ORDER BY f.day, q.cause""", [days]).to_pylist()


def gap_map(catalog: Catalog, limit: int = 300) -> list[dict]:
    """Concepts searched for gaps, newest search per concept: coverage, whether it is a gap,
    and how many patch samples were written for it."""
    return catalog.query("""
        WITH g AS (SELECT concept, arg_max(coverage, searched_at) AS coverage,
                          arg_max(similarity, searched_at) AS similarity, arg_max(is_gap, searched_at) AS is_gap,
                          arg_max(json_extract(evidence, '$.cluster'), searched_at) AS cluster,
                          count(DISTINCT feedback_id) AS failures
                   FROM gaps GROUP BY concept),
             p AS (SELECT concept, count(*) AS patched FROM patches GROUP BY concept)
        SELECT g.*, coalesce(p.patched, 0) AS patched FROM g LEFT JOIN p USING (concept)
        ORDER BY g.coverage LIMIT ?""", [limit]).to_pylist()


def pair_sources(catalog: Catalog, text: str | None = None, limit: int = 200) -> list[str]:
    """Captions that have a degradation chain (matching `text`, plain), for the pairs browser."""
    sql = "SELECT DISTINCT source_id FROM pairs"
    params: list = []
    if text:
        sql += " WHERE strpos(lower(more), lower(?)) > 0"
        params.append(text)
    return catalog.query(sql + " ORDER BY source_id LIMIT ?", params + [limit]).column(0).to_pylist()


def chain(catalog: Catalog, source_id: str) -> list[dict]:
    """One caption's degradation chain, step by step: what each step removed and its category."""
    return catalog.query("SELECT step, category, less, more, removed, policy FROM pairs WHERE source_id = ? "
                         "ORDER BY step", [source_id]).to_pylist()


def jobs(catalog: Catalog, limit: int = 100) -> list[dict]:
    """Retrain jobs, newest first: what fired them, status, the gate's decision, and the
    measure each kind is judged by before and after."""
    rows = catalog.query("SELECT job_id, kind, status, trigger, result, created_at, updated_at FROM jobs "
                         "ORDER BY created_at DESC LIMIT ?", [limit]).to_pylist()
    for r in rows:
        result = json.loads(r.pop("result") or "null") or {}
        inner = result.get("dit") if isinstance(result.get("dit"), dict) else result
        r["promoted"] = inner.get("promoted")
        r["gate"] = inner.get("gate") or result.get("error") or result.get("dit")
        r["fixed_share"] = result.get("fixed_share")
        r["before -> after"] = before_after(r["kind"], result)
    return rows


def before_after(kind: str, result: dict) -> str | None:
    """The figure a job of `kind` is judged by, before and after, in words."""
    def pair(a, b, fmt="{}") -> str:
        return f"{fmt.format(a) if a is not None else '?'} -> {fmt.format(b) if b is not None else '?'}"

    if kind == "retrain-dit" and "prompts_uncovered_before" in result:
        out = "uncovered prompts " + pair(result["prompts_uncovered_before"], result["prompts_uncovered_after"])
        dit = result.get("dit")
        if isinstance(dit, dict):
            out += "; eval loss " + pair(dit.get("current_eval_loss"), dit.get("eval_loss"), "{:.4f}")
        return out
    if kind == "retrain-enhancer" and "heldout_loss_rate_before" in result:
        return "held-out prompts losing a word " + pair(result["heldout_loss_rate_before"],
                                                       result["heldout_loss_rate_after"], "{:.0%}")
    if kind == "retrain-reward" and "heldout_before" in result:
        b, a = result["heldout_before"], result["heldout_after"]
        return "; ".join(f"{h} accuracy " + pair(b.get(h, {}).get("accuracy"), v.get("accuracy"), "{:.3f}")
                         for h, v in a.items())
    return None


def quarantine(catalog: Catalog) -> list[dict]:
    """Quarantined records by stage, shard and reason."""
    return catalog.query("""
        SELECT coalesce(stage, 'ingest') AS stage, coalesce(shard, '(feedback)') AS shard, reason, count(*) AS n
        FROM quarantine GROUP BY ALL ORDER BY n DESC LIMIT 500""").to_pylist()


def nearest_samples(catalog: Catalog, feedback_id: str, k: int = 5) -> list[dict]:
    """The nearest training samples the gap search found for a failure's prompt, with
    where their image bytes lie (shard, offset, size) for a thumbnail."""
    rows = catalog.query("SELECT evidence FROM gaps WHERE feedback_id = ? ORDER BY searched_at DESC LIMIT 1",
                         [feedback_id]).to_pylist()
    if not rows:
        return []
    neighbours = json.loads(rows[0]["evidence"] or "{}").get("neighbours", [])[:k]
    if not neighbours:
        return []
    where = {r["key"]: r for r in catalog.query(
        "SELECT key, shard, image_offset, image_size FROM samples WHERE list_contains(?, key)",
        [[n["key"] for n in neighbours]]).to_pylist()}
    return [n | {k2: where.get(n["key"], {}).get(k2) for k2 in ("shard", "image_offset", "image_size")}
            for n in neighbours]


def thumbnail(shard: str, offset: int, size: int, px: int = 128) -> bytes:
    """A PNG thumbnail of the image at (offset, size) in a shard: one ranged read, no untar."""
    from PIL import Image

    from dataengine.images import read_ranges

    img = Image.open(io.BytesIO(read_ranges(shard, [(offset, size)])[0])).convert("RGB")
    img.thumbnail((px, px))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()

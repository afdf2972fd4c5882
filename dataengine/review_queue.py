"""The `queue` catalog table: each triaged failure's latest triage beside the feedback
fields the review queue filters and sorts on. Triage refreshes the failures it wrote;
a migration fills it once from the lake. The dashboard pages it (dataengine/review.py).
"""

from __future__ import annotations

from typing import Iterable

import pyarrow as pa

from dataengine.catalog import Catalog


def refresh_queue(catalog: Catalog, feedback_ids: Iterable[str] | None = None, con=None) -> int:
    """Bring the `queue` table up to date with the lake for these failures (None: all):
    each one's latest triage and its feedback fields. Triage calls it after each write."""
    if con is None:
        with catalog.transaction() as own:
            return refresh_queue(catalog, feedback_ids, own)
    latest = """SELECT feedback_id, arg_max(cause, triaged_at) AS cause, arg_max(confidence, triaged_at) AS confidence,
                       arg_max(triager, triaged_at) AS triager, max(triaged_at) AS triaged_at
                FROM triage {where} GROUP BY feedback_id"""
    if feedback_ids is None:
        con.execute("DELETE FROM queue")
        where = ""
    else:
        con.register("_ids", pa.table({"feedback_id": pa.array(list(dict.fromkeys(feedback_ids)), pa.string())}))
        con.execute("DELETE FROM queue WHERE feedback_id IN (SELECT feedback_id FROM _ids)")
        where = "WHERE feedback_id IN (SELECT feedback_id FROM _ids)"
    try:
        n = con.execute(f"""INSERT INTO queue
            SELECT t.feedback_id, t.cause, t.confidence, t.triager, t.triaged_at, f.time, f.prompt,
                   f.enhanced_prompt, f.rating, f.model_version, f.task
            FROM ({latest.format(where=where)}) t JOIN feedback f USING (feedback_id)""").fetchall()[0][0]
    finally:
        if feedback_ids is not None:
            con.unregister("_ids")
    return n

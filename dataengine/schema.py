"""Arrow schemas of every table in the catalog, and which of them live where.

Lake tables are bulk and append-only: Parquet files under `lake/<table>/`, seen in the
catalog as views. Catalog tables are small and mutable (a shard's stats, a review's
verdict, a job's status) and live inside catalog.duckdb itself.
"""

from __future__ import annotations

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")

# ---------------------------------------------------------------------------------------
# Lake tables (Parquet, append-only)
# ---------------------------------------------------------------------------------------

SAMPLES = pa.schema(
    [
        ("key", pa.string()),  # the WebDataset __key__; unique across the catalog
        ("split", pa.string()),  # train | pool | eval | patches | ...
        ("shard", pa.string()),  # URL of the shard it came from
        ("shard_uid", pa.string()),  # stable id of that URL
        ("image_field", pa.string()),  # jpg | png | webp
        ("image_offset", pa.int64()),  # byte offset of the image inside the tar
        ("image_size", pa.int64()),
        ("image_sha1", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("caption", pa.string()),
        ("task", pa.string()),  # gen | edit
        ("instruction", pa.string()),  # edits only
        ("source_image_field", pa.string()),  # edits only: src.png | src.jpg ...
        ("source", pa.string()),  # where the sample came from (sceneworld, tuxpaint, ...)
        ("meta", pa.string()),  # the sample's json member, verbatim
        ("ingest_id", pa.string()),
        ("ingested_at", TS),
    ]
)

QUARANTINE = pa.schema(
    [
        ("shard", pa.string()),
        ("shard_uid", pa.string()),
        ("key", pa.string()),
        ("reason", pa.string()),
        ("fields", pa.list_(pa.string())),  # the members the sample had
        ("ingest_id", pa.string()),  # the run that quarantined it (ingest, embed, ...)
        ("ingested_at", TS),
        # Which stage rejected it: ingest (the shard's own accounting) or a later one, e.g.
        # embed, when an image catalogued earlier can no longer be read. Null in old parts = ingest.
        ("stage", pa.string()),
        # Where the sample's bytes lie, so a curator (or `dataengine requeue`) can find and
        # re-read exactly this copy: each member's name, data offset and size (ingest: the
        # full tar names; embed: the image's field, at the offset the catalog holds). Null
        # where the stage never saw the members (old parts; a shard that would not open).
        ("members", pa.list_(pa.string())),
        ("offsets", pa.list_(pa.int64())),
        ("sizes", pa.list_(pa.int64())),
        ("model_id", pa.string()),  # embed: the model whose vector failed (null elsewhere)
        ("raw", pa.string()),  # feedback: the rejected record as it came in (nothing is lost)
    ]
)

EMBEDDINGS = pa.schema(
    [
        ("key", pa.string()),
        ("model_id", pa.string()),
        ("kind", pa.string()),  # image | text
        # L2-normalised. A variable-size list, not fixed-size: one table holds the vectors of
        # every model, and widths differ; readers reshape the flat values without a copy.
        ("vector", pa.list_(pa.float16())),
        ("created_at", TS),
    ]
)

PAIRS = pa.schema(
    [
        ("pair_id", pa.string()),
        ("source_id", pa.string()),  # caption's sample key or file record id
        ("step", pa.int32()),
        ("category", pa.string()),  # lighting | texture | layout | colour | ...
        ("less", pa.string()),  # the less detailed prompt (model input)
        ("more", pa.string()),  # the more detailed one (target)
        ("removed", pa.string()),  # the text this step took out
        ("policy", pa.string()),
        ("created_at", TS),
    ]
)

# One failure or rating of a generated output: the intake contract (README "Feedback
# records"; dataengine/feedback.py validates it). Stored once per feedback_id.
FEEDBACK = pa.schema(
    [
        ("feedback_id", pa.string()),
        ("time", TS),  # when the output was made or rated (the record's own clock)
        ("prompt", pa.string()),  # what the user asked for
        ("enhanced_prompt", pa.string()),  # what the prompt enhancer made of it; null if none ran
        ("model_version", pa.string()),  # the generator that made the output
        ("image_ref", pa.string()),  # absolute path or URI of the output (image_b64 is saved under feedback/images/)
        ("task", pa.string()),  # gen | edit
        ("source_image_ref", pa.string()),  # edits: the image that was edited
        ("instruction", pa.string()),  # edits: the instruction
        ("scores", pa.string()),  # JSON {head: score} as the serving stack logged them; null if it did not
        ("rating", pa.int8()),  # 1-5 from a person; null for evaluation failures
        ("comment", pa.string()),
        ("extra", pa.string()),  # JSON of fields outside the contract, kept verbatim
        ("origin", pa.string()),  # where it came in: FILE:LINE, http, ...
        ("ingest_id", pa.string()),
        ("received_at", TS),
    ]
)

TRIAGE = pa.schema(
    [
        ("feedback_id", pa.string()),
        ("cause", pa.string()),  # rl | knowledge | prompt
        ("confidence", pa.float64()),
        ("evidence", pa.string()),  # JSON
        ("triager", pa.string()),  # which policy/version decided
        ("triaged_at", TS),
    ]
)

PATCHES = pa.schema(
    [
        ("patch_id", pa.string()),
        ("feedback_id", pa.string()),
        ("gap_id", pa.string()),
        ("concept", pa.string()),
        ("pool_shard", pa.string()),
        ("pool_key", pa.string()),
        ("similarity", pa.float32()),
        ("patch_shard", pa.string()),
        ("created_at", TS),
    ]
)

GAPS = pa.schema(
    [
        ("gap_id", pa.string()),  # stable per (model, split, kind, concept)
        ("feedback_id", pa.string()),  # the failure that asked, if any
        ("concept", pa.string()),  # the prompt, or the failed image's reference
        ("kind", pa.string()),  # text | image
        ("model_id", pa.string()),
        ("coverage", pa.float64()),  # k-nearest similarity in train minus in the reference corpus
        ("similarity", pa.float64()),  # mean similarity of the k nearest training images
        ("percentile", pa.float64()),  # among the training set's own reference queries
        ("gap_score", pa.float64()),  # 1 - percentile
        ("threshold", pa.float64()),  # percentile below which it is a gap (alpha quantile of the references')
        ("is_gap", pa.bool_()),
        ("evidence", pa.string()),  # JSON: nearest samples, cluster and its size
        ("searched_at", TS),
    ]
)

LAKE_TABLES: dict[str, pa.Schema] = {
    "samples": SAMPLES,
    "quarantine": QUARANTINE,
    "embeddings": EMBEDDINGS,
    "pairs": PAIRS,
    "feedback": FEEDBACK,
    "triage": TRIAGE,
    "patches": PATCHES,
    "gaps": GAPS,
}

# ---------------------------------------------------------------------------------------
# Catalog tables (inside catalog.duckdb; small, mutable, short transactions)
# ---------------------------------------------------------------------------------------

SHARDS = pa.schema(
    [
        ("shard_uid", pa.string()),
        ("url", pa.string()),
        ("split", pa.string()),
        ("checksum", pa.string()),  # content hash (local files) or the store's ETag when ingested
        ("bytes", pa.int64()),
        ("read", pa.int64()),  # samples seen
        ("accepted", pa.int64()),
        ("quarantined", pa.int64()),
        ("error", pa.string()),  # damage after which the shard could not be read further
        ("ingest_id", pa.string()),
        ("ingested_at", TS),
    ]
)

# Curators' verdicts, append-only: a row is never changed or deleted, an undo is a row of its
# own, and an item's current state is the view `review_state` over them (dataengine/review.py).
REVIEWS = pa.schema(
    [
        ("review_id", pa.string()),  # chosen by the client per action: the same verdict sent twice is stored once
        ("feedback_id", pa.string()),
        ("verdict", pa.string()),  # accept | reject | reassign | undo
        ("cause", pa.string()),  # the curator's cause when reassigning
        ("curator", pa.string()),
        ("note", pa.string()),
        ("reviewed_at", TS),
        ("remedy_id", pa.string()),  # the remedy the verdict decided, if any
        ("remedy_verdict", pa.string()),  # approve | reject | edit
        ("remedy_edit", pa.string()),  # JSON of the fields an edit changed
        ("undoes", pa.string()),  # undo: the review_id it takes back
    ]
)

# Who may sign in to the dashboard, and as what (dataengine/accounts.py).
USERS = pa.schema(
    [
        ("username", pa.string()),
        ("role", pa.string()),  # viewer | curator | admin
        ("password_hash", pa.string()),  # argon2id, with its own salt and parameters
        ("created_by", pa.string()),
        ("created_at", TS),
    ]
)

# A curator's hold on a failure while reviewing it; it lapses at expires_at.
CLAIMS = pa.schema(
    [
        ("feedback_id", pa.string()),
        ("curator", pa.string()),
        ("claimed_at", TS),
        ("expires_at", TS),
    ]
)

JOBS = pa.schema(
    [
        ("job_id", pa.string()),
        ("kind", pa.string()),  # retrain-reward | retrain-dit | retrain-enhancer | ...
        ("status", pa.string()),  # queued | running | done | failed
        ("trigger", pa.string()),  # what fired it
        ("params", pa.string()),  # JSON
        ("result", pa.string()),  # JSON
        ("created_at", TS),
        ("updated_at", TS),
    ]
)

MODEL_VERSIONS = pa.schema(
    [
        ("model", pa.string()),
        ("version", pa.string()),
        ("path", pa.string()),
        ("status", pa.string()),  # candidate | promoted | retired
        ("metrics", pa.string()),  # JSON
        ("job_id", pa.string()),
        ("created_at", TS),
    ]
)

# The review queue of remedies: what each triaged cause proposes, waiting for a curator.
REMEDIES = pa.schema(
    [
        ("remedy_id", pa.string()),
        ("cause", pa.string()),  # rl | knowledge | prompt
        ("kind", pa.string()),  # reward-adjustment | knowledge-patch | enhancer-pair
        ("title", pa.string()),  # one line a curator reads first
        ("feedback_ids", pa.list_(pa.string())),  # the failures it answers
        ("proposal", pa.string()),  # JSON: the head and pairs, the concept and patch, the corrected prompt
        ("status", pa.string()),  # pending | approved | rejected | used
        ("curator", pa.string()),
        ("note", pa.string()),
        ("job_id", pa.string()),  # the retrain job that used it
        ("created_at", TS),
        ("decided_at", TS),
    ]
)

# What a stage finished, unit by unit (a shard, a chunk, a caption): a restarted stage skips
# these, and a unit is committed once however often its work ran (dataengine/fanout.py).
STAGE_UNITS = pa.schema(
    [
        ("stage", pa.string()),
        ("unit", pa.string()),
        ("status", pa.string()),  # done | quarantined
        ("result", pa.string()),  # JSON: what the unit returned, or the error that quarantined it
        ("finished_at", TS),
    ]
)

# Failures the loop found fixed (dataengine/remedies.mark_resolved): triaged again after
# their remedy's job, they no longer fail for their cause on the promoted versions, so no
# new remedy is proposed for them.
RESOLVED = pa.schema(
    [
        ("feedback_id", pa.string()),
        ("cause", pa.string()),  # the cause it was fixed for
        ("versions", pa.string()),  # JSON {model: promoted version} when it was found fixed
        ("resolved_at", TS),
    ]
)

# The review queue: each triaged failure's latest triage beside the feedback fields the
# queue filters and sorts on, kept by triage as it writes (dataengine/review_queue.py).
# A native table, because the dashboard pages 10M of them: the same query over the lake's
# Parquet took ~0.7 s per page at 1M rows. No primary key: an index over 10M keys costs
# memory every open, and rows are replaced by delete + insert in one transaction.
QUEUE = pa.schema(
    [
        ("feedback_id", pa.string()),
        ("cause", pa.string()),
        ("confidence", pa.float64()),
        ("triager", pa.string()),
        ("triaged_at", TS),
        ("time", TS),
        ("prompt", pa.string()),
        ("enhanced_prompt", pa.string()),
        ("rating", pa.int8()),
        ("model_version", pa.string()),
        ("task", pa.string()),
    ]
)

CATALOG_TABLES: dict[str, tuple[pa.Schema, tuple[str, ...]]] = {
    # name: (schema, primary key)
    "shards": (SHARDS, ("shard_uid",)),
    "reviews": (REVIEWS, ("review_id",)),
    "jobs": (JOBS, ("job_id",)),
    "model_versions": (MODEL_VERSIONS, ("model", "version")),
    "remedies": (REMEDIES, ("remedy_id",)),
    "stage_units": (STAGE_UNITS, ("stage", "unit")),
    "users": (USERS, ("username",)),
    "claims": (CLAIMS, ("feedback_id",)),
    "queue": (QUEUE, ()),
    "resolved": (RESOLVED, ("feedback_id",)),
}

# Views over the catalog's own tables (the lake's views are made from LAKE_TABLES).
CATALOG_VIEWS: dict[str, str] = {
    # An item's current verdict: its newest review that is not an undo and was not undone.
    "review_state": """
        SELECT * EXCLUDE (n) FROM (
            SELECT r.*, row_number() OVER (PARTITION BY r.feedback_id ORDER BY r.reviewed_at DESC, r.review_id DESC) AS n
            FROM reviews r
            WHERE r.verdict <> 'undo' AND r.review_id NOT IN (SELECT undoes FROM reviews WHERE verdict = 'undo'))
        WHERE n = 1""",
}

ALL_TABLES = tuple(LAKE_TABLES) + tuple(CATALOG_TABLES)


def conform(table: pa.Table, schema: pa.Schema, name: str) -> pa.Table:
    """Reorder and cast `table` to `schema`; a missing or uncastable column is an error."""
    missing = [f.name for f in schema if f.name not in table.column_names]
    extra = [c for c in table.column_names if c not in schema.names]
    if missing or extra:
        raise ValueError(f"table {name!r}: missing columns {missing}, unknown columns {extra}")
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ValueError(f"table {name!r}: {e}") from e

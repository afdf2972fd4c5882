"""Requeue: run only the quarantined samples again, and touch nothing else.

After a shard is mended, or a decoder learns a format, the samples it rejected deserve
another try; re-ingesting everything would cost a full pass and re-embedding. Each
quarantine row says where the sample's bytes lie (members, offsets, sizes), so:

- stage `ingest`: the sample is read again at exactly those offsets and validated with
  today's code. What now passes moves from the shard's quarantine part to its samples
  part, and the shard's counts follow, in one catalog transaction; what still fails keeps
  its row with today's reason. A shard whose bytes changed since it was ingested is
  scanned again whole instead (its accepted samples' offsets may have moved too).
- stage `embed`: the rows are dropped and `embed` runs for just those keys; what fails
  again is quarantined again, once.

Requeue never invents a sample: read == accepted + quarantined holds after it as before.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from dataengine import lake
from dataengine.catalog import Catalog
from dataengine.ingest import IngestConfig, content_checksum, ingest, sample_row
from dataengine.schema import QUARANTINE, SAMPLES
from dataengine.shards import InvalidSample, ShardError, iter_raw_samples, validate_sample
from dataengine.workspace import Workspace

STAGES = ("ingest", "embed")


@dataclass
class RequeueReport:
    matched: int = 0  # quarantine rows selected
    accepted: int = 0  # now in samples (ingest) or embedded (embed)
    still_quarantined: int = 0
    rescanned_shards: list[str] = field(default_factory=list)  # changed since ingest: scanned whole
    not_found: int = 0  # rows whose bytes are no longer where the row says (shard gone or cut)
    skipped: dict[str, int] = field(default_factory=dict)  # why -> rows left as they were
    reasons: dict[str, int] = field(default_factory=dict)  # what the still-quarantined fail on now

    def skip(self, why: str, n: int = 1) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + n

    def summary(self) -> str:
        out = (f"requeued {self.matched}: {self.accepted} accepted, {self.still_quarantined} still quarantined"
               + (f", {self.not_found} no longer readable" if self.not_found else "")
               + (f"; {len(self.rescanned_shards)} changed shard(s) scanned again whole" if self.rescanned_shards
                  else ""))
        for why, n in self.skipped.items():
            out += f"; {n} left as they were: {why}"
        return out


def select(catalog: Catalog, stage: str | None = None, reason: str | None = None) -> pa.Table:
    """Quarantine rows of `stage` (all stages if None) whose reason matches the regular
    expression `reason` (case-insensitive)."""
    if stage is not None and stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if reason is not None:
        try:
            re.compile(reason)
        except re.error as e:
            raise ValueError(f"--reason {reason!r} is not a regular expression: {e}") from e
    where, params = ["true"], []
    if stage is not None:
        where.append("coalesce(stage, 'ingest') = ?")
        params.append(stage)
    if reason is not None:
        where.append("regexp_matches(reason, ?, 'i')")
        params.append(reason)
    return catalog.query(f"SELECT * FROM quarantine WHERE {' AND '.join(where)} ORDER BY shard, key", params)


def requeue(ws: Workspace, stage: str | None = None, reason: str | None = None,
            catalog: Catalog | None = None,
            embed_keys: Callable[[Sequence[str], str], tuple[int, int]] | None = None,
            model_id: str | None = None) -> RequeueReport:
    """Re-run the quarantined samples of `stage` whose reason matches `reason`.

    Embed rows need `embed_keys(keys, kind) -> (embedded, failed)` (the embed stage bound
    to a model, as the command line passes it) and that model's `model_id`: rows of other
    models are left as they were.
    """
    catalog = catalog or Catalog(ws)
    rows = select(catalog, stage, reason).to_pylist()
    report = RequeueReport(matched=len(rows))
    ingest_rows = [r for r in rows if (r["stage"] or "ingest") == "ingest"]
    embed_rows = [r for r in rows if r["stage"] == "embed"]
    if ingest_rows:
        _requeue_ingest(ws, catalog, ingest_rows, report)
    if embed_rows:
        _requeue_embed(ws, embed_rows, report, embed_keys, model_id)
    return report


# ---------------------------------------------------------------------------------------
# Ingest
# ---------------------------------------------------------------------------------------


def _requeue_ingest(ws: Workspace, catalog: Catalog, rows: list[dict], report: RequeueReport) -> None:
    shards = {r["url"]: r for r in catalog.query("SELECT * FROM shards").to_pylist()}
    by_shard: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_shard[r["shard"]].append(r)
    for url, qrows in by_shard.items():
        known = shards.get(url)
        if known is None:
            report.skip("shard not in the catalog (run ingest)", len(qrows))
            continue
        try:
            changed = content_checksum(url) != known["checksum"]
        except (FileNotFoundError, OSError):
            report.not_found += len(qrows)
            continue
        if changed:
            before = {r["key"] for r in qrows}
            ingest(ws, [url], IngestConfig(split=known["split"], use_ray=False, force=True), catalog)
            now_ok = catalog.query(
                f"SELECT count(*) n FROM samples WHERE shard_uid = ? AND key IN ({', '.join('?' for _ in before)})",
                [known["shard_uid"], *before])["n"][0].as_py()
            report.accepted += now_ok
            report.still_quarantined += len(qrows) - now_ok
            report.rescanned_shards.append(url)
            continue
        _revalidate_shard(ws, catalog, known, qrows, report)


def _revalidate_shard(ws: Workspace, catalog: Catalog, shard: dict, qrows: list[dict],
                      report: RequeueReport) -> None:
    """Validate the quarantined samples of one unchanged shard again, at their offsets."""
    url, uid = shard["url"], shard["shard_uid"]
    run_id = f"requeue-{uuid.uuid4().hex[:12]}"
    now = dt.datetime.now(dt.timezone.utc)
    wanted = {tuple(r["offsets"]): r for r in qrows if r["offsets"]}
    located = {}  # quarantine row index -> raw sample
    try:
        for raw in iter_raw_samples(url):
            offsets = tuple(raw.locations()[1])
            if offsets in wanted:
                located[id(wanted[offsets])] = raw
    except ShardError:
        pass  # a shard that no longer opens: every row below is "not found"
    accepted_keys = set(catalog.query("SELECT key FROM samples WHERE shard_uid = ?", [uid])["key"].to_pylist())
    held_elsewhere = {r["key"]: r["shard"] for r in catalog.query(  # one query per shard, not per row
        "SELECT key, min(shard) AS shard FROM samples WHERE shard_uid <> ? "
        "AND key IN (SELECT unnest(?::VARCHAR[])) GROUP BY key", [uid, [q["key"] for q in qrows]]).to_pylist()}
    new_samples, kept = [], []
    for q in qrows:
        raw = located.get(id(q))
        if raw is None:
            # Rows written before byte ranges were recorded, or bytes that moved: left
            # as they are, and said so (a forced ingest of the shard re-reads it whole).
            if q["offsets"]:
                report.not_found += 1
            else:
                report.skip("quarantined before byte ranges were recorded (ingest the shard with --force)")
            kept.append(q)
            continue
        key = q["key"]
        try:
            if key in accepted_keys:
                raise InvalidSample("duplicate key within the shard")
            if key in held_elsewhere:
                raise InvalidSample(f"duplicate key: already ingested from {held_elsewhere[key]}")
            ok = validate_sample(raw)
            row = sample_row(raw, ok, key, shard["split"], url, uid, run_id, now)
        except Exception as e:  # noqa: BLE001 - as at ingest: one sample's failure is its own
            reason = str(e) if isinstance(e, InvalidSample) else f"unexpected error while validating: {type(e).__name__}: {e}"
            kept.append({**q, "reason": reason, "ingest_id": run_id, "ingested_at": now})
            report.reasons[reason.split(":")[0]] = report.reasons.get(reason.split(":")[0], 0) + 1
            continue
        new_samples.append(row)
        accepted_keys.add(key)
    report.accepted += len(new_samples)
    report.still_quarantined += len(kept)
    _rewrite_shard_parts(catalog, shard, new_samples, qrows, kept)


def _rewrite_shard_parts(catalog: Catalog, shard: dict, new_samples: list[dict], old: list[dict],
                         kept: list[dict]) -> None:
    """Move samples from the shard's quarantine part to its samples part, and its counts with
    them, in one catalog transaction (parts written inside it, as ingest's commit does)."""
    ws, uid = catalog.ws, shard["shard_uid"]
    samples_part = lake.table_dir(ws.lake, "samples") / f"{uid}.parquet"
    quarantine_part = lake.table_dir(ws.lake, "quarantine") / f"{uid}.parquet"
    samples = pq.read_table(samples_part) if samples_part.exists() else SAMPLES.empty_table()
    quarantine = pq.read_table(quarantine_part) if quarantine_part.exists() else QUARANTINE.empty_table()
    # Rows are told apart by their offsets within the shard (keys may repeat in a shard).
    requeued = {(r["key"], tuple(r["offsets"] or ())) for r in old}
    stay = [r for r in quarantine.to_pylist() if (r["key"], tuple(r.get("offsets") or ())) not in requeued]
    quarantine = pa.Table.from_pylist(stay + [{c: r.get(c) for c in QUARANTINE.names} for r in kept],
                                      schema=QUARANTINE)
    samples = pa.concat_tables([samples.select(SAMPLES.names).cast(SAMPLES),
                                pa.Table.from_pylist(new_samples, schema=SAMPLES)])
    with catalog.transaction() as con:
        lake.write_part(ws.lake, "samples", samples, part=uid)
        lake.write_part(ws.lake, "quarantine", quarantine, part=uid)
        con.execute("UPDATE shards SET accepted = ?, quarantined = ? WHERE shard_uid = ?",
                    [samples.num_rows, quarantine.num_rows, uid])


# ---------------------------------------------------------------------------------------
# Embed
# ---------------------------------------------------------------------------------------


def _requeue_embed(ws: Workspace, rows: list[dict], report: RequeueReport,
                   embed_keys: Callable[[Sequence[str], str], tuple[int, int]] | None,
                   model_id: str | None) -> None:
    mine = [r for r in rows if model_id is not None and r["model_id"] == model_id]
    others = len(rows) - len(mine)
    if others:
        why = f"failed with another model than {model_id!r} (pass that one with --model)"
        report.skipped[why] = report.skipped.get(why, 0) + others
    if not mine or embed_keys is None:
        return
    drop = {(r["key"], r["reason"]) for r in mine}
    for part in sorted(lake.table_dir(ws.lake, "quarantine").glob("embed-*.parquet")):
        t = pq.read_table(part)
        keep = [(k, why) not in drop for k, why in zip(t["key"].to_pylist(), t["reason"].to_pylist())]
        if all(keep):
            continue
        if any(keep):
            lake.write_part(ws.lake, "quarantine", t.filter(pa.array(keep)), part=part.stem)
        else:
            part.unlink()
    # Dropped before the retry: a crash in between leaves the samples merely not embedded
    # yet (the next `embed` picks them up), never lost.
    by_kind: dict[str, list[str]] = defaultdict(list)
    for r in mine:
        by_kind[r["reason"].split(":", 1)[0].removeprefix("embed ").strip()].append(r["key"])
    for kind, keys in by_kind.items():
        embedded, failed = embed_keys(keys, kind)
        report.accepted += embedded
        report.still_quarantined += failed

"""Ingest: shards -> `samples` (accepted) and `quarantine` (rejected, with reasons).

Scanning a shard (read, decode, validate) is a plain function that runs anywhere: in
this process or as a Ray task on any node. Committing is done by the driver, in short
catalog transactions, because the catalog takes one writer at a time: the duplicate-key
check against everything already ingested and the write of a shard's parts happen under
the same lock, so two ingests running at once cannot both accept one key.

Accounting is exact per shard: read == accepted + quarantined, and a shard that could
not be read to its end says why in `shards.error`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import fsspec
import pyarrow as pa

from dataengine import lake
from dataengine.catalog import Catalog
from dataengine.schema import QUARANTINE, SAMPLES, SHARDS
from dataengine.shards import InvalidSample, ShardError, ShardScan, iter_raw_samples, validate_sample
from dataengine.workspace import Workspace

DEFAULT_SPLIT = "train"

log = logging.getLogger(__name__)
_SHARD_PART_RE = re.compile(r"^[0-9a-f]{16}$")  # lake parts named by shard_uid (other stages use prefixes)


@dataclass(frozen=True)
class IngestConfig:
    split: str | None = None  # None: from the shard's folder (shards/<split>/), else train
    key_prefix: str = ""  # namespace for keys of shards made by tools that reuse keys
    use_ray: bool = True  # False: scan in this process (a single shard always does)
    force: bool = False  # re-scan shards already ingested unchanged


@dataclass
class ShardResult:
    url: str
    shard_uid: str
    split: str
    ingest_id: str
    checksum: str
    bytes: int
    samples: pa.Table
    quarantine: pa.Table
    error: str | None
    seconds: float
    # key -> (member names, offsets, sizes) of each accepted sample: what a quarantine row
    # needs should commit find the key already taken (driver-side only, never stored).
    locations: dict[str, tuple[list[str], list[int], list[int]]] = field(default_factory=dict)

    @property
    def read(self) -> int:
        return self.samples.num_rows + self.quarantine.num_rows


@dataclass
class IngestReport:
    shards: int = 0
    skipped_unchanged: int = 0
    read: int = 0
    accepted: int = 0
    quarantined: int = 0
    duplicates: int = 0
    orphans_removed: int = 0  # lake parts of an ingest that died before committing
    damaged_shards: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, r: ShardResult) -> None:
        self.shards += 1
        self.read += r.read
        self.accepted += r.samples.num_rows
        self.quarantined += r.quarantine.num_rows
        if r.error:
            self.damaged_shards.append((r.url, r.error))


# ---------------------------------------------------------------------------------------
# Finding shards
# ---------------------------------------------------------------------------------------


def expand_shards(patterns: Sequence[str]) -> list[str]:
    """Globs, folders (every .tar/.tar.gz below) and fsspec URLs -> sorted shard URLs."""
    urls: list[str] = []
    for pattern in patterns:
        fs, _, paths = fsspec.core.get_fs_token_paths(pattern)
        if not paths and not fs.exists(pattern):
            raise FileNotFoundError(f"no shard matches {pattern!r}")
        for p in paths or [pattern]:
            if fs.isdir(p):
                found = [q for q in fs.find(p) if q.endswith((".tar", ".tar.gz", ".tgz"))]
            else:
                found = [p]
            urls += [_canonical_url(fs, q) for q in found]
    return sorted(dict.fromkeys(urls))


def _canonical_url(fs, path: str) -> str:
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return str(Path(path).resolve())
    return fs.unstrip_protocol(path)


def shard_uid(url: str) -> str:
    """Stable id of a shard URL: names its lake parts, so re-ingesting replaces them."""
    return hashlib.sha1(url.encode()).hexdigest()[:16]


def content_checksum(url: str) -> str:
    """What says a shard changed: a hash of its bytes for local files, the store's own
    content hash (ETag, md5, crc) elsewhere.

    fsspec's `checksum` of a local file hashes its metadata (size, mtime), so a shard
    rewritten in place with the same size and a preserved mtime (`cp -p`, `rsync -t`, a
    restore) would pass as unchanged. Hashing costs one read at disk speed, far less than
    the scan it saves; object stores already keep a content hash, read for free.
    """
    fs, path = fsspec.core.url_to_fs(url)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols or "memory" in protocols:
        h = hashlib.blake2b(digest_size=16)
        with fs.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        return f"b2:{h.hexdigest()}"
    return str(fs.checksum(path))


# ---------------------------------------------------------------------------------------
# Scanning one shard (runs anywhere)
# ---------------------------------------------------------------------------------------


def scan_shard(url: str, split: str, ingest_id: str, key_prefix: str = "",
               checksum: str | None = None) -> ShardResult:
    """Read and validate every sample of one shard into accepted and quarantined rows.

    `checksum` is the one the caller already took (ingest does, to skip unchanged shards).
    """
    t0 = time.perf_counter()
    now = dt.datetime.now(dt.timezone.utc)
    uid = shard_uid(url)
    scan = ShardScan(url)
    rows: list[dict] = []
    bad: list[dict] = []
    locations: dict[str, tuple[list[str], list[int], list[int]]] = {}
    seen: set[str] = set()
    try:
        checksum = checksum or content_checksum(url)
        for raw in iter_raw_samples(url, scan):
            key = key_prefix + raw.key
            where = raw.locations()
            try:
                if key in seen:
                    raise InvalidSample("duplicate key within the shard")
                seen.add(key)
                ok = validate_sample(raw)
                row = sample_row(raw, ok, key, split, url, uid, ingest_id, now)
            except InvalidSample as e:
                reason = f"{e} (shard damaged right after it: {raw.damage_after})" if raw.damage_after else str(e)
                bad.append(quarantine_row(url, uid, key, reason, where, ingest_id, now, fields=sorted(raw.fields)))
                continue
            except Exception as e:  # noqa: BLE001
                # A validator bug or a decoder failure no one foresaw costs this sample,
                # never the shard: it is quarantined with the exception, and counted.
                reason = f"unexpected error while validating: {type(e).__name__}: {e}"
                bad.append(quarantine_row(url, uid, key, reason, where, ingest_id, now, fields=sorted(raw.fields)))
                continue
            rows.append(row)
            locations[key] = where
    except ShardError as e:
        scan.error = str(e)
        checksum = ""
    return ShardResult(
        url=url, shard_uid=uid, split=split, ingest_id=ingest_id, checksum=checksum, bytes=scan.size,
        samples=pa.Table.from_pylist(rows, schema=SAMPLES),
        quarantine=pa.Table.from_pylist(bad, schema=QUARANTINE),
        error=scan.error, seconds=time.perf_counter() - t0, locations=locations,
    )


def sample_row(raw, ok, key: str, split: str, url: str, uid: str, ingest_id: str, now) -> dict:
    offset, size = raw.offsets[ok.image_field]
    return dict(
        key=key, split=split, shard=url, shard_uid=uid, image_field=ok.image_field,
        image_offset=offset, image_size=size,
        image_sha1=hashlib.sha1(raw.fields[ok.image_field]).hexdigest(),
        width=ok.width, height=ok.height, caption=ok.caption, task=ok.task,
        instruction=ok.instruction, source_image_field=ok.source_image_field,
        source=str(ok.meta.get("source", "")) or None,
        meta=raw.fields["json"].decode("utf-8") if "json" in raw.fields else None,
        ingest_id=ingest_id, ingested_at=now,
    )


def quarantine_row(url: str, uid: str, key: str, reason: str,
                   where: tuple[list[str], list[int], list[int]] | None, run_id: str, now,
                   fields: list[str] | None = None, stage: str = "ingest", model_id: str | None = None) -> dict:
    """One quarantine row: the sample, why, and where each of its members' bytes lie."""
    members, offsets, sizes = where or (None, None, None)
    return dict(shard=url, shard_uid=uid, key=key, reason=reason, fields=fields, ingest_id=run_id,
                ingested_at=now, stage=stage, members=members, offsets=offsets, sizes=sizes,
                model_id=model_id)


# ---------------------------------------------------------------------------------------
# Committing results (driver only, under the catalog lock)
# ---------------------------------------------------------------------------------------


def commit(catalog: Catalog, results: Sequence[ShardResult]) -> int:
    """Write shard results to the lake and the shards table in one catalog transaction.

    A key already accepted from a shard outside this batch keeps that copy; within the
    batch the shard first in URL order wins, so which copy survives never depends on
    which Ray task finished first. Shards of the batch that were ingested before are being
    replaced, so their old rows neither win nor lose. Returns how many samples were moved
    to quarantine as duplicates.
    """
    results = sorted(results, key=lambda r: r.url)
    moved = 0
    written: list[Path] = []
    try:
        with catalog.transaction() as con:
            keys = pa.Table.from_pylist(
                [{"key": k} for r in results for k in r.samples["key"].to_pylist()],
                schema=pa.schema([("key", pa.string())]),
            )
            uids = pa.Table.from_pylist([{"shard_uid": r.shard_uid} for r in results],
                                        schema=pa.schema([("shard_uid", pa.string())]))
            con.register("_incoming", keys)
            con.register("_replaced", uids)
            try:
                taken = dict(con.sql(
                    "SELECT s.key, min(s.shard) FROM samples s SEMI JOIN _incoming i USING (key) "
                    "ANTI JOIN _replaced r USING (shard_uid) GROUP BY s.key"
                ).fetchall())
            finally:
                con.unregister("_incoming")
                con.unregister("_replaced")
            for r in results:
                dup_mask = [k in taken for k in r.samples["key"].to_pylist()]
                if any(dup_mask):
                    moved += sum(dup_mask)
                    _move_to_quarantine(r, dup_mask, taken)
                for k in r.samples["key"].to_pylist():
                    taken.setdefault(k, r.url)  # later shards in this batch see these keys
                written.append(lake.write_part(catalog.ws.lake, "samples", r.samples, part=r.shard_uid))
                written.append(lake.write_part(catalog.ws.lake, "quarantine", r.quarantine, part=r.shard_uid))
            now = dt.datetime.now(dt.timezone.utc)
            catalog.upsert("shards", pa.Table.from_pylist([dict(
                shard_uid=r.shard_uid, url=r.url, split=r.split, checksum=r.checksum, bytes=r.bytes,
                read=r.read, accepted=r.samples.num_rows, quarantined=r.quarantine.num_rows,
                error=r.error, ingest_id=r.ingest_id, ingested_at=now,
            ) for r in results], schema=SHARDS), con)
    except BaseException:
        # The catalog rolled back: parts it never recorded would be orphans that every view
        # reads. (A process killed here leaves them too: `ingest` and `status` find those.)
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return moved


def _move_to_quarantine(r: ShardResult, dup_mask: list[bool], taken: dict[str, str]) -> None:
    dups = r.samples.filter(pa.array(dup_mask))
    r.samples = r.samples.filter(pa.array([not d for d in dup_mask]))
    rows = [quarantine_row(r.url, r.shard_uid, d["key"], f"duplicate key: already ingested from {taken[d['key']]}",
                           r.locations.get(d["key"]), d["ingest_id"], d["ingested_at"])
            for d in dups.select(["key", "ingest_id", "ingested_at"]).to_pylist()]
    r.quarantine = pa.concat_tables([r.quarantine, pa.Table.from_pylist(rows, schema=QUARANTINE)])


def orphan_parts(catalog: Catalog, remove: bool = False) -> list[Path]:
    """Ingest's lake parts that no `shards` row accounts for: left by a process that died
    between writing a shard's parts and committing it. Every view reads them, so they
    would count samples that the accounting cannot see. With `remove`, they are deleted.

    The `shards` rows are read and the lake listed under one connection: it holds writers
    off, and a writer writes its parts and commits them under its own. Listed after the
    connection closed, a part another process committed in between looked orphaned, and
    `ingest` deleted that process's samples.
    """
    out = []
    with catalog.connect(read_only=True) as con:
        known = {r[0] for r in con.execute("SELECT shard_uid FROM shards").fetchall()}
        for table in ("samples", "quarantine"):
            for p in sorted(lake.table_dir(catalog.ws.lake, table).glob("*.parquet")):
                if _SHARD_PART_RE.match(p.stem) and p.stem not in known:
                    out.append(p)
        if remove:
            for p in out:
                log.warning("removing %s: written by an ingest that never committed", p)
                p.unlink(missing_ok=True)
    return out


def mismatched_shards(catalog: Catalog) -> dict[str, str]:
    """Shards whose lake rows disagree with their `shards` row (url -> what differs): one
    grouped pass over each lake table, not a count per shard."""
    rows = catalog.query(
        "SELECT sh.url, sh.accepted, sh.quarantined, coalesce(s.n, 0) AS s, coalesce(q.n, 0) AS q FROM shards sh "
        "LEFT JOIN (SELECT shard_uid, count(*) n FROM samples GROUP BY ALL) s USING (shard_uid) "
        "LEFT JOIN (SELECT shard_uid, count(*) n FROM quarantine "
        "WHERE coalesce(stage, 'ingest') = 'ingest' GROUP BY ALL) q USING (shard_uid)").to_pylist()
    return {r["url"]: f"catalog says {r['accepted']}+{r['quarantined']}, lake holds {r['s']}+{r['q']}"
            for r in rows if (r["accepted"], r["quarantined"]) != (r["s"], r["q"])}


# ---------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------


def ingest(
    ws: Workspace,
    patterns: Sequence[str],
    cfg: IngestConfig = IngestConfig(),
    catalog: Catalog | None = None,
    on_result: Callable[[ShardResult], None] | None = None,
    ray_address: str | None = None,
    num_cpus: int | None = None,
) -> IngestReport:
    """Ingest shards into the workspace's catalog; skips shards ingested unchanged.

    Ray is started (or joined at `ray_address`) only when there is more than one shard
    to scan and `cfg.use_ray` is set.
    """
    t0 = time.perf_counter()
    catalog = catalog or Catalog(ws)
    urls = expand_shards(patterns)
    report = IngestReport()
    # An orphan's shard has no `shards` row, so it is scanned again below (if asked for).
    report.orphans_removed += len(orphan_parts(catalog, remove=True))
    stale = set(mismatched_shards(catalog))  # a re-scan that died before its commit
    done = set() if cfg.force else {
        (row["url"], row["checksum"])
        # A damaged shard is not re-scanned either: mending it changes its checksum.
        for row in catalog.query("SELECT url, checksum FROM shards").to_pylist() if row["url"] not in stale
    }
    sums = {u: content_checksum(u) for u in urls}
    todo = [u for u in urls if (u, sums[u]) not in done]
    report.skipped_unchanged = len(urls) - len(todo)
    ingest_id = uuid.uuid4().hex[:12]
    jobs = [(u, cfg.split or ws.split_of(u) or DEFAULT_SPLIT, sums[u]) for u in todo]  # URL order

    def accept(batch: list[ShardResult]) -> None:
        report.duplicates += commit(catalog, batch)
        for r in batch:
            report.add(r)
            if on_result:
                on_result(r)

    if cfg.use_ray and len(jobs) > 1:
        _run_on_ray(jobs, ingest_id, cfg.key_prefix, accept, ray_address, num_cpus)
    else:
        for url, split, checksum in jobs:
            accept([scan_shard(url, split, ingest_id, cfg.key_prefix, checksum)])
    report.seconds = time.perf_counter() - t0
    return report


def _run_on_ray(jobs: Sequence[tuple[str, str, str]], ingest_id: str, key_prefix: str,
                accept: Callable[[list[ShardResult]], None],
                ray_address: str | None, num_cpus: int | None) -> None:
    """Scan shards as Ray tasks; commit finished shards in batches, in URL order.

    A shard is committed once every shard before it in URL order is, so which copy of a
    key shared by two shards wins is the same as on the in-process path, whatever order
    the tasks finish in. Results finished behind a slower shard wait in the driver until
    it is done (their rows, not their images: a ShardResult holds no pixels).
    """
    import ray

    from dataengine.cluster import ensure_ray

    ensure_ray(ray_address, num_cpus)
    remote_scan = ray.remote(num_cpus=1)(scan_shard)
    refs = [remote_scan.remote(u, s, ingest_id, key_prefix, c) for u, s, c in jobs]
    position = {ref: i for i, ref in enumerate(refs)}
    finished: dict[int, ShardResult] = {}
    next_up, pending = 0, list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
        if not ready:
            ready, pending = ray.wait(pending, num_returns=1)
        for ref, result in zip(ready, ray.get(ready)):
            finished[position[ref]] = result
        batch = []
        while next_up in finished:
            batch.append(finished.pop(next_up))
            next_up += 1
        if batch:
            accept(batch)

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
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import fsspec
import pyarrow as pa

from dataengine import lake
from dataengine.catalog import Catalog
from dataengine.schema import QUARANTINE, SAMPLES, SHARDS
from dataengine.shards import InvalidSample, ShardError, ShardScan, iter_raw_samples, validate_sample
from dataengine.workspace import Workspace

DEFAULT_SPLIT = "train"


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


def _checksum(url: str) -> str:
    fs, path = fsspec.core.url_to_fs(url)
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
    seen: set[str] = set()
    try:
        checksum = checksum or _checksum(url)
        for raw in iter_raw_samples(url, scan):
            key = key_prefix + raw.key
            fields = sorted(raw.fields)
            try:
                if key in seen:
                    raise InvalidSample("duplicate key within the shard")
                seen.add(key)
                ok = validate_sample(raw)
            except InvalidSample as e:
                reason = f"{e} (shard damaged right after it: {raw.damage_after})" if raw.damage_after else str(e)
                bad.append(dict(shard=url, shard_uid=uid, key=key, reason=reason, fields=fields,
                                ingest_id=ingest_id, ingested_at=now, stage="ingest"))
                continue
            offset, size = raw.offsets[ok.image_field]
            rows.append(dict(
                key=key, split=split, shard=url, shard_uid=uid, image_field=ok.image_field,
                image_offset=offset, image_size=size,
                image_sha1=hashlib.sha1(raw.fields[ok.image_field]).hexdigest(),
                width=ok.width, height=ok.height, caption=ok.caption, task=ok.task,
                instruction=ok.instruction, source_image_field=ok.source_image_field,
                source=str(ok.meta.get("source", "")) or None,
                meta=raw.fields["json"].decode("utf-8") if "json" in raw.fields else None,
                ingest_id=ingest_id, ingested_at=now,
            ))
    except ShardError as e:
        scan.error = str(e)
        checksum = ""
    return ShardResult(
        url=url, shard_uid=uid, split=split, ingest_id=ingest_id, checksum=checksum, bytes=scan.size,
        samples=pa.Table.from_pylist(rows, schema=SAMPLES),
        quarantine=pa.Table.from_pylist(bad, schema=QUARANTINE),
        error=scan.error, seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------------------
# Committing results (driver only, under the catalog lock)
# ---------------------------------------------------------------------------------------


def commit(catalog: Catalog, results: Sequence[ShardResult]) -> int:
    """Write shard results to the lake and the shards table in one catalog transaction.

    Keys already accepted from another shard (earlier, or earlier in this batch) move to
    quarantine. Returns how many samples were moved so.
    """
    moved = 0
    with catalog.transaction() as con:
        keys = pa.Table.from_pylist(
            [{"key": k, "shard_uid": r.shard_uid} for r in results for k in r.samples["key"].to_pylist()],
            schema=pa.schema([("key", pa.string()), ("shard_uid", pa.string())]),
        )
        con.register("_incoming", keys)
        try:
            taken = dict(con.sql(
                "SELECT i.key, any_value(s.shard) FROM _incoming i JOIN samples s "
                "ON i.key = s.key AND s.shard_uid <> i.shard_uid GROUP BY i.key"
            ).fetchall())
        finally:
            con.unregister("_incoming")
        for r in results:
            dup_mask = [k in taken for k in r.samples["key"].to_pylist()]
            if any(dup_mask):
                moved += sum(dup_mask)
                _move_to_quarantine(r, dup_mask, taken)
            for k in r.samples["key"].to_pylist():
                taken.setdefault(k, r.url)  # later shards in this batch see these keys
            lake.write_part(catalog.ws.lake, "samples", r.samples, part=r.shard_uid)
            lake.write_part(catalog.ws.lake, "quarantine", r.quarantine, part=r.shard_uid)
        now = dt.datetime.now(dt.timezone.utc)
        catalog.upsert("shards", pa.Table.from_pylist([dict(
            shard_uid=r.shard_uid, url=r.url, split=r.split, checksum=r.checksum, bytes=r.bytes,
            read=r.read, accepted=r.samples.num_rows, quarantined=r.quarantine.num_rows,
            error=r.error, ingest_id=r.ingest_id, ingested_at=now,
        ) for r in results], schema=SHARDS), con)
    return moved


def _move_to_quarantine(r: ShardResult, dup_mask: list[bool], taken: dict[str, str]) -> None:
    dups = r.samples.filter(pa.array(dup_mask))
    r.samples = r.samples.filter(pa.array([not d for d in dup_mask]))
    n = dups.num_rows
    moved = pa.table({
        "shard": dups["shard"], "shard_uid": dups["shard_uid"], "key": dups["key"],
        "reason": pa.array([f"duplicate key: already ingested from {taken[k]}" for k in dups["key"].to_pylist()]),
        "fields": pa.array([None] * n, pa.list_(pa.string())),
        "ingest_id": dups["ingest_id"], "ingested_at": dups["ingested_at"],
        "stage": pa.array(["ingest"] * n, pa.string()),
    })
    r.quarantine = pa.concat_tables([r.quarantine, moved.cast(QUARANTINE)])


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
    done = set() if cfg.force else {
        (row["url"], row["checksum"])
        # A damaged shard is not re-scanned either: mending it changes its checksum.
        for row in catalog.query("SELECT url, checksum FROM shards").to_pylist()
    }
    sums = {u: _checksum(u) for u in urls}
    todo = [u for u in urls if (u, sums[u]) not in done]
    report.skipped_unchanged = len(urls) - len(todo)
    ingest_id = uuid.uuid4().hex[:12]
    jobs = [(u, cfg.split or ws.split_of(u) or DEFAULT_SPLIT, sums[u]) for u in todo]

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


def _run_on_ray(jobs: Iterable[tuple[str, str, str]], ingest_id: str, key_prefix: str,
                accept: Callable[[list[ShardResult]], None],
                ray_address: str | None, num_cpus: int | None) -> None:
    """Scan shards as Ray tasks and commit them in batches as they finish."""
    import ray

    from dataengine.cluster import ensure_ray

    ensure_ray(ray_address, num_cpus)
    remote_scan = ray.remote(num_cpus=1)(scan_shard)
    pending = [remote_scan.remote(u, s, ingest_id, key_prefix, c) for u, s, c in jobs]
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
        if not ready:
            ready, pending = ray.wait(pending, num_returns=1)
        accept(ray.get(ready))

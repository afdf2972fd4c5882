"""The degradation stage over many captions: caption batches -> deduplicated pairs in the lake.

`pairs_table` is pure, so the same batches run in this process or as Ray Data
`map_batches` tasks across a cluster. The driver streams the pairs back, drops the ones
already in the lake or already made in this run (by `pair_id`), and writes Parquet
parts atomically. Every caption is counted, including those with nothing to remove.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from dataengine import lake
from dataengine.catalog import Catalog
from dataengine.degrade.chains import DegradeConfig, pairs_table
from dataengine.schema import PAIRS

CAPTIONS = pa.schema([("source_id", pa.string()), ("caption", pa.string())])
# Per-batch counters ride along as constant columns: Ray Data blocks carry no side channel.
_BATCH_COLS = ("_batch", "_captions", "_no_detail")


@dataclass
class DegradeReport:
    captions: int = 0
    no_detail: int = 0  # captions with no detail to remove: counted, no pairs
    pairs_made: int = 0
    duplicates: int = 0  # pairs already in the lake or made twice
    rewrites: int = 0  # chain ends paraphrased by the optional rewriter (the rest were rejected)
    pairs_written: int = 0
    parts: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def pairs_per_caption(self) -> float:
        return self.pairs_made / self.captions if self.captions else 0.0


def degrade_batch(batch: pa.Table, cfg: DegradeConfig, rewriter=None) -> pa.Table:
    """One batch of (source_id, caption) -> its pairs, with the batch's counters attached.

    `rewriter` (a `rewrite.ChainEndRewriter`) adds a paraphrase pair to each chain's end.
    """
    counters: dict[str, int] = {}
    records = zip(batch["source_id"].to_pylist(), batch["caption"].to_pylist())
    pairs = pairs_table(records, cfg, counters=counters)
    if rewriter is not None and pairs.num_rows:
        pairs = rewriter.add_pairs(pairs, cfg.name)
    n = pairs.num_rows
    batch_id = uuid.uuid4().hex
    pairs = pairs.append_column("_batch", pa.array([batch_id] * n, pa.string()))
    pairs = pairs.append_column("_captions", pa.array([batch.num_rows] * n, pa.int64()))
    pairs = pairs.append_column("_no_detail", pa.array([counters.get("no_detail", 0)] * n, pa.int64()))
    if n == 0:  # keep the counts of a batch that made no pair at all
        pairs = pa.Table.from_pylist([{"_batch": batch_id, "_captions": batch.num_rows,
                                       "_no_detail": counters.get("no_detail", 0)}], schema=pairs.schema)
    return pairs


class DegradeWithRewriter:
    """Ray Data callable class: loads the rewriting LM once per actor."""

    def __init__(self, cfg: DegradeConfig, rewriter_path: str):
        from dataengine.degrade.rewrite import ChainEndRewriter

        self.cfg = cfg
        self.rewriter = ChainEndRewriter(rewriter_path)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return degrade_batch(batch, self.cfg, self.rewriter)


def _local_batches(captions: pa.Table, cfg: DegradeConfig, batch_size: int,
                   rewriter_path: str | None = None) -> Iterator[pa.Table]:
    rewriter = None
    if rewriter_path:
        from dataengine.degrade.rewrite import ChainEndRewriter

        rewriter = ChainEndRewriter(rewriter_path)
    for start in range(0, captions.num_rows, batch_size):
        yield degrade_batch(captions.slice(start, batch_size), cfg, rewriter)


def _ray_batches(captions, cfg: DegradeConfig, batch_size: int, ray_address: str | None = None,
                 num_cpus: int | None = None, rewriter_path: str | None = None) -> Iterator[pa.Table]:
    import logging

    import ray.data

    from dataengine.cluster import ensure_ray

    ensure_ray(ray_address, num_cpus)  # else Ray Data starts its own, dashboard and all

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if isinstance(captions, ray.data.Dataset):
        ds = captions
    else:  # one block per batch, so the batches spread over the cluster's CPUs
        ds = ray.data.from_arrow([captions.slice(i, batch_size) for i in range(0, captions.num_rows, batch_size)]
                                 or [captions])
    if rewriter_path:
        # One actor fewer than the CPUs Ray reports, so read tasks still get a CPU.
        actors = max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)
        out = ds.map_batches(DegradeWithRewriter, fn_constructor_kwargs={"cfg": cfg, "rewriter_path": rewriter_path},
                             batch_size=batch_size, batch_format="pyarrow", concurrency=actors)
    else:
        out = ds.map_batches(degrade_batch, fn_kwargs={"cfg": cfg}, batch_size=batch_size,
                             batch_format="pyarrow", zero_copy_batch=True)
    yield from out.iter_batches(batch_format="pyarrow", batch_size=None)


def iter_new_pairs(
    captions: pa.Table,
    cfg: DegradeConfig,
    report: DegradeReport,
    seen: set[str],
    use_ray: bool = False,
    batch_size: int = 2048,
    on_batch: Callable[[int], None] | None = None,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    rewriter_path: str | None = None,
) -> Iterator[pa.Table]:
    """Stream PAIRS tables of pairs whose id is not in `seen` (which grows); counts into `report`."""
    captions = captions.select(CAPTIONS.names).cast(CAPTIONS)
    counted: set[str] = set()
    batches = (_ray_batches(captions, cfg, batch_size, ray_address, num_cpus, rewriter_path) if use_ray
               else _local_batches(captions, cfg, batch_size, rewriter_path))
    for block in batches:
        for batch_id, n_capt, n_none in _batch_counts(block):
            if batch_id not in counted:
                counted.add(batch_id)
                report.captions += n_capt
                report.no_detail += n_none
                if on_batch:
                    on_batch(n_capt)
        block = block.filter(pc.is_valid(block["pair_id"])).drop_columns(list(_BATCH_COLS))
        report.pairs_made += block.num_rows
        report.rewrites += pc.sum(pc.equal(block["category"], "rewrite")).as_py() or 0
        keep = []
        for pid in block["pair_id"].to_pylist():
            keep.append(pid not in seen)
            seen.add(pid)
        new = block.filter(pa.array(keep, pa.bool_()))
        report.duplicates += block.num_rows - new.num_rows
        if new.num_rows:
            yield new.cast(PAIRS)


def degrade_to_lake(catalog: Catalog, captions: pa.Table, cfg: DegradeConfig = DegradeConfig(),
                    part_rows: int = 200_000, **run) -> DegradeReport:
    """Degrade (source_id, caption) rows into new pairs in the lake's `pairs` table.

    `run` takes iter_new_pairs' options (use_ray, batch_size, on_batch, ray_address,
    num_cpus, rewriter_path).
    """
    t0 = time.perf_counter()
    report = DegradeReport()
    seen = set(catalog.query("SELECT pair_id FROM pairs")["pair_id"].to_pylist())
    pending: list[pa.Table] = []

    def flush() -> None:
        if pending:
            table = pa.concat_tables(pending)
            part = lake.write_part(catalog.ws.lake, "pairs", table, part=f"pairs-{uuid.uuid4().hex[:16]}")
            report.parts.append(str(part))
            report.pairs_written += table.num_rows
            pending.clear()

    for new in iter_new_pairs(captions, cfg, report, seen, **run):
        pending.append(new)
        if sum(t.num_rows for t in pending) >= part_rows:  # a handful of tables per part
            flush()
    flush()
    report.seconds = time.perf_counter() - t0
    return report


def degrade_to_jsonl(path: str | Path, captions: pa.Table, cfg: DegradeConfig = DegradeConfig(),
                     **run) -> DegradeReport:
    """Degrade into a JSONL file, one pair a line (source_id, step, category, less, more, removed)."""
    t0 = time.perf_counter()
    report = DegradeReport()
    fields = ("source_id", "step", "category", "less", "more", "removed")
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for new in iter_new_pairs(captions, cfg, report, set(), **run):
            for row in new.select(list(fields)).to_pylist():
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            report.pairs_written += new.num_rows
    tmp.replace(path)
    report.seconds = time.perf_counter() - t0
    return report


def _batch_counts(block: pa.Table) -> Iterable[tuple[str, int, int]]:
    if block.num_rows == 0:
        return []
    # A Ray block may hold rows of several batches: one triple per distinct batch.
    first = {}
    for b, c, n in zip(block["_batch"].to_pylist(), block["_captions"].to_pylist(),
                       block["_no_detail"].to_pylist()):
        first.setdefault(b, (c, n))
    return [(b, c, n) for b, (c, n) in first.items()]


def captions_from_samples(catalog: Catalog, split: str | None = "train") -> pa.Table:
    """(source_id, caption) of the workspace's samples, one split or all."""
    where = "WHERE split = ?" if split else ""
    return catalog.query(
        f"SELECT key AS source_id, caption FROM samples {where} ORDER BY key", [split] if split else None)


def read_caption_files(paths: Iterable[str | Path]) -> tuple[pa.Table, list[tuple[str, str]]]:
    """Captions from text files (one a line) or JSONL (a `caption` field, optional `id`).

    Returns the (source_id, caption) table and the lines that could not be used, each as
    (file:line, reason); blank lines in a text file are not records and are skipped.
    """
    ids: list[str] = []
    caps: list[str] = []
    bad: list[tuple[str, str]] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"no caption file {path}")
        jsonl = path.suffix in (".jsonl", ".json", ".ndjson")
        with open(path, encoding="utf-8", errors="strict") as f:
            try:
                lines = f.read().splitlines()
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text: {e}") from e
        for n, line in enumerate(lines, 1):
            where = f"{path.name}:{n}"
            if not line.strip():
                continue
            if not jsonl:
                ids.append(where)
                caps.append(line.strip())
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append((where, f"bad JSON: {e}"))
                continue
            cap = rec.get("caption") if isinstance(rec, dict) else None
            if not isinstance(cap, str) or not cap.strip():
                bad.append((where, "no non-empty string field 'caption'"))
                continue
            ids.append(str(rec.get("id", where)))
            caps.append(cap.strip())
    return pa.table({"source_id": ids, "caption": caps}, schema=CAPTIONS), bad

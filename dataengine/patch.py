"""Patching a confirmed gap: pool samples near the concept -> a patch shard with provenance.

For each gap, candidates come from one of two places:
- caption side, when the gap search found phrases of the prompt that train lacks: pool
  samples whose captions hold a phrase closer to each missing phrase than any training
  caption does (the cut-off is per phrase: its nearest training phrase), closest first;
- image side otherwise: the pool's image index searched with the query vector, keeping
  candidates closer to the query than its k nearest training images are on average (the
  report's `similarity`: a cut-off calibrated per query).
Near-duplicates of training images and of each other are dropped, and the survivors are
written, whole, to `shards/patches/patch-<gap_id>.tar`.
Each patch sample gets a new key (keys are global in the catalog) and its json gains a
`patch` object saying which failure, which gap, which pool shard and key it came from.
The same rows go to the lake's `patches` table. Patching the same gap again replaces
its shard and rows, so reruns are idempotent.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from dataengine import lake
from dataengine.catalog import Catalog
from dataengine.gaps import GapReport, GapSearcher, missing_phrases
from dataengine.index import BuiltIndex
from dataengine.phrases import PhraseIndex
from dataengine.schema import PATCHES
from dataengine.shards import iter_raw_samples, write_shard
from dataengine.workspace import Workspace


@dataclass(frozen=True)
class PatchConfig:
    """How many samples a patch may take and how close they must be."""

    size: int = 32  # at most this many samples per gap
    min_similarity: float | None = None  # None: the query's mean similarity to its k nearest train images
    duplicate_similarity: float = 0.97  # image-image cosine at or above which two are near-duplicates
    candidates: int | None = None  # pool neighbours considered; None: 8 x size

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if not 0.0 < self.duplicate_similarity <= 1.0:
            raise ValueError(f"duplicate_similarity must be in (0, 1], got {self.duplicate_similarity}")
        if self.candidates is not None and self.candidates < self.size:
            raise ValueError(f"candidates ({self.candidates}) must be >= size ({self.size})")


@dataclass
class PatchReport:
    gap_id: str
    concept: str
    cutoff: float
    considered: int = 0
    below_cutoff: int = 0
    duplicates_of_train: int = 0
    duplicates_in_patch: int = 0
    patched_before: int = 0  # already in another gap's patch
    written: int = 0
    shard: str | None = None
    samples: list[dict] = field(default_factory=list)  # pool_key, key, similarity
    side: str = "image"  # where the candidates came from: image | caption

    def summary(self) -> str:
        return (f"{self.concept!r}: {self.written} samples -> {self.shard or '(no shard)'} "
                f"({self.side} side: considered {self.considered}; below cut-off {self.cutoff:.3f}: {self.below_cutoff}; "
                f"near-duplicates of train {self.duplicates_of_train}, within patch {self.duplicates_in_patch}; "
                f"in other patches {self.patched_before})")


def patch_key(gap_id: str, pool_key: str) -> str:
    """The patch sample's key: new (keys are global), and free of dots (webdataset splits on them)."""
    return f"patch-{gap_id[:10]}-{pool_key.replace('.', '_')}"


def patch_gap(ws: Workspace, report: GapReport, query: np.ndarray, train_index: BuiltIndex,
              pool_index: BuiltIndex, cfg: PatchConfig = PatchConfig(),
              pool_phrases: PhraseIndex | None = None,
              missing_phrases: Sequence[tuple[np.ndarray, float]] = ()) -> PatchReport:
    """Write the patch shard for one gap and record it; returns what was kept and dropped.

    `missing_phrases`: (vector, similarity of its nearest training phrase) for each of the
    prompt's phrases that train lacks; with `pool_phrases` they choose the candidates.
    """
    catalog = Catalog(ws)
    others = _patched_elsewhere(catalog, report.gap_id)
    n = min(cfg.candidates or 8 * cfg.size, len(pool_index))
    if pool_phrases is not None and missing_phrases:
        out = PatchReport(report.gap_id, report.concept, float(min(c for _, c in missing_phrases)), side="caption")
        rows, sims = _caption_candidates(pool_index, pool_phrases, missing_phrases, n, cfg, out)
    else:
        cutoff = cfg.min_similarity if cfg.min_similarity is not None else report.similarity
        out = PatchReport(report.gap_id, report.concept, float(cutoff))
        sims, rows = pool_index.search(np.asarray(query, np.float32).reshape(1, -1), n)
        sims, rows = sims[0], rows[0]
        ok = rows >= 0
        sims, rows = sims[ok], rows[ok]
        out.considered = len(rows)
        close = sims >= cutoff
        out.below_cutoff = int((~close).sum())
        sims, rows = sims[close], rows[close]

    chosen: list[tuple[int, float]] = []
    kept_vecs: list[np.ndarray] = []
    if len(rows):
        vecs = pool_index.reconstruct(rows)
        train_sims, _ = train_index.search(vecs, 1)
        for r, s, v, ts in zip(rows, sims, vecs, train_sims[:, 0]):
            if len(chosen) >= cfg.size:
                break
            key = pool_index.keys[r]
            if key in others:
                out.patched_before += 1
            elif ts >= cfg.duplicate_similarity:
                out.duplicates_of_train += 1
            elif kept_vecs and float(np.max(np.stack(kept_vecs) @ v)) >= cfg.duplicate_similarity:
                out.duplicates_in_patch += 1
            else:
                chosen.append((int(r), float(s)))
                kept_vecs.append(v)
    if not chosen:
        return out
    picks = {pool_index.keys[r]: s for r, s in chosen}
    where = catalog.query(
        f"SELECT key, shard, image_offset FROM samples WHERE key IN ({', '.join('?' for _ in picks)})",
        list(picks)).to_pylist()
    shard_of = {r["key"]: r["shard"] for r in where}
    offset_of = {r["key"]: r["image_offset"] for r in where}
    path = ws.shards / "patches" / f"patch-{report.gap_id}.tar"
    now = datetime.now(timezone.utc)
    samples, rows_out = _collect(picks, shard_of, offset_of, report, path)
    write_shard(samples, path)
    for r in rows_out:
        r["created_at"] = now
    lake.write_part(ws.lake, "patches", pa.Table.from_pylist(rows_out, schema=PATCHES), part=f"gap-{report.gap_id}")
    out.written, out.shard = len(samples), str(path)
    out.samples = [{"pool_key": r["pool_key"], "key": patch_key(report.gap_id, r["pool_key"]),
                    "similarity": r["similarity"]} for r in rows_out]
    return out


def patch_found_gap(searcher: GapSearcher, report: GapReport, query: np.ndarray,
                    cfg: PatchConfig = PatchConfig()) -> PatchReport:
    """Patch a gap the searcher reported, from the side that found it: the prompt's
    missing phrases when there are any, else the query's image neighbourhood."""
    pool_phrases = searcher.phrases[1] if searcher.phrases is not None else None
    missing = missing_phrases(report)
    vectors = searcher.encoder.encode_texts([m.phrase for m in missing]) if missing and pool_phrases else []
    return patch_gap(searcher.ws, report, query, searcher.index, searcher.reference, cfg, pool_phrases,
                     [(v, m.train_similarity) for v, m in zip(vectors, missing)])


def _caption_candidates(pool_index: BuiltIndex, pool_phrases: PhraseIndex,
                        missing: Sequence[tuple[np.ndarray, float]], n: int, cfg: PatchConfig,
                        out: PatchReport) -> tuple[np.ndarray, np.ndarray]:
    """Pool image rows whose captions state every missing phrase more closely than any
    training caption does, ordered by their weakest such phrase; and those similarities."""
    queries = np.stack([np.asarray(v, np.float32) for v, _ in missing])
    k = min(len(pool_phrases), max(4 * n, 64))  # a caption holds several phrases
    sims, rows = pool_phrases.index.search(queries, k)
    best: list[dict[str, float]] = []
    for (_, cutoff), srow, rrow in zip(missing, sims, rows):
        mine: dict[str, float] = {}
        for s, r in zip(srow, rrow):
            if r < 0:
                continue
            owner = pool_phrases.owners[r]
            mine[owner] = max(mine.get(owner, -1.0), float(s))
        out.considered = max(out.considered, len(mine))
        best.append({o: s for o, s in mine.items() if s > cutoff})
        out.below_cutoff += sum(1 for s in mine.values() if s <= cutoff)
    owners = set(best[0]).intersection(*best[1:]) if best else set()
    ranked = sorted(owners, key=lambda o: (-min(b[o] for b in best), o))
    have = pool_index._row_map()
    ranked = [o for o in ranked if o in have]  # a caption's sample whose image failed to embed has no row
    return (np.array([have[o] for o in ranked], np.int64),
            np.array([min(b[o] for b in best) for o in ranked], np.float32))


def _patched_elsewhere(catalog: Catalog, gap_id: str) -> set[str]:
    rows = catalog.query("SELECT DISTINCT pool_key FROM patches WHERE gap_id <> ?", [gap_id])
    return set(rows["pool_key"].to_pylist())


def _collect(picks: dict[str, float], shard_of: dict[str, str], offset_of: dict[str, int], report: GapReport,
             path: Path) -> tuple[list[dict], list[dict]]:
    """Read the picked samples whole from their pool shards, most similar first.

    A sample is found by where its image lies, not by its tar key: the catalog's key may
    carry ingest's `key_prefix`, and a shard may hold a second copy under the same key
    that ingest quarantined. The copy read is exactly the one the catalog accepted.
    """
    by_shard: dict[str, dict[int, str]] = defaultdict(dict)  # shard -> image offset -> catalog key
    for key in picks:
        if key not in shard_of:
            raise KeyError(f"pool sample {key!r} is in the index but not in the catalog; rebuild the pool index")
        by_shard[shard_of[key]][offset_of[key]] = key
    found: dict[str, dict] = {}
    for shard, wanted in by_shard.items():
        for raw in iter_raw_samples(shard):
            if raw.problem is not None:
                continue
            for offset, _ in raw.offsets.values():
                if offset in wanted:
                    found[wanted[offset]] = raw.fields
    missing = sorted(set(picks) - set(found))
    if missing:
        raise FileNotFoundError(f"pool samples {missing[:3]} could not be read back from their shards")
    samples, rows = [], []
    for key in sorted(picks, key=lambda k: -picks[k]):
        fields = dict(found[key])
        meta = json.loads(fields.pop("json")) if "json" in fields else {}
        provenance = {"feedback_id": report.feedback_id, "gap_id": report.gap_id, "concept": report.concept,
                      "pool_shard": shard_of[key], "pool_key": key, "similarity": round(picks[key], 6),
                      "model_id": report.model_id}
        meta["patch"] = provenance
        new_key = patch_key(report.gap_id, key)
        samples.append({"__key__": new_key, **fields, "json": meta})
        rows.append(dict(
            patch_id=hashlib.sha1(f"{report.gap_id}\0{key}".encode()).hexdigest()[:16],
            feedback_id=report.feedback_id, gap_id=report.gap_id, concept=report.concept,
            pool_shard=shard_of[key], pool_key=key, similarity=picks[key], patch_shard=str(path)))
    return samples, rows

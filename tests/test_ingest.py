"""Ingest: idempotent, replaces a changed shard, splits by folder, same result on Ray."""

from __future__ import annotations

import os
import time

import pytest

from conftest import good_sample
from dataengine.catalog import Catalog
from dataengine.ingest import IngestConfig, ingest
from dataengine.shards import write_shards
from dataengine.status import summarize


def _counts(cat):
    return cat.query("SELECT (SELECT count(*) FROM samples) s, (SELECT count(*) FROM quarantine) q").to_pylist()[0]


def test_reingest_skips_unchanged_and_replaces_changed(ws, catalog):
    [url] = write_shards([good_sample(f"k{i}") for i in range(5)], ws.shards / "pool", "a", 10)
    r1 = ingest(ws, [url], IngestConfig(use_ray=False), catalog)
    r2 = ingest(ws, [url], IngestConfig(use_ray=False), catalog)
    assert (r1.accepted, r2.shards, r2.skipped_unchanged) == (5, 0, 1)
    assert _counts(catalog) == {"s": 5, "q": 0}
    time.sleep(0.01)
    write_shards([good_sample(f"k{i}") for i in range(3)], ws.shards / "pool", "a", 10)
    r3 = ingest(ws, [url], IngestConfig(use_ray=False), catalog)
    assert r3.shards == 1
    # The shard's rows are replaced, not added to, and its own keys are no duplicates.
    assert _counts(catalog) == {"s": 3, "q": 0}
    assert catalog.query("SELECT DISTINCT split FROM samples")["split"].to_pylist() == ["pool"]


def test_split_from_folder_or_flag(ws, catalog, tmp_path):
    a = write_shards([good_sample("e1")], ws.shards / "eval", "e", 10)
    b = write_shards([good_sample("x1")], tmp_path / "elsewhere", "x", 10)
    c = write_shards([good_sample("y1")], tmp_path / "other", "y", 10)
    ingest(ws, a + b, IngestConfig(use_ray=False), catalog)
    ingest(ws, c, IngestConfig(use_ray=False, split="pool", key_prefix="other-"), catalog)
    rows = {r["key"]: r["split"] for r in catalog.query("SELECT key, split FROM samples").to_pylist()}
    assert rows == {"e1": "eval", "x1": "train", "other-y1": "pool"}


def test_summary_checks_accounting_against_the_lake(ws, catalog):
    [url] = write_shards([good_sample(f"k{i}") for i in range(4)], ws.shards / "train", "t", 10)
    ingest(ws, [url], IngestConfig(use_ray=False), catalog)
    assert summarize(catalog).exact
    # Lose a lake part behind the catalog's back: the summary must notice.
    part = next((ws.lake / "samples").glob("[0-9a-f]*.parquet"))
    os.remove(part)
    s = summarize(catalog)
    assert not s.exact and "lake holds 0+0" in s.problems[0]


@pytest.mark.slow
def test_ray_and_local_ingest_agree(tmp_path):
    from dataengine.cluster import ensure_ray
    from dataengine.workspace import Workspace

    samples = [good_sample(f"k{i:03d}") for i in range(40)] + [good_sample("k000")]
    shard_dir = tmp_path / "shards"
    write_shards(samples, shard_dir, "r", maxcount=7)
    results = {}
    for use_ray in (False, True):
        ws = Workspace.at(tmp_path / f"ws-{use_ray}")
        cat = Catalog(ws)
        cat.migrate()
        if use_ray:
            ensure_ray(num_cpus=2)
        rep = ingest(ws, [str(shard_dir)], IngestConfig(use_ray=use_ray), cat)
        results[use_ray] = (rep.shards, rep.read, rep.accepted, rep.quarantined,
                            sorted(cat.query("SELECT key FROM samples")["key"].to_pylist()))
    assert results[True] == results[False]
    assert results[True][:4] == (6, 41, 40, 1)

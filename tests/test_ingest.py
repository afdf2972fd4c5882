"""Ingest: idempotent, replaces a changed shard, splits by folder, same result on Ray."""

from __future__ import annotations

import os
import shutil
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


# ---------------------------------------------------------------------------------------
# Duplicates across shards: which copy wins, and nothing lost on a re-scan
# ---------------------------------------------------------------------------------------


def _two_shards_sharing_a_key(root):
    a = write_shards([good_sample("shared", "copy in a"), good_sample("a1")], root, "a", 10)[0]
    b = write_shards([good_sample("shared", "copy in b"), good_sample("b1")], root, "b", 10)[0]
    return a, b


def test_a_rescan_in_one_batch_with_another_holder_of_the_key_keeps_the_key(ws, catalog, tmp_path):
    from dataengine.ingest import commit, scan_shard

    a, b = _two_shards_sharing_a_key(tmp_path / "in")
    ingest(ws, [a], IngestConfig(use_ray=False), catalog)
    # `a` re-scanned (--force, or changed) and `b` new, committed together as Ray batches them.
    commit(catalog, [scan_shard(a, "train", "i2"), scan_shard(b, "train", "i2")])
    rows = catalog.query("SELECT key, caption FROM samples WHERE key = 'shared'").to_pylist()
    assert rows == [{"key": "shared", "caption": "copy in a"}]
    q = catalog.query("SELECT shard, reason FROM quarantine").to_pylist()
    assert len(q) == 1 and q[0]["shard"] == b and q[0]["reason"] == f"duplicate key: already ingested from {a}"
    assert summarize(catalog).exact


def test_the_first_shard_in_url_order_wins_whatever_order_results_arrive_in(ws, catalog, tmp_path):
    from dataengine.ingest import commit, scan_shard

    a, b = _two_shards_sharing_a_key(tmp_path / "in")
    commit(catalog, [scan_shard(b, "train", "i"), scan_shard(a, "train", "i")])  # b finished first
    assert catalog.query("SELECT shard FROM samples WHERE key = 'shared'")["shard"].to_pylist() == [a]
    q = catalog.query("SELECT key, shard, members, offsets, sizes FROM quarantine").to_pylist()
    assert [(r["key"], r["shard"]) for r in q] == [("shared", b)]
    # The quarantined copy says where its bytes lie, so a curator can read it.
    assert sorted(q[0]["members"]) == ["shared.json", "shared.png", "shared.txt"]
    data = open(b, "rb").read()
    i = q[0]["members"].index("shared.txt")
    assert data[q[0]["offsets"][i]: q[0]["offsets"][i] + q[0]["sizes"][i]] == b"copy in b"


# ---------------------------------------------------------------------------------------
# What the workspace says about itself
# ---------------------------------------------------------------------------------------


def test_change_is_detected_by_content_not_file_metadata(ws, catalog, tmp_path):
    [url] = write_shards([good_sample("k0", "a red box")], tmp_path / "in", "m", 10)
    ingest(ws, [url], IngestConfig(use_ray=False), catalog)
    # Touched or copied (mtime, ctime, inode change), same bytes: nothing to re-scan.
    copy = url + ".copy"
    shutil.copyfile(url, copy)
    os.replace(copy, url)
    os.utime(url, (time.time() + 60, time.time() + 60))
    assert ingest(ws, [url], IngestConfig(use_ray=False), catalog).skipped_unchanged == 1
    # Same size, other bytes, with the old times put back (`cp -p`, a restore): re-scanned.
    st = os.stat(url)
    data = open(url, "rb").read().replace(b"a red box", b"a big box")
    open(url, "wb").write(data)
    os.utime(url, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = ingest(ws, [url], IngestConfig(use_ray=False), catalog)
    assert (r.shards, r.skipped_unchanged) == (1, 0)
    assert catalog.query("SELECT caption FROM samples")["caption"].to_pylist() == ["a big box"]


def test_parts_of_a_commit_that_never_happened_are_seen_and_removed(ws, catalog, tmp_path, monkeypatch):
    from dataengine import lake
    from dataengine.ingest import scan_shard

    [url] = write_shards([good_sample(f"k{i}") for i in range(3)], tmp_path / "in", "o", 10)
    # An exception inside the commit: the catalog rolls back and takes the parts with it.
    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(Catalog, "upsert", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ingest(ws, [url], IngestConfig(use_ray=False), catalog)
    monkeypatch.undo()
    assert _counts(catalog) == {"s": 0, "q": 0} and summarize(catalog).exact
    # A process killed between writing the parts and committing leaves them behind.
    r = scan_shard(url, "train", "dead")
    lake.write_part(ws.lake, "samples", r.samples, part=r.shard_uid)
    s = summarize(catalog)
    assert not s.exact and "never committed" in s.problems[0]
    rep = ingest(ws, [url], IngestConfig(use_ray=False), catalog)
    assert rep.orphans_removed == 1 and rep.accepted == 3
    assert _counts(catalog) == {"s": 3, "q": 0} and summarize(catalog).exact


def test_a_shard_committed_while_another_ingest_lists_the_lake_keeps_its_samples(ws, catalog, tmp_path, monkeypatch):
    # Another process commits a shard while this one looks for orphan parts. Its parts
    # have a `shards` row by the time they are listed; read before it, they looked orphaned
    # and were deleted (CI saw the four-writer catalog test fail on it).
    import subprocess
    import sys

    from dataengine import lake
    from dataengine.ingest import orphan_parts

    [url] = write_shards([good_sample(f"o{i}") for i in range(3)], tmp_path / "in", "o", 10)
    code = (f"from dataengine.workspace import Workspace\n"
            f"from dataengine.catalog import Catalog, LockRetry\n"
            f"from dataengine.ingest import IngestConfig, ingest\n"
            f"ws = Workspace.at({str(ws.root)!r})\n"
            f"print('ready', flush=True)\n"
            f"ingest(ws, [{url!r}], IngestConfig(use_ray=False), Catalog(ws, LockRetry(timeout_s=60)))\n")
    other: list[subprocess.Popen] = []
    table_dir = lake.table_dir

    def listing(root, name):  # the other ingest gets five seconds to commit mid-listing
        if not other:
            other.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True))
            assert other[0].stdout.readline().strip() == "ready"
            try:
                other[0].wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass  # held off until the listing is done: what the lock is for
        return table_dir(root, name)

    monkeypatch.setattr(lake, "table_dir", listing)
    assert orphan_parts(catalog, remove=True) == []
    monkeypatch.undo()
    assert other[0].wait(timeout=120) == 0
    assert sorted(catalog.query("SELECT key FROM samples")["key"].to_pylist()) == ["o0", "o1", "o2"]
    assert summarize(catalog).exact


def test_a_rescan_that_died_before_its_commit_is_scanned_again(ws, catalog, tmp_path):
    from dataengine import lake
    from dataengine.ingest import scan_shard

    [url] = write_shards([good_sample(f"k{i}") for i in range(3)], tmp_path / "in", "r", 10)
    ingest(ws, [url], IngestConfig(use_ray=False), catalog)
    r = scan_shard(url, "train", "dead")
    lake.write_part(ws.lake, "samples", r.samples.slice(0, 1), part=r.shard_uid)  # half a rewrite
    assert not summarize(catalog).exact
    rep = ingest(ws, [url], IngestConfig(use_ray=False), catalog)  # unchanged, yet re-scanned
    assert rep.shards == 1 and _counts(catalog) == {"s": 3, "q": 0} and summarize(catalog).exact


def test_split_comes_only_from_the_workspaces_own_shards_folder(ws, catalog, tmp_path):
    [outside] = write_shards([good_sample("c1")], tmp_path / "data" / "shards" / "cc12m", "x", 10)
    [inside] = write_shards([good_sample("p1")], ws.shards / "pool", "y", 10)
    ingest(ws, [outside, inside], IngestConfig(use_ray=False), catalog)
    rows = {r["key"]: r["split"] for r in catalog.query("SELECT key, split FROM samples").to_pylist()}
    assert rows == {"c1": "train", "p1": "pool"}

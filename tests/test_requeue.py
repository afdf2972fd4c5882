"""Requeue: only the quarantined samples run again, and the accounting stays exact."""

from __future__ import annotations

import pytest

from conftest import good_sample
from dataengine.catalog import Catalog
from dataengine.ingest import IngestConfig, ingest
from dataengine.requeue import requeue, select
from dataengine.shards import write_shards
from dataengine.status import summarize


def _lake_files(ws, table):
    return {p.name: p.stat().st_mtime_ns for p in (ws.lake / table).glob("*.parquet")}


def test_a_decoder_that_learns_a_format_gets_only_the_quarantined_samples(ws, catalog, tmp_path, monkeypatch):
    import dataengine.shards as shards

    # Today's decoder refuses samples whose caption mentions a "new format".
    real = shards.decode_image

    def old_decoder(data, name):
        if data.endswith(b"NEWFORMAT"):
            raise shards.InvalidSample(f"undecodable image {name!r}: unknown format")
        return real(data, name)

    monkeypatch.setattr(shards, "decode_image", old_decoder)
    odd = good_sample("odd", "a sample in a new format")
    odd["png"] = odd["png"] + b"NEWFORMAT"  # PNG readers ignore bytes after IEND
    broken = good_sample("broken")
    broken["png"] = b"not an image at all"
    [a] = write_shards([good_sample("a0"), odd, broken, good_sample("a1")], tmp_path / "in", "a", 10)
    [b] = write_shards([good_sample("b0")], tmp_path / "in", "b", 10)
    ingest(ws, [a, b], IngestConfig(use_ray=False, key_prefix="p-"), catalog)
    assert select(catalog, "ingest").num_rows == 2

    monkeypatch.setattr(shards, "decode_image", real)  # the decoder gained the format
    b_part = {n: t for n, t in _lake_files(ws, "samples").items() if n != "_schema.parquet"}
    rep = requeue(ws, "ingest", "undecodable", catalog)
    assert (rep.matched, rep.accepted, rep.still_quarantined) == (2, 1, 1)
    keys = sorted(catalog.query("SELECT key FROM samples")["key"].to_pylist())
    assert keys == ["p-a0", "p-a1", "p-b0", "p-odd"]
    [still] = catalog.query("SELECT key, reason, offsets FROM quarantine").to_pylist()
    assert still["key"] == "p-broken" and still["reason"].startswith("undecodable image 'png'")
    # Only shard a's parts were rewritten; shard b's were not touched.
    after = _lake_files(ws, "samples")
    changed = {n for n in b_part if after.get(n) != b_part[n]}
    assert len(changed) == 1
    s = summarize(catalog)
    assert s.exact and [(sp.read, sp.accepted, sp.quarantined) for sp in s.splits] == [(5, 4, 1)]
    # The requeued sample reads back by offset like any other.
    from dataengine.images import read_ranges

    r = catalog.query("SELECT shard, image_offset, image_size FROM samples WHERE key = 'p-odd'").to_pylist()[0]
    assert read_ranges(r["shard"], [(r["image_offset"], r["image_size"])]) == [odd["png"]]
    # A second requeue finds only the one that still fails, and changes nothing.
    again = requeue(ws, "ingest", None, catalog)
    assert (again.matched, again.accepted, again.still_quarantined) == (1, 0, 1)


def test_a_mended_shard_is_scanned_again_whole(ws, catalog, tmp_path):
    bad = good_sample("k1")
    bad["png"] = b"garbage"
    [url] = write_shards([good_sample("k0"), bad], tmp_path / "in", "m", 10)
    ingest(ws, [url], IngestConfig(use_ray=False), catalog)
    write_shards([good_sample("k0"), good_sample("k1")], tmp_path / "in", "m", 10)  # mended in place
    rep = requeue(ws, "ingest", None, catalog)
    assert rep.rescanned_shards == [url] and (rep.accepted, rep.still_quarantined) == (1, 0)
    assert sorted(catalog.query("SELECT key FROM samples")["key"].to_pylist()) == ["k0", "k1"]
    assert summarize(catalog).exact


def test_a_duplicate_becomes_a_sample_once_its_winner_is_gone(ws, catalog, tmp_path):
    [a] = write_shards([good_sample("shared", "in a")], tmp_path / "in", "a", 10)
    [b] = write_shards([good_sample("shared", "in b")], tmp_path / "in", "b", 10)
    ingest(ws, [a, b], IngestConfig(use_ray=False), catalog)
    rep = requeue(ws, None, "duplicate", catalog)
    assert (rep.accepted, rep.still_quarantined) == (0, 1)  # a still holds the key
    write_shards([good_sample("other")], tmp_path / "in", "a", 10)  # a no longer has it
    ingest(ws, [a], IngestConfig(use_ray=False), catalog)
    rep = requeue(ws, None, "duplicate", catalog)
    assert rep.accepted == 1
    assert catalog.query("SELECT caption FROM samples WHERE key = 'shared'")["caption"].to_pylist() == ["in b"]
    assert summarize(catalog).exact


def test_bad_arguments_are_refused(ws, catalog):
    with pytest.raises(ValueError, match="stage must be one of"):
        select(catalog, "decode")
    with pytest.raises(ValueError, match="not a regular expression"):
        select(catalog, None, "([")


def test_cli_dry_run_then_requeue(ws, catalog, tmp_path):
    from typer.testing import CliRunner

    from cli.app import app

    bad = good_sample("k1")
    bad["png"] = b"garbage"
    [url] = write_shards([good_sample("k0"), bad], tmp_path / "in", "c", 10)
    ingest(ws, [url], IngestConfig(use_ray=False), catalog)
    runner = CliRunner()
    res = runner.invoke(app, ["requeue", "-w", str(ws.root), "--stage", "ingest", "--dry-run"])
    assert res.exit_code == 0 and "1 quarantined sample(s) match (dry run" in res.output
    assert "undecodable image 'png'" in res.output
    res = runner.invoke(app, ["requeue", "-w", str(ws.root), "--stage", "ingest"])
    assert res.exit_code == 0, res.output
    assert "requeued 1: 0 accepted, 1 still quarantined" in res.output
    res = runner.invoke(app, ["requeue", "-w", str(ws.root), "--stage", "nope"])
    assert res.exit_code == 2 and "stage must be one of" in res.output

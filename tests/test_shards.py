"""Shards: reading is exact (every sample accepted or quarantined with its reason)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import fsspec
import pytest

from conftest import good_sample, image_bytes
from dataengine.ingest import IngestConfig, ingest, scan_shard
from dataengine.shards import ShardScan, iter_raw_samples, split_member_name, write_shards


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def _members(key, png=None, txt=None, meta=None, extra=()):
    out = []
    if png is not None:
        out.append((f"{key}.png", png))
    if txt is not None:
        out.append((f"{key}.txt", txt.encode()))
    if meta is not None:
        out.append((f"{key}.json", meta if isinstance(meta, bytes) else json.dumps(meta).encode()))
    out += list(extra)
    return out


def test_member_names_split_like_webdataset():
    assert split_member_name("000012.jpg") == ("000012", "jpg")
    assert split_member_name("a/b/000012.src.PNG") == ("a/b/000012", "src.png")
    assert split_member_name("README") is None


def test_write_then_read_round_trip(tmp_path):
    samples = [good_sample(f"k{i}") for i in range(7)]
    paths = write_shards(samples, tmp_path, "rt", maxcount=3)
    assert len(paths) == 3
    keys = [raw.key for p in paths for raw in iter_raw_samples(p)]
    assert keys == [f"k{i}" for i in range(7)]


def test_damaged_shard_keeps_every_good_sample(tmp_path):
    png = image_bytes()
    meta = {"width": 32, "height": 24}
    members = (
        _members("good1", png, "a red box", meta)
        + _members("badimg", b"\x89PNG\r\n\x1a\n not really a png", "broken", meta)
        + _members("cutimg", png[: len(png) // 2], "half an image", meta)
        + _members("nocap", png, None, meta)
        + _members("badjson", png, "a box", b"{not json")
        + _members("good2", png, "another red box", meta)
        + _members("good1", png, "same key again", meta)
        + _members("good3", png, "a third box", meta)
        + _members("editnosrc", png, "an edit", {**meta, "task": "edit", "instruction": "make it blue"})
        + _members("goodedit", png, "a blue box", {**meta, "task": "edit", "instruction": "make it blue"},
                   extra=[("goodedit.src.png", png)])
    )
    url = _tar(tmp_path / "mixed.tar", members)
    r = scan_shard(url, "train", "t")
    reasons = dict(zip(r.quarantine["key"].to_pylist(), r.quarantine["reason"].to_pylist()))
    assert r.samples["key"].to_pylist() == ["good1", "good2", "good3", "goodedit"]
    assert set(reasons) == {"badimg", "cutimg", "nocap", "badjson", "good1", "editnosrc"}
    assert reasons["badimg"].startswith("undecodable image")
    assert reasons["cutimg"].startswith("undecodable image")
    assert reasons["nocap"].startswith("missing caption")
    assert reasons["badjson"].startswith("bad JSON")
    assert reasons["good1"] == "duplicate key within the shard"
    assert reasons["editnosrc"].startswith("edit sample without a source image")
    assert r.read == 10 == r.samples.num_rows + r.quarantine.num_rows
    assert r.error is None
    edit = r.samples.to_pylist()[-1]
    assert edit["task"] == "edit" and edit["instruction"] == "make it blue"
    assert edit["source_image_field"] == "src.png"


def _cut_inside(url, member_name, into=10):
    with tarfile.open(url) as tf:
        info = tf.getmember(member_name)
    data = open(url, "rb").read()
    open(url, "wb").write(data[: info.offset_data + into])


def test_truncated_tar_keeps_samples_before_the_cut(tmp_path, ws):
    [url] = write_shards([good_sample(f"s{i}") for i in range(6)], tmp_path, "cut", maxcount=10)
    _cut_inside(url, "s4.png")
    r = scan_shard(url, "train", "t")
    assert r.samples["key"].to_pylist() == ["s0", "s1", "s2", "s3"]
    assert r.quarantine["key"].to_pylist() == ["s4"]
    assert "truncated tar" in r.quarantine["reason"][0].as_py()
    assert r.error and "truncated" in r.error
    # webdataset's own reader, told to warn and continue, stops here without a word.


def test_archive_without_end_marker_is_reported_but_samples_kept(tmp_path):
    [url] = write_shards([good_sample(f"s{i}") for i in range(3)], tmp_path, "noend", maxcount=10)
    with tarfile.open(url) as tf:
        last = tf.getmember("s2.txt")  # write order: json, png, txt
    data = open(url, "rb").read()
    end = last.offset_data + ((last.size + 511) // 512) * 512
    open(url, "wb").write(data[:end])
    scan = ShardScan(url)
    keys = [raw.key for raw in iter_raw_samples(url, scan)]
    assert keys == ["s0", "s1", "s2"]
    assert "without an end-of-archive marker" in scan.error
    r = scan_shard(url, "train", "t")
    assert r.samples.num_rows == 3 and r.quarantine.num_rows == 0


def test_not_a_tar_is_a_damaged_shard_with_zero_samples(tmp_path):
    p = tmp_path / "junk.tar"
    p.write_bytes(b"this is not a tar file at all" * 100)
    r = scan_shard(str(p), "train", "t")
    assert r.read == 0 and "not a readable tar" in r.error


def test_img2dataset_layout_and_gzip_and_fsspec_urls(tmp_path, ws):
    jpg = image_bytes(fmt="JPEG")
    meta = {"url": "http://example.invalid/x.jpg", "status": "success", "width": 32, "height": 24,
            "original_width": 640, "original_height": 480, "caption": "a cat"}
    members = _members("000000000", None, "a cat", meta, extra=[("000000000.jpg", jpg)])
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress(raw.getvalue()))
    with fsspec.open("memory://bucket/b.tar", "wb") as f:
        f.write(raw.getvalue())
    report = ingest(ws, [str(tmp_path / "a.tar.gz"), "memory://bucket/b.tar"],
                    IngestConfig(use_ray=False, key_prefix=""))
    # Same key in two shards: the second is quarantined as a duplicate, not lost.
    assert (report.read, report.accepted, report.quarantined, report.duplicates) == (2, 1, 1, 1)


def test_missing_shard_is_a_clear_error(tmp_path, ws):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        ingest(ws, [str(tmp_path / "nothing-here-*.tar")], IngestConfig(use_ray=False))


def test_members_sorted_by_extension_still_make_whole_samples(tmp_path):
    png, meta = image_bytes(), {"width": 32, "height": 24}
    samples = [_members(f"k{i}", png, f"box {i}", meta) for i in range(8)]
    by_extension = [m for ext in (".json", ".png", ".txt") for s in samples for m in s if m[0].endswith(ext)]
    r = scan_shard(_tar(tmp_path / "sorted.tar", by_extension), "train", "t")
    assert r.samples["key"].to_pylist() == [f"k{i}" for i in range(8)]
    assert r.quarantine.num_rows == 0 and r.read == 8
    assert r.samples["caption"].to_pylist() == [f"box {i}" for i in range(8)]


@pytest.mark.parametrize("error", [__import__("struct").error("unpack requires a buffer of 4 bytes"),
                                   IndexError("list index out of range"), EOFError(), TypeError("bad")])
def test_any_decoder_exception_quarantines_the_sample_not_the_ingest(tmp_path, ws, monkeypatch, error):
    from PIL import Image

    import dataengine.shards as shards

    png, meta = image_bytes(), {"width": 32, "height": 24}
    evil = png + b"EVIL"
    real_open = Image.open

    def picky_open(fp, *a, **k):  # PIL raising what its parsers raise on hostile bytes
        if fp.getvalue().endswith(b"EVIL"):
            raise error
        return real_open(fp, *a, **k)

    monkeypatch.setattr(shards.Image, "open", picky_open)
    url = _tar(tmp_path / "odd.tar", _members("ok1", png, "fine", meta) + _members("odd", evil, "odd", meta)
               + _members("ok2", png, "fine too", meta))
    r = ingest(ws, [url], IngestConfig(use_ray=False))
    assert (r.read, r.accepted, r.quarantined) == (3, 2, 1)
    from dataengine.catalog import Catalog

    [reason] = Catalog(ws).query("SELECT reason FROM quarantine")["reason"].to_pylist()
    assert reason.startswith(f"undecodable image 'png': {type(error).__name__}")


def test_quarantine_reasons_carry_no_object_reprs(tmp_path):
    meta = {"width": 32, "height": 24}
    url = _tar(tmp_path / "junk.tar", _members("junk", b"\x00\x01 definitely not an image", "junk", meta))
    [reason] = scan_shard(url, "train", "t").quarantine["reason"].to_pylist()
    assert reason.startswith("undecodable image 'png': UnidentifiedImageError")
    assert " object at 0x" not in reason


def test_compressed_shards_read_back_byte_identical(tmp_path, ws):
    from dataengine.catalog import Catalog
    from dataengine.images import iter_images, read_ranges

    png = image_bytes()
    members = [m for i in range(4) for m in _members(f"g{i}", png, f"box {i}", {"width": 32, "height": 24})]
    plain = _tar(tmp_path / "p.tar", members)
    (tmp_path / "c.tar.gz").write_bytes(gzip.compress(open(plain, "rb").read()))
    ingest(ws, [str(tmp_path / "c.tar.gz")], IngestConfig(use_ray=False))
    rows = Catalog(ws).query("SELECT key, shard, image_offset, image_size FROM samples ORDER BY key").to_pylist()
    assert len(rows) == 4
    blobs = read_ranges(rows[0]["shard"], [(r["image_offset"], r["image_size"]) for r in reversed(rows)])
    assert blobs == [png] * 4
    assert all(err is None and arr.shape == (16, 16, 3) for _, arr, err in iter_images(rows, 16))

"""Fuzzed shards: flipped bytes and cuts anywhere never crash an ingest, never break the
accounting, and whatever is accepted reads back byte-identical by its offsets."""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import zlib

import pytest
from PIL import Image

from conftest import image_bytes
from dataengine.catalog import Catalog
from dataengine.images import ImageReadError, read_ranges
from dataengine.ingest import IngestConfig, ingest
from dataengine.shards import write_shard
from dataengine.status import summarize
from dataengine.workspace import Workspace

CASES = 300


def _shard_bytes(rng: random.Random, case: int, tmp) -> bytes:
    samples = []
    for i in range(rng.randint(1, 5)):
        w, h = rng.randint(8, 40), rng.randint(8, 40)
        fmt = rng.choice(["PNG", "JPEG", "WEBP"])
        colour = tuple(rng.randrange(256) for _ in range(3))
        ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]
        samples.append({"__key__": f"c{case:03d}s{i}", ext: image_bytes((w, h), colour, fmt),
                        "txt": f"case {case} sample {i}: a {w}x{h} patch",
                        "json": {"width": w, "height": h, "source": "fuzz"}})
    path = write_shard(samples, tmp / f"clean-{case}.tar")
    return open(path, "rb").read()


def _damage(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.choice([0, 1, 1, 2, 4, 16])):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    if rng.random() < 0.4:
        del data[rng.randrange(len(data)):]
    return bytes(data)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "clean").mkdir()
    out = root / "shards"
    out.mkdir()
    rng = random.Random(20261202)
    for case in range(CASES):
        clean = _shard_bytes(rng, case, root / "clean")
        compressed = rng.random() < 0.2
        data = gzip.compress(clean, mtime=0) if compressed else clean
        (out / f"f{case:03d}.tar{'.gz' if compressed else ''}").write_bytes(_damage(rng, data))
    return root


def _ingest(root, use_ray: bool) -> Workspace:
    ws = Workspace.at(root / f"ws-{'ray' if use_ray else 'local'}")
    Catalog(ws).migrate()
    if use_ray:
        from dataengine.cluster import ensure_ray

        ensure_ray(num_cpus=2)
    rep = ingest(ws, [str(root / "shards")], IngestConfig(use_ray=use_ray))
    assert rep.shards == CASES and rep.read == rep.accepted + rep.quarantined
    return ws


def _state(ws: Workspace):
    cat = Catalog(ws)
    samples = cat.query("SELECT key, shard, image_offset, image_size, image_sha1, caption FROM samples "
                        "ORDER BY key, shard").to_pylist()
    quarantine = cat.query("SELECT shard, key, reason FROM quarantine ORDER BY shard, key, reason").to_pylist()
    return samples, quarantine


def _readable_stream(raw: bytes) -> bytes:
    """What a damaged .gz yields before its damage (a cut, a failed CRC): fed a byte at a
    time, so no output decoded before the error is lost with it."""
    out, d = bytearray(), zlib.decompressobj(wbits=31)
    try:
        for i in range(len(raw)):
            out += d.decompress(raw[i:i + 1])
            if d.eof:
                break
    except zlib.error:
        pass
    return bytes(out)


@pytest.mark.slow
def test_fuzzed_shards_are_accounted_for_and_read_back_exactly(fuzzed):
    local = _ingest(fuzzed, use_ray=False)
    summary = summarize(Catalog(local))
    assert summary.exact, summary.problems
    samples, quarantine = _state(local)
    # The fuzz must exercise both outcomes, or it tests nothing.
    assert len(samples) > CASES and len(quarantine) > CASES // 4
    assert any(r["shard"].endswith(".gz") for r in samples)
    by_shard: dict[str, list[dict]] = {}
    for r in samples:
        by_shard.setdefault(r["shard"], []).append(r)
    for shard, rows in by_shard.items():
        raw = open(shard, "rb").read()
        data = _readable_stream(raw) if shard.endswith(".gz") else raw
        blobs = read_ranges(shard, [(r["image_offset"], r["image_size"]) for r in rows])
        for r, blob in zip(rows, blobs):
            assert hashlib.sha1(blob).hexdigest() == r["image_sha1"], (shard, r["key"])
            assert data[r["image_offset"]: r["image_offset"] + r["image_size"]] == blob
            Image.open(io.BytesIO(blob)).load()  # what was accepted decodes
            assert r["caption"].encode() in data, (shard, r["key"])

    # The Ray path decides exactly as the in-process one: same samples, same quarantine.
    on_ray = _ingest(fuzzed, use_ray=True)
    assert summarize(Catalog(on_ray)).exact
    assert _state(on_ray) == (samples, quarantine)


def test_a_member_before_the_damage_of_a_gzip_shard_reads_back_though_gzip_reads_ahead(tmp_path):
    """gzip decodes ahead of what is asked: damage a little after a member that ingest
    accepted used to fail reading that member back (zlib: invalid distance too far back)."""
    import tarfile

    rng = random.Random(0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(3):
            data = bytes(rng.getrandbits(8) for _ in range(1500)) * 2
            info = tarfile.TarInfo(f"s{i}.bin")
            info.size, info.mtime = len(data), 0
            tf.addfile(info, io.BytesIO(data))
    bad = bytearray(gzip.compress(buf.getvalue(), mtime=0))
    bad[95] ^= 0xFF  # decodes on (wrongly) past the first member, then fails inside gzip's read-ahead
    path = tmp_path / "d.tar.gz"
    path.write_bytes(bytes(bad))
    with pytest.raises(zlib.error):  # what plain gzip does with it
        f = gzip.GzipFile(fileobj=io.BytesIO(bytes(bad)))
        f.seek(512)
        f.read(3000)
    # The bytes a careful decoder yields before the damage, which are what ingest read and hashed.
    assert read_ranges(str(path), [(512, 3000)]) == [_readable_stream(bytes(bad))[512:3512]]
    with pytest.raises(ImageReadError, match="damaged at byte"):
        read_ranges(str(path), [(512 + 3072 + 512, 3000)])  # the second member lies past the damage

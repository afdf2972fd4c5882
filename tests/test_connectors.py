"""Connectors that turn captioned images shipped offline into WebDataset shards.

The real-data tests read Tux Paint's stamps (`make real-data`) and scikit-image's bundled
images, and skip with a message where those are not installed. The rules a curator relies
on (English caption, white behind cut-outs, every file accounted for) are also checked
on small stamp trees made here, so they are tested on every machine.
"""

from __future__ import annotations

import io
import json
import re
import socket
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from connectors import tuxpaint
from connectors.report import ConnectorReport

_TRANSLATION = re.compile(r"^[a-z]{2,3}(?:_[A-Z]{2})?(?:@\w+)?(?:\.[\w-]+)?=")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test instead of hanging on a timeout."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"connector tried the network: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def read_shards(paths: list[str]) -> list[dict]:
    """Every sample in the shards, fields as raw bytes, via the webdataset reader itself."""
    samples = []
    for url in paths:
        samples.extend(wds.WebDataset(url, shardshuffle=False, empty_check=False))
    return samples


def check_samples(samples: list[dict]) -> None:
    """Each sample decodes to an RGB image of the size its json states and has a caption."""
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)), "sample keys must be unique"
    for s in samples:
        assert "." not in s["__key__"]
        image_field = "png" if "png" in s else "jpg"
        meta = json.loads(s["json"])
        with Image.open(io.BytesIO(s[image_field])) as im:
            im.load()
            assert im.mode == "RGB", s["__key__"]
            assert im.size == (meta["width"], meta["height"]), s["__key__"]
        caption = s["txt"].decode("utf-8")
        assert caption.strip() == caption and caption, s["__key__"]
        assert not _TRANSLATION.match(caption), f"{s['__key__']}: caption is a translation line"
        assert meta["task"] == "gen" and meta["source"]


# ---------------------------------------------------------------------------------------
# Tux Paint: rules, on a stamp tree made here
# ---------------------------------------------------------------------------------------


def _png(path: Path, im: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def _text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, "utf-8")


def _cutout(size=(20, 16)) -> Image.Image:
    """A red square on a transparent background, as most stamps are."""
    im = Image.new("RGBA", size, (0, 0, 0, 0))
    im.paste((200, 20, 20, 255), (5, 4, 15, 12))
    return im


@pytest.fixture
def stamp_tree(tmp_path) -> Path:
    root = tmp_path / "stamps"
    _png(root / "animals/heron.png", _cutout())
    # BOM, padding and translations after the English line, as in the Debian files.
    _text(root / "animals/heron.txt", "\ufeffA great  blue heron. \nfr.utf8=Un grand héron.\n")
    _png(root / "animals/heron_mirror.png", _cutout().transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    # A palette image whose index 0 (green) is the transparent one: it must come out white.
    palette = Image.new("P", (20, 16), 0)
    palette.putpalette([0, 255, 0, 200, 20, 20])
    palette.paste(1, (5, 4, 15, 12))
    (root / "food").mkdir(parents=True, exist_ok=True)
    palette.save(root / "food/apple.png", transparency=0)
    _text(root / "food/apple.txt", "An apple.\n")
    _png(root / "food/nocaption.png", _cutout())
    _png(root / "food/empty.png", _cutout())
    _text(root / "food/empty.txt", "\n\n")
    _png(root / "food/onlyfrench.png", _cutout())
    _text(root / "food/onlyfrench.txt", "fr.utf8=Une poire.\nde.utf8=Eine Birne.\n")
    (root / "food/broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _text(root / "food/broken.txt", "A broken file.\n")
    _text(root / "food/apple.svg", "<svg xmlns='http://www.w3.org/2000/svg'/>")
    _text(root / "plants/tree.svg", "<svg xmlns='http://www.w3.org/2000/svg'/>")
    _text(root / "plants/tree.txt", "A tree.\n")
    # A colorable stamp stores white: Tux Paint tints its shape, so it must not vanish.
    white = Image.new("LA", (10, 10), (255, 0))
    white.paste((255, 255), (2, 2, 8, 8))
    _png(root / "symbols/bolt.png", white)
    _text(root / "symbols/bolt.txt", "A lightning bolt.\n")
    _text(root / "symbols/bolt.dat", "colorable\nnoflip\n")
    _text(root / "seasonal/gift.txt", "A gift.\n")  # caption, no image
    return root


def test_tuxpaint_accounts_for_every_image_file(stamp_tree, tmp_path, monkeypatch):
    monkeypatch.setattr(tuxpaint, "_load_svg_rasteriser", lambda: None)
    report = tuxpaint.write_shards(stamp_tree, tmp_path / "out")
    reasons = {item: reason.split(":")[0] for item, reason in report.skipped}
    assert reasons == {
        "animals/heron_mirror.png": "mirror variant",
        "food/nocaption.png": "no caption",
        "food/empty.png": "no caption",
        "food/onlyfrench.png": "no caption",
        "food/broken.png": "unreadable image",
        "food/apple.svg": "svg duplicate of png",
        "plants/tree.svg": "svg without rasteriser",
    }
    assert report.found == 10 and report.written == 3 and report.balanced
    samples = {s["__key__"]: s for s in read_shards(report.shards)}
    assert set(samples) == {
        "tuxpaint-animals_heron",
        "tuxpaint-food_apple",
        "tuxpaint-symbols_bolt",
    }
    check_samples(list(samples.values()))
    heron = samples["tuxpaint-animals_heron"]
    assert heron["txt"].decode() == "A great blue heron."
    assert json.loads(heron["json"])["path"] == "animals/heron.png"
    with Image.open(io.BytesIO(heron["png"])) as im:
        assert im.getpixel((0, 0)) == (255, 255, 255)  # transparent corner -> white
        assert im.getpixel((10, 8)) == (200, 20, 20)
    with Image.open(io.BytesIO(samples["tuxpaint-food_apple"]["png"])) as im:
        assert im.getpixel((0, 0)) == (255, 255, 255)
    with Image.open(io.BytesIO(samples["tuxpaint-symbols_bolt"]["png"])) as im:
        assert im.getpixel((5, 5)) == (0, 0, 0) and im.getpixel((0, 0)) == (255, 255, 255)


def test_tuxpaint_limit_counts_files_examined(stamp_tree, tmp_path):
    report = ConnectorReport("tuxpaint")
    samples = list(tuxpaint.iter_samples(stamp_tree, limit=3, report=report))
    assert report.found == 3 and len(samples) + len(report.skipped) == 3


def test_tuxpaint_caption_falls_back_to_tagged_english(tmp_path):
    txt = tmp_path / "x.txt"
    txt.write_text("de.utf8=Ein Hut.\nen_GB.utf8=A hat.\n", "utf-8")
    assert tuxpaint.read_caption(txt) == "A hat."
    txt.write_text("A calculator.  6x7=42\nfr.utf8=Une calculatrice.\n", "utf-8")
    assert tuxpaint.read_caption(txt) == "A calculator. 6x7=42"  # '=' in English text is kept


def test_find_stamps_root_rejects_a_missing_explicit_path(tmp_path):
    assert tuxpaint.find_stamps_root(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError):
        tuxpaint.find_stamps_root(tmp_path / "nope")


# ---------------------------------------------------------------------------------------
# Tux Paint: the real stamps
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stamps_root() -> Path:
    root = tuxpaint.find_stamps_root()
    if root is None:
        pytest.skip(
            "no Tux Paint stamps: install tuxpaint-stamps-default or run "
            "`make real-data` (scripts/fetch_tuxpaint.sh)"
        )
    return root


def _check_against_sources(root: Path, samples: list[dict]) -> None:
    """The caption is the English first line of the stamp's own .txt."""
    for s in samples:
        meta = json.loads(s["json"])
        assert meta["source"] == "tuxpaint" and meta["license"] == "GPL-2.0"
        txt = (root / meta["path"]).with_suffix(".txt")
        first = txt.read_text("utf-8-sig").splitlines()[0]
        assert s["txt"].decode() == " ".join(first.split())


def test_tuxpaint_real_stamps_small(stamps_root, tmp_path, no_network):
    report = tuxpaint.write_shards(stamps_root, tmp_path, maxcount=20, limit=60)
    assert report.found == 60 and report.balanced, report.summary()
    assert report.written >= 30, report.summary()
    samples = read_shards(report.shards)
    assert len(samples) == report.written
    assert len(report.shards) == -(-report.written // 20)
    check_samples(samples)
    _check_against_sources(stamps_root, samples)


@pytest.mark.slow
def test_tuxpaint_real_stamps_full(stamps_root, tmp_path, no_network):
    report = tuxpaint.write_shards(stamps_root, tmp_path)
    assert report.balanced, report.summary()
    # Debian's package holds ~950 captioned stamps, most of them PNG.
    assert report.found > 900 and report.written > 700, report.summary()
    samples = read_shards(report.shards)
    assert len(samples) == report.written
    check_samples(samples)
    _check_against_sources(stamps_root, samples)


# ---------------------------------------------------------------------------------------
# scikit-image and friends
# ---------------------------------------------------------------------------------------


def test_skimage_samples_offline(tmp_path, no_network):
    pytest.importorskip("skimage", reason="scikit-image missing: pip install scikit-image==0.26.0")
    from connectors import skimage_samples

    report = skimage_samples.write_shards(tmp_path)
    assert report.balanced, report.summary()
    samples = read_shards(report.shards)
    assert len(samples) == report.written
    check_samples(samples)
    by_key = {s["__key__"]: s for s in samples}
    # These ship inside the 0.26 wheel.
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field"):
        assert f"skimage-{name}" in by_key, report.summary()
    assert by_key["skimage-chelsea"]["txt"].decode() == "Chelsea the cat."
    assert "jpg" in by_key["skimage-rocket"]  # a JPEG is passed through, not re-encoded
    # Loaders whose file is fetched at first use are reported, never silently dropped.
    skipped = dict(report.skipped)
    assert skipped["skimage.data.cat"].startswith("duplicate")
    assert all(r.split(":")[0] in {
        "not installed", "package not installed", "duplicate", "generated", "not an image",
        "not a single image", "unreadable image", "no caption", "unknown loader",
    } for r in skipped.values()), report.skipped


def test_real_photographs_go_through_ingest(tmp_path):
    """The pipeline runs on images no one here drew: every stamp written is accepted."""
    from dataengine.catalog import Catalog
    from dataengine.ingest import IngestConfig, ingest
    from dataengine.workspace import Workspace

    root = tuxpaint.find_stamps_root()
    if root is None:
        pytest.skip("no Tux Paint stamps (run scripts/fetch_tuxpaint.sh)")
    ws = Workspace.at(tmp_path / "ws")
    Catalog(ws).migrate()
    rep = tuxpaint.write_shards(root, ws.shards / "train", maxcount=50, limit=120)
    result = ingest(ws, [str(ws.shards / "train")], IngestConfig(use_ray=False))
    assert result.read == rep.written > 0
    assert result.accepted == rep.written and result.quarantined == 0
    sources = Catalog(ws).query("SELECT DISTINCT source FROM samples")["source"].to_pylist()
    assert sources == ["tuxpaint"]

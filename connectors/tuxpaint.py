"""Tux Paint's stamps as captioned images: Debian's `tuxpaint-stamps-default` (GPL-2.0).

Under the stamps root every stamp is `NAME.png` or `NAME.svg` with `NAME.txt` beside it,
whose first line is the English description and whose later lines are translations
(`fr.utf8=...`). `NAME.dat` holds Tux Paint options (`colorable`, `nomirror`, `scale
25%`); `NAME_mirror.png` is a pre-made mirrored copy of NAME for Tux Paint's mirror
tool. Most PNGs are photographic cut-outs around 134x128 px on a transparent
background; `colorable` ones are black silhouettes that Tux Paint tints.

Every image file found is written as one sample or skipped with a reason.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image

from connectors.report import (
    IMAGE_DECODE_ERRORS,
    ConnectorReport,
    encode_png,
    flatten_to_rgb,
    is_blank,
)
from dataengine.shards import write_shards as _write_tar_shards

SOURCE = "tuxpaint"
LICENSE = "GPL-2.0"
SYSTEM_ROOT = Path("/usr/share/tuxpaint/stamps")
# Where scripts/fetch_tuxpaint.sh unpacks the .deb when the package is not installed.
REPO_CACHE_ROOT = Path(__file__).resolve().parents[1] / ".cache/tuxpaint/usr/share/tuxpaint/stamps"

# A translation line: `fr=`, `fr.utf8=`, `zh_TW.UTF-8=`, `sr@latin.utf8=`, ...
_LOCALE_LINE = re.compile(r"^([a-z]{2,3})(?:_[A-Z]{2})?(?:@[A-Za-z]+)?(?:\.[A-Za-z0-9-]+)?=(.*)$")
_VARIANT_SUFFIXES = ("_mirror", "_flip")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# Rendered SVGs get this longest side: vectors have no native pixel size worth keeping.
_SVG_LONGEST_SIDE = 512


def find_stamps_root(explicit: str | Path | None = None) -> Path | None:
    """The stamps folder: `explicit`, else the installed package's, else the repo cache, else None.

    An explicit path that is not a folder raises FileNotFoundError rather than quietly
    falling back to another set of stamps.
    """
    if explicit is not None:
        root = Path(explicit)
        if not root.is_dir():
            raise FileNotFoundError(f"tuxpaint stamps root {root} is not a folder")
        return root
    for root in (SYSTEM_ROOT, REPO_CACHE_ROOT):
        if root.is_dir():
            return root
    return None


def read_caption(txt_path: Path) -> str | None:
    """The English description in a stamp's .txt: its first line, unless that is a translation.

    Falls back to an `en`/`en_XX` tagged line; None when there is no English text at all.
    """
    # utf-8-sig: a byte-order mark from a hand-edited file is not part of the caption.
    text = txt_path.read_bytes().decode("utf-8-sig")
    lines = [" ".join(line.split()) for line in text.splitlines()]
    lines = [line for line in lines if line]
    if lines and not _LOCALE_LINE.match(lines[0]):
        return lines[0]
    for line in lines:
        m = _LOCALE_LINE.match(line)
        if m and m.group(1) == "en" and m.group(2).strip():
            return m.group(2).strip()
    return None


def sample_key(rel_path: str) -> str:
    """A dot-free webdataset key: `animals/birds/heron.png` -> `tuxpaint-animals_birds_heron`."""
    stem = rel_path.rsplit(".", 1)[0]
    return "tuxpaint-" + _KEY_UNSAFE.sub("_", stem)


def iter_samples(
    root: str | Path,
    *,
    limit: int | None = None,
    report: ConnectorReport | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield one webdataset sample dict per usable stamp under `root`, in path order.

    `limit` caps the number of image files examined (not written). Pass a `report` to
    have every file counted as found and each one not yielded recorded with its reason.
    """
    root = Path(root)
    report = report if report is not None else ConnectorReport(SOURCE)
    files = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in (".png", ".svg") and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if limit is not None:
        files = files[:limit]
    rasterise = _load_svg_rasteriser()
    seen_keys: set[str] = set()
    for path in files:
        rel = path.relative_to(root).as_posix()
        report.found += 1
        sample = _make_sample(root, path, rel, rasterise, report)
        if sample is None:
            continue
        key = sample_key(rel)
        if key in seen_keys:
            # `a/b_c.png` and `a_b/c.png` flatten alike; a hash of the path separates them.
            key = f"{key}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"
        seen_keys.add(key)
        sample["__key__"] = key
        yield sample


def write_shards(
    root: str | Path,
    out_dir: str | Path,
    maxcount: int = 500,
    *,
    limit: int | None = None,
    prefix: str = SOURCE,
) -> ConnectorReport:
    """Write the stamps under `root` to `out_dir/tuxpaint-000000.tar`, ...; returns the account."""
    report = ConnectorReport(SOURCE)

    def counted() -> Iterator[dict[str, Any]]:
        for sample in iter_samples(root, limit=limit, report=report):
            report.written += 1
            yield sample

    report.shards = _write_tar_shards(counted(), out_dir, prefix=prefix, maxcount=maxcount)
    return report


# ---------------------------------------------------------------------------------------
# One stamp
# ---------------------------------------------------------------------------------------


def _make_sample(
    root: Path,
    path: Path,
    rel: str,
    rasterise: Callable[[Path], Image.Image] | None,
    report: ConnectorReport,
) -> dict[str, Any] | None:
    """The sample for one image file, or None after recording why it was skipped."""
    stem = path.with_suffix("")
    is_svg = path.suffix.lower() == ".svg"
    if is_svg and _sibling(stem, ".png") is not None:
        # Tux Paint ships a PNG beside some SVGs for builds without SVG support: one stamp.
        report.skip(rel, f"svg duplicate of png: {stem.name}.png is the same stamp and is used")
        return None
    txt = _sibling(stem, ".txt")
    if txt is None:
        base = _variant_base(stem)
        if base is not None:
            report.skip(rel, f"mirror variant: pre-mirrored copy of {base.name}, which is used")
        else:
            report.skip(rel, f"no caption: {stem.name}.txt is missing")
        return None
    try:
        caption = read_caption(txt)
    except UnicodeDecodeError as e:
        report.skip(rel, f"no caption: {txt.name} is not UTF-8 ({e.reason})")
        return None
    if not caption:
        report.skip(rel, f"no caption: {txt.name} has no English line")
        return None
    if is_svg and rasterise is None:
        report.skip(rel, "svg without rasteriser: no PNG beside it and cairosvg is not importable")
        return None
    options = _read_options(stem)
    try:
        im = rasterise(path) if is_svg else _open_image(path)
        # Tux Paint fills a colorable stamp's shape with the user's colour and ignores the
        # stored one, which may be white (lightningbolt.png) and vanish on white: use black.
        rgb = _silhouette(im) if any("colorable" in o for o in options) else flatten_to_rgb(im)
    except IMAGE_DECODE_ERRORS as e:
        report.skip(rel, f"unreadable image: {type(e).__name__}: {e}")
        return None
    if is_blank(rgb):
        report.skip(rel, "blank image: a single colour once composited on white")
        return None
    meta: dict[str, Any] = {
        "width": rgb.width,
        "height": rgb.height,
        "source": SOURCE,
        "path": rel,
        "license": LICENSE,
        "task": "gen",
    }
    if options:
        meta["stamp_options"] = options  # e.g. "colorable": the image is a silhouette
    return {"png": encode_png(rgb), "txt": caption, "json": meta}


def _sibling(stem: Path, suffix: str) -> Path | None:
    """`stem + suffix` if it is a file (either letter case of the suffix)."""
    for s in (suffix, suffix.upper()):
        p = stem.with_name(stem.name + s)
        if p.is_file():
            return p
    return None


def _variant_base(stem: Path) -> Path | None:
    """The stamp that `NAME_mirror`/`NAME_flip` is a variant of, if that stamp exists."""
    for suffix in _VARIANT_SUFFIXES:
        if stem.name.endswith(suffix):
            base = stem.with_name(stem.name[: -len(suffix)])
            for ext in (".png", ".svg"):
                if _sibling(base, ext) is not None:
                    return base.with_name(base.name + ext)
    return None


def _read_options(stem: Path) -> list[str]:
    """The non-empty lines of `NAME.dat` (Tux Paint's per-stamp options), if any."""
    dat = _sibling(stem, ".dat")
    if dat is None:
        return []
    lines = dat.read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _open_image(path: Path) -> Image.Image:
    """Decode an image fully now, so a truncated file fails here and not at encode time."""
    with Image.open(path) as im:
        im.load()
        return im.copy()


def _silhouette(im: Image.Image) -> Image.Image:
    """The image's shape (its alpha) in black on white, as Tux Paint shows a colorable stamp."""
    alpha = im.convert("RGBA").getchannel("A")
    out = Image.new("RGB", im.size, (255, 255, 255))
    out.paste((0, 0, 0), mask=alpha)
    return out


def _load_svg_rasteriser() -> Callable[[Path], Image.Image] | None:
    """A function SVG path -> PIL image, or None when no rasteriser is importable."""
    try:
        import cairosvg
    except (ImportError, OSError):
        # OSError: cairosvg is installed but the cairo C library is not.
        return None

    def rasterise(path: Path) -> Image.Image:
        native = Image.open(io.BytesIO(cairosvg.svg2png(url=str(path))))
        if min(native.size) < 1:
            raise ValueError(f"{path.name} renders to an empty image {native.size}")
        scale = _SVG_LONGEST_SIDE / max(native.size)
        png = cairosvg.svg2png(url=str(path), scale=scale)
        with Image.open(io.BytesIO(png)) as im:
            im.load()
            return im.copy()

    return rasterise

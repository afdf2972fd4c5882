"""Reading a catalogued sample's image straight from its shard, and making model inputs.

Ingest records where each image's bytes lie inside its tar (`image_offset`,
`image_size`), so a later stage reads just those bytes with one seek instead of
re-walking the archive. `to_square` is the decode-and-resize step every image model
here shares: shorter side to `size`, centre crop, RGB uint8.
"""

from __future__ import annotations

import io
import zlib
from collections import defaultdict
from typing import Iterable, Iterator, Sequence

import fsspec
import fsspec.compression
import numpy as np
from PIL import Image

from dataengine.shards import reason_of


class ImageReadError(OSError):
    """A catalogued image could not be read back from its shard."""


_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"))


def _compression(f) -> str | None:
    """The compression of a shard by its first bytes (what tarfile's `r:*` detects too)."""
    head = f.read(6)
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def read_ranges(shard: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """The bytes at each (offset, size) of one shard, in the order given.

    Offsets are into the tar stream, so a compressed shard (`.tar.gz`, ...) is read
    through its decompressor. Ranges are read in offset order: a compressed stream seeks
    forward by decompressing and backward only by starting over.
    """
    try:
        order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
        out: list[bytes] = [b""] * len(ranges)
        with fsspec.open(shard, "rb") as raw:
            compression = _compression(raw)
            raw.seek(0)
            f = fsspec.compression.compr[compression](raw, mode="rb") if compression else raw
            try:
                for i in order:
                    offset, size = ranges[i]
                    f.seek(offset)
                    data = f.read(size)
                    if len(data) != size:
                        raise ImageReadError(f"{shard}: {size} bytes at {offset} wanted, {len(data)} read")
                    out[i] = data
            except zlib.error:
                if compression != "gzip":
                    raise
                # gzip reads ahead: damage after a member ingest accepted can fail reading that
                # member. What lies before the damage is still there, a byte at a time.
                raw.seek(0)
                return _gzip_prefix_ranges(shard, raw.read(), ranges)
            return out
    except ImageReadError:
        raise
    except zlib.error as e:
        raise ImageReadError(f"{shard}: cannot read back its members: damaged stream: {e}") from e
    except FileNotFoundError as e:
        raise ImageReadError(f"{shard}: shard is gone since it was ingested ({e})") from e
    except (OSError, EOFError, ValueError) as e:
        raise ImageReadError(f"{shard}: cannot read back its members: {type(e).__name__}: {e}") from e


def _gzip_prefix_ranges(shard: str, raw: bytes, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """The ranges from what a damaged gzip stream decodes before its damage: fed in blocks,
    and the block that fails again a byte at a time from the state before it, so no byte
    decoded ahead of the damage is lost."""
    need = max((o + n for o, n in ranges), default=0)
    out, d, block = bytearray(), zlib.decompressobj(wbits=31), 1 << 16
    for start in range(0, len(raw), block):
        if len(out) >= need or d.eof:
            break
        before = d.copy()
        try:
            out += d.decompress(raw[start:start + block])
        except zlib.error:
            d = before
            try:
                for k in range(start, min(start + block, len(raw))):
                    out += d.decompress(raw[k:k + 1])
            except zlib.error:
                pass
            break
    got = []
    for offset, size in ranges:
        if offset + size > len(out):
            raise ImageReadError(f"{shard}: {size} bytes at {offset} wanted; the stream is damaged at "
                                 f"byte {len(out)} of its content")
        got.append(bytes(out[offset: offset + size]))
    return got


def to_square(data: bytes, size: int) -> np.ndarray:
    """Decode image bytes to a (size, size, 3) uint8 array: shorter side to `size`, centre crop.

    Transparent images are laid on white first, as a viewer shows them (Tux Paint
    cut-outs would otherwise turn black).
    """
    return to_shape(data, size, size)


def to_shape(data: bytes, width: int, height: int) -> np.ndarray:
    """Decode image bytes to a (height, width, 3) uint8 array: scaled to cover the box, then
    centre-cropped to it (an aspect bucket's shape; `to_square` is the square case)."""
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (width, height))  # JPEG: let the decoder downscale, much cheaper than resizing
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    else:
        img = img.convert("RGB")
    w, h = img.size
    scale = max(width / w, height / h)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    left, top = (nw - width) // 2, (nh - height) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)), dtype=np.uint8)


def iter_images(rows: Iterable[dict], size: int) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    """Yield (key, array, error) for rows holding key, shard, image_offset, image_size.

    Rows are read shard by shard in offset order (one open per shard, forward seeks);
    an image that cannot be read or decoded yields an error instead of an array.
    """
    by_shard: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_shard[r["shard"]].append(r)
    for shard, group in by_shard.items():
        group.sort(key=lambda r: r["image_offset"])
        try:
            blobs = read_ranges(shard, [(r["image_offset"], r["image_size"]) for r in group])
        except ImageReadError as e:
            for r in group:
                yield r["key"], None, str(e)
            continue
        for r, data in zip(group, blobs):
            try:
                yield r["key"], to_square(data, size), None
            except Exception as e:  # noqa: BLE001  (PIL raises many types on bad bytes; see shards.decode_image)
                yield r["key"], None, f"undecodable image: {type(e).__name__}: {reason_of(e)}"

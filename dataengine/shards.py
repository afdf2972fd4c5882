"""WebDataset shards: write them, read them member by member, validate each sample.

The layout is the one webdataset and img2dataset write: consecutive tar members that
share a key (`dir/name` up to the first dot of the base name) form one sample, and the
rest of the name is the field (`jpg`, `txt`, `json`, `src.png`, ...).

Reading is exact: every sample seen in a shard comes out either accepted or quarantined
with a reason, including the samples around a truncated or corrupt region. The tar is
parsed with the standard library's `tarfile` in seekable mode, and the places where
tarfile stops silently (a header cut short, an archive with no end marker) are checked
after the fact, so damage is reported rather than mistaken for the end of the shard.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import fsspec
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SOURCE_IMAGE_EXTS = tuple(f"src.{e}" for e in IMAGE_EXTS)
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)

# Decoding a hostile image must fail, not exhaust memory: 16k x 16k is the ceiling.
Image.MAX_IMAGE_PIXELS = 16384 * 16384


class ShardError(Exception):
    """A shard cannot be opened at all (missing, not a tar)."""


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | Path,
    prefix: str = "shard",
    maxcount: int = 1000,
) -> list[str]:
    """Write webdataset sample dicts (`__key__`, `png`/`jpg`: bytes, `txt`: str, `json`: dict)
    to `out_dir/prefix-000000.tar`, ... ; returns the shard paths written."""
    import webdataset as wds  # imports torch (~3 s): only writers pay for it, not readers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pattern = str(out / f"{prefix}-%06d.tar")
    written: list[str] = []
    # webdataset's ShardWriter prints a line per shard unless verbose=0.
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
            if sink.fname and (not written or written[-1] != sink.fname):
                written.append(sink.fname)
    return written


def write_shard(samples: Iterable[dict[str, Any]], path: str | Path) -> str:
    """Write sample dicts to exactly one shard at `path`, atomically (temp file, then rename),
    so a reader never sees it half written. Returns the path."""
    import webdataset as wds

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with wds.TarWriter(str(tmp)) as sink:
        for sample in samples:
            sink.write(sample)
    tmp.replace(path)
    return str(path)


# ---------------------------------------------------------------------------------------
# Reading raw samples
# ---------------------------------------------------------------------------------------


@dataclass
class RawSample:
    """One group of tar members sharing a key, before validation."""

    key: str
    fields: dict[str, bytes] = field(default_factory=dict)
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict)  # field -> (offset, size)
    names: dict[str, str] = field(default_factory=dict)  # field -> the member's full tar name
    problem: str | None = None  # the tar's damage cut into this sample: reject it
    damage_after: str | None = None  # the shard breaks right after it (it may be whole)

    def locations(self) -> tuple[list[str], list[int], list[int]]:
        """(member names, data offsets, sizes) in tar order: where quarantine says the bytes lie."""
        order = sorted(self.offsets, key=lambda f: self.offsets[f][0])
        return ([self.names[f] for f in order], [self.offsets[f][0] for f in order],
                [self.offsets[f][1] for f in order])


@dataclass
class ShardScan:
    """What a pass over one shard saw besides its samples."""

    url: str
    size: int = 0
    error: str | None = None  # damage after which nothing more could be read


def split_member_name(name: str) -> tuple[str, str] | None:
    """`dir/000012.src.png` -> (`dir/000012`, `src.png`); None for names with no field."""
    m = _KEY_RE.match(name)
    if not m:
        return None
    return m.group(1), m.group(2).lower()


def iter_raw_samples(url: str, scan: ShardScan | None = None) -> Iterator[RawSample]:
    """Yield the samples of a shard in order of first appearance; damage ends up in
    `sample.problem` or `scan.error`.

    Members are grouped by key across the whole shard, not only when adjacent: tools that
    sort members by name or extension (`tar --sort=name` on `k.json k.png k.txt` sorts
    well, but a sort by extension puts every .json first) still make whole samples. A
    member whose field its key's sample already has starts a second copy of that sample,
    which the validator then sees as a duplicate key.

    Two passes: tar headers first (seeks over the data, so cheap), then each sample's
    members by offset, one sample in memory at a time.
    """
    scan = scan if scan is not None else ShardScan(url)
    try:
        fs, path = fsspec.core.url_to_fs(url)
        scan.size = int(fs.size(path) or 0)
        fobj = fs.open(path, "rb")
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ShardError(f"{url}: cannot open shard: {e}") from e
    with fobj:
        try:
            tf = tarfile.open(fileobj=fobj, mode="r:*")
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise ShardError(f"{url}: not a readable tar archive: {reason_of(e)}") from e
        groups = _group_members(tf, scan)
        for n, (key, infos) in enumerate(groups, 1):
            raw = RawSample(key)
            for ext, info in infos:
                try:
                    member = tf.extractfile(info)
                    data = member.read() if member is not None else b""
                    if len(data) != info.size:
                        raise EOFError(f"{len(data)} of {info.size} bytes")
                except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
                    raw.problem = f"truncated tar: member {info.name} cut short ({reason_of(e)})"
                    scan.error = f"truncated tar inside member {info.name}"
                    break
                raw.fields[ext] = data  # never twice: _group_members starts a new copy instead
                raw.offsets[ext] = (info.offset_data, info.size)
                raw.names[ext] = info.name
            # A sample that ends where the archive breaks is kept if it validates: its
            # members were all read in full, only a later optional one may be missing.
            if scan.error and raw.problem is None and n == len(groups):
                raw.damage_after = scan.error
            yield raw


def _group_members(tf: tarfile.TarFile, scan: ShardScan) -> list[tuple[str, list[tuple[str, tarfile.TarInfo]]]]:
    """Walk the headers: [(key, [(field, member), ...]), ...] in order of first appearance."""
    groups: list[tuple[str, list[tuple[str, tarfile.TarInfo]]]] = []
    open_group: dict[str, int] = {}  # key -> index of its newest group
    while True:
        try:
            info = tf.next()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            scan.error = f"truncated or corrupt tar after byte {tf.offset}: {reason_of(e)}"
            break
        if info is None:
            _check_end_marker(tf, scan)
            break
        if not info.isfile():
            continue
        parts = split_member_name(info.name)
        if parts is None:
            continue  # webdataset skips members with no field too
        key, ext = parts
        i = open_group.get(key)
        if i is None or any(e == ext for e, _ in groups[i][1]):
            groups.append((key, []))
            i = open_group[key] = len(groups) - 1
        groups[i][1].append((ext, info))
    return groups


_REPR_RE = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def reason_of(err: BaseException) -> str:
    """An exception as a quarantine reason: its type where the message is bare, and no
    Python object reprs (PIL names the BytesIO it read: noise to a curator, and never the
    same twice, which splits `status`'s reason counts)."""
    msg = _REPR_RE.sub("the member's bytes", str(err)).strip()
    return msg or type(err).__name__


def _check_end_marker(tf: tarfile.TarFile, scan: ShardScan) -> None:
    """tarfile ends quietly on a short or broken header; tell those apart from a real end."""
    tf.fileobj.seek(tf.offset)
    block = tf.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        scan.error = f"archive ends at byte {tf.offset + len(block)} without an end-of-archive marker"
    elif block != _ZERO_BLOCK:
        scan.error = f"corrupt tar header at byte {tf.offset}; the rest of the shard is unreadable"


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


class InvalidSample(ValueError):
    """A sample that cannot be accepted; the message is the quarantine reason."""


@dataclass
class ValidSample:
    """What validation learned about an accepted sample."""

    key: str
    image_field: str
    width: int
    height: int
    caption: str
    meta: dict[str, Any]
    task: str
    instruction: str | None
    source_image_field: str | None


def decode_image(data: bytes, field_name: str) -> Image.Image:
    """Fully decode image bytes (a truncated file fails here, not later in training)."""
    if not data:
        raise InvalidSample(f"empty image member {field_name!r}")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # noqa: BLE001
        # PIL's decoders raise whatever their parsing meets on hostile bytes (struct.error,
        # IndexError, EOFError, TypeError, ...), not only OSError: every one of them means
        # this image is bad, never that the ingest should stop, so each is quarantined with
        # its type and message.
        raise InvalidSample(f"undecodable image {field_name!r}: {type(e).__name__}: {reason_of(e)}") from e
    if img.width <= 0 or img.height <= 0:
        raise InvalidSample(f"image {field_name!r} has size {img.width}x{img.height}")
    return img


def validate_sample(raw: RawSample) -> ValidSample:
    """Check one sample: an image that decodes, a UTF-8 caption, a JSON object if present,
    and for edits a source image and an instruction. Raises InvalidSample with the reason."""
    if raw.problem:
        raise InvalidSample(raw.problem)
    image_field = next((e for e in IMAGE_EXTS if e in raw.fields), None)
    if image_field is None:
        raise InvalidSample(f"no image member (expected one of {', '.join(IMAGE_EXTS)}); has {sorted(raw.fields)}")
    img = decode_image(raw.fields[image_field], image_field)

    if "txt" not in raw.fields:
        raise InvalidSample("missing caption (no txt member)")
    try:
        caption = raw.fields["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise InvalidSample(f"caption is not UTF-8: {e}") from e
    if not caption:
        raise InvalidSample("empty caption")

    meta: dict[str, Any] = {}
    if "json" in raw.fields:
        try:
            meta = json.loads(raw.fields["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidSample(f"bad JSON: {e}") from e
        if not isinstance(meta, dict):
            raise InvalidSample(f"bad JSON: expected an object, got {type(meta).__name__}")
        w, h = meta.get("width"), meta.get("height")
        if isinstance(w, int) and isinstance(h, int) and (w, h) != img.size:
            raise InvalidSample(f"json says {w}x{h} but the image is {img.width}x{img.height}")

    task = str(meta.get("task", "gen"))
    instruction, source_field = None, None
    if task == "edit":
        source_field = next((e for e in SOURCE_IMAGE_EXTS if e in raw.fields), None)
        if source_field is None:
            raise InvalidSample("edit sample without a source image (src.jpg/src.png/src.webp)")
        decode_image(raw.fields[source_field], source_field)
        instruction = meta.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise InvalidSample("edit sample without an instruction in its json")
    elif task != "gen":
        raise InvalidSample(f"unknown task {task!r} (expected gen or edit)")

    return ValidSample(
        key=raw.key,
        image_field=image_field,
        width=img.width,
        height=img.height,
        caption=caption,
        meta=meta,
        task=task,
        instruction=instruction,
        source_image_field=source_field,
    )

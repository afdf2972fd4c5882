"""What every image connector shares: the account of what it found, wrote and skipped,
and how a source image becomes the RGB bytes of a shard sample."""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image


@dataclass
class ConnectorReport:
    """Counts of one connector run; every item found is either written or skipped with a reason.

    A reason reads `category: detail`; `skipped_by_reason` counts by the category.
    """

    source: str
    found: int = 0
    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item, reason)
    shards: list[str] = field(default_factory=list)

    def skip(self, item: str, reason: str) -> None:
        """Record that `item` was not written, and why."""
        self.skipped.append((item, reason))

    @property
    def balanced(self) -> bool:
        """True when found == written + skipped, i.e. nothing was dropped silently."""
        return self.found == self.written + len(self.skipped)

    def skipped_by_reason(self) -> dict[str, int]:
        """Skipped items counted by the category of their reason (the text before ':')."""
        return dict(Counter(reason.split(":", 1)[0] for _, reason in self.skipped))

    def to_dict(self) -> dict:
        """A JSON-ready form, for logs and per-run stats files."""
        return {
            "source": self.source,
            "found": self.found,
            "written": self.written,
            "skipped": len(self.skipped),
            "skipped_by_reason": self.skipped_by_reason(),
            "skipped_items": [{"item": i, "reason": r} for i, r in self.skipped],
            "shards": list(self.shards),
        }

    def summary(self) -> str:
        """One line: found, written, skipped by reason."""
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped_by_reason().items()))
        return (
            f"{self.source}: found {self.found}, written {self.written}, "
            f"skipped {len(self.skipped)}" + (f" ({reasons})" if reasons else "")
        )


# What decoding a bad image file raises in PIL: OSError covers unidentified and truncated
# files, SyntaxError some malformed PNG chunks, DecompressionBombError oversized ones.
IMAGE_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def flatten_to_rgb(im: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of `im`, with any transparency composited over white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # PIL's own convert clips wide grey to 255 instead of scaling it.
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        im = Image.fromarray(scaled.round().astype(np.uint8), "L")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
    if not has_alpha:
        return im.convert("RGB")
    # Cut-outs are stored on transparent backgrounds; a generator is trained on opaque
    # images, and white is what the cut-out shows on a page or a Tux Paint canvas.
    rgba = im.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return out


def encode_png(im: Image.Image) -> bytes:
    """PNG bytes of an image (lossless, so re-encoding a cut-out adds no artefacts)."""
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def is_blank(im: Image.Image) -> bool:
    """True when every pixel has the same value (e.g. a fully transparent cut-out on white)."""
    return all(lo == hi for lo, hi in im.getextrema())

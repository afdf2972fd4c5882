"""The sample photographs that ship inside Python packages, as captioned images.

scikit-image 0.26 (`skimage.data`) installs about twenty of its images with the wheel
and downloads the rest through pooch at first use. This connector never calls the
loaders: it reads a loader's file only when that file is already in the installed
package's data folder, so nothing here can reach the network (with pooch installed, a
loader whose file is missing would try to download it). The caption is the first
paragraph of the loader's docstring ("Chelsea the cat."), the license the docstring's
sentence about copyright.

scikit-learn's china.jpg and flower.jpg and matplotlib's grace_hopper.jpg are added when
those packages are installed; they are found without importing the packages.

Every loader and extra image found is written as one sample or skipped with a reason.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from connectors.report import IMAGE_DECODE_ERRORS, ConnectorReport, encode_png, flatten_to_rgb
from dataengine.shards import write_shards as _write_tar_shards

SOURCE = "skimage"

# Loader -> the file it reads, as named in skimage's registry (relative to the package).
# Written out rather than parsed from the loaders' source so a reader sees what is used.
_LOADER_FILES = {
    "astronaut": "data/astronaut.png",
    "brain": "data/brain.tiff",
    "brick": "data/brick.png",
    "camera": "data/camera.png",
    "cat": "data/chelsea.png",
    "cell": "data/cell.png",
    "cells3d": "data/cells3d.tif",
    "checkerboard": "data/chessboard_GRAY.png",
    "chelsea": "data/chelsea.png",
    "clock": "data/clock_motion.png",
    "coffee": "data/coffee.png",
    "coins": "data/coins.png",
    "colorwheel": "data/color.png",
    "eagle": "data/eagle.png",
    "grass": "data/grass.png",
    "gravel": "data/gravel.png",
    "horse": "data/horse.png",
    "hubble_deep_field": "data/hubble_deep_field.jpg",
    "human_mitosis": "data/mitosis.tif",
    "immunohistochemistry": "data/ihc.png",
    "kidney": "data/kidney.tif",
    "lbp_frontal_face_cascade_filename": "data/lbpcascade_frontalface_opencv.xml",
    "lfw_subset": "data/lfw_subset.npy",
    "lily": "data/lily.tif",
    "logo": "data/logo.png",
    "microaneurysms": "data/microaneurysms.png",
    "moon": "data/moon.png",
    "nickel_solidification": "data/solidification.tif",
    "page": "data/page.png",
    "palisades_of_vogt": "data/palisades_of_vogt.tif",
    "protein_transport": "data/protein_transport.tif",
    "retina": "data/retina.jpg",
    "rocket": "data/rocket.jpg",
    "shepp_logan_phantom": "data/phantom.png",
    "skin": "data/skin.jpg",
    "stereo_motorcycle": "data/motorcycle_left.png",
    "text": "data/text.png",
    "vortex": "data/pivchallenge-B-B001_1.tif",
}
# Public names of skimage.data that are not image loaders at all.
_NOT_LOADERS = {"data_dir", "download_all", "file_hash"}
_GENERATED = {"binary_blobs"}  # synthesised on call: no file, not a photograph
_ALIASES = {"cat": "chelsea"}  # same image under two names; the second would duplicate it
# Where the docstring describes more than the one file used.
_CAPTION_OVERRIDES = {"stereo_motorcycle": "A motorcycle, left view of a rectified stereo pair."}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".tif", ".tiff", ".bmp")
_LICENSE_HINT = re.compile(r"cc0|cc-0|public domain|copyright|licen[cs]e", re.IGNORECASE)
# A numpydoc section header ("Notes" over "-----"), dropped from the license text.
_SECTION_HEADER = re.compile(r"^[A-Za-z][A-Za-z ]*\n-{3,}[ \t]*$\n?", re.MULTILINE)
_RST_LINK = re.compile(r"`([^`<]+?)\s*<([^>]+)>`_*")  # `text <url>`_ -> text (url)


@dataclass(frozen=True)
class _Extra:
    """A sample image shipped by another package, found without importing it."""

    package: str  # importable module name
    pip_name: str
    rel_path: str  # inside the package folder
    caption: str
    license: str


_EXTRAS = (
    _Extra("sklearn", "scikit-learn", "datasets/images/china.jpg",
           "A Chinese temple seen through trees.", "CC-BY-2.0 (danielbuechele on Flickr)"),
    _Extra("sklearn", "scikit-learn", "datasets/images/flower.jpg",
           "A close-up photograph of a flower.", "CC-BY-2.0 (vultilion on Flickr)"),
    _Extra("matplotlib", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg",
           "A portrait photograph of Rear Admiral Grace Hopper in uniform.",
           "public domain (U.S. Navy photograph)"),
)


def iter_samples(*, report: ConnectorReport | None = None) -> Iterator[dict[str, Any]]:
    """Yield one webdataset sample dict per installed sample image; never touches the network.

    Pass a `report` to have every loader and extra image counted as found and each one
    not yielded recorded with its reason.
    """
    report = report if report is not None else ConnectorReport(SOURCE)
    yield from _iter_skimage(report)
    yield from _iter_extras(report)


def write_shards(
    out_dir: str | Path, maxcount: int = 500, *, prefix: str = SOURCE
) -> ConnectorReport:
    """Write the installed sample images to `out_dir/skimage-NNNNNN.tar`; returns the counts."""
    report = ConnectorReport(SOURCE)

    def counted() -> Iterator[dict[str, Any]]:
        for sample in iter_samples(report=report):
            report.written += 1
            yield sample

    report.shards = _write_tar_shards(counted(), out_dir, prefix=prefix, maxcount=maxcount)
    return report


# ---------------------------------------------------------------------------------------
# scikit-image
# ---------------------------------------------------------------------------------------


def _iter_skimage(report: ConnectorReport) -> Iterator[dict[str, Any]]:
    """Samples from skimage.data loaders whose file is in the installed package."""
    try:
        import skimage.data as skdata
    except ImportError:
        report.found += 1
        report.skip("skimage.data", "package not installed: pip install scikit-image==0.26.0")
        return
    package_dir = Path(skdata.__file__).resolve().parent.parent  # .../site-packages/skimage
    names = sorted(n for n in getattr(skdata, "__all__", []) if n not in _NOT_LOADERS)
    used_files: dict[str, str] = {}
    for name in names:
        report.found += 1
        item = f"skimage.data.{name}"
        loader = getattr(skdata, name, None)
        if name in _GENERATED:
            report.skip(item, "generated: synthesised on call, no image file")
            continue
        if name in _ALIASES:
            report.skip(item, f"duplicate: alias of skimage.data.{_ALIASES[name]}")
            continue
        rel = _LOADER_FILES.get(name)
        if rel is None:
            report.skip(item, "unknown loader: no image file listed for it in this connector")
            continue
        path = package_dir / rel
        if not path.is_file():
            # Not shipped in the wheel: skimage would download it with pooch.
            report.skip(item, f"not installed: {rel} is downloaded on first use; offline, skipped")
            continue
        if path.suffix.lower() not in _IMAGE_SUFFIXES:
            report.skip(item, f"not an image: {rel} is a {path.suffix} file")
            continue
        if rel in used_files:
            report.skip(item, f"duplicate: same file as {used_files[rel]}")
            continue
        caption = _CAPTION_OVERRIDES.get(name) or _docstring_caption(loader)
        if not caption:
            report.skip(item, "no caption: the loader has no docstring")
            continue
        sample = _image_sample(path, item, report)
        if sample is None:
            continue
        used_files[rel] = item
        sample["__key__"] = f"skimage-{name}"
        sample["txt"] = caption
        sample["json"].update(
            path=f"skimage/{rel}",
            license=_docstring_license(loader) or f"unknown: see the docstring of {item}",
            loader=item,
        )
        yield sample


def _docstring_caption(loader: Any) -> str | None:
    """The first paragraph of a loader's docstring, on one line and ending in a full stop."""
    doc = inspect.getdoc(loader) or ""
    first = doc.strip().split("\n\n", 1)[0]
    caption = " ".join(first.split())
    if not caption:
        return None
    return caption if caption.endswith((".", "!", "?")) else caption + "."


def _docstring_license(loader: Any) -> str | None:
    """The docstring paragraph that states the image's copyright or license, if any."""
    doc = _SECTION_HEADER.sub("", inspect.getdoc(loader) or "")
    for para in doc.split("\n\n"):
        if _LICENSE_HINT.search(para):
            return " ".join(_RST_LINK.sub(r"\1 (\2)", para).split())[:300]
    return None


# ---------------------------------------------------------------------------------------
# Other packages' sample images
# ---------------------------------------------------------------------------------------


def _iter_extras(report: ConnectorReport) -> Iterator[dict[str, Any]]:
    """Samples from scikit-learn and matplotlib's bundled photos, where installed."""
    for extra in _EXTRAS:
        report.found += 1
        item = f"{extra.package}:{extra.rel_path}"
        # find_spec locates a top-level package without running its (heavy) __init__.
        spec = importlib.util.find_spec(extra.package)
        if spec is None or not spec.submodule_search_locations:
            report.skip(item, f"package not installed: {extra.pip_name} (optional)")
            continue
        path = Path(list(spec.submodule_search_locations)[0]) / extra.rel_path
        if not path.is_file():
            report.skip(item, f"not installed: this {extra.pip_name} has no {extra.rel_path}")
            continue
        sample = _image_sample(path, item, report)
        if sample is None:
            continue
        stem = Path(extra.rel_path).stem
        sample["__key__"] = f"{extra.package}-{stem}"
        sample["txt"] = extra.caption
        sample["json"].update(
            source=extra.package, path=f"{extra.package}/{extra.rel_path}", license=extra.license
        )
        yield sample


# ---------------------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------------------


def _image_sample(path: Path, item: str, report: ConnectorReport) -> dict[str, Any] | None:
    """Image bytes and size for one file, or None after recording why it was skipped.

    An RGB JPEG is passed through unchanged (re-encoding would lose quality); anything
    else becomes an RGB PNG.
    """
    try:
        with Image.open(path) as im:
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                report.skip(item, f"not a single image: {path.name} has {frames} frames")
                return None
            im.load()
            if im.format == "JPEG" and im.mode == "RGB":
                field, data, size = "jpg", path.read_bytes(), im.size
            else:
                rgb = flatten_to_rgb(im)
                field, data, size = "png", encode_png(rgb), rgb.size
    except IMAGE_DECODE_ERRORS as e:
        report.skip(item, f"unreadable image: {type(e).__name__}: {e}")
        return None
    meta = {"width": size[0], "height": size[1], "source": SOURCE, "task": "gen"}
    return {field: data, "json": meta}

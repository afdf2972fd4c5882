"""Scene world: draw a `Scene` with PIL and numpy.

Order of work: background -> drop shadows -> objects (shape mask x texture patch) ->
lighting -> style. Every random draw comes from generators seeded by the scene's
`noise_seed` and a fixed stream number per stage, so the background of an edited scene
is pixel-identical to its source's wherever the edit did not touch it.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from .scene import COLOURS, Group, Scene

# Where inside its box (fractions of the box) each shape is sure to be filled: tests and
# measurements probe the object's colour there. The centre works except for hollow shapes.
FILL_POINT: dict[str, tuple[float, float]] = {"ring": (0.5, 0.11), "crescent": (0.2, 0.5)}
DEFAULT_FILL_POINT = (0.5, 0.55)

# name -> (rgb tint, brightness, shadow direction (dx, dy) away from the light)
LIGHTS: dict[str, tuple[tuple[float, float, float], float, tuple[float, float]]] = {
    "daylight": ((1.0, 1.0, 1.0), 1.0, (0.45, 0.9)),
    "dim": ((0.92, 0.92, 1.0), 0.55, (0.0, 1.0)),
    "sunset": ((1.12, 0.84, 0.62), 0.95, (-1.0, 0.3)),
    "moonlight": ((0.72, 0.82, 1.15), 0.62, (-0.5, 0.85)),
    "spotlight-left": ((1.02, 1.0, 0.95), 1.0, (1.0, 0.3)),
    "spotlight-right": ((1.02, 1.0, 0.95), 1.0, (-1.0, 0.3)),
}

# Independent noise streams, so changing one stage (e.g. adding a group) leaves the others.
_BG_STREAM, _STYLE_STREAM = 0, 1


def render(scene: Scene) -> Image.Image:
    """Draw `scene` as an RGB image of `scene.width` x `scene.height`; pure in the scene."""
    w, h = scene.width, scene.height
    arr = _background(scene.background, w, h, np.random.default_rng([scene.noise_seed, _BG_STREAM]))
    arr *= 1.0 - 0.42 * _shadows(scene)[..., None]
    img = Image.fromarray(_to_uint8(arr))
    for g in scene.groups:
        _draw_group(img, g, scene.style)
    arr = _light(np.asarray(img, np.float32) / 255.0, scene.lighting)
    img = Image.fromarray(_to_uint8(arr))
    return _stylise(img, scene.style, np.random.default_rng([scene.noise_seed, _STYLE_STREAM]))


def encode_image(img: Image.Image, fmt: str = "png") -> bytes:
    """PNG (lossless; low compression level because generation speed matters) or JPEG bytes."""
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=3)
    elif fmt in ("jpg", "jpeg"):
        img.save(buf, format="JPEG", quality=92)
    else:
        raise ValueError(f"unsupported image format {fmt!r}")
    return buf.getvalue()


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    return np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# Backgrounds (float32 arrays, H x W x 3 in 0..1)
# ---------------------------------------------------------------------------------------


def _vgrad(top, bottom, h: int, w: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    a = np.asarray(top, np.float32)
    b = np.asarray(bottom, np.float32)
    return np.broadcast_to(a + (b - a) * t, (h, w, 3)).copy()


def _background(kind: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "plain":
        return np.full((h, w, 3), (0.94, 0.92, 0.86), np.float32)
    if kind == "sky":
        return _vgrad((0.35, 0.58, 0.90), (0.80, 0.89, 0.98), h, w)
    if kind == "grass":
        arr = _vgrad((0.40, 0.62, 0.92), (0.78, 0.88, 0.97), h, w)
        y0 = int(h * 0.42)
        grass = _vgrad((0.42, 0.68, 0.30), (0.20, 0.48, 0.16), h - y0, w)
        # Blades: per-column noise stretched vertically reads as grass at any size.
        step = max(2, h // 64)
        blades = rng.random((-(-(h - y0) // step), w), dtype=np.float32)
        blades = np.repeat(blades, step, axis=0)[: h - y0]
        arr[y0:] = grass * (0.86 + 0.24 * blades)[..., None]
        return arr
    if kind == "beach":
        arr = _vgrad((0.38, 0.62, 0.93), (0.82, 0.90, 0.98), h, w)
        y_sea, y_sand = int(h * 0.38), int(h * 0.58)
        sea = _vgrad((0.08, 0.32, 0.58), (0.20, 0.62, 0.70), y_sand - y_sea, w)
        yy = np.arange(y_sand - y_sea, dtype=np.float32)[:, None]
        xx = np.arange(w, dtype=np.float32)[None, :]
        waves = np.sin(xx / w * 40.0 + np.sin(yy / h * 90.0) * 2.0) * np.sin(yy / h * 160.0)
        arr[y_sea:y_sand] = sea * (0.95 + 0.07 * waves)[..., None]
        sand = np.full((h - y_sand, w, 3), (0.90, 0.82, 0.60), np.float32)
        grain = rng.random((h - y_sand, w), dtype=np.float32)
        arr[y_sand:] = sand * (0.94 + 0.08 * grain)[..., None]
        return arr
    if kind == "indoor":
        y_floor = int(h * 0.62)
        arr = _vgrad((0.88, 0.84, 0.76), (0.80, 0.76, 0.68), h, w)
        floor = _vgrad((0.50, 0.34, 0.20), (0.62, 0.44, 0.27), h - y_floor, w)
        plank = max(2, h // 20)
        yy = np.arange(h - y_floor)[:, None]
        floor[(yy % plank == 0).repeat(w, axis=1)] *= 0.7
        arr[y_floor:] = floor
        base = max(1, h // 60)
        arr[y_floor - base: y_floor] = (0.96, 0.95, 0.92)
        return arr
    if kind == "night":
        arr = _vgrad((0.03, 0.04, 0.15), (0.12, 0.12, 0.30), h, w)
        n = max(8, w * h // 700)
        ys = rng.integers(0, h, n)
        xs = rng.integers(0, w, n)
        glow = rng.uniform(0.55, 1.0, n).astype(np.float32)
        r = max(1, w // 384)  # stars grow with the image so they survive downscaling
        for dy in range(r):
            for dx in range(r):
                arr[np.minimum(ys + dy, h - 1), np.minimum(xs + dx, w - 1)] = glow[:, None] * (1.0, 1.0, 0.9)
        return arr
    if kind == "brick":
        bh = max(4, h // 12)
        bw = bh * 2
        mortar = max(1, bh // 6)
        yy = np.arange(h)[:, None]
        xx = np.arange(w)[None, :]
        row = yy // bh
        xo = xx + (row % 2) * (bw // 2)
        col = xo // bw
        shade = rng.uniform(0.82, 1.08, (h // bh + 2, w // bw + 3)).astype(np.float32)
        arr = np.asarray((0.66, 0.28, 0.20), np.float32) * shade[row, col][..., None]
        is_mortar = (yy % bh < mortar) | (xo % bw < mortar)
        arr[is_mortar] = (0.80, 0.77, 0.72)
        return arr
    raise ValueError(f"unknown background {kind!r}")


# ---------------------------------------------------------------------------------------
# Shapes and textures (cached: a group draws the same mask and patch `count` times)
# ---------------------------------------------------------------------------------------


def _polygon(shape: str) -> list[tuple[float, float]] | None:
    """Unit-box outline of a polygonal shape; None for shapes drawn from ellipses."""
    if shape == "square":
        return [(0, 0), (1, 0), (1, 1), (0, 1)]
    if shape == "triangle":
        return [(0.5, 0), (1, 1), (0, 1)]
    if shape == "diamond":
        return [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]
    if shape == "hexagon":
        return [(0.5, 0), (1, 0.25), (1, 0.75), (0.5, 1), (0, 0.75), (0, 0.25)]
    if shape == "cross":
        a, b = 0.33, 0.67
        return [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]
    if shape == "star":
        # Outer radius chosen so the top point touches y=0 and the lower points y=1;
        # x is stretched the little it takes to touch both sides too.
        r = 1 / (1 + math.cos(math.radians(36)))
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.40
            ang = math.radians(-90 + 36 * k)
            pts.append((rad * math.cos(ang), r + rad * math.sin(ang)))
        xs = [p[0] for p in pts]
        span = max(xs) - min(xs)
        return [((x - min(xs)) / span, y) for x, y in pts]
    if shape == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            pts.append((16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in pts]
    return None


@lru_cache(maxsize=512)
def _mask(shape: str, w: int, h: int) -> Image.Image:
    """Anti-aliased 'L' mask of `shape` filling a w x h box (drawn large, then box-reduced)."""
    ss = 4 if max(w, h) < 96 else 2
    W, H = w * ss, h * ss
    m = Image.new("L", (W, H), 0)
    d = ImageDraw.Draw(m)
    poly = _polygon(shape)
    if poly is not None:
        d.polygon([(x * (W - 1), y * (H - 1)) for x, y in poly], fill=255)
    elif shape == "circle":
        d.ellipse((0, 0, W - 1, H - 1), fill=255)
    elif shape == "ring":
        d.ellipse((0, 0, W - 1, H - 1), fill=255)
        d.ellipse((0.22 * W, 0.22 * H, 0.78 * W - 1, 0.78 * H - 1), fill=0)
    elif shape == "crescent":
        d.ellipse((0, 0, W - 1, H - 1), fill=255)
        d.ellipse((0.30 * W, -0.03 * H, 1.15 * W, 0.83 * H), fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m.reduce(ss)


@lru_cache(maxsize=64)
def _eroded(shape: str, w: int, h: int, k: int) -> Image.Image:
    """The mask shrunk by k pixels: the cartoon outline is the ring between the two, so
    the outline stays inside the ground-truth box."""
    return _mask(shape, w, h).filter(ImageFilter.MinFilter(2 * k + 1))


def _shade(c: np.ndarray) -> np.ndarray:
    """A second tone for patterns: darker for light colours, lighter for dark ones."""
    lum = 0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2]
    return c * 0.55 if lum > 0.3 else c * 0.5 + 0.45


@lru_cache(maxsize=512)
def _patch(texture: str, colour: str, w: int, h: int) -> Image.Image:
    """An RGB w x h patch of `colour` with `texture`, to be pasted through a shape mask."""
    c = np.asarray(COLOURS[colour], np.float32) / 255.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    p = max(2, round(min(w, h) / 5))
    if texture == "solid":
        arr = np.broadcast_to(c, (h, w, 3))
    elif texture == "striped":
        sel = ((xx + yy) // p) % 2 == 1
        arr = np.where(sel[..., None], _shade(c), c)
    elif texture == "checkered":
        sel = ((xx // p) + (yy // p)) % 2 == 1
        arr = np.where(sel[..., None], _shade(c), c)
    elif texture == "dotted":
        q = max(3, round(min(w, h) / 4))  # about four dots across, whatever the size
        sel = ((xx % q) - q / 2) ** 2 + ((yy % q) - q / 2) ** 2 < (0.3 * q) ** 2
        arr = np.where(sel[..., None], _shade(c), c)
    elif texture == "metallic":
        t = (xx / w + yy / h)[..., None] / 2
        band = np.exp(-(((t - 0.35) / 0.08) ** 2))
        arr = c * (1.25 - 0.6 * t)
        arr = arr + (1.0 - arr) * 0.5 * band
    elif texture == "wooden":
        grain = np.sin(2 * np.pi * (yy / h * 6 + 0.25 * np.sin(2 * np.pi * xx / w * 1.3)))
        arr = c * (0.72 + 0.28 * grain)[..., None]
    elif texture == "glossy":
        d2 = ((xx / w - 0.32) / 0.16) ** 2 + ((yy / h - 0.28) / 0.11) ** 2
        hi = np.exp(-d2)[..., None] * 0.85
        arr = c * (1.0 - 0.12 * (yy / h))[..., None]
        arr = arr + (1.0 - arr) * hi
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return Image.fromarray(_to_uint8(np.asarray(arr)))


def _draw_group(img: Image.Image, g: Group, style: str) -> None:
    for x0, y0, x1, y1 in g.boxes:
        w, h = x1 - x0, y1 - y0
        mask = _mask(g.shape, w, h)
        k = round(min(w, h) * 0.07) if style == "cartoon" else 0
        if k:
            img.paste((25, 25, 25), (x0, y0, x1, y1), mask)
            mask = _eroded(g.shape, w, h, k)
        img.paste(_patch(g.texture, g.colour, w, h), (x0, y0), mask)


def _shadows(scene: Scene) -> np.ndarray:
    """Soft drop shadows (H x W in 0..1), offset away from the scene's light."""
    w, h = scene.width, scene.height
    layer = Image.new("L", (w, h), 0)
    dx, dy = LIGHTS[scene.lighting][2]
    for g in scene.groups:
        for x0, y0, x1, y1 in g.boxes:
            off = 0.14 * (x1 - x0)
            layer.paste(255, (x0 + round(dx * off), y0 + round(dy * off)), _mask(g.shape, x1 - x0, y1 - y0))
    layer = layer.filter(ImageFilter.GaussianBlur(max(1.0, w * 0.008)))
    return np.asarray(layer, np.float32) / 255.0


# ---------------------------------------------------------------------------------------
# Lighting and style
# ---------------------------------------------------------------------------------------


def _light(arr: np.ndarray, lighting: str) -> np.ndarray:
    """Global tint and brightness times a light gradient that says where the light is."""
    h, w = arr.shape[:2]
    tint, bright, _ = LIGHTS[lighting]
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    if lighting == "daylight":
        gain = 1.03 - 0.06 * y + 0 * x
    elif lighting == "dim":
        gain = 1.0 - 0.35 * ((x - 0.5) ** 2 + (y - 0.5) ** 2)  # vignette
    elif lighting == "sunset":
        gain = 0.82 + 0.25 * x + 0 * y  # the low sun is on the right
    elif lighting == "moonlight":
        gain = 1.0 - 0.25 * (1 - x) * y  # from the upper right
    elif lighting in ("spotlight-left", "spotlight-right"):
        sx = -0.05 if lighting == "spotlight-left" else 1.05
        d = np.sqrt((x - sx) ** 2 + (y - 0.35) ** 2)
        gain = 0.30 + 0.95 * np.exp(-((d / 0.65) ** 2))
    else:
        raise ValueError(f"unknown lighting {lighting!r}")
    return arr * (np.asarray(tint, np.float32) * bright) * gain[..., None]


def _stylise(img: Image.Image, style: str, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    if style in ("flat", "cartoon"):  # cartoon outlines are drawn with the objects
        return img
    if style == "pixel-art":
        b = max(2, round(w / 64))
        small = ImageOps.posterize(img.resize((max(1, w // b), max(1, h // b)), Image.BOX), 4)
        return small.resize((w, h), Image.NEAREST)
    if style == "watercolor":
        arr = np.asarray(img.filter(ImageFilter.GaussianBlur(max(1.0, w * 0.005))), np.float32) / 255.0
        arr = arr + (1.0 - arr) * 0.15  # pigment on white paper is never fully saturated
        return Image.fromarray(_to_uint8(arr * _paper(w, h, rng)[..., None]))
    if style == "pencil-sketch":
        grey = img.convert("L")
        # Smooth first so background noise (grass, sand) does not turn into scribbles.
        soft = grey.filter(ImageFilter.GaussianBlur(max(1.0, w * 0.004)))
        edges = np.asarray(soft.filter(ImageFilter.FIND_EDGES), np.float32) / 255.0
        if w >= 512:  # thicken lines so they read at full size
            edges = np.asarray(Image.fromarray(_to_uint8(edges)).filter(ImageFilter.MaxFilter(3)), np.float32) / 255.0
        g = np.asarray(grey, np.float32)[..., None] / 255.0
        arr = np.asarray(img, np.float32) / 255.0
        wash = 0.55 + 0.45 * (0.6 * arr + 0.4 * g)  # a light coloured-pencil wash
        yy, xx = np.mgrid[0:h, 0:w]
        hatch = (((xx + yy) % max(3, w // 48)) == 0) & (g[..., 0] < 0.45)
        line = np.clip(edges * 3.0, 0, 1) + 0.35 * hatch
        out = wash * (1.0 - 0.85 * np.clip(line, 0, 1))[..., None]
        return Image.fromarray(_to_uint8(out * _paper(w, h, rng)[..., None]))
    raise ValueError(f"unknown style {style!r}")


def _paper(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative paper texture: soft blotches plus fine grain."""
    lo = rng.random((h // 16 + 2, w // 16 + 2), dtype=np.float32)
    lo = np.asarray(Image.fromarray(_to_uint8(lo)).resize((w, h), Image.BILINEAR), np.float32) / 255.0
    grain = rng.random((h, w), dtype=np.float32)
    return 0.94 + 0.05 * lo + 0.03 * grain

"""Scene world: the vocabulary, the `Scene` record, layout, random scenes and edits.

A scene is pure data: everything the renderer draws and the captioner names is in it,
including the pixel boxes of every object instance and the seed of the renderer's noise,
so `render(scene)` is a pure function and the scene *is* the ground truth.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable

# ---------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------

SHAPES = (
    "circle", "square", "triangle", "star", "hexagon",
    "heart", "diamond", "cross", "ring", "crescent",
)
# Explicit plurals: the English rule set is small here, and "crosss" must never happen.
PLURALS = {s: s + "s" for s in SHAPES} | {"cross": "crosses"}

# Fixed RGB per colour word; the words are the ground truth and captions use them as is.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 25),
    "green": (40, 160, 60),
    "blue": (35, 75, 215),
    "purple": (125, 40, 175),
    "pink": (245, 135, 195),
    "brown": (125, 75, 35),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
}

# Object diameter as a fraction of the image side.
SIZES = {"small": 0.08, "medium": 0.12, "large": 0.17}
TEXTURES = ("solid", "striped", "dotted", "checkered", "metallic", "wooden", "glossy")
ARRANGEMENTS = ("single", "row", "column", "grid", "scattered", "stacked")

# A 3x3 grid of cells: a group's position names the cell holding its bounding box's centre.
POSITIONS: dict[str, tuple[int, int]] = {  # name -> (column, row)
    "top-left": (0, 0), "top": (1, 0), "top-right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom-left": (0, 2), "bottom": (1, 2), "bottom-right": (2, 2),
}

BACKGROUNDS = ("plain", "sky", "grass", "beach", "indoor", "night", "brick")
LIGHTINGS = ("daylight", "dim", "sunset", "moonlight", "spotlight-left", "spotlight-right")
STYLES = ("flat", "cartoon", "pixel-art", "watercolor", "pencil-sketch")

MAX_GROUPS = 3
MAX_COUNT = 5
_MARGIN = 0.02  # objects keep this far from the image border (fraction of the side)
_GAP = 0.03  # and groups keep this far from each other


# ---------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels; x1, y1 exclusive (PIL's crop box)


@dataclass(frozen=True)
class Group:
    """1-5 identical objects of one shape and colour, laid out together in one cell."""

    shape: str
    colour: str
    count: int
    size: str
    texture: str
    position: str
    arrangement: str
    boxes: tuple[Box, ...]  # one per instance, len == count


@dataclass(frozen=True)
class Scene:
    """Everything needed to render and describe one image."""

    width: int
    height: int
    groups: tuple[Group, ...]
    background: str
    lighting: str
    style: str
    noise_seed: int  # seeds the renderer's textures and noise; kept across an edit

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; `rgb` is added per group for readers without the palette."""
        d = asdict(self)
        for g in d["groups"]:
            g["rgb"] = list(COLOURS[g["colour"]])
            g["boxes"] = [list(b) for b in g["boxes"]]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any] | str) -> "Scene":
        """Inverse of `to_json` (accepts the dict or its JSON text)."""
        if isinstance(d, str):
            d = json.loads(d)
        groups = tuple(
            Group(
                shape=g["shape"], colour=g["colour"], count=int(g["count"]), size=g["size"],
                texture=g["texture"], position=g["position"], arrangement=g["arrangement"],
                boxes=tuple(tuple(int(v) for v in b) for b in g["boxes"]),
            )
            for g in d["groups"]
        )
        return cls(
            width=int(d["width"]), height=int(d["height"]), groups=groups,
            background=d["background"], lighting=d["lighting"], style=d["style"],
            noise_seed=int(d["noise_seed"]),
        )


@dataclass(frozen=True)
class Edit:
    """One edit operation. `group` indexes the source scene's groups (None for global ops)."""

    op: str  # recolor | add | remove | move | background | lighting | style
    group: int | None = None
    value: str | None = None  # new colour / position / background / lighting / style


Concept = tuple[str, str]  # (colour, shape)


def concept_present(scene_json: dict[str, Any] | Scene, colour: str, shape: str) -> bool:
    """True when any object group of the scene (a `Scene` or its JSON) is `colour` `shape`."""
    groups = scene_json.groups if isinstance(scene_json, Scene) else scene_json["groups"]
    for g in groups:
        gc, gs = (g.colour, g.shape) if isinstance(g, Group) else (g["colour"], g["shape"])
        if gc == colour and gs == shape:
            return True
    return False


# ---------------------------------------------------------------------------------------
# Layout: instance boxes for a group, in fractions of the image side
# ---------------------------------------------------------------------------------------


def _relative_centres(arrangement: str, count: int, s: float, rng: random.Random) -> list[tuple[float, float]]:
    """Instance centres around (0, 0) for `count` objects of diameter `s`; never overlapping,
    so every instance stays visible and its box centre shows its own colour."""
    step = s * 1.25
    if arrangement == "single" or count == 1:
        return [(0.0, 0.0)]
    if arrangement == "row":
        return [((i - (count - 1) / 2) * step, 0.0) for i in range(count)]
    if arrangement == "column":
        return [(0.0, (i - (count - 1) / 2) * step) for i in range(count)]
    if arrangement == "grid":
        cols = 2 if count <= 4 else 3
        return [((i % cols) * step, (i // cols) * step) for i in range(count)]
    if arrangement == "stacked":
        # A pyramid resting on its widest row: 3 -> 2+1, 4 -> 3+1, 5 -> 3+2.
        rows = {2: [2], 3: [2, 1], 4: [3, 1], 5: [3, 2]}[count]
        pts, y = [], 0.0
        for n in rows:
            pts += [((i - (n - 1) / 2) * s * 1.08, y) for i in range(n)]
            y -= s * 1.04
        return pts
    if arrangement == "scattered":
        radius = s * (0.8 + 0.75 * count**0.5)
        pts: list[tuple[float, float]] = []
        for _ in range(400):
            if len(pts) == count:
                break
            p = (rng.uniform(-radius, radius), rng.uniform(-radius, radius))
            if all(max(abs(p[0] - q[0]), abs(p[1] - q[1])) > s * 1.15 for q in pts):
                pts.append(p)
        if len(pts) < count:  # crowded draw: fall back to a loose grid rather than overlap
            return _relative_centres("grid", count, s, rng)
        return pts
    raise ValueError(f"unknown arrangement {arrangement!r}")


def layout_group(
    position: str, size: str, count: int, arrangement: str, width: int, height: int,
    rng: random.Random,
) -> tuple[Box, ...] | None:
    """Pixel boxes for a group centred (with jitter) in its cell; None if it cannot fit there."""
    s = SIZES[size]
    rel = _relative_centres(arrangement, count, s, rng)
    xs = [p[0] for p in rel]
    ys = [p[1] for p in rel]
    # Centre the union of the boxes on the target point so the group's box centre is known.
    ox, oy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    col, row = POSITIONS[position]
    cx = (col + 0.5) / 3 + rng.uniform(-0.04, 0.04)
    cy = (row + 0.5) / 3 + rng.uniform(-0.04, 0.04)
    side_w, side_h = round(s * width), round(s * height)
    if side_w < 3 or side_h < 3:
        side_w, side_h = max(side_w, 3), max(side_h, 3)
    boxes = []
    for px, py in rel:
        x0 = round((cx + px - ox - s / 2) * width)
        y0 = round((cy + py - oy - s / 2) * height)
        boxes.append((x0, y0, x0 + side_w, y0 + side_h))
    ux0, uy0, ux1, uy1 = union(boxes)
    if ux0 < _MARGIN * width or uy0 < _MARGIN * height:
        return None
    if ux1 > (1 - _MARGIN) * width or uy1 > (1 - _MARGIN) * height:
        return None
    if position_of(boxes, width, height) != position:  # big groups can drift out of the cell
        return None
    return tuple(boxes)


def union(boxes: Iterable[Box]) -> Box:
    """The smallest box holding all `boxes`."""
    bs = list(boxes)
    return (min(b[0] for b in bs), min(b[1] for b in bs), max(b[2] for b in bs), max(b[3] for b in bs))


def position_of(boxes: Iterable[Box], width: int, height: int) -> str:
    """The cell name that holds the centre of the union of `boxes` (the ground-truth rule)."""
    x0, y0, x1, y1 = union(boxes)
    col = min(2, int((x0 + x1) / 2 / width * 3))
    row = min(2, int((y0 + y1) / 2 / height * 3))
    return next(name for name, cr in POSITIONS.items() if cr == (col, row))


def _clashes(boxes: tuple[Box, ...], others: Iterable[Group], width: int) -> bool:
    """True if the union box of `boxes` comes within the group gap of another group's."""
    gap = _GAP * width
    a = union(boxes)
    for g in others:
        b = union(g.boxes)
        if a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap:
            return True
    return False


# ---------------------------------------------------------------------------------------
# Random scenes
# ---------------------------------------------------------------------------------------


def _arrangement_for(count: int, rng: random.Random) -> str:
    if count == 1:
        return "single"
    choices = ["row", "column", "scattered"] + (["grid", "stacked"] if count >= 3 else [])
    return rng.choice(choices)


def _try_group(
    rng: random.Random, others: tuple[Group, ...], width: int, height: int,
    forbid: set[Concept], concept: Concept | None = None, position: str | None = None,
) -> Group | None:
    """Draw one group that fits beside `others`; None after a bounded number of tries."""
    taken = {(g.colour, g.shape) for g in others}
    used_cells = {g.position for g in others}
    for _ in range(60):
        colour, shape = concept or (rng.choice(list(COLOURS)), rng.choice(SHAPES))
        # Distinct (colour, shape) per scene keeps "the red stars" unambiguous in captions
        # and edit instructions.
        if (colour, shape) in taken or (concept is None and (colour, shape) in forbid):
            continue
        pos = position or rng.choice([p for p in POSITIONS if p not in used_cells])
        count = rng.choice((1, 1, 2, 2, 3, 3, 4, 5))
        size = rng.choice(list(SIZES))
        arrangement = _arrangement_for(count, rng)
        boxes = layout_group(pos, size, count, arrangement, width, height, rng)
        if boxes is None or _clashes(boxes, others, width):
            continue
        return Group(shape, colour, count, size, rng.choice(TEXTURES), pos, arrangement, boxes)
    return None


def sample_scene(
    rng: random.Random, width: int, height: int,
    forbid: Iterable[Concept] = (), require: Concept | None = None,
) -> Scene:
    """A random scene with no group in `forbid`; with `require`, one group is that concept."""
    forbid = set(forbid)
    n_groups = rng.choice((1, 2, 2, 3, 3))
    groups: tuple[Group, ...] = ()
    for i in range(n_groups):
        g = _try_group(rng, groups, width, height, forbid, concept=require if i == 0 else None)
        if g is None:
            break
        groups += (g,)
    if not groups:
        # Always fits: one small object in the centre of an empty image.
        colour, shape = require or next(
            (c, s) for c in COLOURS for s in SHAPES if (c, s) not in forbid
        )
        boxes = layout_group("center", "small", 1, "single", width, height, rng)
        assert boxes is not None
        groups = (Group(shape, colour, 1, "small", "solid", "center", "single", boxes),)
    # Shuffle so a required concept is not always the first group named in captions.
    order = list(groups)
    rng.shuffle(order)
    return Scene(
        width=width, height=height, groups=tuple(order),
        background=rng.choice(BACKGROUNDS), lighting=rng.choice(LIGHTINGS),
        style=rng.choice(STYLES), noise_seed=rng.getrandbits(31),
    )


# ---------------------------------------------------------------------------------------
# Edits: source scene -> (edit, target scene)
# ---------------------------------------------------------------------------------------

EDIT_OPS = ("recolor", "add", "remove", "move", "background", "lighting", "style")


def apply_edit(
    scene: Scene, op: str, rng: random.Random, forbid: Iterable[Concept] = (),
    concept: Concept | None = None,
) -> tuple[Edit, Scene] | None:
    """Try edit `op` on `scene`; None when it does not apply (e.g. no room to add a group).

    No target may contain a concept in `forbid`. `concept` asks for an edit that puts that
    concept into the target (only recolor and add can).
    """
    forbid = set(forbid)
    gs = scene.groups
    if op in ("background", "lighting", "style"):
        if concept is not None:
            return None
        pool = {"background": BACKGROUNDS, "lighting": LIGHTINGS, "style": STYLES}[op]
        value = rng.choice([v for v in pool if v != getattr(scene, op)])
        return Edit(op, None, value), replace(scene, **{op: value})
    if op == "recolor":
        for i in rng.sample(range(len(gs)), len(gs)):
            g = gs[i]
            if concept is not None:
                if g.shape != concept[1] or g.colour == concept[0]:
                    continue
                colour = concept[0]
            else:
                options = [c for c in COLOURS if c != g.colour and (c, g.shape) not in forbid]
                colour = rng.choice(options)
            if any((h.colour, h.shape) == (colour, g.shape) for h in gs):
                continue
            new = replace(g, colour=colour)
            return Edit(op, i, colour), replace(scene, groups=gs[:i] + (new,) + gs[i + 1:])
        return None
    if op == "add":
        if len(gs) >= MAX_GROUPS:
            return None
        g = _try_group(rng, gs, scene.width, scene.height, forbid, concept=concept)
        if g is None:
            return None
        return Edit(op, None, None), replace(scene, groups=gs + (g,))
    if concept is not None:
        return None
    if op == "remove":
        if len(gs) < 2:
            return None
        i = rng.randrange(len(gs))
        return Edit(op, i, None), replace(scene, groups=gs[:i] + gs[i + 1:])
    if op == "move":
        for i in rng.sample(range(len(gs)), len(gs)):
            g, rest = gs[i], gs[:i] + gs[i + 1:]
            free = [p for p in POSITIONS if p not in {h.position for h in gs}]
            for pos in rng.sample(free, len(free)):
                boxes = layout_group(pos, g.size, g.count, g.arrangement, scene.width, scene.height, rng)
                if boxes is not None and not _clashes(boxes, rest, scene.width):
                    new = replace(g, position=pos, boxes=boxes)
                    return Edit(op, i, pos), replace(scene, groups=gs[:i] + (new,) + gs[i + 1:])
        return None
    raise ValueError(f"unknown edit op {op!r}")


def sample_edit(
    rng: random.Random, width: int, height: int,
    forbid: Iterable[Concept] = (), require: Concept | None = None,
) -> tuple[Scene, Edit, Scene]:
    """A random (source, edit, target). Neither side holds a `forbid` concept, except that
    with `require` the target holds that concept (the source may too)."""
    forbid = set(forbid)
    for _ in range(50):
        source = sample_scene(rng, width, height, forbid=forbid | ({require} if require else set()))
        ops = ["recolor", "add"] if require else list(EDIT_OPS)
        rng.shuffle(ops)
        for op in ops:
            done = apply_edit(source, op, rng, forbid=forbid, concept=require)
            if done is not None:
                return source, done[0], done[1]
    # No edit could introduce the concept: start from a source that already has it and
    # change something else, so the target still shows it.
    source = sample_scene(rng, width, height, forbid=forbid, require=require)
    op = rng.choice(("background", "lighting", "style"))
    edit, target = apply_edit(source, op, rng)  # type: ignore[misc]  # global ops always apply
    return source, edit, target


__all__ = [
    "ARRANGEMENTS", "BACKGROUNDS", "COLOURS", "EDIT_OPS", "LIGHTINGS", "PLURALS", "POSITIONS",
    "SHAPES", "SIZES", "STYLES", "TEXTURES", "Box", "Concept", "Edit", "Group", "Scene",
    "apply_edit", "concept_present", "layout_group", "position_of", "sample_edit",
    "sample_scene", "union",
]

"""Failures of known cause in the scene world: the truth side of the self-correcting loop,
for its tests, benchmarks and the demo. Only code here (and in the world itself) may name
the world's vocabulary; the engine that triages these failures never does.

    rng = random.Random(0)
    made = make_failure("knowledge", held=(("purple", "triangle"),), rng=rng, size=128)
    records, truth = write_feedback(folder, [made, ...], rng)   # the feedback contract's records

Causes, each as a generator that has that fault would fail:
- knowledge: the prompt names a held-out concept; the enhanced prompt is faithful; the
  output draws that object in a colour the generator knows (it never learnt the concept);
- prompt: a covered prompt; the enhanced prompt changes or drops one of the user's
  attributes; the output follows the enhanced prompt;
- rl: a covered prompt, a faithful enhanced prompt, and an output the reward should have
  caught: one attribute wrong (`rl_kind` colour, shape, count or position) or blurred
  (`rl_kind="blur"`, what a generator RL-tuned on a reward that likes blur learns to make).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageFilter

from .captions import caption_for
from .render import render
from .scene import COLOURS, PLURALS, SHAPES, Group, Scene, apply_edit, layout_group, sample_scene, union

CAUSES = ("rl", "knowledge", "prompt")
CHANGES = ("colour", "shape", "count", "position")  # what change_one can change


@dataclass
class Injected:
    cause: str  # rl | knowledge | prompt | good
    scene: Scene  # what the user's prompt describes
    prompt: str
    enhanced: str
    shown: Scene  # what the output shows
    blur: float = 0.0  # sigma (px) the output is blurred by

    def image(self) -> Image.Image:
        img = render(self.shown)
        return img.filter(ImageFilter.GaussianBlur(self.blur)) if self.blur else img


def _free(boxes, others: tuple[Group, ...], size: int) -> bool:
    """True when `boxes` stay in the frame and clear of every other group."""
    a = union(boxes)
    if a[0] < 0 or a[1] < 0 or a[2] > size or a[3] > size:
        return False
    gap = max(1, round(0.03 * size))
    return all(not (a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap)
               for b in (union(g.boxes) for g in others))


def change_one(scene: Scene, kind: str, rng: random.Random) -> Scene | None:
    """`scene` with one attribute of one group changed (colour, shape, count, position);
    None when that change does not fit."""
    gs = scene.groups
    i = rng.randrange(len(gs))
    g, others = gs[i], gs[:i] + gs[i + 1:]
    taken = {(h.colour, h.shape) for h in gs}
    if kind == "colour":
        new = replace(g, colour=rng.choice([c for c in COLOURS if c != g.colour and (c, g.shape) not in taken]))
    elif kind == "shape":
        new = replace(g, shape=rng.choice([s for s in SHAPES if s != g.shape and (g.colour, s) not in taken]))
    elif kind == "count":
        for n in rng.sample([k for k in range(1, 6) if k != g.count], 4):
            arr = "single" if n == 1 else ("row" if g.arrangement == "single" or (n < 3 and g.arrangement in ("grid", "stacked")) else g.arrangement)
            boxes = layout_group(g.position, g.size, n, arr, scene.width, scene.height, rng)
            if boxes is not None and _free(boxes, others, scene.width):
                new = replace(g, count=n, arrangement=arr, boxes=boxes)
                break
        else:
            return None
    elif kind == "position":
        done = apply_edit(scene, "move", rng)
        return done[1] if done else None
    else:
        raise ValueError(f"unknown change {kind!r}; expected one of {CHANGES}")
    return replace(scene, groups=gs[:i] + (new,) + gs[i + 1:])


def terse_and_rich(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A rich caption and a terser prompt degradation makes of it (the engine's pairs): a
    random step of its chain among those that still name an object by colour and shape."""
    from ..degrade.chains import DegradeConfig, degrade_chain

    rich = caption_for(scene, rng, detail="rich")
    steps = degrade_chain(rich, DegradeConfig(policy="fixed"))
    naming = [st.less for st in steps if named_groups(st.less, scene)]
    return (rng.choice(naming) if naming else rich), rich


def named_groups(prompt: str, scene: Scene) -> list[int]:
    """Indices of the scene's groups the prompt names by colour and shape."""
    from ..enhance_eval import extract_attributes

    objects = {v for a, v in extract_attributes(prompt) if a == "object"}
    return [i for i, g in enumerate(scene.groups) if f"{g.colour} {g.shape}" in objects]


def word_re(word: str) -> re.Pattern:
    return re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])", re.I)


def _with_group(scene: Scene, k: int, group) -> Scene:
    return replace(scene, groups=tuple(group if j == k else g for j, g in enumerate(scene.groups)))


def good_output(held: Sequence[tuple[str, str]], rng: random.Random, size: int) -> Injected:
    scene = sample_scene(rng, size, size, forbid=held)
    prompt, rich = terse_and_rich(scene, rng)
    return Injected("good", scene, prompt, rich, scene)


def make_failure(cause: str, held: Sequence[tuple[str, str]], rng: random.Random, size: int,
                 rl_kind: str | None = None) -> Injected | None:
    """One failure of `cause`, or None when this draw does not fit it (draw again).
    `rl_kind`: None draws an attribute change at random; "blur" blurs the output."""
    if cause == "knowledge":
        scene = sample_scene(rng, size, size, require=rng.choice(list(held)))
    else:
        scene = sample_scene(rng, size, size, forbid=held)
    prompt, rich = terse_and_rich(scene, rng)
    named = named_groups(prompt, scene)
    if cause == "knowledge":
        hit = [k for k in named if (scene.groups[k].colour, scene.groups[k].shape) in held]
        if not hit:
            return None  # the prompt does not ask for the held-out concept
        g = scene.groups[hit[0]]
        new = replace(g, colour=rng.choice([c for c in COLOURS if c != g.colour and (c, g.shape) not in held]))
        return Injected(cause, scene, prompt, rich, _with_group(scene, hit[0], new))
    if cause == "rl":
        if rl_kind == "blur":
            return Injected(cause, scene, prompt, rich, scene, blur=rng.uniform(1.5, 3.0))
        shown = change_one(scene, rl_kind or rng.choice(CHANGES), rng)
        return Injected(cause, scene, prompt, rich, shown) if shown is not None else None
    if cause != "prompt":
        raise ValueError(f"unknown cause {cause!r}; expected one of {CAUSES}")
    if not named:
        return None
    k = rng.choice(named)
    g = scene.groups[k]
    taken = {(x.colour, x.shape) for x in scene.groups}
    how = rng.choice(("swap-colour", "swap-colour", "drop-colour", "swap-shape"))
    if how == "swap-shape":
        s = rng.choice([s for s in SHAPES if s != g.shape and (g.colour, s) not in taken | set(held)])
        enhanced = word_re(PLURALS[g.shape]).sub(PLURALS[s], word_re(g.shape).sub(s, rich))
        new = replace(g, shape=s)
    else:
        c = rng.choice([c for c in COLOURS if c != g.colour and (c, g.shape) not in taken | set(held)])
        enhanced = re.sub(r"\s{2,}", " ", word_re(g.colour).sub("" if how == "drop-colour" else c, rich))
        new = replace(g, colour=c)  # dropped: the generator picks some colour
    if enhanced == rich:
        return None
    return Injected(cause, scene, prompt, enhanced, _with_group(scene, k, new))


def draw(cause: str, held: Sequence[tuple[str, str]], rng: random.Random, size: int,
         rl_kind: str | None = None) -> Injected:
    """`make_failure` (or a good output) drawn until one fits."""
    while True:
        made = good_output(held, rng, size) if cause == "good" else make_failure(cause, held, rng, size, rl_kind)
        if made is not None:
            return made


def write_feedback(out: Path, items: Sequence[Injected], rng: random.Random, tag: str = "injected",
                   model_version: str = "dit/v0001", cause_field: bool = True) -> tuple[list[dict], dict[str, str]]:
    """Render each output into `out` and write `out/feedback.jsonl` in the feedback contract
    (well-rated 4-5 for good outputs, 1-2 or none for failures); with `cause_field`, each
    failure carries its cause as the extra field `injected_cause`. Returns (records, truth)."""
    out.mkdir(parents=True, exist_ok=True)
    records, truth = [], {}
    counts: dict[str, int] = {}
    for it in items:
        n = counts[it.cause] = counts.get(it.cause, -1) + 1
        fid = f"{tag}-{it.cause}-{n:04d}"
        it.image().save(out / f"{fid}.png")
        rec = {"id": fid, "time": "2026-12-06T00:00:00Z", "prompt": it.prompt, "enhanced_prompt": it.enhanced,
               "model_version": model_version, "image": f"{fid}.png", "task": "gen",
               "rating": rng.choice((4, 5)) if it.cause == "good" else rng.choice((1, 1, 2, None)), "comment": None}
        if it.cause != "good":
            truth[fid] = it.cause
            if cause_field:
                rec["injected_cause"] = it.cause
        records.append(rec)
    with open(out / "feedback.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return records, truth

"""Train the five reward heads on preference pairs made from the scene world's ground truth.

    record = train_reward("ws", RewardTrainConfig(), LoopConfig(steps=3000))   # -> models/reward/vNNNN
    python -m models.train_reward -w ws --steps 3000

Every head learns from Bradley-Terry pairs, loss -log sigmoid(r_win - r_lose). A pair is
two renders (or two texts) of scenes that differ in exactly what the head should judge,
so the ground truth says which one wins:

- fidelity: an image with its own caption beats the same image with the caption of a
  scene that differs in one attribute (a group's colour, shape, count or position); and,
  for a fixed caption, the image of its scene beats the image of the changed scene (the
  direction RL uses: it compares images of one prompt).
- aesthetics (a PROXY: the scene world has no taste): a clean render beats the same
  render degraded by blur, noise, JPEG, a colour cast or a crop blown up to full size.
- portrait quality (a PROXY, defined here): the main subject (the group with the largest
  box) whole, in frame, unoccluded and sharp beats it cut in half by the frame edge,
  half covered by another object, or blurred while the rest stays sharp.
- instruction following: (source, instruction, true target) beats the same source and
  instruction with a wrong target: the unchanged source, the result of another kind of
  edit, or the same kind of edit with another value (recolour to another colour...).
- consistency: a target that changes only what was asked beats one that also changed
  something else (another edit on top, or a new noise seed for textures and grain).

Scenes are the workspace's scene-world ground truth (`meta["scene"]` of its catalogued
samples, through `CurriculumSampler`'s rows: train split for training, eval split for
held-out pairs), re-rendered at `resolution`; a workspace without enough scene-world
samples is topped up with freshly sampled scenes. All draws are seeded by the loop's
seed. The frozen CLIP embeddings are the expensive part: they are computed once in
`setup`, after which a step only runs the small heads.
"""

from __future__ import annotations

if __name__ == "__main__":  # the CLI edge: offline defaults before transformers is imported
    from dataengine.runtime import apply_offline_defaults

    apply_offline_defaults()

import io
import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from dataengine.sceneworld import (
    COLOURS, EDIT_OPS, SHAPES, Group, Scene, apply_edit, caption_for, instruction_for, render, sample_scene,
)
from dataengine.sceneworld.failures import change_one
from dataengine.sceneworld.scene import union

from .rewards import (
    EDIT_HEADS, HEAD_INPUTS, HEADS, MODEL_NAME, SPATIAL_INPUTS, EmbeddedRewards, RewardConfig, bradley_terry,
    patch_tokens, text_states,
)
from .trainer import LoopConfig, TrainJob, train

__all__ = ["RewardTrainConfig", "RewardTrainJob", "PairSet", "make_pairs", "scene_pool", "train_reward"]

FIDELITY_KINDS = ("colour", "shape", "count", "position")
AESTHETIC_KINDS = ("blur", "noise", "jpeg", "cast", "crop")
PORTRAIT_KINDS = ("cut", "occluded", "blurred")


@dataclass
class RewardTrainConfig:
    """The knobs of one reward-heads run (the loop's own are in LoopConfig)."""

    heads: tuple[str, ...] = HEADS  # which heads get pairs and train (the rest keep their init)
    resolution: int = 64  # px the scenes are rendered at before the frozen CLIP sees them
    n_train: int = 2000  # training scenes; each gives one or more pairs per head (fidelity swaps 0.788 at 2000)
    n_eval: int = 150  # held-out scenes (the eval split's): ~800 fidelity pairs
    batch_size: int = 64  # pairs per head per step
    hidden: int = 256
    dropout: float = 0.1
    weight_decay: float = 0.01
    eval_blur: float = 1.0  # sigma (px) of the "generated-looking" fidelity evaluation
    spatial: tuple[str, ...] = RewardConfig.spatial  # heads over patch and prompt tokens
    token_size: int = 256  # px for patch tokens (RewardConfig.token_size, patch_strides, patch_grid)
    patch_strides: tuple[int, ...] = RewardConfig.patch_strides
    patch_grid: int = RewardConfig.patch_grid
    patch_context: bool = RewardConfig.patch_context
    clip: str | None = None  # a Frozen spec; None: the workspace's promoted CLIP (else lite0)
    # A fault to inject, never a setting: pair kinds whose training preferences are reversed
    # (a fidelity attribute such as "colour", an aesthetics or portrait flaw such as "blur"),
    # so that tests and benchmarks can make a head miscalibrated on one attribute.
    flip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.heads, self.spatial, self.flip = tuple(self.heads), tuple(self.spatial), tuple(self.flip)
        self.patch_strides = tuple(self.patch_strides)
        unknown = [h for h in self.heads if h not in HEADS]
        if unknown or not self.heads:
            raise ValueError(f"heads must be a non-empty subset of {HEADS}, got {self.heads}")
        flippable = FIDELITY_KINDS + AESTHETIC_KINDS + PORTRAIT_KINDS
        if any(k not in flippable for k in self.flip):
            raise ValueError(f"flip must name pair kinds of {flippable}, got {self.flip}")
        for name in ("n_train", "n_eval", "batch_size", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resolution < 32:
            raise ValueError(f"resolution must be >= 32, got {self.resolution}")


# ---------------------------------------------------------------------------------------
# Scenes: the workspace's ground truth, re-rendered at the training size
# ---------------------------------------------------------------------------------------


def rescale(scene: Scene, size: int) -> Scene:
    """`scene` laid out on a size x size canvas (boxes scaled, at least 3 px a side)."""
    if scene.width == size and scene.height == size:
        return scene
    sx, sy = size / scene.width, size / scene.height

    def box(b):
        x0, y0 = round(b[0] * sx), round(b[1] * sy)
        return (x0, y0, x0 + max(3, round((b[2] - b[0]) * sx)), y0 + max(3, round((b[3] - b[1]) * sy)))

    groups = tuple(replace(g, boxes=tuple(box(b) for b in g.boxes)) for g in scene.groups)
    return replace(scene, width=size, height=size, groups=groups)


def scene_pool(workspace_root: str | Path | None, split: str, n: int, size: int, seed: int) -> tuple[list[Scene], int]:
    """`n` scenes at `size` px: the workspace's scene-world samples of `split` (a seeded
    shuffle of them), topped up with sampled scenes. Returns (scenes, how many came from
    the workspace)."""
    found: list[Scene] = []
    if workspace_root is not None:
        from dataengine.curriculum import CurriculumSampler, NoTrainingData

        try:
            rows = CurriculumSampler(workspace_root, 1, 1, splits=(split,)).rows
        except NoTrainingData:
            rows = []
        for r in rows:
            meta = json.loads(r["meta"]) if r["meta"] else {}
            if "scene" in meta:
                found.append(Scene.from_json(meta["scene"]))
        random.Random(f"reward/{seed}/{split}").shuffle(found)
    scenes = [rescale(s, size) for s in found[:n]]
    rng = random.Random(f"reward/{seed}/{split}/sampled")
    while len(scenes) < n:
        scenes.append(sample_scene(rng, size, size))
    return scenes, min(n, len(found))


# ---------------------------------------------------------------------------------------
# Changes to scenes and images that make the losing side of a pair
# ---------------------------------------------------------------------------------------


def _pil_degrade(img: Image.Image, kind: str, rng: random.Random) -> Image.Image:
    """One aesthetic flaw, strong enough to see at 64 px."""
    w, h = img.size
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.02, 0.035) * w))
    if kind == "noise":
        arr = np.asarray(img, np.float32)
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(18, 40), arr.shape)
        return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=rng.randint(4, 12))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "cast":
        gains = np.ones(3, np.float32)
        down, up = rng.sample(range(3), 2)
        gains[down], gains[up] = rng.uniform(0.5, 0.7), rng.uniform(1.15, 1.3)
        return Image.fromarray(np.clip(np.asarray(img, np.float32) * gains, 0, 255).astype(np.uint8))
    if kind == "crop":
        side = round(rng.uniform(0.45, 0.65) * w)
        x0, y0 = rng.randrange(w - side + 1), rng.randrange(h - side + 1)
        return img.crop((x0, y0, x0 + side, y0 + side)).resize((w, h), Image.BILINEAR)
    raise ValueError(f"unknown degradation {kind!r}; expected one of {AESTHETIC_KINDS}")


def _subject(scene: Scene) -> int:
    """The main subject: the group whose union box is largest."""
    def area(g: Group) -> int:
        x0, y0, x1, y1 = union(g.boxes)
        return (x1 - x0) * (y1 - y0)
    return max(range(len(scene.groups)), key=lambda i: area(scene.groups[i]))


def portrait_flaw(scene: Scene, kind: str, rng: random.Random) -> Image.Image:
    """The render of `scene` with its main subject cut by the frame, occluded or blurred."""
    i = _subject(scene)
    g = scene.groups[i]
    x0, y0, x1, y1 = union(g.boxes)
    size = scene.width
    if kind == "cut":  # slide the subject toward its nearest edge until half of it is outside
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        edges = {"left": cx, "right": size - cx, "top": cy, "bottom": size - cy}
        side = min(edges, key=edges.get)
        dx = {"left": -x1 + (x1 - x0) // 2, "right": size - x0 - (x1 - x0) // 2}.get(side, 0)
        dy = {"top": -y1 + (y1 - y0) // 2, "bottom": size - y0 - (y1 - y0) // 2}.get(side, 0)
        moved = replace(g, boxes=tuple((a + dx, b + dy, c + dx, d + dy) for a, b, c, d in g.boxes))
        return render(replace(scene, groups=scene.groups[:i] + (moved,) + scene.groups[i + 1:]))
    if kind == "occluded":  # a square of another colour over the middle of every instance
        colour = rng.choice([c for c in COLOURS if c != g.colour])
        boxes = []
        for a, b, c, d in g.boxes:
            bw, bh = c - a, d - b
            boxes.append((a + bw // 4, b + bh // 5, a + bw // 4 + max(3, round(0.7 * bw)), b + bh // 5 + max(3, round(0.75 * bh))))
        cover = Group("square", colour, len(boxes), g.size, "solid", g.position, g.arrangement, tuple(boxes))
        return render(replace(scene, groups=scene.groups + (cover,)))
    if kind == "blurred":  # the subject out of focus, the rest sharp
        img = render(scene)
        pad = max(1, size // 32)
        box = (max(0, x0 - pad), max(0, y0 - pad), min(size, x1 + pad), min(size, y1 + pad))
        img.paste(img.filter(ImageFilter.GaussianBlur(max(1.2, 0.035 * size))).crop(box), box[:2])
        return img
    raise ValueError(f"unknown portrait flaw {kind!r}; expected one of {PORTRAIT_KINDS}")


def _edit(scene: Scene, rng: random.Random, exclude: tuple[str, ...] = ()):
    """A random applicable edit of `scene` whose op is not in `exclude`: (Edit, target) or None."""
    for op in rng.sample(EDIT_OPS, len(EDIT_OPS)):
        if op not in exclude:
            done = apply_edit(scene, op, rng)
            if done is not None:
                return done
    return None


# ---------------------------------------------------------------------------------------
# Pairs: indices into banks of images and texts, embedded once
# ---------------------------------------------------------------------------------------


class _Bank:
    """Images (uint8 HxWx3) and texts (deduplicated) that pairs point into by index."""

    def __init__(self):
        self.images: list[np.ndarray] = []
        self.texts: list[str] = []
        self._text_ix: dict[str, int] = {}

    def image(self, img: Image.Image | np.ndarray) -> int:
        self.images.append(np.asarray(img, np.uint8))
        return len(self.images) - 1

    def text(self, t: str) -> int:
        if t not in self._text_ix:
            self._text_ix[t] = len(self.texts)
            self.texts.append(t)
        return self._text_ix[t]


# Where each role's rows live: pooled embeddings of images / texts, or their token states.
ROLE_TABLE = {"image": "img", "source": "img", "text": "txt", "instruction": "txt",
              "image_tokens": "img_tok", "source_tokens": "img_tok", "text_tokens": "txt_tok", "text_mask": "txt_mask",
              "instruction_tokens": "txt_tok", "instruction_mask": "txt_mask"}


@dataclass
class PairSet:
    """One head's preference pairs: win[role] and lose[role] are (N,) row indices into the
    shared `tables` (a bank's embeddings, embedded once however many pairs use them)."""

    head: str
    win: dict[str, torch.Tensor]
    lose: dict[str, torch.Tensor]
    kinds: list[str]
    tables: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.kinds)

    def side(self, which: str, idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The winning ("win") or losing ("lose") side's inputs by role, of pairs `idx` (all by default)."""
        rows = self.win if which == "win" else self.lose
        out = {r: self.tables[ROLE_TABLE[r]][ix if idx is None else ix[idx]] for r, ix in rows.items()}
        return {r: t.float() if t.is_floating_point() else t for r, t in out.items()}

    def take(self, idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return self.side("win", idx), self.side("lose", idx)


# A pair before embedding: (kind, win roles, lose roles); a role maps to ("img"|"txt", bank index).
_Raw = tuple[str, dict[str, tuple[str, int]], dict[str, tuple[str, int]]]


def _pairs_for(scene: Scene, heads: tuple[str, ...], bank: _Bank, rng: random.Random,
               blur: float | None = None) -> dict[str, list[_Raw]]:
    """The raw pairs one scene gives each head. With `blur`, fidelity's images are blurred
    by that sigma (px) first: the generated-looking evaluation."""
    out: dict[str, list[_Raw]] = {h: [] for h in heads}
    clean = render(scene)
    img = bank.image(clean)
    # The workspace's mix leans rich; terse prompts are what users type (and RL samples).
    detail = rng.choices(("rich", "short", "terse"), weights=(0.4, 0.3, 0.3))[0]
    words = rng.getrandbits(32)  # the same words for both captions: only the attribute differs
    cap = bank.text(caption_for(scene, random.Random(words), detail=detail))

    if "fidelity" in heads:
        def shown(s: Scene) -> int:
            im = render(s)
            return bank.image(im.filter(ImageFilter.GaussianBlur(blur)) if blur else im)

        fid_img = shown(scene) if blur else img
        # A change the caption does not name (a terse prompt says no positions) makes no pair.
        changed = {k: (o, bank.text(caption_for(o, random.Random(words), detail=detail)))
                   for k, o in ((k, change_one(scene, k, rng)) for k in FIDELITY_KINDS) if o is not None}
        changed = {k: v for k, v in changed.items() if v[1] != cap}
        for kind, (_, wrong) in changed.items():  # caption side: the image's own caption wins
            out["fidelity"].append((f"caption_{kind}", {"image": ("img", fid_img), "text": ("txt", cap)},
                                    {"image": ("img", fid_img), "text": ("txt", wrong)}))
        # Image side, both ways, for every change: for either caption, its own scene's image
        # wins. The changed scenes' captions are embedded already, so these pairs cost only
        # an image each (twice the pairs; held-out swaps 0.765 -> 0.769, overall 0.695 -> 0.708).
        # And the caption side the other way round, free: the changed scene's image prefers its
        # own caption. Caption pairs compare two words' matches, which image pairs never ask
        # for (caption shapes 0.65 -> 0.69, swaps 0.778 -> 0.791 on one cached pair set).
        for kind, (other, o_cap) in sorted(changed.items()):
            o_img = shown(other)
            out["fidelity"].append((f"image_{kind}", {"image": ("img", fid_img), "text": ("txt", cap)},
                                    {"image": ("img", o_img), "text": ("txt", cap)}))
            out["fidelity"].append((f"image_{kind}", {"image": ("img", o_img), "text": ("txt", o_cap)},
                                    {"image": ("img", fid_img), "text": ("txt", o_cap)}))
            out["fidelity"].append((f"caption_{kind}", {"image": ("img", o_img), "text": ("txt", o_cap)},
                                    {"image": ("img", o_img), "text": ("txt", cap)}))
    if "aesthetics" in heads:
        kind = rng.choice(AESTHETIC_KINDS)
        out["aesthetics"].append((kind, {"image": ("img", img)}, {"image": ("img", bank.image(_pil_degrade(clean, kind, rng)))}))
    if "portrait" in heads:
        kind = rng.choice(PORTRAIT_KINDS)
        out["portrait"].append((kind, {"image": ("img", img)},
                                {"image": ("img", bank.image(portrait_flaw(scene, kind, rng)))}))
    if any(h in heads for h in EDIT_HEADS):
        done = _edit(scene, rng)
        if done is not None:
            edit, target = done
            ins = bank.text(instruction_for(edit, scene, target, rng))
            tgt = bank.image(render(target))
            good = {"source": ("img", img), "image": ("img", tgt), "instruction": ("txt", ins)}
            if "instruction" in heads:
                out["instruction"].append(("unchanged", good, good | {"image": ("img", img)}))
                kind = rng.choice(("other_edit", "wrong_value"))
                if kind == "wrong_value":  # the same op again until its result differs
                    wrong = next((d for d in (apply_edit(scene, edit.op, rng) for _ in range(8))
                                  if d is not None and d[1] != target), None)
                else:
                    wrong = _edit(scene, rng, exclude=(edit.op,))
                if wrong is not None:
                    out["instruction"].append((kind, good, good | {"image": ("img", bank.image(render(wrong[1])))}))
            if "consistency" in heads:
                if rng.random() < 0.2:
                    kind, over = "reseed", replace(target, noise_seed=rng.getrandbits(31))
                else:
                    extra = _edit(target, rng, exclude=(edit.op,))
                    kind, over = (f"also_{extra[0].op}", extra[1]) if extra else ("reseed", replace(target, noise_seed=rng.getrandbits(31)))
                out["consistency"].append((kind, good, good | {"image": ("img", bank.image(render(over)))}))
    return out


@torch.no_grad()
def _embed_bank(bank: _Bank, frozen, model_cfg: RewardConfig, token_images: list[int],
                batch_size: int = 64) -> dict[str, torch.Tensor]:
    """The bank's frozen embeddings by table: pooled (N, D) always; patch tokens of the
    images `token_images` (row i of "img_tok" is bank image token_images[i]) and token
    states of every text when there are any (half precision: they are the bulk)."""
    def pixels(rows: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.stack([bank.images[r] for r in rows])).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    every = list(range(len(bank.images)))
    tables = {"img": torch.cat([frozen.image_embed(pixels(every[i: i + batch_size])).float().cpu()
                                for i in range(0, len(every), batch_size)])}
    tables["txt"] = frozen.text_embed(bank.texts).float().cpu() if bank.texts else torch.zeros(0)
    if token_images:
        tables["img_tok"] = torch.cat([patch_tokens(frozen, pixels(token_images[i: i + batch_size]), model_cfg).half().cpu()
                                       for i in range(0, len(token_images), batch_size)])
        if bank.texts:
            tables["txt_tok"], tables["txt_mask"] = text_states(frozen, bank.texts, model_cfg.text_len, batch_size,
                                                                dtype=torch.half)
    return tables


def make_pairs(scenes: list[Scene], heads: tuple[str, ...], frozen, seed: int, blur: float | None = None,
               model_cfg: RewardConfig | None = None) -> dict[str, PairSet]:
    """Every head's pairs from `scenes`, embedded by the frozen CLIP; deterministic in seed.
    A head that `model_cfg` makes spatial also gets its token inputs (and keeps its pooled
    ones, for the CLIP-cosine baseline)."""
    model_cfg = model_cfg or RewardConfig(clip=frozen.spec, embed_dim=frozen.embed_dim, spatial=())
    bank = _Bank()
    raw: dict[str, list[_Raw]] = {h: [] for h in heads}
    for i, scene in enumerate(scenes):
        for h, pairs in _pairs_for(scene, heads, bank, random.Random(f"{seed}/{i}"), blur).items():
            raw[h].extend(pairs)
    return _embedded(raw, bank, frozen, model_cfg)


def output_pairs(head: str, wins: list[tuple[np.ndarray, str]], loses: list[tuple[np.ndarray, str]], frozen,
                 model_cfg: RewardConfig, kind: str = "feedback") -> PairSet:
    """`head`'s pairs from real outputs: (image uint8 HxWx3, prompt) wins[i] over loses[i]
    (a well-rated output over a failure the head overrated: recalibration pairs)."""
    if len(wins) != len(loses) or not wins:
        raise ValueError(f"{head}: need as many winners as losers, at least one (got {len(wins)}, {len(loses)})")
    bank = _Bank()

    def side(image: np.ndarray, text: str) -> dict[str, tuple[str, int]]:
        return {"image": ("img", bank.image(image)), "text": ("txt", bank.text(text))}

    raw = {head: [(kind, side(*w), side(*lo)) for w, lo in zip(wins, loses)]}
    return _embedded(raw, bank, frozen, model_cfg)[head]


def _embedded(raw: dict[str, list[_Raw]], bank: _Bank, frozen, model_cfg: RewardConfig) -> dict[str, PairSet]:
    """Raw pairs as PairSets over the bank's frozen embeddings."""
    # A spatial role is the same bank row as its pooled one: image_tokens <- image, text_* <- text.
    # Only the images a spatial head reads get patch tokens (the trunk at token_size is the cost).
    source_role = {"image_tokens": "image", "source_tokens": "source", "text_tokens": "text", "text_mask": "text",
                   "instruction_tokens": "instruction", "instruction_mask": "instruction"}
    token_images = sorted({side[role][1] for h, pairs in raw.items() if h in model_cfg.spatial
                           for p in pairs for side in p[1:] for role in ("image", "source") if role in side})
    token_row = {b: i for i, b in enumerate(token_images)}
    tables = _embed_bank(bank, frozen, model_cfg, token_images)

    def rows(sides: list[dict[str, tuple[str, int]]], role: str) -> torch.Tensor:
        ix = [s[source_role.get(role, role)][1] for s in sides]
        return torch.tensor([token_row[b] for b in ix] if ROLE_TABLE[role] == "img_tok" else ix, dtype=torch.long)

    out = {}
    for h, pairs in raw.items():
        if not pairs:
            continue
        roles = HEAD_INPUTS[h] + (SPATIAL_INPUTS[h] if h in model_cfg.spatial else ())
        out[h] = PairSet(h, {r: rows([p[1] for p in pairs], r) for r in roles},
                         {r: rows([p[2] for p in pairs], r) for r in roles}, [p[0] for p in pairs], tables)
    return out


# ---------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------


def flipped(ps: PairSet, attributes: tuple[str, ...]) -> PairSet:
    """`ps` with the preferences of the pairs of kinds `attributes` reversed (fault injection;
    a fidelity kind is named by its attribute: "colour" flips caption_colour and image_colour)."""
    bad = torch.tensor([k.split("_", 1)[-1] in attributes for k in ps.kinds])
    win = {r: torch.where(bad, ps.lose[r], ps.win[r]) for r in ps.win}
    lose = {r: torch.where(bad, ps.win[r], ps.lose[r]) for r in ps.lose}
    return replace(ps, win=win, lose=lose)


def _wins(win_score: torch.Tensor, lose_score: torch.Tensor) -> torch.Tensor:
    """1 where the preferred side scores higher, 0.5 on a tie (a coin toss), else 0."""
    return (win_score > lose_score).float() + 0.5 * (win_score == lose_score).float()


class RewardTrainJob(TrainJob):
    """Bradley-Terry on each head's pairs; the CLIP stays frozen and its embeddings precomputed."""

    name = MODEL_NAME

    def __init__(self, frozen, train_scenes: list[Scene], eval_scenes: list[Scene], cfg: RewardTrainConfig,
                 info: dict | None = None, pairs: dict[str, "PairSet"] | None = None):
        # info: JSON facts that identify the run beyond cfg (the CLIP spec, where scenes came from).
        # pairs: the training pairs, embedded already ({key: PairSet}, key a head or a head's
        # extra set such as "fidelity/feedback"): a recalibration's pairs from real outputs with
        # the scene pairs it replays (models/recalibrate.py). Without, the scene pairs of cfg.
        self.frozen, self.cfg, self.info, self.given_pairs = frozen, cfg, info or {}, pairs
        self.train_scenes, self.eval_scenes = train_scenes, eval_scenes
        self.model_cfg = RewardConfig(clip=frozen.spec, embed_dim=frozen.embed_dim, hidden=cfg.hidden,
                                      dropout=cfg.dropout, spatial=cfg.spatial,
                                      patch_dim=frozen.patch_dim(cfg.patch_strides), text_dim=frozen.text_dim,
                                      token_size=cfg.token_size, patch_strides=cfg.patch_strides,
                                      patch_grid=cfg.patch_grid, patch_context=cfg.patch_context)

    def setup(self) -> None:
        t0 = time.perf_counter()
        seed = self.loop.seed
        self.train_pairs = self.given_pairs if self.given_pairs is not None else self.scene_pairs(seed)
        self.data_seconds = round(time.perf_counter() - t0, 2)
        self.model = EmbeddedRewards(self.model_cfg, self.frozen).to(self.device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.loop.lr, weight_decay=self.cfg.weight_decay)

    def scene_pairs(self, seed: int) -> dict[str, PairSet]:
        """Each head's pairs from the training scenes (with cfg.flip's kinds reversed)."""
        pairs = make_pairs(self.train_scenes, self.cfg.heads, self.frozen, seed, model_cfg=self.model_cfg)
        return {h: flipped(ps, self.cfg.flip) for h, ps in pairs.items()} if self.cfg.flip else pairs

    def config(self) -> dict:
        return {"model": asdict(self.model_cfg), "train": asdict(self.cfg)} | self.info

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"rewards": self.model}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"rewards": self.opt}

    def step(self, step: int) -> dict[str, float]:
        g = torch.Generator().manual_seed(self.loop.seed * 1_000_003 + step)
        losses, accs = {}, {}
        for key, pairs in self.train_pairs.items():  # key: a head, or a head's extra pairs ("fidelity/feedback")
            h = pairs.head
            idx = torch.randint(0, len(pairs), (self.cfg.batch_size,), generator=g)
            win, lose = pairs.take(idx)
            r_w, r_l = self.model(win, (h,))[h], self.model(lose, (h,))[h]
            losses[key] = bradley_terry(r_w, r_l)
            accs[key] = float((r_w > r_l).float().mean())
        loss = torch.stack(list(losses.values())).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = self.clip(self.model.parameters())
        self.opt.step()
        return ({"loss": float(loss.detach())} | {f"loss_{h}": float(v.detach()) for h, v in losses.items()}
                | {f"acc_{h}": a for h, a in accs.items()} | {"grad_norm": grad_norm})

    @torch.no_grad()
    def accuracy(self, pairs: dict[str, PairSet]) -> dict[str, Any]:
        """Per head: the share of pairs the winner scores higher in, overall and per kind."""
        self.model.eval()
        out: dict[str, Any] = {}
        for key, ps in pairs.items():
            h = ps.head
            chunks = [torch.arange(i, min(i + 256, len(ps))) for i in range(0, len(ps), 256)]
            r_w = torch.cat([self.model(ps.side("win", c), (h,))[h] for c in chunks])
            r_l = torch.cat([self.model(ps.side("lose", c), (h,))[h] for c in chunks])
            right = _wins(r_w, r_l)
            kinds = sorted(set(ps.kinds))
            out[key] = {"accuracy": round(float(right.mean()), 4), "pairs": len(ps),
                      "by_kind": {k: round(float(right[[i for i, x in enumerate(ps.kinds) if x == k]].mean()), 4)
                                  for k in kinds}}
        self.model.train()
        return out

    def _eval_pairs(self, seed: int, blur: float | None = None) -> dict[str, PairSet]:
        # Kept per instance: a job trained again with other pairs (a recalibration's
        # candidates) evaluates on the same pairs without embedding them again.
        memo = self.__dict__.setdefault("_eval_memo", {})
        if (seed, blur) not in memo:
            heads = ("fidelity",) if blur else self.cfg.heads
            memo[seed, blur] = make_pairs(self.eval_scenes, heads, self.frozen, seed, blur=blur, model_cfg=self.model_cfg)
        return memo[seed, blur]

    def evaluate(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        seed = self.loop.seed + 7919  # other draws than training's, on other scenes
        held = self._eval_pairs(seed)
        out: dict[str, Any] = {"heldout": self.accuracy(held), "train": self.accuracy(self.train_pairs)}
        if "fidelity" in held:
            ps = held["fidelity"]
            # The untrained baseline: CLIP's own image-text cosine as the fidelity score.
            win, lose = ps.side("win"), ps.side("lose")
            cos_w, cos_l = (win["image"] * win["text"]).sum(-1), (lose["image"] * lose["text"]).sum(-1)
            out["fidelity_clip_cosine"] = round(float(_wins(cos_w, cos_l).mean()), 4)
            blurred = self._eval_pairs(seed, blur=self.cfg.eval_blur)
            out["fidelity_blurred"] = self.accuracy(blurred)["fidelity"] | {"sigma_px": self.cfg.eval_blur}
        from .rewards import HELDOUT_BARS, trusted

        out["bars"] = {h: HELDOUT_BARS[h] for h in out["heldout"]}
        out["trusted"] = sorted(trusted({"eval": out}))
        out["summary"] = {h: v["accuracy"] for h, v in out["heldout"].items()} | (
            {"fidelity_blurred": out["fidelity_blurred"]["accuracy"]} if "fidelity_blurred" in out else {})
        out["pairs_seconds"] = {"train": self.data_seconds, "eval": round(time.perf_counter() - t0, 2)}
        return out


# ---------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------


def make_job(workspace_root: str | Path, cfg: RewardTrainConfig, loop: LoopConfig, info: dict | None = None,
             pairs: dict[str, PairSet] | None = None) -> RewardTrainJob:
    """The job for `cfg` on the workspace's scene-world ground truth and CLIP (`info` and
    `pairs`: see RewardTrainJob)."""
    from .frozen import Frozen, workspace_clip_spec
    from .trainer import device_of

    spec = cfg.clip or workspace_clip_spec(workspace_root)
    frozen = Frozen.load(spec, device=str(device_of(loop.device)))
    train_scenes, n_ws_train = scene_pool(workspace_root, "train", cfg.n_train, cfg.resolution, loop.seed)
    eval_scenes, n_ws_eval = scene_pool(workspace_root, "eval", cfg.n_eval, cfg.resolution, loop.seed)
    info = {"clip": spec, "scenes": {"train_from_workspace": n_ws_train, "eval_from_workspace": n_ws_eval}} | (info or {})
    return RewardTrainJob(frozen, train_scenes, eval_scenes, cfg, info, pairs)


def train_reward(workspace_root: str | Path, cfg: RewardTrainConfig | None = None, loop: LoopConfig | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Train the reward heads on the workspace's scene-world ground truth; save them as the
    next models/reward/ version, registered in the catalog. Returns the version's record."""
    from dataengine.catalog import Catalog
    from dataengine.workspace import Workspace

    cfg = cfg or RewardTrainConfig()
    loop = replace(loop or LoopConfig(steps=3000, lr=1e-3), progress=progress)
    ws = Workspace.at(workspace_root)
    return train(make_job(ws.root, cfg, loop), ws.models, loop, catalog=Catalog(ws))


def main(argv: list[str] | None = None) -> int:
    """`python -m models.train_reward -w WS [config and loop flags]`."""
    import argparse
    import dataclasses
    import typing

    ap = argparse.ArgumentParser(prog="python -m models.train_reward", description=__doc__.splitlines()[0])
    ap.add_argument("-w", "--workspace", required=True)
    for cls in (RewardTrainConfig, LoopConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in ("progress", "heads", "spatial", "flip", "patch_strides"):
                continue
            flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
            base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
            default = f.default if f.default is not dataclasses.MISSING else None
            if base is bool:
                ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
            else:
                ap.add_argument(flag, type=base if base in (int, float, str) else str, default=default)
    ap.add_argument("--heads", default=",".join(HEADS), help="comma-separated heads to train")
    ap.add_argument("--spatial", default=",".join(RewardConfig.spatial),
                    help="comma-separated heads over patch tokens ('' for none)")
    ap.set_defaults(steps=3000, lr=1e-3)  # the reward's own loop defaults (models/stack.py)
    args = vars(ap.parse_args(argv))
    def names(text: str) -> tuple[str, ...]:
        return tuple(h.strip() for h in text.split(",") if h.strip())

    cfg = RewardTrainConfig(**{f.name: args[f.name] for f in dataclasses.fields(RewardTrainConfig)
                               if f.name not in ("heads", "spatial", "flip", "patch_strides")},
                            heads=names(args["heads"]), spatial=names(args["spatial"]))
    loop = LoopConfig(**{f.name: args[f.name] for f in dataclasses.fields(LoopConfig) if f.name != "progress"})
    record = train_reward(args["workspace"], cfg, loop)
    print(json.dumps(record | {"created_at": record["created_at"].isoformat()}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

"""Scene world: a judge of generated images against their scenes' ground truth.

    checker = Checker.load_or_train("ws/models/checker")     # trains once (~2 min on one core), then loads
    out = checker.check(images, scenes)        # per image: colour, shape, bound, position, background, accuracy
    acc = attribute_accuracy(images, scenes, checker)          # one number: mean per-image accuracy

It is independent of the reward heads (RL reports it as the held-out reward it never
optimises; the DiT benchmark reports its attribute accuracy). A palette rule cannot do
this job: backgrounds hold the palette's colours (brick red, grass green, sky blue) and
the lighting and styles move object colours far from their RGB; measured on 400 clean
64 px renders, a nearest-palette pixel count found 65% of the scenes' colours while
flagging 41% of the absent ones. So the judge is a small fully convolutional detector
trained on scene-world renders: for each cell of a stride-4 grid it predicts "an object
covers this cell" plus that object's colour and shape, and from pooled features the
background kind. Presence of a colour, a shape or a bound (colour, shape) pair is the
best cell's probability (object x colour x shape), so binding means "on the same
object", not "somewhere in the image". Trained with blur, low-resolution and noise
augmentations because generations are soft. `Checker.metrics` holds its held-out
accuracy on clean and degraded renders.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .render import render
from .scene import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, Scene, _try_group, sample_scene

__all__ = ["ATTRIBUTES", "Checker", "CheckerConfig", "attribute_accuracy", "degrade", "scenes_of"]

COLOUR_NAMES = tuple(COLOURS)
# What `check` judges per image; `accuracy` is their mean.
ATTRIBUTES = ("colour", "shape", "bound", "position", "background")
STRIDE = 4  # one grid cell per 4x4 pixels of the checker's input
STEM = 8  # channels of the full-resolution stem
IGNORE = -1.0  # object label of cells an object only grazes: no loss there
WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE = "weights.safetensors", "config.json", "metrics.json"
ARCH = 4  # bump when _Net changes: a cached checker of another architecture is retrained
# The default checker (CheckerConfig()), trained by this module and shipped with the
# package: training it costs ~100 s on 2 cores, which every fresh workspace would pay.
# `python -m dataengine.sceneworld.checker --ship` retrains it (after a change to the
# renderer or the net); tests/test_checker.py checks it still judges today's renders.
SHIPPED = Path(__file__).with_name("checker-64")

SceneLike = Scene | dict[str, Any] | str


@dataclass(frozen=True)
class CheckerConfig:
    """How the checker is trained; a cached checker is reused only when this matches."""

    resolution: int = 64  # images are resized to this before judging
    n_train: int = 4000  # rendered training scenes
    n_eval: int = 500  # rendered held-out scenes (a different seed stream)
    epochs: int = 6
    batch_size: int = 64
    lr: float = 3e-3
    width: int = 32  # channels of the first stage; the grid stages use 1.5x
    extra_groups: int = 3  # training scenes get 0..this many groups beyond sample_scene's 1-3
    shape_weight: float = 2.0  # shapes learn slowest: their loss counts double
    presence_weight: float = 1.0  # the image-level loss on the presence scores `check` thresholds
    degraded_share: float = 0.3  # share of training images shown blurred, half-resolution or noisy
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.degraded_share <= 1.0:
            raise ValueError(f"degraded_share must be in [0, 1], got {self.degraded_share}")
        if self.resolution < 16 or self.resolution % STRIDE:
            raise ValueError(f"resolution must be a multiple of {STRIDE} and >= 16, got {self.resolution}")
        for name in ("n_train", "n_eval", "epochs", "batch_size", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------
# Network: stride-4 grid of (objectness, colour, shape) + a global background head
# ---------------------------------------------------------------------------------------


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class _Net(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        w, w2 = width, width * 3 // 2
        # A thin full-resolution conv, then space-to-channel: the 2-core training budget buys
        # about 15 MFLOP per image, but the smallest objects are 3 px across at 32 px, and a
        # bare space-to-channel stem splits them over cells before anything has seen them whole.
        self.trunk = nn.Sequential(
            _conv(3, STEM), nn.PixelUnshuffle(2), _conv(4 * STEM, w),  # /2
            _conv(w, w2, stride=2),  # /4: the grid
            _Residual(_conv(w2, w2)),
            _Residual(_conv(w2, w2, dilation=2)),  # dilation widens the view to the largest objects
        )
        # Global context added to every cell: lighting and style act on the whole image, and
        # an object's colour is read against them (a grey under moonlight is not a blue).
        self.context = nn.Linear(w2, w2)
        self.cells = nn.Sequential(nn.Conv2d(w2, w2, 1), nn.ReLU(inplace=True),
                                   nn.Conv2d(w2, 1 + len(COLOURS) + len(SHAPES), 1))
        self.background = nn.Linear(w2, len(BACKGROUNDS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.trunk(x)  # (B, w2, R/4, R/4)
        pooled = f.mean((2, 3))  # (B, w2)
        f = f + self.context(pooled)[:, :, None, None]
        return self.cells(f), self.background(pooled)  # (B, 1+11+10, g, g), (B, 7)


# ---------------------------------------------------------------------------------------
# Images in, labels out
# ---------------------------------------------------------------------------------------


def _as_input(images: torch.Tensor | np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 (N,H,W,3) or float [-1,1] (N,3,H,W) -> float (N,3,R,R) in [-1,1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (N, H, W, 3), got {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    else:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"float images must be (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        x = images.detach().float().clamp(-1.0, 1.0)
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return x.cpu()


def _scene(s: SceneLike) -> Scene:
    return s if isinstance(s, Scene) else Scene.from_json(s)


def _labels(scene: Scene, resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per grid cell: object (1, 0, or IGNORE where a box covers part of the cell but not
    its centre), colour index and shape index (-1 off objects); a cell belongs to an
    instance when its centre is inside the instance's box (its centre cell for boxes
    smaller than a cell). At 32 px a 3 px object straddles up to four cells, and calling
    the ones it covers in part background would contradict the one it covers whole."""
    g = resolution // STRIDE
    sx, sy = resolution / scene.width, resolution / scene.height
    obj = np.zeros((g, g), np.float32)
    col = np.full((g, g), -1, np.int64)
    shp = np.full((g, g), -1, np.int64)
    centres = (np.arange(g) + 0.5) * STRIDE
    edges = np.arange(g) * STRIDE
    for grp in scene.groups:  # first: cells an object only grazes are neither object nor background
        for x0, y0, x1, y1 in grp.boxes:
            x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
            touched_x = np.nonzero((edges < x1) & (edges + STRIDE > x0))[0]
            touched_y = np.nonzero((edges < y1) & (edges + STRIDE > y0))[0]
            obj[np.ix_(touched_y, touched_x)] = IGNORE
    for grp in scene.groups:
        ci, si = COLOUR_NAMES.index(grp.colour), SHAPES.index(grp.shape)
        for x0, y0, x1, y1 in grp.boxes:
            x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
            cols = np.nonzero((centres >= x0) & (centres < x1))[0]
            rows = np.nonzero((centres >= y0) & (centres < y1))[0]
            if len(cols) == 0:
                cols = np.array([min(g - 1, int((x0 + x1) / 2 / STRIDE))])
            if len(rows) == 0:
                rows = np.array([min(g - 1, int((y0 + y1) / 2 / STRIDE))])
            obj[np.ix_(rows, cols)] = 1.0
            col[np.ix_(rows, cols)] = ci
            shp[np.ix_(rows, cols)] = si
    return obj, col, shp


def _crowded(scene: Scene, rng: random.Random, extra: int) -> Scene:
    """`scene` with up to `extra` more groups in free cells: training scenes hold 2-3x the
    objects of `sample_scene`'s, so each rendered pixel teaches more shapes."""
    groups = scene.groups
    for _ in range(extra):
        g = _try_group(rng, groups, scene.width, scene.height, forbid=set())
        if g is None:
            break
        groups += (g,)
    return replace(scene, groups=groups)


def _render_set(n: int, resolution: int, seed: int, extra_groups: int = 0) -> tuple[torch.Tensor, list[Scene]]:
    rng = random.Random(seed)
    scenes = [sample_scene(rng, resolution, resolution) for _ in range(n)]
    if extra_groups:
        scenes = [_crowded(s, rng, rng.randint(0, extra_groups)) for s in scenes]
    arr = np.stack([np.asarray(render(s)) for s in scenes])
    return _as_input(arr, resolution), scenes


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image by its own sigma (pixels); sigma 0 leaves it as is."""
    radius = 3
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # (B, 7)
    b, c, h, w = x.shape
    y = x.reshape(1, b * c, h, w)
    kk = k.repeat_interleave(c, 0)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), kk[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), kk[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def degrade(x: torch.Tensor, kind: str, strength: float = 1.0) -> torch.Tensor:
    """What generations look like: "blur" (Gaussian, sigma = strength px), "lowres" (down by
    2*strength, back up), "noise" (Gaussian, std 0.1*strength). x: (N,3,H,W) in [-1,1]."""
    if kind == "blur":
        return _gaussian_blur(x, torch.full((x.shape[0],), float(strength)))
    if kind == "lowres":
        h, w = x.shape[-2:]
        f = 2.0 * strength
        small = F.interpolate(x, size=(max(4, round(h / f)), max(4, round(w / f))), mode="bilinear",
                              antialias=True, align_corners=False)
        return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    if kind == "noise":
        g = torch.Generator().manual_seed(0)
        return (x + 0.1 * strength * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    raise ValueError(f"unknown degradation {kind!r}; expected blur, lowres or noise")


def _degraded_copies(x: torch.Tensor, gen: torch.Generator, chunk: int = 512) -> torch.Tensor:
    """One degraded copy per training image, made once (augmenting every step cost as much
    as the network): blur of random strength, half resolution, or noise, a third each."""
    out = torch.empty_like(x)
    for i in range(0, len(x), chunk):
        xb = x[i: i + chunk]
        b = xb.shape[0]
        kind = torch.randint(0, 3, (b,), generator=gen)
        sigma = 0.4 + 1.1 * torch.rand(b, generator=gen)
        noisy = (xb + 0.08 * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(xb.shape, generator=gen)).clamp(-1, 1)
        pick = kind[:, None, None, None]
        out[i: i + b] = torch.where(pick == 0, _gaussian_blur(xb, sigma),
                                    torch.where(pick == 1, degrade(xb, "lowres"), noisy))
    return out


def _presence_loss(cells: torch.Tensor, colours: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the scores `check` thresholds (the best cell's object x colour
    and object x shape) against which colours and shapes the image holds: the cell losses
    never see a background cell that looks like a red object, this one does."""
    obj = torch.sigmoid(cells[:, :1])  # (B,1,g,g)
    colour = (obj * cells[:, 1:1 + len(COLOURS)].softmax(1)).flatten(2).amax(2)  # (B,11)
    shape = (obj * cells[:, 1 + len(COLOURS):].softmax(1)).flatten(2).amax(2)  # (B,10)
    eps = 1e-4
    return F.binary_cross_entropy(colour.clamp(eps, 1 - eps), colours) \
        + F.binary_cross_entropy(shape.clamp(eps, 1 - eps), shapes)


def _jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A per-channel gain of +-5%: a little colour cast, as generations have."""
    gain = 1.0 + 0.1 * (torch.rand(x.shape[0], 3, 1, 1, generator=gen) - 0.5)
    return ((x + 1) * gain - 1).clamp(-1, 1)


# ---------------------------------------------------------------------------------------
# The checker
# ---------------------------------------------------------------------------------------


class Checker:
    """A trained scene-world judge; build it with `load_or_train` (or `train`/`load`)."""

    def __init__(self, cfg: CheckerConfig, net: _Net, thresholds: dict[str, float] | None = None,
                 metrics: dict | None = None):
        self.cfg = cfg
        self.net = net.eval()
        # Presence probability above which a colour / shape / (colour, shape) pair counts as
        # shown; `calibrate` sets them on held-out renders.
        self.thresholds = dict(thresholds or {"colour": 0.5, "shape": 0.5, "pair": 0.5})
        self.metrics = metrics or {}

    # -- building ---------------------------------------------------------------------

    @classmethod
    def load_or_train(cls, folder: str | Path, resolution: int = 64, cfg: CheckerConfig | None = None,
                      progress: bool = False) -> "Checker":
        """Load the checker cached in `folder`; train and cache it there when it is absent
        or was trained with another config."""
        cfg = cfg or CheckerConfig(resolution=resolution)
        folder = Path(folder)
        for source in (folder, SHIPPED):
            if (source / CONFIG_FILE).is_file():
                saved = json.loads((source / CONFIG_FILE).read_text())
                if saved.get("checker") == asdict(cfg) and saved.get("arch") == ARCH:
                    checker = cls.load(source)
                    if source != folder:
                        checker.save(folder)
                    return checker
        checker = cls.train(cfg, progress=progress)
        checker.save(folder)
        return checker

    @classmethod
    def train(cls, cfg: CheckerConfig = CheckerConfig(), progress: bool = False) -> "Checker":
        """Render scenes, train the detector and measure it on held-out renders."""
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        x, scenes = _render_set(cfg.n_train, cfg.resolution, 2 * cfg.seed + 1, cfg.extra_groups)
        labels = [_labels(s, cfg.resolution) for s in scenes]
        obj = torch.from_numpy(np.stack([lab[0] for lab in labels]))
        col = torch.from_numpy(np.stack([lab[1] for lab in labels]))
        shp = torch.from_numpy(np.stack([lab[2] for lab in labels]))
        bg = torch.tensor([BACKGROUNDS.index(s.background) for s in scenes])
        col_in = F.one_hot(col.flatten(1) + 1, len(COLOURS) + 1)[..., 1:].amax(1).float()  # (N,11): colours shown
        shp_in = F.one_hot(shp.flatten(1) + 1, len(SHAPES) + 1)[..., 1:].amax(1).float()  # (N,10)
        x_deg = _degraded_copies(x, gen)
        t_render = time.perf_counter() - t0

        net = _Net(cfg.width)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
        steps_per_epoch = -(-cfg.n_train // cfg.batch_size)
        total = cfg.epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.15)
        pos_weight = torch.tensor(3.0)  # object cells are a few percent of the grid
        net.train()
        step, history = 0, []
        from ..progress import bar

        with bar(progress, "checker", total) as advance:
            for _ in range(cfg.epochs):
                epoch_sums: dict[str, float] = {}
                order = torch.randperm(cfg.n_train, generator=gen)
                for i in range(0, cfg.n_train, cfg.batch_size):
                    idx = order[i: i + cfg.batch_size]
                    use_deg = (torch.rand(len(idx), generator=gen) < cfg.degraded_share)[:, None, None, None]
                    ob = obj[idx]
                    cells, bg_logits = net(_jitter(torch.where(use_deg, x_deg[idx], x[idx]), gen))
                    parts = {
                        "object": F.binary_cross_entropy_with_logits(cells[:, 0], ob.clamp_min(0), (ob != IGNORE).float(),
                                                                     pos_weight=pos_weight),
                        "colour": F.cross_entropy(cells[:, 1:1 + len(COLOURS)], col[idx], ignore_index=-1),
                        "shape": F.cross_entropy(cells[:, 1 + len(COLOURS):], shp[idx], ignore_index=-1),
                        "background": F.cross_entropy(bg_logits, bg[idx]),
                        "presence": _presence_loss(cells, col_in[idx], shp_in[idx]),
                    }
                    loss = parts["object"] + parts["colour"] + cfg.shape_weight * parts["shape"] + 0.5 * parts["background"] \
                        + cfg.presence_weight * parts["presence"]
                    for k, v in parts.items():
                        epoch_sums[k] = epoch_sums.get(k, 0.0) + float(v.detach())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    step += 1
                    advance(1)
                history.append({k: round(v / steps_per_epoch, 4) for k, v in epoch_sums.items()})
        checker = cls(cfg, net)
        t_train = time.perf_counter() - t0
        checker.calibrate()
        checker.metrics = {"render_s": round(t_render, 2), "train_s": round(t_train, 2), "steps": step,
                           "loss_per_epoch": history, "thresholds": checker.thresholds, **checker.evaluate()}
        return checker

    def save(self, folder: str | Path) -> Path:
        """Write weights.safetensors, config.json and metrics.json into `folder` (replaced whole)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-checker-", dir=folder.parent))
        try:
            save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(tmp / WEIGHTS_FILE))
            vocab = {"colours": COLOUR_NAMES, "shapes": SHAPES, "backgrounds": BACKGROUNDS}
            (tmp / CONFIG_FILE).write_text(json.dumps({"checker": asdict(self.cfg), "arch": ARCH, "thresholds": self.thresholds,
                                                       "vocab": vocab}, indent=2))
            (tmp / METRICS_FILE).write_text(json.dumps(self.metrics, indent=2))
            for p in tmp.iterdir():
                p.chmod(0o644)
            tmp.chmod(0o755)
            if folder.exists():
                shutil.rmtree(folder)
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Checker":
        """A checker saved by `save`."""
        from safetensors.torch import load_file

        folder = Path(folder)
        saved = json.loads((folder / CONFIG_FILE).read_text())
        if saved.get("arch") != ARCH:
            raise ValueError(f"{folder}: checker architecture {saved.get('arch')}, this code builds {ARCH}")
        vocab = saved.get("vocab", {})
        if tuple(vocab.get("colours", ())) != COLOUR_NAMES or tuple(vocab.get("shapes", ())) != SHAPES \
                or tuple(vocab.get("backgrounds", ())) != BACKGROUNDS:
            raise ValueError(f"{folder}: checker was trained on another scene-world vocabulary")
        cfg = CheckerConfig(**saved["checker"])
        net = _Net(cfg.width)
        net.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        metrics = json.loads((folder / METRICS_FILE).read_text()) if (folder / METRICS_FILE).is_file() else {}
        return cls(cfg, net, saved.get("thresholds"), metrics)

    # -- judging ----------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, images: torch.Tensor | np.ndarray, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Per-cell probabilities: `object` (N,g,g), `colour` (N,11,g,g) and `shape` (N,10,g,g)
        given an object there; `background` (N,7). Columns follow COLOURS, SHAPES, BACKGROUNDS."""
        x = _as_input(images, self.cfg.resolution)
        outs = []
        for i in range(0, len(x), batch_size):
            cells, bg = self.net(x[i: i + batch_size])
            outs.append((torch.sigmoid(cells[:, 0]), cells[:, 1:1 + len(COLOURS)].softmax(1),
                         cells[:, 1 + len(COLOURS):].softmax(1), bg.softmax(1)))
        return {k: torch.cat([o[j] for o in outs]) for j, k in enumerate(("object", "colour", "shape", "background"))}

    @staticmethod
    def _presence(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The best cell's probability of each colour (N,11), shape (N,10) and pair (N,11,10)."""
        obj = p["object"][:, None]  # (N,1,g,g)
        colour = (obj * p["colour"]).flatten(2).amax(2)
        shape = (obj * p["shape"]).flatten(2).amax(2)
        pair = torch.stack([(obj[n, :, None] * p["colour"][n][:, None] * p["shape"][n][None]).flatten(2).amax(2)
                            for n in range(len(obj))])  # (N,11,10): one image at a time keeps memory small
        return colour, shape, pair

    def check(self, images: torch.Tensor | np.ndarray, scenes: Sequence[SceneLike]) -> dict[str, np.ndarray]:
        """Which of each scene's attributes its image shows, per image (N,) in [0, 1]:
        colour / shape / bound (that colour on that shape) / position (the bound pair's
        cells centred in the group's 3x3 cell): the share of the scene's groups shown;
        background: 1 if the right kind; accuracy: the mean of those five; extra: detected
        (colour, shape) pairs the scene does not hold (hallucinations, not in accuracy)."""
        if len(images) != len(scenes):
            raise ValueError(f"{len(images)} images but {len(scenes)} scenes")
        p = self.predict(images)
        colour, shape, pair = self._presence(p)
        th = self.thresholds
        g = p["object"].shape[-1]
        centres = (torch.arange(g, dtype=torch.float32) + 0.5) / g
        out = {k: np.zeros(len(scenes), np.float32) for k in (*ATTRIBUTES, "accuracy", "extra")}
        for n, sc in enumerate(scenes):
            sc = _scene(sc)
            hits = dict.fromkeys(("colour", "shape", "bound", "position"), 0.0)
            for gr in sc.groups:
                ci, si = COLOUR_NAMES.index(gr.colour), SHAPES.index(gr.shape)
                hits["colour"] += float(colour[n, ci] > th["colour"])
                hits["shape"] += float(shape[n, si] > th["shape"])
                if pair[n, ci, si] > th["pair"]:
                    hits["bound"] += 1.0
                    m = p["object"][n] * p["colour"][n, ci] * p["shape"][n, si]  # (g,g): this pair's map
                    w = torch.where(m >= 0.5 * m.max(), m, torch.zeros(()))
                    cx = float((w.sum(0) * centres).sum() / w.sum())
                    cy = float((w.sum(1) * centres).sum() / w.sum())
                    hits["position"] += float(POSITIONS[gr.position] == (min(2, int(cx * 3)), min(2, int(cy * 3))))
            for k, v in hits.items():
                out[k][n] = v / len(sc.groups)
            out["background"][n] = float(int(p["background"][n].argmax()) == BACKGROUNDS.index(sc.background))
            wanted = {(COLOUR_NAMES.index(gr.colour), SHAPES.index(gr.shape)) for gr in sc.groups}
            found = {tuple(ix) for ix in torch.nonzero(pair[n] > th["pair"]).tolist()}
            out["extra"][n] = len(found - wanted)
        out["accuracy"] = np.mean([out[k] for k in ATTRIBUTES], axis=0).astype(np.float32)
        return out

    def accuracy(self, images: torch.Tensor | np.ndarray, scenes: Sequence[SceneLike]) -> float:
        """Mean per-image attribute accuracy (see `check`)."""
        return float(self.check(images, scenes)["accuracy"].mean())

    def _truth(self, scenes: Sequence[Scene]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Which colours (N,11), shapes (N,10) and pairs (N,11,10) each scene holds."""
        c = torch.zeros(len(scenes), len(COLOURS), dtype=torch.bool)
        s = torch.zeros(len(scenes), len(SHAPES), dtype=torch.bool)
        cs = torch.zeros(len(scenes), len(COLOURS), len(SHAPES), dtype=torch.bool)
        for i, sc in enumerate(scenes):
            for gr in sc.groups:
                ci, si = COLOUR_NAMES.index(gr.colour), SHAPES.index(gr.shape)
                c[i, ci] = s[i, si] = cs[i, ci, si] = True
        return c, s, cs

    def calibrate(self, n: int | None = None) -> dict[str, float]:
        """Set each threshold to the one with the best F1 of "shown" against the truth on fresh
        renders (their own seed stream, not the evaluation's). F1, not recall minus the
        false-positive rate: an image holds about 2 of the 11 colours and 108 of its 110 pairs
        are absent, and a rate that looks small there is several hallucinations per image
        (measured: recall minus false-positive rate picks a colour threshold that flags 12-16%
        of absent colours)."""
        x, scenes = _render_set(n or self.cfg.n_eval, self.cfg.resolution, seed=2 * self.cfg.seed + 3)
        scores = self._presence(self.predict(x))
        grid = torch.arange(0.05, 0.951, 0.05)
        for name, score, truth in zip(("colour", "shape", "pair"), scores, self._truth(scenes)):
            if truth.all() or not truth.any():
                continue
            tp = torch.stack([(score[truth] > t).sum() for t in grid]).float()
            shown = torch.stack([(score > t).sum() for t in grid]).float()
            f1 = 2 * tp / (shown + truth.sum())
            self.thresholds[name] = round(float(grid[int(f1.argmax())]), 2)
        return self.thresholds

    def evaluate(self, n: int | None = None) -> dict[str, Any]:
        """Held-out figures on fresh renders: per-attribute means on clean, blurred (sigma 1 px),
        half-resolution and noisy images; on clean ones also the false-positive rates (absent
        colours, shapes, pairs flagged as shown) and how often an image scores higher on its
        own scene than on the next image's."""
        n = n or self.cfg.n_eval
        x, scenes = _render_set(n, self.cfg.resolution, seed=2 * self.cfg.seed + 2)
        report: dict[str, Any] = {"n_eval": n}
        for name, imgs in (("clean", x), ("blur", degrade(x, "blur", 1.0)),
                           ("lowres", degrade(x, "lowres", 1.0)), ("noise", degrade(x, "noise", 0.5))):
            res = self.check(imgs, scenes)
            report[name] = {k: round(float(v.mean()), 4) for k, v in res.items()}
        scores = self._presence(self.predict(x))
        for name, score, truth in zip(("colour", "shape", "pair"), scores, self._truth(scenes)):
            flagged = score[~truth] > self.thresholds[name]
            report["clean"][f"{name}_false_positive"] = round(float(flagged.float().mean()), 4)
        own = self.check(x, scenes)["accuracy"]
        other = self.check(x, scenes[1:] + scenes[:1])["accuracy"]
        report["own_beats_other"] = round(float((own > other).mean()), 4)
        return report


def attribute_accuracy(images: torch.Tensor | np.ndarray, scenes: Sequence[SceneLike],
                       checker: Checker | str | Path) -> float:
    """Mean per-image attribute accuracy of `images` against `scenes` (a `Checker`, or the
    folder to load or train one in)."""
    if not isinstance(checker, Checker):
        checker = Checker.load_or_train(checker)
    return checker.accuracy(images, scenes)


def scenes_of(metas: Iterable[dict[str, Any]]) -> list[Scene]:
    """The ground-truth scenes of shard samples' json (`meta["scene"]`)."""
    return [Scene.from_json(m["scene"]) for m in metas]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dataengine.sceneworld.checker [--ship | --out FOLDER]`: train the default
    checker and save it (over the shipped copy with --ship); print its held-out figures."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m dataengine.sceneworld.checker", description=main.__doc__)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--ship", action="store_true", help=f"replace the shipped checker ({SHIPPED})")
    where.add_argument("--out", type=Path, help="a folder to save the checker in")
    args = ap.parse_args(argv)
    checker = Checker.train(CheckerConfig(), progress=True)
    folder = checker.save(SHIPPED if args.ship else args.out)
    print(json.dumps({k: checker.metrics[k] for k in ("train_s", "thresholds", "clean", "blur", "own_beats_other")},
                     indent=1))
    print(f"saved to {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

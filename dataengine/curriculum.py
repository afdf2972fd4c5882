"""The six-stage training curriculum and the sampler every training loop draws from.

The report trains in six stages whose resolution grows from 256 to 2048 px while the
share of editing data grows from 1 in 10 to 3 in 10. `stages(scale)` gives that schedule
divided by `scale` (the embedded default trains at 1/8: 32 to 256 px), and
`CurriculumSampler` turns it into batches over the workspace's catalogued shards: each
step's stage fixes the resolution and the chance that the step is an editing batch
(source, instruction, target) instead of a generation batch (caption, image).

With `buckets`, a batch is drawn from one aspect bucket (1:1, 4:3, 3:4, 16:9, 9:16, by
each sample's catalogued width and height) and decoded to that bucket's shape at about
the stage's pixel count, so wide and tall images train whole instead of centre-cropped
to a square.

A batch depends only on (seed, step), never on what came before, so a resumed run
draws exactly the batches the uninterrupted one would have. Images are read by their
catalogued byte offsets, decoded to the stage's square size (centre crop, as the
embedding stage does) and kept in a bounded in-process cache, since a run revisits them.
"""

from __future__ import annotations

import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import fsspec
import numpy as np

from .catalog import Catalog
from .images import read_ranges, to_shape
from .workspace import Workspace

__all__ = ["Stage", "REPORT_STAGES", "ASPECTS", "stages", "bucket_of", "bucket_shape", "Batch",
           "CurriculumSampler", "NoTrainingData"]


class NoTrainingData(ValueError):
    """The workspace has no samples the sampler can train on."""


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: its square resolution, its editing share, its share of steps."""

    name: str
    resolution: int
    edit_fraction: float
    share: float


# Resolutions and the gen:edit mix (9:1 early to 7:3 late) follow the report; the shares of
# steps are ours: most optimisation happens at low resolution, where steps are cheapest.
REPORT_STAGES = (
    Stage("s1", 256, 0.10, 0.30),
    Stage("s2", 512, 0.10, 0.25),
    Stage("s3", 768, 0.15, 0.15),
    Stage("s4", 1024, 0.20, 0.12),
    Stage("s5", 1536, 0.25, 0.10),
    Stage("s6", 2048, 0.30, 0.08),
)


def stages(scale: int = 1, multiple: int = 16, max_resolution: int | None = None) -> list[Stage]:
    """The six stages with resolutions divided by `scale`, rounded to a multiple of
    `multiple` (the VAE's factor) and capped at `max_resolution`."""
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    out = []
    for s in REPORT_STAGES:
        res = max(multiple, round(s.resolution / scale / multiple) * multiple)
        if max_resolution is not None:
            res = min(res, max(multiple, max_resolution // multiple * multiple))
        out.append(Stage(s.name, res, s.edit_fraction, s.share))
    return out


# Aspect buckets, width:height. A sample goes to the nearest in log ratio; one batch holds
# one bucket, so its tensors stack.
ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16)


def bucket_of(width: int | None, height: int | None) -> int:
    """Index into ASPECTS of the bucket nearest width:height (square when unknown)."""
    if not width or not height:
        return 0
    r = np.log(width / height)
    return int(np.argmin([abs(r - np.log(a)) for a in ASPECTS]))


def bucket_shape(resolution: int, bucket: int, multiple: int = 16) -> tuple[int, int]:
    """(height, width) of `bucket` with about resolution^2 pixels, each a multiple of `multiple`."""
    a = ASPECTS[bucket]
    w = max(multiple, round(resolution * a ** 0.5 / multiple) * multiple)
    h = max(multiple, round(resolution / a ** 0.5 / multiple) * multiple)
    return h, w


@dataclass
class Batch:
    """One training batch; all generation or all editing."""

    images: "torch.Tensor"  # (B, 3, H, W) float32 in [-1, 1], the target image  # noqa: F821
    captions: list[str]  # the target's caption
    task: str  # gen | edit
    sources: "torch.Tensor | None"  # edit: (B, 3, H, W) source images  # noqa: F821
    instructions: list[str] | None  # edit: the instruction texts
    meta: list[dict]  # each sample's json (scene world: the ground truth under "scene")
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)


# ---------------------------------------------------------------------------------------
# Reading images (cached: a run revisits every sample many times)
# ---------------------------------------------------------------------------------------


class _ImageCache:
    """Decoded uint8 arrays by (shard, offset, size), least recently used out past `max_bytes`."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes, self.bytes = max_bytes, 0
        self.items: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def get(self, key: tuple) -> np.ndarray | None:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        return None

    def put(self, key: tuple, value: np.ndarray) -> None:
        self.items[key] = value
        self.bytes += value.nbytes
        while self.bytes > self.max_bytes and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.nbytes


_CACHE = _ImageCache()


@lru_cache(maxsize=256)
def _members(shard: str) -> dict[str, tuple[int, int]]:
    """name -> (data offset, size) of every file in a tar, from its headers alone."""
    with fsspec.open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}


def _read(shard: str, ranges: list[tuple[int, int]], shape: tuple[int, int]) -> list[np.ndarray]:
    """Decode the images at `ranges` of one shard to (height, width, 3) uint8, through the cache."""
    h, w = shape
    out: list[np.ndarray | None] = [_CACHE.get((shard, o, n, h, w)) for o, n in ranges]
    missing = [i for i, a in enumerate(out) if a is None]
    if missing:
        for i, data in zip(missing, read_ranges(shard, [ranges[i] for i in missing])):
            out[i] = to_shape(data, w, h)
            _CACHE.put((shard, *ranges[i], h, w), out[i])
    return out  # type: ignore[return-value]


def _to_tensor(arrays: Sequence[np.ndarray]):
    import torch

    x = torch.from_numpy(np.stack(arrays))  # (B, H, W, 3) uint8
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (B, 3, H, W) in [-1, 1]


# ---------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------


class CurriculumSampler:
    """Batches over a workspace's catalogued samples, following the curriculum.

    `resolution` fixes one size for every stage (a run that should not grow); otherwise
    the stages' own resolutions apply, capped at `max_resolution`. With `buckets`, each
    batch comes from one aspect bucket at about the stage's pixel count (shapes are
    multiples of `multiple`); without, every batch is square. Editing batches need
    editing samples: where the splits hold none, every batch is a generation batch."""

    COLUMNS = ("key", "split", "shard", "image_offset", "image_size", "caption", "task", "instruction",
               "source_image_field", "source", "meta", "width", "height")

    def __init__(self, workspace_root: str | Path, batch_size: int, total_steps: int,
                 stage_list: Sequence[Stage] | None = None, seed: int = 0,
                 splits: Sequence[str] = ("train", "patches"), resolution: int | None = None,
                 scale: int = 8, max_resolution: int | None = None, buckets: bool = False, multiple: int = 16):
        if batch_size < 1 or total_steps < 1:
            raise ValueError(f"batch_size and total_steps must be >= 1, got {batch_size}, {total_steps}")
        self.ws = Workspace.at(workspace_root)
        if not self.ws.exists():
            raise FileNotFoundError(f"no workspace at {self.ws.root}")
        self.batch_size, self.total_steps, self.seed = batch_size, total_steps, seed
        self.stages = list(stage_list) if stage_list is not None else stages(scale, multiple, max_resolution)
        if resolution is not None:
            self.stages = [Stage(s.name, resolution, s.edit_fraction, s.share) for s in self.stages]
        shares = np.array([s.share for s in self.stages], dtype=float)
        self._bounds = np.cumsum(shares / shares.sum()) * total_steps  # a stage ends at its bound
        self.catalog = Catalog(self.ws)
        self.splits = tuple(splits)
        self.rows = self._rows(self.splits)
        self.gen = [i for i, r in enumerate(self.rows) if r["task"] != "edit"]
        self.edit = [i for i, r in enumerate(self.rows) if r["task"] == "edit" and r["source_image_field"]]
        self.buckets, self.multiple = buckets, multiple
        self.bucket = [bucket_of(r["width"], r["height"]) if buckets else 0 for r in self.rows]
        self._bucket_pools: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
        if not self.gen and not self.edit:
            raise NoTrainingData(f"{self.ws.root}: no samples in splits {list(self.splits)}; "
                                 "ingest shards first (`dataengine ingest`)")

    def _rows(self, splits: Sequence[str]) -> list[dict]:
        marks = ", ".join("?" for _ in splits)
        return self.catalog.query(
            f"SELECT {', '.join(self.COLUMNS)} FROM samples WHERE split IN ({marks}) ORDER BY key",
            list(splits)).to_pylist()

    def stage_at(self, step: int) -> Stage:
        """The stage that `step` (0-based) falls in."""
        i = int(np.searchsorted(self._bounds, step, side="right"))
        return self.stages[min(i, len(self.stages) - 1)]

    def task_at(self, step: int) -> str:
        """gen or edit for `step`: an edit with the stage's edit_fraction, when edits exist."""
        if not self.edit:
            return "gen"
        if not self.gen:
            return "edit"
        u = np.random.default_rng([self.seed, step, 1]).random()
        return "edit" if u < self.stage_at(step).edit_fraction else "gen"

    def batch(self, step: int, task: str | None = None) -> Batch:
        """The batch of `step`: deterministic in (seed, step)."""
        task = task or self.task_at(step)
        pool = self.edit if task == "edit" else self.gen
        if not pool:
            raise NoTrainingData(f"{self.ws.root}: no {task} samples in splits {list(self.splits)}")
        rng = np.random.default_rng([self.seed, step, 2])
        res = self.stage_at(step).resolution
        if self.buckets:  # a bucket with the odds of its size: the bucket of one sample drawn at random
            b = self.bucket[pool[int(rng.integers(len(pool)))]]
            pool = self._in_bucket(pool, b)
            shape = bucket_shape(res, b, self.multiple)
        else:
            shape = (res, res)
        idx = rng.choice(len(pool), size=self.batch_size, replace=len(pool) < self.batch_size)
        return self._load([self.rows[pool[i]] for i in idx], task, shape)

    def _in_bucket(self, pool: list[int], b: int) -> list[int]:
        """The rows of `pool` in bucket `b`, filtered once per pool (not on every step); a
        pool replaced by another list (a job holding rows out) is filtered again."""
        found = self._bucket_pools.get((id(pool), b))
        if found is None or found[0] is not pool:
            found = self._bucket_pools[(id(pool), b)] = (pool, [i for i in pool if self.bucket[i] == b])
        return found[1]

    def images(self, n: int, split: str = "eval", resolution: int = 64, task: str = "gen",
               source: str | None = None) -> Batch:
        """A fixed held-out set: the first `n` `task` samples of `split` by key (optionally of
        one `source`, e.g. sceneworld; "!sceneworld" means any other)."""
        rows = [r for r in self._rows([split]) if (r["task"] == "edit") == (task == "edit")
                and (task != "edit" or r["source_image_field"])]
        if source is not None:
            rows = ([r for r in rows if r["source"] != source[1:]] if source.startswith("!")
                    else [r for r in rows if r["source"] == source])
        if not rows:
            raise NoTrainingData(f"{self.ws.root}: no {task} samples in split {split!r}"
                                 + (f" from {source}" if source else ""))
        return self._load(rows[:n], task, (resolution, resolution))

    def _load(self, rows: list[dict], task: str, shape: tuple[int, int]) -> Batch:
        import json

        targets = self._decode([(r["shard"], r["image_offset"], r["image_size"]) for r in rows], shape)
        sources = instructions = None
        if task == "edit":
            ranges = []
            for r in rows:
                name = f"{r['key']}.{r['source_image_field']}"
                found = _members(r["shard"]).get(name)
                if found is None:
                    raise FileNotFoundError(f"{r['shard']}: edit sample {r['key']} has no member {name}")
                ranges.append((r["shard"], *found))
            sources = _to_tensor(self._decode(ranges, shape))
            instructions = [r["instruction"] or "" for r in rows]
        return Batch(images=_to_tensor(targets), captions=[r["caption"] or "" for r in rows], task=task,
                     sources=sources, instructions=instructions,
                     meta=[json.loads(r["meta"]) if r["meta"] else {} for r in rows], keys=[r["key"] for r in rows])

    @staticmethod
    def _decode(ranges: list[tuple[str, int, int]], shape: tuple[int, int]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(ranges)
        by_shard: dict[str, list[int]] = {}
        for i, (shard, _, _) in enumerate(ranges):
            by_shard.setdefault(shard, []).append(i)
        for shard, idx in by_shard.items():
            for i, arr in zip(idx, _read(shard, [ranges[i][1:] for i in idx], shape)):
                out[i] = arr
        return out  # type: ignore[return-value]

    def describe(self) -> list[dict]:
        """The schedule as rows: stage, resolution, edit share, first and last step."""
        starts = np.concatenate([[0], np.ceil(self._bounds[:-1])]).astype(int)
        ends = np.ceil(self._bounds).astype(int) - 1
        return [{"stage": s.name, "resolution": s.resolution, "edit_fraction": s.edit_fraction,
                 "first_step": int(a), "last_step": int(b)} for s, a, b in zip(self.stages, starts, ends) if b >= a]


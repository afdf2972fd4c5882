"""Scene world: configuration, per-sample generation and writing WebDataset shards.

Sample `i` of a split is a pure function of (config, split, i): its random generators
are seeded from those three alone, so samples can be made in any order, in parallel, or
resumed from the middle, and always come out byte-identical.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..shards import write_shard, write_shards
from .captions import caption_for, instruction_for
from .render import encode_image, render
from .scene import COLOURS, SHAPES, Concept, concept_present, sample_edit, sample_scene

SOURCE = "sceneworld"


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneWorldConfig:
    """What to generate. Defaults make a small world quickly (mostly 128-256 px images)."""

    seed: int = 0
    n_train: int = 600
    n_pool: int = 200
    n_eval: int = 100
    resolutions: tuple[int, ...] = (64, 128, 256, 512, 1024)
    resolution_weights: tuple[float, ...] = (0.05, 0.40, 0.40, 0.12, 0.03)
    resolution: int | None = None  # one fixed size for every image (benchmarks use 256)
    # (colour, shape) concepts that never appear in train, as object or in an edit.
    holdout: tuple[tuple[str, str], ...] = (("purple", "triangle"),)
    holdout_pool_fraction: float = 0.15  # share of pool samples that show a held-out concept
    holdout_eval_fraction: float = 0.25  # the same for eval
    edit_fraction: float = 0.1
    jpeg_fraction: float = 0.2  # share of generation samples stored as JPEG, not PNG
    short_caption_fraction: float = 0.2  # the rest get rich captions
    samples_per_shard: int = 100

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if len(self.resolutions) != len(self.resolution_weights):
            raise ValueError("resolutions and resolution_weights differ in length")
        for colour, shape in self.holdout:
            if colour not in COLOURS or shape not in SHAPES:
                raise ValueError(f"holdout concept {(colour, shape)} is not in the vocabulary")
        for name in ("holdout_pool_fraction", "holdout_eval_fraction", "edit_fraction",
                     "jpeg_fraction", "short_caption_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.resolution is not None and self.resolution < 32:
            raise ValueError(f"resolution must be >= 32, got {self.resolution}")

    def size(self, split: str) -> int:
        """Number of samples in `split` (train, pool, eval)."""
        sizes = {"train": self.n_train, "pool": self.n_pool, "eval": self.n_eval}
        if split not in sizes:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(sizes)}")
        return sizes[split]

    def holdout_fraction(self, split: str) -> float:
        """Share of `split` that must show a held-out concept; 0 for train."""
        return {"pool": self.holdout_pool_fraction, "eval": self.holdout_eval_fraction}.get(split, 0.0)


# ---------------------------------------------------------------------------------------
# One sample
# ---------------------------------------------------------------------------------------


def sample_seed(seed: int, split: str, index: int) -> int:
    """The seed of sample `index` of `split`: independent of every other sample's."""
    state = np.random.SeedSequence([seed, zlib.crc32(split.encode()), index]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])  # < 2**63: fits a JSON/int64 reader


def scene_rngs(seed: int, split: str, index: int) -> tuple[random.Random, random.Random]:
    """The (scene, words) generators that sample `index` of `split` draws from, for text-only
    uses (captions, prompts) that need no rendering."""
    s = sample_seed(seed, split, index)
    return random.Random(4 * s + 1), random.Random(4 * s + 2)


def _weyl(index: int, step: float, offset: float) -> float:
    return (offset + index * step) % 1.0


def _split_offset(seed: int, split: str, what: str) -> float:
    return random.Random(f"sceneworld/{seed}/{split}/{what}").random()


def make_sample(split: str, index: int, cfg: SceneWorldConfig) -> dict[str, Any]:
    """Sample `index` of `split` as a webdataset dict (`__key__`, `png`|`jpg`, `txt`, `json`,
    and `src.png` for edits)."""
    if "." in split or "/" in split:
        raise ValueError(f"split name {split!r} would break webdataset keys")
    s = sample_seed(cfg.seed, split, index)
    # Separate streams: the per-sample decisions, the scene, and the words; all fixed-order
    # draws so changing e.g. jpeg_fraction does not reshuffle the scenes.
    decide = random.Random(4 * s)
    scene_rng = random.Random(4 * s + 1)
    words = random.Random(4 * s + 2)
    # Edits and held-out concepts follow low-discrepancy (Weyl) sequences over the index
    # rather than coin flips, so every prefix of a split has close to the configured shares
    # (a 200-sample pool with 0.15 holds 30 held-out samples, not "somewhere near 30").
    u_edit = _weyl(index, 0.6180339887498949, _split_offset(cfg.seed, split, "edit"))
    u_hold = _weyl(index, 0.4142135623730951, _split_offset(cfg.seed, split, "holdout"))
    u_fmt, u_detail = decide.random(), decide.random()
    concept: Concept | None = decide.choice(cfg.holdout) if cfg.holdout else None
    size = cfg.resolution or decide.choices(cfg.resolutions, weights=cfg.resolution_weights)[0]

    required = concept if concept is not None and u_hold < cfg.holdout_fraction(split) else None
    forbid = {tuple(c) for c in cfg.holdout} - ({required} if required else set())
    is_edit = u_edit < cfg.edit_fraction
    detail = "short" if u_detail < cfg.short_caption_fraction else "rich"

    meta: dict[str, Any] = {"width": size, "height": size, "source": SOURCE, "split": split,
                            "index": index, "seed": s, "caption_detail": detail}
    sample: dict[str, Any] = {"__key__": f"{split}-{index:07d}"}
    if is_edit:
        source, edit, target = sample_edit(scene_rng, size, size, forbid=forbid, require=required)
        sample["png"] = encode_image(render(target), "png")
        sample["src.png"] = encode_image(render(source), "png")
        meta |= {"task": "edit", "instruction": instruction_for(edit, source, target, words),
                 "edit": {"op": edit.op, "group": edit.group, "value": edit.value},
                 "scene": target.to_json(), "source_scene": source.to_json()}
    else:
        target = sample_scene(scene_rng, size, size, forbid=forbid, require=required)
        fmt = "jpg" if u_fmt < cfg.jpeg_fraction else "png"
        sample[fmt] = encode_image(render(target), fmt)
        meta |= {"task": "gen", "scene": target.to_json()}
    sample["txt"] = caption_for(target, words, detail=detail)
    sample["json"] = meta
    return sample


def generate(split: str, cfg: SceneWorldConfig, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield samples `start`..`stop` (default: all) of `split` as webdataset dicts."""
    n = cfg.size(split)
    for i in range(start, n if stop is None else min(stop, n)):
        yield make_sample(split, i, cfg)


# ---------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------


def write_scene_shard(shards_root: str | Path, split: str, shard: int, cfg: SceneWorldConfig) -> str:
    """Write shard number `shard` of `split` on its own (samples are seeded by index, so any
    shard can be made anywhere, in any order); returns its path."""
    start = shard * cfg.samples_per_shard
    path = Path(shards_root) / split / f"{SOURCE}-{split}-{shard:06d}.tar"
    return write_shard(generate(split, cfg, start, start + cfg.samples_per_shard), path)


def _write_on_ray(root: Path, splits: list[str], cfg: SceneWorldConfig, advance) -> dict[str, list[str]]:
    """One Ray task per shard; the same files as the sequential path, written in parallel."""
    import ray

    remote = ray.remote(num_cpus=1)(write_scene_shard)
    pending = {}
    for sp in splits:
        for k in range(-(-cfg.size(sp) // cfg.samples_per_shard)):
            pending[remote.remote(root, sp, k, cfg)] = (sp, k)
    out: dict[str, list[str]] = {sp: [] for sp in splits}
    waiting = list(pending)
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        sp, k = pending[done[0]]
        out[sp].append(ray.get(done[0]))
        advance(sp, min(cfg.samples_per_shard, cfg.size(sp) - k * cfg.samples_per_shard))
    return {sp: sorted(paths) for sp, paths in out.items()}


def write_scene_world(
    shards_root: str | Path, cfg: SceneWorldConfig,
    splits: Iterable[str] = ("train", "pool", "eval"), progress: bool = True,
    use_ray: bool = False,
) -> dict[str, list[str]]:
    """Write `shards_root/<split>/sceneworld-<split>-000000.tar`, ...; returns the paths per split.

    Earlier scene-world shards of those splits are removed first, so a smaller rerun does
    not leave stale shards behind; other files in the folders are left alone. With
    `use_ray`, each shard is a Ray task (on the Ray this process already joined).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    root = Path(shards_root)
    splits = list(splits)
    out: dict[str, list[str]] = {}
    columns = (TextColumn("scene world {task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        tasks = {sp: bar.add_task(sp, total=cfg.size(sp)) for sp in splits}
        for sp in splits:
            for old in (root / sp).glob(f"{SOURCE}-{sp}-*.tar"):
                old.unlink()
        if use_ray:
            return _write_on_ray(root, splits, cfg, lambda sp, n: bar.advance(tasks[sp], n))
        for sp in splits:
            prefix = f"{SOURCE}-{sp}"

            def counted(samples: Iterator[dict[str, Any]], task=tasks[sp]) -> Iterator[dict[str, Any]]:
                for smp in samples:
                    yield smp
                    bar.advance(task)

            out[sp] = write_shards(counted(generate(sp, cfg)), root / sp, prefix=prefix,
                                   maxcount=cfg.samples_per_shard)
    return out


__all__ = ["SOURCE", "SceneWorldConfig", "concept_present", "generate", "make_sample",
           "sample_seed", "write_scene_shard", "write_scene_world"]

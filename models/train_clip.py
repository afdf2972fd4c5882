"""Train the embedded default CLIP once per workspace, and measure it.

    python -m models.train_clip --workspace ws            # trains v0001, or reuses it

No CLIP-family weights install offline, so the default (`models/clip.py`, arch
`dataengine-clip-lite0`) is built from the two pretrained models that do: an ImageNet
EfficientNet-Lite0 image trunk and the all-MiniLM-L6-v2 text trunk. Both trunks stay
frozen; only the projections into the shared space train, so each image and caption
goes through its trunk once (features cached in memory) and training takes seconds.
The run is a `ClipJob` of models/trainer.py, the stack's one loop: a checkpoint halfway
and before evaluation, exact resume of a crashed run, the version saved and registered
like every other model's.

The image projection starts as the composite that ../shared/OFFLINE.md describes, written
into open_clip's own MLP head: its first layer holds the ImageNet classifier (a GELU over
class logits keeps the classes the image shows), its second the MiniLM embeddings of the
1,000 class names; the text projection starts as the identity on MiniLM's space. So
before any step the model matches text to images much as the composite does (a little
worse: GELU is not softmax); then CLIP's contrastive loss adapts both projections, and
the spare hidden units and output dims, to the train split's captions (the scene world
plus real captioned photographs; never the pool, whose captions name what train lacks
and would flatter gap search), with dropout on the cached features. Each caption that
states a colour, count or position also brings an attribute-swap negative
(dataengine/negatives.py) that its image must score below its own caption, as NegCLIP
does, so that attributes bind to their objects.
Tried and dropped (chosen on a validation slice of the Tux Paint training captions,
not on the held-out sets): a random start of the same heads (Tux Paint recall@1 about
half), an L2 anchor toward the start (no gain at any strength), weight decay, 224 or
128 px, 768-d, class-name templates ("A {}."), shifted or sharper class gates.

Held out, never trained on: the scene world's `eval` split, and a fixed fraction of the
Tux Paint photographs chosen by a hash of the caption (all images sharing a caption fall
on one side; Tux Paint repeats captions, e.g. "The letter M." four times). Text->image
recall@1/5/10 is measured on both for the trained model, the composite baseline (at
224 px, as measured in OFFLINE.md) and chance, and swap accuracy: the share of held-out
images scored closer to their own caption than to it with one attribute changed.
"""

from __future__ import annotations

if __name__ == "__main__":  # the CLI edge: offline defaults before transformers is imported
    from dataengine.runtime import apply_offline_defaults

    apply_offline_defaults()

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .clip import DEFAULT_ARCH, MODEL_NAME, _write, build_default, default_config, lite0_classifier, versions
from .trainer import LoopConfig, TrainJob, _register, train

__all__ = ["ClipTrainConfig", "ClipJob", "train_default_clip", "evaluate_config", "recall_at", "main"]


@dataclass
class ClipTrainConfig:
    """The knobs of the default CLIP's one training run."""

    image_size: int = 160  # px fed to the image trunk (see models/clip.py for the speed trade)
    embed_dim: int = 512  # >= 500 for the composite start: the MLP's hidden layer (2x) holds 1,000 classes
    init: str = "composite"  # composite | random: how the projections start
    steps: int = 200  # optimiser steps over the cached features (~30 epochs of ~1,300 pairs)
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    anchor: float = 0.0  # L2 pull of the projections toward their start (composite init only)
    feature_dropout: float = 0.2  # dropout on the cached trunk features while training
    class_temperature: float = 1.0  # composite start: GELU((logit - class_shift) / T)
    class_shift: float = 0.0
    name_template: str = "{}"  # how ImageNet class names are phrased for MiniLM in the composite start
    seed: int = 0
    holdout_fraction: float = 1 / 3  # of each holdout source's captions
    holdout_sources: tuple[str, ...] = ("tuxpaint",)
    eval_source: str = "sceneworld"  # ... whose `eval` split is the other held-out set
    # Train only: the pool is the corpus gap search compares train with, and its captions
    # name the very concepts train lacks (training on them flattered the gap figures).
    train_splits: tuple[str, ...] = ("train",)
    hard_negatives: bool = True  # attribute-swap negative captions (dataengine/negatives.py) in the loss
    baseline_image_size: int = 224  # the composite baseline's own input size
    baseline: bool = True  # measure the composite baseline's held-out recall (~20% of the run on 2 cores)
    store_vectors: bool = True  # write every featurised sample's vectors to the lake (embed skips them)
    feature_batch_size: int = 32  # images/s within noise of 64 (benchmarks/trunk_layout.py), half the memory
    num_threads: int | None = None  # torch CPU threads during the run; None leaves it as is

    def __post_init__(self) -> None:
        if self.init not in ("composite", "random"):
            raise ValueError(f"init must be 'composite' or 'random', got {self.init!r}")
        if self.init == "composite" and self.embed_dim < 500:
            raise ValueError(f"the composite start needs embed_dim >= 500 (its hidden layer, 2 x embed_dim, "
                             f"holds the 1,000 ImageNet classes), got {self.embed_dim}")
        for name in ("steps", "batch_size", "feature_batch_size", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size < 32 or self.baseline_image_size < 32:
            raise ValueError(f"image sizes must be >= 32, got {self.image_size}, {self.baseline_image_size}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.lr <= 0 or self.weight_decay < 0 or self.anchor < 0 or self.class_temperature <= 0:
            raise ValueError("lr and class_temperature must be > 0; weight_decay and anchor >= 0")
        if not 0.0 <= self.feature_dropout < 1.0:
            raise ValueError(f"feature_dropout must be in [0, 1), got {self.feature_dropout}")
        if "{}" not in self.name_template:
            raise ValueError(f"name_template must contain '{{}}', got {self.name_template!r}")
        self.holdout_sources = tuple(self.holdout_sources)
        self.train_splits = tuple(self.train_splits)
        if self.eval_source in self.holdout_sources:
            raise ValueError(f"eval_source {self.eval_source!r} is held out by its eval split; "
                             f"it cannot also be a holdout source {self.holdout_sources}")

    def model_config(self) -> dict:
        """The open_clip config of the model this run trains."""
        return default_config(image_size=self.image_size, embed_dim=self.embed_dim,
                              image_proj="mlp" if self.init == "composite" else "linear", text_proj="linear")


# ---------------------------------------------------------------------------------------
# Data: which samples train, which are held out
# ---------------------------------------------------------------------------------------

SAMPLES_SQL = ("SELECT key, split, shard, image_offset, image_size, caption, source "
               "FROM samples WHERE task = 'gen' ORDER BY key")


def caption_group(caption: str) -> str:
    """What decides a real image's side of the split: its caption, case-folded (MiniLM is
    uncased), so two images of "The letter M." never straddle train and held-out."""
    return " ".join(caption.lower().split())


def is_held_out(caption: str, fraction: float) -> bool:
    """A stable, seed-free draw: the same caption is held out in every workspace and run."""
    h = int.from_bytes(hashlib.sha256(caption_group(caption).encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def split_rows(rows: Sequence[dict], cfg: ClipTrainConfig) -> dict[str, list[dict]]:
    """{'train': ..., 'heldout_<eval_source>': its eval split, 'heldout_<source>': the held-out
    fraction of each holdout source}; rows with an empty caption are left out."""
    out: dict[str, list[dict]] = {"train": []}
    out[f"heldout_{cfg.eval_source}"] = []
    for s in cfg.holdout_sources:
        out[f"heldout_{s}"] = []
    for r in rows:
        if not (r.get("caption") or "").strip():
            continue
        if r["source"] == cfg.eval_source and r["split"] == "eval":
            out[f"heldout_{cfg.eval_source}"].append(r)
        elif r["source"] in cfg.holdout_sources and is_held_out(r["caption"], cfg.holdout_fraction):
            out[f"heldout_{r['source']}"].append(r)
        elif r["split"] in cfg.train_splits:
            out["train"].append(r)
    return out


# ---------------------------------------------------------------------------------------
# Frozen trunk features (computed once per image / caption)
# ---------------------------------------------------------------------------------------


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("clip {task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not enabled)


@torch.inference_mode()
def image_features(trunk: torch.nn.Module, rows: Sequence[dict], size: int, batch_size: int = 64,
                   bar=None, label: str = "images") -> tuple[torch.Tensor, list[bool], list[str]]:
    """Pooled trunk features (N, C) of each row's image at `size` px (rows whose image
    cannot be read get zeros and ok=False), and the read errors."""
    from dataengine.images import iter_images

    from .clip import LITE0_MEAN, LITE0_STD

    mean = torch.tensor(LITE0_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(LITE0_STD).view(1, 3, 1, 1)
    index = {r["key"]: i for i, r in enumerate(rows)}
    feats: torch.Tensor | None = None
    ok = [False] * len(rows)
    errors: list[str] = []
    task = bar.add_task(f"{label} {size}px", total=len(rows)) if bar is not None else None
    pending: list[tuple[int, np.ndarray]] = []

    def flush():
        nonlocal feats
        if not pending:
            return
        x = torch.from_numpy(np.stack([a for _, a in pending])).permute(0, 3, 1, 2).float()  # (B, 3, S, S)
        f = trunk((x / 255 - mean) / std)  # (B, C)
        if feats is None:
            feats = torch.zeros(len(rows), f.shape[1])
        for (i, _), v in zip(pending, f):
            feats[i], ok[i] = v, True
        if task is not None:
            bar.update(task, advance=len(pending))
        pending.clear()

    for key, arr, err in iter_images(rows, size):
        if arr is None:
            errors.append(f"{key}: {err}")
            if task is not None:
                bar.update(task, advance=1)
            continue
        pending.append((index[key], arr))
        if len(pending) >= batch_size:
            flush()
    flush()
    if feats is None:
        feats = torch.zeros(len(rows), trunk.num_features)
    return feats, ok, errors


@torch.inference_mode()
def text_features(text_tower: torch.nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 128,
                  bar=None, label: str = "captions") -> torch.Tensor:
    """Pooled (pre-projection) features (N, W) of an HF text tower: exactly what its
    projection sees inside encode_text."""
    from .clip import trim_padding

    tokens = tokenizer(list(texts))  # (N, context_length)
    pad = text_tower.config.pad_token_id
    order = torch.argsort((tokens != pad).sum(1), stable=True)
    out = torch.zeros(len(texts), text_tower.config.hidden_size)
    task = bar.add_task(label, total=len(texts)) if bar is not None else None
    for i in range(0, len(texts), batch_size):
        idx = order[i: i + batch_size]
        x = trim_padding(tokens[idx], pad)  # (B, L)
        mask = (x != pad).long()
        out[idx] = text_tower.pooler(text_tower.transformer(input_ids=x, attention_mask=mask), mask)
        if task is not None:
            bar.update(task, advance=len(idx))
    return out


# ---------------------------------------------------------------------------------------
# The composite: the baseline, and the start of the projections
# ---------------------------------------------------------------------------------------


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet-1k class names in class order (open_clip ships them)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def composite_image_vectors(pooled: torch.Tensor, name_vecs: torch.Tensor) -> torch.Tensor:
    """The composite baseline's image vectors: ImageNet class probabilities of the pooled
    Lite0 features times the (normalised) class-name vectors, normalised."""
    weight, bias = lite0_classifier()
    probs = (pooled @ weight.T + bias).softmax(-1)  # (N, 1000)
    return F.normalize(probs @ F.normalize(name_vecs, dim=-1), dim=-1)  # (N, 384)


@torch.no_grad()
def init_composite(model: torch.nn.Module, name_vecs: torch.Tensor, shift: float = 0.0,
                   temperature: float = 1.0, seed: int = 0) -> None:
    """Write the composite into the model's projections (image: open_clip's MLP head,
    text: linear). Image: hidden unit c < 1000 is GELU((logit_c - shift) / T), so only
    the classes the image shows pass; the output's first 384 dims sum those classes'
    name vectors. Text: the first 384 dims are MiniLM's own. The other hidden units keep
    their random start and the other output dims start near zero, free to learn what
    class names do not say (positions, counts, styles)."""
    mlp, proj = model.visual.head.mlp, model.text.proj
    weight, bias = lite0_classifier()
    n_cls, width = weight.shape[0], name_vecs.shape[1]
    hidden, out = mlp.fc1.out_features, mlp.fc2.out_features
    if not isinstance(proj, torch.nn.Linear) or hidden < n_cls or out < width or mlp.fc1.in_features != weight.shape[1]:
        raise ValueError(f"the composite start needs an MLP image head with >= {n_cls} hidden units, an output "
                         f"of >= {width} dims and a linear text projection; got hidden {hidden}, out {out}")
    g = torch.Generator().manual_seed(seed)
    mlp.fc1.weight[:n_cls] = weight / temperature
    mlp.fc1.bias[:n_cls] = (bias - shift) / temperature
    mlp.fc2.weight.normal_(0, 1e-3, generator=g)
    mlp.fc2.weight[:width, :n_cls] = F.normalize(name_vecs, dim=-1).T
    mlp.fc2.weight[:width, n_cls:] = 0
    proj.weight.normal_(0, 1e-3, generator=g)
    proj.weight[:width] = torch.eye(width)


# ---------------------------------------------------------------------------------------
# Measures
# ---------------------------------------------------------------------------------------

KS = (1, 5, 10)


def recall_at(text_vecs: torch.Tensor, image_vecs: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """Text->image recall@k: caption i's own image i ranks in the top k of all candidates
    (ties count against it)."""
    sims = text_vecs @ image_vecs.T  # (N, N)
    rank = (sims > sims.diag()[:, None]).sum(1)  # images strictly better than the right one
    return {f"r@{k}": round(float((rank < k).float().mean()), 4) for k in ks}


def chance_at(n: int, ks: Sequence[int] = KS) -> dict[str, float]:
    return {f"r@{k}": round(min(k, n) / n, 4) if n else 0.0 for k in ks}


# ---------------------------------------------------------------------------------------
# Training the projections on cached features
# ---------------------------------------------------------------------------------------


def _project(model: torch.nn.Module, image_pooled: torch.Tensor, text_pooled: torch.Tensor):
    """Exactly encode_image / encode_text after the trunks: head, projection, L2 norm."""
    return F.normalize(model.visual.head(image_pooled), dim=-1), F.normalize(model.text.proj(text_pooled), dim=-1)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                     negatives: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE; `negatives` (extra caption vectors, one per pair at most)
    join the texts each image must not pick, as NegCLIP does. Without them this is
    exactly open_clip's ClipLoss on one process."""
    labels = torch.arange(len(img))
    texts = txt if negatives is None or not len(negatives) else torch.cat([txt, negatives])
    return (F.cross_entropy(scale * img @ texts.T, labels) + F.cross_entropy(scale * txt @ img.T, labels)) / 2


def _negative_features(model: torch.nn.Module, tokenizer, captions: Sequence[str], seed: int,
                       bar=None) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Pooled text features of each caption's attribute-swap negative (zeros where it has
    none), which captions have one, and how many of each kind were made."""
    import random

    from dataengine.negatives import AttributeWords, attribute_negative

    rng = random.Random(seed)
    words = AttributeWords.from_captions(captions)
    made = [attribute_negative(c, words, rng) for c in captions]
    has = torch.tensor([m is not None for m in made], dtype=torch.bool)
    kinds: dict[str, int] = {}
    for m in made:
        if m is not None:
            kinds[m[1]] = kinds.get(m[1], 0) + 1
    feats = torch.zeros(len(captions), model.text.config.hidden_size)
    if has.any():
        feats[has] = text_features(model.text, tokenizer, [m[0] for m in made if m is not None], bar=bar,
                                   label="negative captions")
    return feats, has, dict(sorted(kinds.items()))


class ClipJob(TrainJob):
    """The default CLIP's projections as a `models.trainer` job, so CLIP trains in the
    stack's one loop (checkpoints, exact resume, versions). `setup` runs the frozen trunks
    once over every sample and caches their pooled features; a step is one contrastive
    step of the image head, text projection and logit scale on a batch of them."""

    name = MODEL_NAME

    def __init__(self, catalog, cfg: ClipTrainConfig, progress: bool = False):
        self.catalog, self.cfg, self.progress = catalog, cfg, progress

    def setup(self) -> None:
        import open_clip

        from .clip import _arch_for, _quiet

        cfg = self.cfg
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        parts = split_rows(self.catalog.query(SAMPLES_SQL).to_pylist(), cfg)
        if len(parts["train"]) < 2:
            raise ValueError(f"too few training samples ({len(parts['train'])}): ingest the scene world "
                             f"and real images first (dataengine sceneworld / import-real / ingest)")
        self.held = {name[len("heldout_"):]: rows for name, rows in parts.items() if name != "train"}
        self.rows = [r for rows in parts.values() for r in rows]
        self.model = model = build_default(cfg.model_config())
        with _quiet():
            tokenizer = open_clip.get_tokenizer(_arch_for(cfg.model_config()))
        with _progress(self.progress) as bar:
            t = time.perf_counter()
            self.captions = text_features(model.text, tokenizer, [r["caption"] for r in self.rows], bar=bar)
            names = imagenet_class_names()
            self.plain_names = text_features(model.text, tokenizer, names, bar=bar, label="class names")
            start_names = (self.plain_names if cfg.name_template == "{}" else
                           text_features(model.text, tokenizer, [cfg.name_template.format(n) for n in names]))
            self.seconds["text_features"] = time.perf_counter() - t
            t = time.perf_counter()
            self.pooled, ok, self.errors = image_features(model.visual.trunk, self.rows, cfg.image_size,
                                                          cfg.feature_batch_size, bar=bar)
            self.seconds["image_features"] = time.perf_counter() - t
            self.offsets, at = {}, 0
            for name, rows in parts.items():
                self.offsets[name], at = (at, at + len(rows)), at + len(rows)
            self.ok = torch.tensor(ok)
            if cfg.init == "composite":
                init_composite(model, start_names, shift=cfg.class_shift, temperature=cfg.class_temperature,
                               seed=cfg.seed)
            self.train_idx = self._sel("train")
            # Attribute binding on held-out pairs: the image's own caption against the same
            # caption with one attribute changed (the negatives' recipe, a seed of its own).
            self.held_negs = {}
            for s in self.held:
                idx = self._sel(f"heldout_{s}")
                if len(idx) >= 2:
                    self.held_negs[s] = _negative_features(model, tokenizer, [self.rows[i]["caption"] for i in idx],
                                                           cfg.seed + 1)[:2]
            self.start = self._measure()
            self.negs, self.has_neg, self.neg_kinds = None, None, {}
            if cfg.hard_negatives:
                self.negs, self.has_neg, self.neg_kinds = _negative_features(
                    model, tokenizer, [self.rows[i]["caption"] for i in self.train_idx], cfg.seed, bar)

        self.params = [*model.visual.head.parameters(), *model.text.proj.parameters()]
        self.anchors = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.AdamW([{"params": self.params, "weight_decay": cfg.weight_decay},
                                      {"params": [model.logit_scale], "weight_decay": 0.0}], lr=cfg.lr)
        self.scale = torch.nn.Module()
        self.scale.logit_scale = model.logit_scale  # the same Parameter: the checkpoint carries it
        # Epochs of shuffled pairs end to end; a step's batch depends only on (seed, step).
        n, self.batch = len(self.train_idx), min(cfg.batch_size, len(self.train_idx))
        rng = torch.Generator().manual_seed(cfg.seed)
        perms = [torch.randperm(n, generator=rng) for _ in range(math.ceil(self.loop.steps * self.batch / n))]
        self.order = torch.cat(perms)
        model.visual.head.train(), model.text.proj.train()

    def _sel(self, name: str) -> torch.Tensor:
        """Indices of a part's readable rows."""
        lo, hi = self.offsets[name]
        return torch.arange(lo, hi)[self.ok[lo:hi]]

    @torch.no_grad()
    def _measure(self) -> dict[str, dict[str, float]]:
        out = {}
        for s in self.held:
            idx = self._sel(f"heldout_{s}")
            if len(idx) < 2:  # nothing to rank
                continue
            image_vecs, text_vecs = _project(self.model, self.pooled[idx], self.captions[idx])
            out[s] = recall_at(text_vecs, image_vecs)
            negs, has = self.held_negs[s]
            if has.any():
                neg_vecs = F.normalize(self.model.text.proj(negs[has]), dim=-1)
                own = (image_vecs[has] * text_vecs[has]).sum(-1)
                swapped = (image_vecs[has] * neg_vecs).sum(-1)
                out[s] |= {"swap_acc": round(float((own > swapped).float().mean()), 4), "swap_n": int(has.sum())}
        return out

    def config(self) -> dict:
        # The samples are part of the run's identity: a checkpoint of other data never resumes.
        digest = hashlib.sha256("\n".join(f"{r['key']}\t{r['caption']}" for r in self.rows).encode()).hexdigest()
        skip = ("num_threads", "store_vectors", "feature_batch_size")
        return {k: v for k, v in asdict(self.cfg).items() if k not in skip} | {"samples": digest[:16]}

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"head": self.model.visual.head, "proj": self.model.text.proj, "scale": self.scale}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"adamw": self.opt}

    def step(self, step: int) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        pos = self.order[step * self.batch:(step + 1) * self.batch]  # positions in train_idx
        fi, ti = self.pooled[self.train_idx[pos]], self.captions[self.train_idx[pos]]
        if cfg.feature_dropout:  # the global RNG, which the checkpoint carries
            fi, ti = F.dropout(fi, cfg.feature_dropout), F.dropout(ti, cfg.feature_dropout)
        img, txt = _project(model, fi, ti)
        neg = None
        if self.negs is not None:
            take = pos[self.has_neg[pos]]  # negatives are indexed like train_idx
            if len(take):
                ni = self.negs[take]
                ni = F.dropout(ni, cfg.feature_dropout) if cfg.feature_dropout else ni
                neg = F.normalize(model.text.proj(ni), dim=-1)
        loss = contrastive_loss(img, txt, model.logit_scale.exp(), neg)
        if cfg.anchor and cfg.init == "composite":
            loss = loss + cfg.anchor * sum(((p - a) ** 2).sum() for p, a in zip(self.params, self.anchors))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip's own training loop does
        return {"loss": loss.item()}

    def evaluate(self) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        model.visual.head.eval(), model.text.proj.eval()
        trained = self._measure()
        # The composite baseline at its own input size, on the same held-out images.
        t = time.perf_counter()
        baseline, candidates = {}, {}
        with _progress(self.progress) as bar:
            for s, rows in self.held.items():
                idx = self._sel(f"heldout_{s}")
                kept = [rows[i - self.offsets[f"heldout_{s}"][0]] for i in idx.tolist()]
                candidates[s] = len(kept)
                if len(kept) < 2 or not cfg.baseline:
                    continue
                if cfg.baseline_image_size == cfg.image_size:
                    base_pooled, base_ok = self.pooled[idx], [True] * len(kept)
                else:
                    base_pooled, base_ok, _ = image_features(model.visual.trunk, kept, cfg.baseline_image_size,
                                                             cfg.feature_batch_size, bar=bar, label=f"{s} baseline")
                m = torch.tensor(base_ok)
                baseline[s] = recall_at(F.normalize(self.captions[idx][m], dim=-1),
                                        composite_image_vectors(base_pooled[m], self.plain_names))
        self.seconds["baseline"] = time.perf_counter() - t
        return {"trained": trained, "baseline": baseline, "candidates": candidates}

    def summary(self, metrics: dict[str, Any], history: list[dict[str, float]]) -> dict[str, Any]:
        ev, cfg = metrics["eval"], self.cfg
        losses = [h["loss"] for h in history]
        tail = losses[-max(1, len(losses) // 10):]
        by_source: dict[str, int] = {}
        for i in self.train_idx.tolist():
            by_source[self.rows[i]["source"]] = by_source.get(self.rows[i]["source"], 0) + 1
        seconds = self.seconds | {"train": metrics["train_seconds"]}
        return {
            "heldout": {s: {"candidates": ev["candidates"][s], "default": ev["trained"][s], "start": self.start[s],
                            "chance": chance_at(ev["candidates"][s])}
                        | ({"composite": ev["baseline"][s]} if s in ev["baseline"] else {})
                        for s in self.held if s in ev["trained"]},
            "composite_image_size": cfg.baseline_image_size,
            "image_size": cfg.image_size,
            "embed_dim": cfg.embed_dim,
            "train_pairs": len(self.train_idx),
            "hard_negatives": dict(sorted(self.neg_kinds.items())),
            "train_by_source": dict(sorted(by_source.items())),
            "unreadable_images": len(self.errors),
            "unreadable_examples": self.errors[:5],
            "steps": metrics["steps"],
            "epochs": round(metrics["steps"] * self.batch / len(self.train_idx), 2),
            "loss_first": round(losses[0], 4),
            "loss_last": round(sum(tail) / len(tail), 4),  # mean of the last 10% of steps
            "logit_scale": round(float(self.model.logit_scale.detach().exp()), 3),
            "seconds": {k: round(v, 2) for k, v in seconds.items()}
            | {"total": round(time.perf_counter() - self.started, 2)},
            "images_per_s": round(len(self.rows) / max(self.seconds["image_features"], 1e-9), 1),
            "threads": torch.get_num_threads(),
        } | {k: metrics[k] for k in ("steps_per_s", "curves", "resumed_from", "device")}

    def save(self, folder: Path) -> None:
        meta = {"arch": DEFAULT_ARCH, "trained_by": "models.train_clip", "train_config": asdict(self.cfg)}
        _write(folder, self.model.eval(), self.cfg.model_config(), meta)

    def features(self) -> dict[str, Any]:
        """What `_store_vectors` needs: every featurised row's key and pooled features."""
        return {"keys": [r["key"] for r in self.rows], "image": self.pooled, "text": self.captions, "ok": self.ok}


def clip_loop(cfg: ClipTrainConfig, progress: bool = True, resume: bool = True) -> LoopConfig:
    """The trainer's loop for a CLIP run: cfg's steps and lr, no warmup, cosine to a tenth."""
    return LoopConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=0, min_lr_ratio=0.1,
                      grad_clip=0.0,  # unused: a CLIP step does not clip
                      seed=cfg.seed, ckpt_every=max(1, cfg.steps // 2), progress=progress, resume=resume,
                      num_threads=cfg.num_threads or torch.get_num_threads(), device="cpu")


# ---------------------------------------------------------------------------------------
# The one entry: train once per workspace (or reuse), measure, save, register
# ---------------------------------------------------------------------------------------


def _latest(models_root: Path) -> Path | None:
    done = [v for v in versions(models_root) if (models_root / MODEL_NAME / v / "metrics.json").is_file()]
    return models_root / MODEL_NAME / done[-1] if done else None


def _result(path: Path, record: dict[str, Any], reused: bool) -> dict[str, Any]:
    meta = json.loads((path / "meta.json").read_text())
    metrics = json.loads(record["metrics"]) if isinstance(record["metrics"], str) else record["metrics"]
    return {**record, "metrics": metrics, "reused": reused,
            "model_id": f"{meta.get('arch', DEFAULT_ARCH)}@{meta['weights_sha256'][:12]}"}


def train_default_clip(workspace_root: str | Path, cfg: ClipTrainConfig | None = None, progress: bool = True,
                       reuse: bool = True, resume: bool = True) -> dict[str, Any]:
    """Train the default CLIP on the workspace's samples through `models.trainer` and save
    it as the next version under `<ws>/models/clip/`, registered in the catalog's
    model_versions (the first version promoted); with `reuse`, an existing version is
    returned instead; with `resume`, a crashed run of the same config and samples picks up
    from its checkpoint. Returns the version's record with its metrics (a dict),
    `model_id` and `reused`."""
    from dataengine.catalog import Catalog
    from dataengine.workspace import Workspace

    cfg = cfg or ClipTrainConfig()
    ws = Workspace.at(workspace_root)
    if not ws.exists():
        raise FileNotFoundError(f"no workspace at {ws.root}: run `dataengine init -w {ws.root}` first")
    catalog = Catalog(ws)
    if reuse:
        promoted = [r for r in catalog.query("SELECT * FROM model_versions WHERE model = ? AND status = 'promoted' "
                                             "ORDER BY version DESC", [MODEL_NAME]).to_pylist()
                    if (Path(r["path"]) / "metrics.json").is_file()]
        if promoted:
            return _result(Path(promoted[0]["path"]), promoted[0], reused=True)
    if reuse and (path := _latest(ws.models)) is not None:
        rows = catalog.query("SELECT * FROM model_versions WHERE model = ? AND version = ?",
                             [MODEL_NAME, path.name]).to_pylist()
        if rows:
            return _result(path, rows[0], reused=True)
        record = {"model": MODEL_NAME, "version": path.name, "path": str(path), "status": "promoted",
                  "metrics": json.loads((path / "metrics.json").read_text()), "job_id": None,
                  "created_at": datetime.now(timezone.utc)}
        _register(catalog, record)  # saved but never registered (e.g. a crash between the two)
        return _result(path, record, reused=True)

    job = ClipJob(catalog, cfg, progress)
    record = train(job, ws.models, clip_loop(cfg, progress, resume), catalog=catalog)
    result = _result(Path(record["path"]), record, reused=False)
    if cfg.store_vectors:
        result["stored_vectors"] = _store_vectors(ws, job.model.eval(), job.features(), result["model_id"])
    return result


def evaluate_config(workspace_root: str | Path, cfg: ClipTrainConfig, progress: bool = False) -> dict[str, Any]:
    """Train a model with `cfg` on the workspace's samples and return its metrics, keeping
    nothing (to compare recipes on the same data)."""
    import tempfile

    from dataengine.catalog import Catalog
    from dataengine.workspace import Workspace

    with tempfile.TemporaryDirectory(prefix="clip-eval-") as scratch:
        job = ClipJob(Catalog(Workspace.at(workspace_root)), cfg, progress)
        return train(job, scratch, clip_loop(cfg, progress, resume=False))["metrics"]


@torch.no_grad()
def _store_vectors(ws, model: torch.nn.Module, features: dict, model_id: str) -> dict[str, int]:
    """The lake's vectors of every sample the run featurised: the trunks' pooled features
    are already computed, and only the trained head and projection stand between them and
    what `dataengine embed` would make (same pixels, same preprocessing), so embedding
    those samples again would repeat the run's costliest part for nothing."""
    from dataengine.catalog import Catalog
    from dataengine.embed import store_vectors

    image, text = _project(model.eval(), features["image"], features["text"])
    out = {}
    for kind, vecs, ok in (("image", image, features["ok"]), ("text", text, torch.ones(len(text), dtype=torch.bool))):
        # A retrain that reproduces the same weights has the same model id: store only
        # what the lake lacks, never a second vector for a key.
        have = set(Catalog(ws).query("SELECT DISTINCT key FROM embeddings WHERE model_id = ? AND kind = ?",
                                     [model_id, kind]).column("key").to_pylist())
        take = [i for i, (k, good) in enumerate(zip(features["keys"], ok.tolist())) if good and k not in have]
        out[kind] = store_vectors(ws, [features["keys"][i] for i in take], vecs[take].numpy(), model_id, kind)
    return out


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def format_table(metrics: dict[str, Any]) -> str:
    """The held-out recall table as text: one row per (set, model)."""
    lines = [f"{'held-out set':<14}{'N':>6}  {'model':<10}{'r@1':>7}{'r@5':>7}{'r@10':>7}"]
    for s, m in metrics["heldout"].items():
        for name in ("default", "composite", "start", "chance"):
            if name not in m:  # no composite row when the run skipped the baseline
                continue
            r = m[name]
            lines.append(f"{s:<14}{m['candidates']:>6}  {name:<10}" + "".join(f"{r[f'r@{k}']:>7.3f}" for k in KS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m models.train_clip --workspace WS [config flags]`."""
    ap = argparse.ArgumentParser(prog="python -m models.train_clip", description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", "-w", required=True, help="the workspace folder")
    ap.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                    help="return the existing version if there is one (default) instead of training another")
    ap.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                    help="pick up a crashed run of the same config and samples from its checkpoint (default)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    for f in dataclasses.fields(ClipTrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind == "bool":
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif kind.startswith("tuple"):
            ap.add_argument(flag, nargs="+", default=f.default)
        elif kind.startswith("int"):
            ap.add_argument(flag, type=int, default=f.default)
        elif kind.startswith("float"):
            ap.add_argument(flag, type=float, default=f.default)
        else:
            ap.add_argument(flag, type=str, default=f.default)
    ap.set_defaults(num_threads=os.cpu_count())  # the CLI owns the machine (runtime sets OMP_NUM_THREADS=1 for Ray)
    args = ap.parse_args(argv)
    cfg = ClipTrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ClipTrainConfig)})
    result = train_default_clip(args.workspace, cfg, progress=args.progress, reuse=args.reuse, resume=args.resume)
    print(format_table(result["metrics"]))
    print(json.dumps(result | {"created_at": str(result["created_at"])}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train the prompt enhancer on (less -> more) pairs and save it as a new version.

    python -m models.train_enhancer --pairs ws/lake/pairs --models-root ws/models --size nano --steps 600

The shared loop of models/trainer.py (checkpoints, exact resume, versions): AdamW, linear
warmup then cosine decay, gradient clipping, bf16 autocast on a GPU. Pairs are split into train and held-out eval by `source_id` (every
degradation step of one caption lands on the same side), so the eval loss is measured
on captions the model never saw. Deterministic on CPU for a given seed.
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
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import torch

from .enhancer import (
    ENHANCER_SIZES, MODEL_NAME, build, collate, encode_pair, enhance, load, load_version, n_params,
    pad_id, target_loss, train_tokenizer, uses_special_format,
)
from .trainer import LoopConfig, TrainJob
from .trainer import train as run_job

__all__ = ["EnhancerTrainConfig", "EnhancerJob", "train", "enhance", "load_version"]


@dataclass
class EnhancerTrainConfig:
    """The knobs of one enhancer training run."""

    size: str = "nano"  # a key of ENHANCER_SIZES; ignored when training from a `base`
    steps: int = 600  # optimiser steps
    epochs: float | None = None  # when set: steps = ceil(epochs * train examples / batch_size)
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_len: int = 256  # tokens per sequence, prompt and target together
    vocab_size: int = 4096
    seed: int = 0
    eval_fraction: float = 0.05  # share of source captions held out for the eval loss
    eval_every: int = 0  # also evaluate every N steps (0: only before and after training)
    ckpt_every: int = 200  # steps between resumable checkpoints (models/trainer.py)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:1 ...
    num_threads: int | None = None  # torch CPU threads during the run; None leaves it as is
    progress: bool = True
    # Also train on whole chains (a prompt -> its chain's full caption): the pairs teach
    # one detail at a time, users ask for all of it at once.
    chain_ends: bool = True
    # Whole-chain rows marked with <|all|> (models/enhancer.py), one from every level of
    # the chain; generation asks for <|all|>. False: one unmarked row from the tersest
    # level, which reads the same as that level's one-step pair (the model then adds
    # about one detail: richness gain 0.99 where the full captions add 4.76).
    whole_marker: bool = True
    # The insertion format (models/enhancer.py): targets mark the words they copy from the
    # prompt, and decoding writes those words itself. False: plain targets, free decoding.
    copy_markers: bool = True
    # Also train on whole-chain rows whose prompt states some of the caption's scene-wide
    # details as casual tags ("A little square, pixel art" -> the full caption;
    # dataengine/degrade/tags.py): users type tags, and a model that never saw one copies
    # it and then writes a second, different style or light of its own. Needs whole_marker.
    tag_rows: bool = True

    def __post_init__(self) -> None:
        if self.size not in ENHANCER_SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {sorted(ENHANCER_SIZES)}")
        for name in ("steps", "batch_size", "max_len", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_len < 8:
            raise ValueError(f"max_len must be >= 8, got {self.max_len}")


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


Row = tuple[str, str, str, bool]  # (source_id, less, more, whole: more is the full caption)


Tops = dict[str, tuple[int, str]]  # per chain (source_id): its first step and that step's `more`


def _chain_tops(pairs: pa.Table) -> Tops:
    """Each chain's first step and full caption (that step's `more`); empty for a table
    without chains (no step or source_id column)."""
    top: Tops = {}
    if "step" in pairs.column_names and "source_id" in pairs.column_names:
        for s, step, more in zip(*(pairs.column(c).to_pylist() for c in ("source_id", "step", "more"))):
            if s is not None and more and more.strip() and (s not in top or step < top[s][0]):
                top[s] = (step, more)
    return top


def _chain_rows(pairs: pa.Table, tops: Tops, every_level: bool) -> list[Row]:
    """Whole-chain rows (source_id, less, full caption, True) of every chain of two or more
    steps: from each step below the first when `every_level` (the first step's own pair
    already ends at the full caption), else from the tersest step only."""
    levels: dict[str, list[tuple[int, str]]] = {}
    if tops:
        for s, step, less in zip(*(pairs.column(c).to_pylist() for c in ("source_id", "step", "less"))):
            if s in tops and less and less.strip() and step > tops[s][0]:
                levels.setdefault(s, []).append((step, less))
    out: list[Row] = []
    for s, ls in levels.items():
        ls.sort()
        out += [(s, less, tops[s][1], True) for _, less in (ls if every_level else ls[-1:])]
    return out


def _tag_rows(whole: list[Row], seed: int) -> list[Row]:
    """For each whole-chain row whose prompt lacks some of its caption's casual tags
    (dataengine/degrade/tags.py), one row whose prompt ends with a random non-empty subset
    of them, in caption order ("A little square." -> "A little square, pixel art"). Kept
    only when the tagged prompt's words are still in the caption in order, so the insertion
    format copies every tag word inside its own sentence."""
    from dataengine.degrade.tags import casual_tags

    from .keep_words import kept_in_order

    rng = random.Random(f"{seed}/tags")
    cache: dict[str, list[str]] = {}
    out: list[Row] = []
    for s, less, full, _ in whole:
        if full not in cache:
            cache[full] = [t.text for t in casual_tags(full)]
        missing = [t for t in cache[full] if t.lower() not in less.lower()]
        if not missing:
            continue
        chosen = [t for t in missing if rng.random() < 0.5] or [rng.choice(missing)]
        tagged = less.rstrip(" .") + ", " + ", ".join(chosen)
        if kept_in_order(tagged, full):
            out.append((s, tagged, full, True))
    return out


def _rows(pairs: pa.Table, tops: Tops | None = None) -> tuple[list[Row], int]:
    """(source_id, less, more, whole) rows with both texts present, and how many were
    skipped. Given the chains' `tops`, a step below its chain's first is one detail (whole
    False); a chain's first step, any pair outside a chain, and every pair without `tops`
    is whole."""
    missing = [c for c in ("less", "more") if c not in pairs.column_names]
    if missing:
        raise ValueError(f"pairs table lacks columns {missing}; it must follow schema.PAIRS")
    less, more = pairs.column("less").to_pylist(), pairs.column("more").to_pylist()
    sources = (pairs.column("source_id").to_pylist() if "source_id" in pairs.column_names
               else [None] * pairs.num_rows)
    steps = pairs.column("step").to_pylist() if tops else [None] * pairs.num_rows
    rows, skipped = [], 0
    for i, (s, a, b, step) in enumerate(zip(sources, less, more, steps)):
        if not a or not b or not a.strip() or not b.strip():
            skipped += 1  # reported in metrics as skipped_pairs
            continue
        whole = step is None or s not in tops or step <= tops[s][0]  # step is None when tops is
        rows.append((s if s is not None else f"row-{i}", a, b, whole))
    if not rows:
        raise ValueError(f"no usable pairs: {pairs.num_rows} rows, {skipped} with an empty less or more")
    return rows, skipped


def _split(rows: list[Row], fraction: float, seed: int) -> tuple[list, list]:
    """Train and eval rows; whole source captions go to one side."""
    sources = sorted({r[0] for r in rows})
    if fraction <= 0 or len(sources) < 2:
        return rows, []
    random.Random(seed).shuffle(sources)
    n_eval = min(len(sources) - 1, max(1, round(fraction * len(sources))))
    held = set(sources[:n_eval])
    return [r for r in rows if r[0] not in held], [r for r in rows if r[0] in held]


@torch.no_grad()
def _eval_loss(model, examples, pad: int, batch_size: int, device, autocast) -> float | None:
    """Mean cross-entropy per target token over `examples` (None when there are none)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = {k: v.to(device) for k, v in collate(examples[i: i + batch_size], pad).items()}
        with autocast():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss, n = target_loss(logits, b["labels"])
        total, count = total + loss.item(), count + int(n)
    model.train(was_training)
    return total / max(count, 1)


def _curve(losses: list[float], points: int = 20) -> list[list[float]]:
    """The loss curve as `points` [step, mean loss over its window] pairs."""
    if not losses:
        return []
    size = max(1, math.ceil(len(losses) / points))
    return [[min(i + size, len(losses)), round(sum(losses[i: i + size]) / len(losses[i: i + size]), 4)]
            for i in range(0, len(losses), size)]


class EnhancerJob(TrainJob):
    """Phase one as a `models.trainer` job: checkpoints, exact resume and versions like
    every other model; the version folder is a transformers model with its tokenizer.

    A step's batch depends only on (seed, step): epochs are the successive shuffles of
    one seeded stream laid end to end, so a resumed run sees exactly the batches the
    unbroken one would have."""

    name = MODEL_NAME

    def __init__(self, pairs: pa.Table, cfg: EnhancerTrainConfig, tokenizer_texts: Iterable[str] | None = None,
                 base: str | None = None):
        self.cfg, self.base = cfg, base
        # Without the marker a step pair and a whole-chain row read alike (no <|all|> token
        # to write), so the rows need no flag.
        tops = _chain_tops(pairs)
        rows, self.skipped = _rows(pairs, tops if cfg.whole_marker else None)
        if cfg.chain_ends:
            rows += _chain_rows(pairs, tops, every_level=cfg.whole_marker)
        if cfg.tag_rows and cfg.whole_marker:  # unmarked, every row reads as whole
            rows += _tag_rows([r for r in rows if r[3]], cfg.seed)
        self.train_rows, self.eval_rows = _split(rows, cfg.eval_fraction, cfg.seed)
        self.tokenizer_texts = list(tokenizer_texts) if tokenizer_texts is not None else None
        self.steps = math.ceil(cfg.epochs * len(self.train_rows) / cfg.batch_size) if cfg.epochs else cfg.steps
        digest = hashlib.sha256(json.dumps([self.train_rows, self.eval_rows]).encode()).hexdigest()[:16]
        self.identity = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "num_threads", "device")} | {
            "base": base, "tokenizer": "trained" if base is None else base, "pairs": digest}

    def setup(self) -> None:
        cfg = self.cfg
        if self.base is None:
            texts = self.tokenizer_texts if self.tokenizer_texts is not None else [
                t for r in self.train_rows for t in r[1:3]]
            self.tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size, copy=cfg.copy_markers,
                                             whole=cfg.whole_marker)
            self.model = build(cfg.size, self.tokenizer)
        else:
            self.model, self.tokenizer = load(self.base)
        self.model.to(self.device).train()
        on_gpu = self.device.type == "cuda"
        self.pad = pad_id(self.tokenizer)
        encoded = [encode_pair(self.tokenizer, a, b, cfg.max_len, whole) for _, a, b, whole in self.train_rows]
        self.truncated = sum(t for _, _, t in encoded)
        self.train_ex = [(ids, lab) for ids, lab, _ in encoded]
        self.eval_ex = [encode_pair(self.tokenizer, a, b, cfg.max_len, whole)[:2] for _, a, b, whole in self.eval_rows]
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Decay matrices only (not norms' gains).
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=self.loop.lr, betas=(0.9, 0.95), fused=on_gpu or None)
        self.eval_initial = self._eval()

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _eval(self) -> float | None:
        return _eval_loss(self.model, self.eval_ex, self.pad, self.cfg.batch_size, self.device, self.autocast)

    def config(self) -> dict:
        return self.identity

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"enhancer": self.model}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"enhancer": self.opt}

    def batch_indices(self, step: int) -> list[int]:
        """The training examples of `step`: positions step*B .. step*B+B-1 of the seeded
        epoch permutations laid end to end."""
        n, b = len(self.train_ex), self.cfg.batch_size
        out = []
        for pos in range(step * b, step * b + b):
            epoch, i = divmod(pos, n)
            out.append(self._epoch(epoch)[i])
        return out

    def _epoch(self, epoch: int) -> list[int]:
        """Epoch `epoch`'s order: the epoch-th shuffle of one stream seeded by cfg.seed,
        replayed from the start when needed (a resumed run rebuilds it in milliseconds)."""
        perms = getattr(self, "_perms", None)
        if perms is None:
            perms = self._perms = []
            self._order_rng = random.Random(self.cfg.seed)
        while len(perms) <= epoch:
            perm = list(range(len(self.train_ex)))
            self._order_rng.shuffle(perm)
            perms.append(perm)
        return perms[epoch]

    def step(self, step: int) -> dict[str, float]:
        b = {k: v.to(self.device) for k, v in collate([self.train_ex[i] for i in self.batch_indices(step)],
                                                        self.pad).items()}
        with self.autocast():
            logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss_sum, n = target_loss(logits, b["labels"])
        loss = loss_sum / n.clamp(min=1)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = self.clip(p for g in self.opt.param_groups for p in g["params"])
        self.opt.step()
        stats = {"loss": loss.item(), "tokens": float(b["attention_mask"].sum()), "grad_norm": grad_norm}
        every = self.cfg.eval_every
        if every and (step + 1) % every == 0 and step + 1 < self.loop.steps:
            stats["eval_loss"] = self._eval()
        return stats

    def evaluate(self) -> dict[str, Any]:
        return {"eval_loss_initial": self.eval_initial, "eval_loss": self._eval()}

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder / "model")
        self.tokenizer.save_pretrained(folder / "model")

    def summary(self, metrics: dict[str, Any], history: list[dict[str, float]]) -> dict[str, Any]:
        cfg, losses = self.cfg, [h["loss"] for h in history]
        tail = losses[-max(1, len(losses) // 10):]
        tokens = int(sum(h.get("tokens", 0) for h in history))
        return metrics | {
            "size": cfg.size if self.base is None else None,
            "base": self.base,
            "params": n_params(self.model),
            "vocab": len(self.tokenizer),
            "format": "special" if uses_special_format(self.tokenizer) else "plain",
            "epochs": round(self.loop.steps * cfg.batch_size / len(self.train_ex), 3),
            "train_pairs": len(self.train_ex),
            "eval_pairs": len(self.eval_ex),
            "skipped_pairs": self.skipped,
            "truncated_pairs": self.truncated,
            "train_loss_first": round(losses[0], 4),
            "train_loss_last": round(sum(tail) / len(tail), 4),  # mean of the last 10% of steps
            "train_loss_min": round(min(losses), 4),
            "train_loss_curve": _curve(losses),
            "eval_loss_initial": self.eval_initial,
            "eval_loss": metrics["eval"]["eval_loss"],
            "eval_curve": [[i + 1, h["eval_loss"]] for i, h in enumerate(history) if "eval_loss" in h],
            "tokens": tokens,
            "tokens_per_s": round(tokens / max(metrics["train_seconds"], 1e-9), 1),
        }


def train(
    pairs: pa.Table, models_root: str | Path, cfg: EnhancerTrainConfig | None = None,
    tokenizer_texts: Iterable[str] | None = None, base: str | None = None, resume: bool = True,
) -> dict[str, Any]:
    """Train an enhancer on `pairs` (schema.PAIRS) through `models.trainer` and save it as
    the next version under `models_root/enhancer/`; returns its `model_versions` record
    (metrics as JSON). With `base` (a saved version, a local causal LM folder or a cached
    hub name) fine-tune that model and its tokenizer; otherwise train a tokenizer on
    `tokenizer_texts` (default: the pairs' texts) and build a fresh model of `cfg.size`.
    A run that died part-way resumes from its checkpoint unless `resume` is False."""
    cfg = cfg or EnhancerTrainConfig()
    job = EnhancerJob(pairs, cfg, tokenizer_texts, base)
    loop = LoopConfig(steps=job.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio,
                      grad_clip=cfg.grad_clip, seed=cfg.seed, ckpt_every=cfg.ckpt_every, device=cfg.device,
                      num_threads=cfg.num_threads, progress=cfg.progress, resume=resume)
    record = run_job(job, Path(models_root), loop)
    metrics = record["metrics"]
    return {k: record[k] for k in ("model", "version", "path", "status", "job_id", "created_at")} | {
        "metrics": json.dumps(metrics, sort_keys=True, default=str)}  # metrics["resumed_from"] says if it resumed


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m models.train_enhancer --pairs PARQUET --models-root DIR [config flags]`."""
    import pyarrow.parquet as pq

    ap = argparse.ArgumentParser(prog="python -m models.train_enhancer", description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", required=True, help="a Parquet file or folder with the PAIRS schema")
    ap.add_argument("--models-root", required=True, help="the workspace's models/ folder")
    ap.add_argument("--base", default=None, help="fine-tune this saved version / causal LM instead")
    for f in dataclasses.fields(EnhancerTrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" |")[0], str)
            ap.add_argument(flag, type=kind, default=f.default)
    args = ap.parse_args(argv)
    cfg = EnhancerTrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EnhancerTrainConfig)})
    record = train(pq.read_table(args.pairs), args.models_root, cfg, base=args.base)
    print(json.dumps(record | {"created_at": record["created_at"].isoformat(),
                               "metrics": json.loads(record["metrics"])}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train the prompt enhancer on (less -> more) pairs and save it as a new version.

    python -m models.train_enhancer --pairs ws/lake/pairs --models-root ws/models --size nano --steps 600

One plain PyTorch loop: AdamW, linear warmup then cosine decay, gradient clipping, bf16
autocast on a GPU. Pairs are split into train and held-out eval by `source_id` (every
degradation step of one caption lands on the same side), so the eval loss is measured
on captions the model never saw. Deterministic on CPU for a given seed.
"""

from __future__ import annotations

if __name__ == "__main__":  # the CLI edge: offline defaults before transformers is imported
    from dataengine.runtime import apply_offline_defaults

    apply_offline_defaults()

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import torch

from .enhancer import (
    ENHANCER_SIZES, MODEL_NAME, build, collate, encode_pair, enhance, load, load_version, n_params,
    pad_id, save_version, target_loss, train_tokenizer, uses_special_format, versions,
)

__all__ = ["EnhancerTrainConfig", "train", "enhance", "load_version"]


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
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:1 ...
    num_threads: int | None = None  # torch CPU threads during the run; None leaves it as is
    progress: bool = True
    # Also train on each chain's ends (its tersest prompt -> its full caption): the pairs
    # teach one detail at a time, users ask for all of it at once.
    chain_ends: bool = True
    # The insertion format (models/enhancer.py): targets mark the words they copy from the
    # prompt, and decoding writes those words itself. False: plain targets, free decoding.
    copy_markers: bool = True

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


def _chain_end_rows(pairs: pa.Table) -> list[tuple[str, str, str]]:
    """(source_id, tersest less, step-1 more) for every chain of two or more steps."""
    if "step" not in pairs.column_names or "source_id" not in pairs.column_names:
        return []
    first: dict[str, tuple[int, str]] = {}
    last: dict[str, tuple[int, str]] = {}
    for s, step, less, more in zip(*(pairs.column(c).to_pylist() for c in ("source_id", "step", "less", "more"))):
        if s is None or not less or not more:
            continue
        if s not in first or step < first[s][0]:
            first[s] = (step, more)
        if s not in last or step > last[s][0]:
            last[s] = (step, less)
    return [(s, last[s][1], first[s][1]) for s in first if last[s][0] > first[s][0]]


def _rows(pairs: pa.Table) -> tuple[list[tuple[str, str, str]], int]:
    """(source_id, less, more) rows with both texts present, and how many were skipped."""
    missing = [c for c in ("less", "more") if c not in pairs.column_names]
    if missing:
        raise ValueError(f"pairs table lacks columns {missing}; it must follow schema.PAIRS")
    less, more = pairs.column("less").to_pylist(), pairs.column("more").to_pylist()
    sources = (pairs.column("source_id").to_pylist() if "source_id" in pairs.column_names
               else [None] * pairs.num_rows)
    rows, skipped = [], 0
    for i, (s, a, b) in enumerate(zip(sources, less, more)):
        if not a or not b or not a.strip() or not b.strip():
            skipped += 1  # reported in metrics as skipped_pairs
            continue
        rows.append((s if s is not None else f"row-{i}", a, b))
    if not rows:
        raise ValueError(f"no usable pairs: {pairs.num_rows} rows, {skipped} with an empty less or more")
    return rows, skipped


def _split(rows: list[tuple[str, str, str]], fraction: float, seed: int) -> tuple[list, list]:
    """Train and eval rows; whole source captions go to one side."""
    sources = sorted({r[0] for r in rows})
    if fraction <= 0 or len(sources) < 2:
        return rows, []
    random.Random(seed).shuffle(sources)
    n_eval = min(len(sources) - 1, max(1, round(fraction * len(sources))))
    held = set(sources[:n_eval])
    return [r for r in rows if r[0] not in held], [r for r in rows if r[0] in held]


def _lr_at(step: int, cfg: EnhancerTrainConfig, total: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio."""
    warm = min(cfg.warmup_steps, max(total - 1, 0))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


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


def train(
    pairs: pa.Table, models_root: str | Path, cfg: EnhancerTrainConfig | None = None,
    tokenizer_texts: Iterable[str] | None = None, base: str | None = None,
) -> dict[str, Any]:
    """Train an enhancer on `pairs` (schema.PAIRS) and save it as the next version under
    `models_root/enhancer/`; returns its `model_versions` record. With `base` (a saved
    version, a local causal LM folder or a cached hub name) fine-tune that model and its
    tokenizer; otherwise train a tokenizer on `tokenizer_texts` (default: the pairs' texts)
    and build a fresh model of `cfg.size`."""
    cfg = cfg or EnhancerTrainConfig()
    threads_before = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _train(pairs, Path(models_root), cfg, tokenizer_texts, base)
    finally:
        torch.set_num_threads(threads_before)


def _train(pairs, models_root: Path, cfg: EnhancerTrainConfig, tokenizer_texts, base) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rows, skipped = _rows(pairs)
    if cfg.chain_ends:
        rows += _chain_end_rows(pairs)
    train_rows, eval_rows = _split(rows, cfg.eval_fraction, cfg.seed)

    # Tokenizer and model
    if base is None:
        texts = tokenizer_texts if tokenizer_texts is not None else [t for r in train_rows for t in r[1:]]
        tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size, copy=cfg.copy_markers)
        model = build(cfg.size, tokenizer)
    else:
        model, tokenizer = load(base)
    device = _device(cfg.device)
    model.to(device).train()
    on_gpu = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu)

    # Data
    pad = pad_id(tokenizer)
    encoded = [encode_pair(tokenizer, a, b, cfg.max_len) for _, a, b in train_rows]
    truncated = sum(t for _, _, t in encoded)
    train_ex = [(ids, lab) for ids, lab, _ in encoded]
    eval_ex = [encode_pair(tokenizer, a, b, cfg.max_len)[:2] for _, a, b in eval_rows]
    steps = math.ceil(cfg.epochs * len(train_ex) / cfg.batch_size) if cfg.epochs else cfg.steps

    # Optimiser: decay matrices only (not norms' gains)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=on_gpu or None)

    # Loop
    order_rng = random.Random(cfg.seed)
    order: list[int] = []
    losses: list[float] = []
    evals: list[list[float]] = []
    tokens = 0
    eval_initial = _eval_loss(model, eval_ex, pad, cfg.batch_size, device, autocast)
    train_seconds = 0.0
    columns = (TextColumn("enhancer {task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
    with Progress(*columns, disable=not cfg.progress) as bar:
        task = bar.add_task(f"{cfg.size if base is None else base}", total=steps, loss="-")
        for step in range(steps):
            t0 = time.perf_counter()
            while len(order) < cfg.batch_size:  # epochs of shuffled indices, end to end
                perm = list(range(len(train_ex)))
                order_rng.shuffle(perm)
                order += perm
            idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
            b = {k: v.to(device) for k, v in collate([train_ex[i] for i in idx], pad).items()}
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg, steps)
            with autocast():
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss_sum, n = target_loss(logits, b["labels"])
            loss = loss_sum / n.clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            losses.append(loss.item())
            tokens += int(b["attention_mask"].sum())
            train_seconds += time.perf_counter() - t0
            bar.update(task, advance=1, loss=f"{losses[-1]:.3f}")
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < steps:
                evals.append([step + 1, _eval_loss(model, eval_ex, pad, cfg.batch_size, device, autocast)])
    eval_final = _eval_loss(model, eval_ex, pad, cfg.batch_size, device, autocast)
    model.to("cpu")
    model.eval()

    tail = losses[-max(1, len(losses) // 10):]
    metrics = {
        "size": cfg.size if base is None else None,
        "base": base,
        "params": n_params(model),
        "vocab": len(tokenizer),
        "format": "special" if uses_special_format(tokenizer) else "plain",
        "device": str(device),
        "steps": steps,
        "epochs": round(steps * cfg.batch_size / len(train_ex), 3),
        "train_pairs": len(train_ex),
        "eval_pairs": len(eval_ex),
        "skipped_pairs": skipped,
        "truncated_pairs": truncated,
        "train_loss_first": round(losses[0], 4),
        "train_loss_last": round(sum(tail) / len(tail), 4),  # mean of the last 10% of steps
        "train_loss_min": round(min(losses), 4),
        "train_loss_curve": _curve(losses),
        "eval_loss_initial": eval_initial,
        "eval_loss": eval_final,
        "eval_curve": evals,
        "train_seconds": round(train_seconds, 2),
        "seconds": round(time.perf_counter() - started, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / max(train_seconds, 1e-9), 1),
    }
    config = asdict(cfg) | {"base": base, "tokenizer": "trained" if base is None else base}
    version, path = save_version(models_root, model, tokenizer, config, metrics)
    # The trainer's rule for every model: a first version is promoted, later ones wait as
    # candidates for a gate that beats the current one.
    first = versions(models_root) == [version]
    return {
        "model": MODEL_NAME, "version": version, "path": str(path), "status": "promoted" if first else "candidate",
        "metrics": json.dumps(metrics, sort_keys=True), "job_id": None,
        "created_at": datetime.now(timezone.utc),
    }


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

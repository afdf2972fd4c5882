"""Enhancer retraining, the prompt remedy's job: fine-tune the promoted enhancer on the
workspace's degradation pairs plus the corrected pairs curators approved (the user's
prompt -> the enhanced prompt with the user's words put back). A current version without
the insertion format (models/enhancer.py: it can keep the user's words only by decoding
constraints) is retrained from scratch in that format on the same mix instead.

    result = retrain_enhancer(ws, [{"feedback_id": ..., "less": ..., "more": ...}], EnhancerFixConfig())

An enhancer fails a prompt when its output loses one of the prompt's content words
(dropped, or replaced by another word in its slot: `dataengine.signals.drift`). Outputs are
decoded without the keep-words constraint, so the measure is what the model learned, not
what decoding forces. What the job fixed is measured on failures it did not train on (a
hash of the feedback id keeps a share of the corrected pairs out of training); the new
version is promoted only when it fixes at least `min_fixed` of the held-out failing prompts
the current version still fails, and loses words on held-out prompts (the degradation
pairs' held-out captions) no more often than the current version, within `tolerance`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa

from dataengine.catalog import Catalog
from dataengine.signals import drift
from dataengine.versions import promoted
from dataengine.workspace import Workspace

from .enhancer import MODEL_NAME
from .gate import promotion
from .recalibrate import in_check


@dataclass(frozen=True)
class EnhancerFixConfig:
    steps: int = 150  # fine-tune steps from the current version
    lr: float = 1e-3
    fresh_steps: int = 600  # steps of a retrain from scratch (a current version without the insertion format)
    batch_size: int = 16
    repeat: int = 4  # copies of each corrected pair in the mix (a few among thousands of pairs)
    check_share: float = 0.3  # corrected pairs kept out of training to measure the fix on
    heldout_prompts: int = 100  # held-out prompts for the no-worse check
    min_fixed: float = 0.5
    tolerance: float = 0.02  # the held-out rate of lost words may rise this much (absolute)
    max_new_tokens: int = 192  # room for long prompts: a cut-off output would count as losing words
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.check_share < 1:
            raise ValueError(f"check_share must be in (0, 1), got {self.check_share}")
        if self.steps < 1 or self.repeat < 1:
            raise ValueError(f"steps and repeat must be >= 1, got {self.steps}, {self.repeat}")


def loses_words(version_path: str | Path, prompts: Sequence[str], max_new_tokens: int = 192) -> list[bool]:
    """Per prompt: does the version's unconstrained output drop or replace a content word of it?"""
    from .enhancer import enhance, load_version

    if not prompts:
        return []
    model, tok = load_version(version_path)
    outs = enhance(model, tok, list(prompts), max_new_tokens=max_new_tokens, keep_words=False)
    return [drift(p, o).lost > 0 for p, o in zip(prompts, outs)]


def _insertion_format(version_path: str | Path) -> bool:
    from transformers import AutoTokenizer

    from .enhancer import copy_id

    return copy_id(AutoTokenizer.from_pretrained(Path(version_path) / "model")) is not None


def _heldout_prompts(pairs: pa.Table, n: int, seed: int) -> list[str]:
    """The tersest prompt of up to `n` degradation chains the fine-tune holds out (its eval
    split, drawn as models/train_enhancer.py draws it)."""
    from .train_enhancer import _rows, _split

    rows, _ = _rows(pairs)
    _, held = _split(rows, 0.05, seed)
    tersest: dict[str, str] = {}
    for source, less, *_ in held:
        if source not in tersest or len(less) < len(tersest[source]):
            tersest[source] = less
    return [tersest[s] for s in sorted(tersest)][:n]


def retrain_enhancer(ws: Workspace, corrected: Sequence[dict], cfg: EnhancerFixConfig = EnhancerFixConfig(),
                     job_id: str | None = None) -> dict[str, Any]:
    """Fine-tune the promoted enhancer on the workspace's pairs plus `corrected` pairs
    (dicts with feedback_id, less, more), measure it, promote it or keep it a candidate."""
    from .train_enhancer import EnhancerTrainConfig, train

    catalog = Catalog(ws)
    current = promoted(catalog, MODEL_NAME)
    if current is None:
        raise RuntimeError("no promoted enhancer version to retrain (dataengine demo or python -m models.train_enhancer)")
    corrected = [c for c in corrected if c.get("less") and c.get("more") and drift(c["less"], c["more"]).lost == 0]
    if not corrected:
        raise ValueError("no corrected pair keeps the user's words: nothing to retrain on")
    fit = [c for c in corrected if not in_check(c["feedback_id"], cfg.check_share)]
    check = [c for c in corrected if in_check(c["feedback_id"], cfg.check_share)]
    if not fit:
        raise ValueError("every corrected pair fell in the check share: nothing to train on")
    base = catalog.query("SELECT source_id, step, less, more FROM pairs ORDER BY pair_id")
    extra = pa.table({"source_id": [f"feedback/{c['feedback_id']}/{k}" for c in fit for k in range(cfg.repeat)],
                      "step": pa.array([1] * (len(fit) * cfg.repeat), base.schema.field("step").type),
                      "less": [c["less"] for c in fit for _ in range(cfg.repeat)],
                      "more": [c["more"] for c in fit for _ in range(cfg.repeat)]})
    mix = pa.concat_tables([base, extra.cast(base.schema)])
    if _insertion_format(current["path"]):  # a fine-tune keeps its tokenizer and format
        how = "fine-tuned"
        train_cfg = EnhancerTrainConfig(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                                        warmup_steps=min(10, cfg.steps), seed=cfg.seed, progress=False)
        record = train(mix, ws.models, train_cfg, base=current["path"])
    else:  # a plain-format model can keep words only by decoding tricks: retrain it in the insertion format
        how = "retrained in the insertion format"
        train_cfg = EnhancerTrainConfig(steps=cfg.fresh_steps, batch_size=cfg.batch_size, seed=cfg.seed, progress=False)
        record = train(mix, ws.models, train_cfg)
    record["job_id"] = job_id
    from .trainer import _register

    _register(catalog, record | {"metrics": json.loads(record["metrics"])})

    held = _heldout_prompts(base, cfg.heldout_prompts, cfg.seed) if base.num_rows else []
    prompts = [c["less"] for c in check] + held
    before = loses_words(current["path"], prompts, cfg.max_new_tokens)
    after = loses_words(record["path"], prompts, cfg.max_new_tokens)
    n = len(check)
    fixed = sum(1 for b, a in zip(before[:n], after[:n]) if b and not a)
    asked = sum(before[:n])
    share = fixed / asked if asked else 0.0
    rate_before = sum(before[n:]) / len(held) if held else None
    rate_after = sum(after[n:]) / len(held) if held else None
    worse = ([f"loses words on {rate_after:.0%} of {len(held)} held-out prompts (current {rate_before:.0%})"]
             if held and rate_after > rate_before + cfg.tolerance else [])
    ok, why = promotion(asked, fixed, worse, cfg.min_fixed, "held-out failing prompts it lost words of")
    return {"version": record["version"], "path": record["path"], "replaces": current["version"], "how": how,
            "promoted": ok, "gate": why, "fixed_share": round(share, 4),
            "check_failures": n, "failing_before": asked, "fixed": fixed, "train_pairs": len(fit),
            "heldout_prompts": len(held), "heldout_loss_rate_before": rate_before,
            "heldout_loss_rate_after": rate_after}

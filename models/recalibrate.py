"""Reward recalibration, the rl remedy's job: fine-tune the heads of the promoted reward
version that overrated failures on the recalibration pairs curators approved (a
well-rated output over a failure the head overrated); the other heads stay as they are
(`replay` also trains every head on the version's own pairs).

    result = recalibrate(ws, {"fidelity": [(win_id, lose_id), ...]}, RecalibrationConfig())

What it fixed is measured on failures it did not train on: the remedy's failures are split
by a hash of their id, pairs whose failure (or well-rated output) falls in the check share
are left out of training, and a check failure counts as fixed when the old version scored
it at or above the median well-rated output of the check share and the new one scores it
below (the selection share that chooses what replay leaves out is measured the same way).
The new version is promoted
only when no head's held-out accuracy falls by more than the tolerance and it fixes at
least `min_fixed` of the check failures it was asked to fix.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dataengine.catalog import Catalog
from dataengine.versions import promoted
from dataengine.workspace import Workspace

from .gate import promotion
from .rewards import MODEL_NAME
from .train_reward import PairSet


@dataclass(frozen=True)
class RecalibrationConfig:
    steps: int = 150
    lr: float = 3e-4
    check_share: float = 0.3  # failures (and well-rated outputs) kept out of training to measure on
    # Replay the version's own training pairs beside the approved ones, so that what the
    # approved pairs do not speak to is kept (without replay a head recalibrated on blurred
    # failures forgot noise and colour casts: benchmarks/results/loop-cpu.md). A replayed kind
    # that taught the fault points against the approved pairs, and a head trained on both
    # learns to tell them apart instead of unlearning the fault; so when some kinds point
    # against them (cosine < 0), candidates leaving out none, each of the most opposed
    # alone, or all of them are fitted, and the one that fixes most failures of a selection
    # share (held out of the candidates' training, apart from the check share) is trained
    # on everything.
    replay: bool = True
    select_share: float = 0.25  # of the failures outside the check share
    min_select: int = 8  # overrated failures the selection share needs, else nothing is left out
    min_fixed: float = 0.5
    tolerance: float = 0.02  # a head's held-out accuracy may fall this much (absolute) and still pass

    def __post_init__(self) -> None:
        for name in ("check_share", "select_share"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")


def in_check(feedback_id: str, share: float) -> bool:
    """Stable membership of the check share (the same id always lands on the same side)."""
    return int(hashlib.sha1(feedback_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < share


def in_select(feedback_id: str, share: float) -> bool:
    """Stable membership of the selection share (drawn independently of the check share)."""
    return in_check(feedback_id + "#select", share)


def overrated(fail: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Failures a head scores at or above the median of the well-rated outputs."""
    return fail >= np.median(good)


def _outputs(catalog: Catalog, ids: Sequence[str], size: int) -> dict[str, tuple[np.ndarray, str]]:
    """(image at `size` px, the prompt it was rendered from) per readable feedback id: the
    enhanced prompt where there is one, as the serving stack scored it."""
    from dataengine.images import to_square

    rows = catalog.query("SELECT feedback_id, image_ref, prompt, enhanced_prompt FROM feedback "
                         "WHERE list_contains(?, feedback_id)", [list(ids)]).to_pylist()
    out = {}
    for r in rows:
        try:
            img = to_square(Path(r["image_ref"].removeprefix("file://")).read_bytes(), size)
        except (OSError, ValueError):
            continue  # an output gone since intake makes no pair
        out[r["feedback_id"]] = (img, r["enhanced_prompt"] or r["prompt"])
    return out


def _head_scores(version_path: str | Path, head: str, items: list[tuple[np.ndarray, str]]) -> np.ndarray:
    from .rewards import RewardBatch, load

    model = load(version_path)
    out = []
    for i in range(0, len(items), 64):
        chunk = items[i: i + 64]
        x = torch.from_numpy(np.stack([c[0] for c in chunk])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        out.append(model.score(RewardBatch(x, [c[1] for c in chunk]))[head].float().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _train_cfg(version_path: Path):
    """The current version's own training config (its faults included: the job cannot know them)."""
    from .rewards import OLD_PATCH_RECIPE
    from .train_reward import RewardTrainConfig

    saved = json.loads((version_path / "config.json").read_text())["job"]["train"]
    for k, v in OLD_PATCH_RECIPE.items():  # a version saved before these fields: its own recipe
        saved.setdefault(k, v)
    known = {f.name for f in fields(RewardTrainConfig)}
    return RewardTrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in known})


POOLED = ("image", "text", "source", "instruction")  # a head's pooled inputs (token inputs left aside)


def _direction(ps: PairSet, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Where a pair set points in the frozen embedding space: the mean winner minus the mean
    loser, over every pooled input (image, text, source, instruction) joined."""
    win, lose = ps.side("win", idx), ps.side("lose", idx)
    parts = [win[r].float().mean(0) - lose[r].float().mean(0) for r in POOLED if r in win]
    return torch.cat(parts)


def subset(ps: PairSet, keep: torch.Tensor) -> PairSet:
    """The pairs of `ps` where the bool mask `keep` is true."""
    idx = keep.nonzero().flatten()
    return PairSet(ps.head, {r: t[idx] for r, t in ps.win.items()}, {r: t[idx] for r, t in ps.lose.items()},
                   [k for k, m in zip(ps.kinds, keep.tolist()) if m], ps.tables)


def kind_cosines(replay: PairSet, approved: PairSet) -> dict[str, float]:
    """Per kind of `replay`: the cosine of its direction with the approved pairs'."""
    u, out = _direction(approved), {}
    for kind in sorted(set(replay.kinds)):
        v = _direction(replay, torch.tensor([i for i, k in enumerate(replay.kinds) if k == kind]))
        out[kind] = round(float(torch.nn.functional.cosine_similarity(u, v, dim=0)), 3)
    return out


def leave_out_candidates(cosines: dict[str, dict[str, float]], singles: int = 3) -> list[dict[str, tuple[str, ...]]]:
    """What replay may leave out, per head: nothing; each of the `singles` kinds pointing
    most against the approved pairs, alone (the k-th most opposed of every head at once);
    every kind pointing against them (cosine < 0). Distinct, in that order. Singles matter:
    a kind confounded with the fault can point further against the feedback than the
    kind that taught it (seed 0: colour casts -0.725, the reversed blur -0.68)."""
    opposed = {h: tuple(k for k, c in sorted(cs.items(), key=lambda kc: kc[1]) if c < 0) for h, cs in cosines.items()}
    cands = [{}] + [{h: o[r:r + 1] for h, o in opposed.items() if len(o) > r} for r in range(singles)]
    out: list[dict[str, tuple[str, ...]]] = []
    for cand in cands + [{h: o for h, o in opposed.items() if o}]:
        if cand not in out:
            out.append(cand)
    return out


def heldout_drop(new: dict, current: dict, tolerance: float) -> list[str]:
    """Heads whose held-out accuracy in `new` metrics fell more than `tolerance` below `current`'s."""
    cur = current.get("eval", {}).get("heldout", {})
    got = new.get("eval", {}).get("heldout", {})
    return [f"{h} {got[h]['accuracy']:.3f} < {cur[h]['accuracy']:.3f}" for h in cur
            if h in got and got[h]["accuracy"] < cur[h]["accuracy"] - tolerance]


def scored_pairs(catalog: Catalog, version_path: str | Path, head: str, failures: Sequence[str], size: int,
                 limit: int = 1000) -> list[tuple[str, str]]:
    """Recalibration pairs for failures no one logged scores for: the version's `head` scores
    them and the well-rated outputs, and each well-rated output it scored no higher than a
    failure makes a pair (the remedy's rule, on this version's scores), spread over failures."""
    good = [r["feedback_id"] for r in catalog.query("SELECT feedback_id FROM feedback WHERE rating >= 4 "
                                                    "ORDER BY feedback_id").to_pylist()]
    outputs = _outputs(catalog, list(failures) + good, size)
    fails, good = [f for f in failures if f in outputs], [g for g in good if g in outputs]
    if not fails or not good:
        return []
    s = _head_scores(version_path, head, [outputs[i] for i in fails + good])
    s_fail, s_good = s[:len(fails)], s[len(fails):]
    per = [[(good[j], f) for j in np.argsort(s_good) if s_good[j] <= s_fail[i]] for i, f in enumerate(fails)]
    return [m[k] for k in range(max(map(len, per), default=0)) for m in per if k < len(m)][:limit]


def recalibrate(ws: Workspace, pairs: dict[str, list[tuple[str, str]]], cfg: RecalibrationConfig = RecalibrationConfig(),
                job_id: str | None = None, progress: bool = False,
                unscored: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Fine-tune the promoted reward version on `pairs` ({head: [(win id, lose id)]}), measure
    the fix on the held-out failures, and promote or keep the result as a candidate.
    `unscored` ({head: failure ids}): failures whose pairs this version's scores decide
    (feedback that came without logged scores)."""
    from .trainer import LoopConfig, device_of, train
    from .train_reward import make_job, output_pairs

    catalog = Catalog(ws)
    current = promoted(catalog, MODEL_NAME)
    if current is None:
        raise RuntimeError("no promoted reward version to recalibrate (dataengine train reward)")
    path = Path(current["path"])
    train_cfg = _train_cfg(path)
    for h, ids in (unscored or {}).items():
        if h in train_cfg.heads:
            pairs = pairs | {h: list(pairs.get(h, [])) + scored_pairs(catalog, path, h, ids, train_cfg.resolution)}
    pairs = {h: p for h, p in pairs.items() if h in train_cfg.heads and p}
    if not pairs:
        raise ValueError(f"no recalibration pairs for a head {current['version']} trains ({train_cfg.heads})")
    # The reference a check (or selection) failure is measured against: every well-rated
    # output in the same share.
    all_good = [r["feedback_id"] for r in catalog.query("SELECT feedback_id FROM feedback WHERE rating >= 4 "
                                                        "ORDER BY feedback_id").to_pylist()]
    good = [g for g in all_good if in_check(g, cfg.check_share)]
    select_good = [g for g in all_good if in_select(g, cfg.select_share) and not in_check(g, cfg.check_share)]
    ids = {i for p in pairs.values() for pair in p for i in pair} | set(good) | set(select_good)
    outputs = _outputs(catalog, sorted(ids), train_cfg.resolution)
    good, select_good = [g for g in good if g in outputs], [g for g in select_good if g in outputs]
    fit = {h: [(w, lo) for w, lo in p if w in outputs and lo in outputs
               and not in_check(w, cfg.check_share) and not in_check(lo, cfg.check_share)] for h, p in pairs.items()}
    check = {h: (sorted({lo for _, lo in p if lo in outputs and in_check(lo, cfg.check_share)}), good)
             for h, p in pairs.items()}
    if not any(fit.values()):
        raise ValueError("every recalibration pair fell in the check share or lost its image: nothing to train on")
    fit = {h: p for h, p in fit.items() if p}

    loop = LoopConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=min(10, cfg.steps), init_from=str(path),
                      progress=progress)
    base = make_job(ws.root, train_cfg, loop)
    base.loop, base.device = loop, device_of(loop.device)
    replay = base.scene_pairs(loop.seed) if cfg.replay else {}
    approved = {h: output_pairs(h, [outputs[w] for w, _ in p], [outputs[lo] for _, lo in p], base.frozen,
                                base.model_cfg) for h, p in fit.items()}
    cosines = {h: kind_cosines(replay[h], ps) for h, ps in approved.items() if h in replay}
    held = {h: torch.tensor([in_select(w, cfg.select_share) or in_select(lo, cfg.select_share) for w, lo in p])
            for h, p in fit.items()}

    def pairs_for(leave: dict[str, tuple[str, ...]], selecting: bool) -> dict[str, PairSet]:
        out = {h: subset(ps, torch.tensor([k not in leave.get(h, ()) for k in ps.kinds])) for h, ps in replay.items()}
        out |= {f"{h}/feedback": subset(ps, ~held[h]) if selecting else ps for h, ps in approved.items()}
        return {k: ps for k, ps in out.items() if len(ps)}

    job, info = base, dict(base.info)

    def job_for(leave: dict[str, tuple[str, ...]], selecting: bool) -> RewardTrainJob:
        # One job instance for every fit: its held-out pairs are embedded once.
        job.info = info | {"recalibration": {"from": current["version"], "replay": cfg.replay,
                                                  "pairs": {h: len(p) for h, p in fit.items()},
                                                  "leave_out": leave, "selecting": selecting}}
        job.given_pairs = pairs_for(leave, selecting)
        return job

    # Choose what the replay leaves out on the selection share (failures and well-rated
    # outputs outside the check share that the candidates do not train on).
    candidates, trials = leave_out_candidates(cosines), []
    select = {h: (sorted({lo for (_, lo), m in zip(p, held[h].tolist()) if m and in_select(lo, cfg.select_share)}),
                  select_good) for h, p in fit.items()}
    chosen = candidates[0]
    select_was = _overrated(path, select, outputs) if len(candidates) > 1 else {}
    if len(candidates) > 1 and sum(int(w.sum()) for w in select_was.values()) >= cfg.min_select:
        with tempfile.TemporaryDirectory(prefix="recalibrate-") as tmp:
            for leave in candidates:
                rec = train(job_for(leave, True), tmp, replace(loop, progress=False))
                asked, fixed, _ = _fixed(select_was, rec["path"], select, outputs)
                trials.append({"leave_out": leave, "fixed": fixed, "of": asked})
        chosen = max(trials, key=lambda t: t["fixed"])["leave_out"]  # ties: the first, which leaves out least
    record = train(job_for(chosen, False), ws.models, loop, catalog=catalog, job_id=job_id)

    asked, fixed, per_head = _fixed(_overrated(path, check, outputs), record["path"], check, outputs)
    share = fixed / asked if asked else 0.0
    dropped = heldout_drop(record["metrics"], json.loads(current["metrics"] or "{}"), cfg.tolerance)
    ok, why = promotion(asked, fixed, [f"held-out accuracy {d}" for d in dropped], cfg.min_fixed,
                        "held-out failures it overrated")
    return {"version": record["version"], "path": record["path"], "recalibrated_from": current["version"],
            "promoted": ok, "gate": why, "fixed_share": round(share, 4), "heads": per_head,
            "train_pairs": {h: len(p) for h, p in fit.items()},
            "replay_kind_cosines": cosines, "replay_left_out": chosen, "replay_trials": trials,
            "heldout_before": _summary(json.loads(current["metrics"] or "{}")),
            "heldout_after": _summary(record["metrics"])}


def _overrated(version: str | Path, sets: dict[str, tuple[list[str], list[str]]], outputs: dict) -> dict[str, np.ndarray]:
    """Per head of `sets` ({head: (failures, well-rated outputs)}) with both sides: which
    failures `version` scores at or above the median well-rated output."""
    out = {}
    for h, (fails, goods) in sets.items():
        if fails and goods:
            s = _head_scores(version, h, [outputs[i] for i in fails + goods])
            out[h] = overrated(s[:len(fails)], s[len(fails):])
    return out


def _fixed(was: dict[str, np.ndarray], after: str | Path, sets: dict[str, tuple[list[str], list[str]]],
           outputs: dict) -> tuple[int, int, dict[str, Any]]:
    """(failures overrated before (`was`, from `_overrated`), of those `after` no longer
    overrates, per head) over `sets`."""
    now_all = _overrated(after, sets, outputs)
    per_head, fixed, asked = {}, 0, 0
    for h, (fails, goods) in sets.items():
        if h not in was:
            per_head[h] = {"check_failures": len(fails), "check_good": len(goods), "note": "too few to measure"}
            continue
        now = now_all[h]
        per_head[h] = {"check_failures": len(fails), "overrated_before": int(was[h].sum()),
                       "overrated_after": int(now.sum()), "fixed": int((was[h] & ~now).sum())}
        fixed += int((was[h] & ~now).sum())
        asked += int(was[h].sum())
    return asked, fixed, per_head


def _summary(metrics: dict) -> dict[str, Any]:
    held = metrics.get("eval", {}).get("heldout", {})
    return {h: {"accuracy": v["accuracy"], "by_kind": v.get("by_kind", {})} for h, v in held.items()}

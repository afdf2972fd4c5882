"""Triage: each failure -> cause {rl, knowledge, prompt}, a confidence, and the evidence.

Two deciders read the same signal vector (`FEATURES`, from dataengine/signals.py):

- `RuleTriager`, calibrated rules: the enhanced prompt lost the user's words -> prompt;
  the prompt's concept is below gap search's coverage threshold -> knowledge; neither ->
  rl (the output failed on a covered, faithfully passed prompt, so the generator's
  reward let it through), more confidently the more the reward liked the failure.
- `LearnedTriager`, a logistic regression trained on curators' verdicts; it replaces the
  rules only when it beats them on reviews it was not trained on (`learn`).

Both are versioned: every triage row names the decider (`rules/v1`, `learned/v0003`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Sequence

import numpy as np

from dataengine import signals as sg

CAUSES = ("rl", "knowledge", "prompt")
# Each side of coverage alone, and the least covered phrase's nearest neighbours: the rules
# read only the combined percentile; a learned triager may weigh them.
COVERAGE_SIDES = ("caption_pct", "image_pct", "phrase_train_sim", "phrase_ref_gain")
FEATURES = ("reward_pct", "disagreement", "coverage_pct", "coverage_margin", "is_gap", "drift_share",
            "drift_lost", "drift_pct", "has_enhanced", "sim_gap") + COVERAGE_SIDES
RULES_VERSION = "rules/v1"


@dataclass
class SignalTable:
    """The signals of a batch of failures: one row of `FEATURES` per failure (NaN where a
    signal could not be measured) and, per failure, the details a curator reads."""

    feedback_ids: list[str]
    features: np.ndarray  # (n, len(FEATURES)) float64
    details: list[dict] = field(default_factory=list)

    def col(self, name: str) -> np.ndarray:
        return self.features[:, FEATURES.index(name)]

    def __len__(self) -> int:
        return len(self.feedback_ids)


def gather(feedback_ids: Sequence[str], prompts: Sequence[str], enhanced: Sequence[str | None],
           ratings: Sequence[int | None], scores: Sequence[dict | None], reward_reference: dict[str, np.ndarray],
           gap_reports: Sequence | None = None, image_vecs: np.ndarray | None = None,
           prompt_vecs: np.ndarray | None = None, enhanced_vecs: np.ndarray | None = None,
           drift_reference: Sequence[np.ndarray | None] | None = None) -> SignalTable:
    """Signals of a batch from what is at hand: texts, logged scores and their reference,
    gap reports and CLIP vectors (either may be None: those signals are then NaN), and the
    drift shares of well-rated outputs of each failure's serving version (how much its
    enhancer rewords when nothing failed; None where there are too few)."""
    n = len(feedback_ids)
    has_enh = np.array([e is not None and bool(e.strip()) for e in enhanced])
    drifts = [sg.drift(p, e if h else None) for p, e, h in zip(prompts, enhanced, has_enh)]
    reward_pct, top_head, per_head = sg.reward_percentiles(scores, reward_reference)
    dis = sg.disagreement(reward_pct, ratings)
    cov = sg.coverage_signals(gap_reports) if gap_reports is not None else None
    if image_vecs is not None and prompt_vecs is not None:
        sim = sg.similarity_signals(image_vecs, prompt_vecs, enhanced_vecs, has_enh)
    else:
        sim = {"sim_gap": np.full(n, np.nan), "sim_prompt": np.full(n, np.nan), "sim_enhanced": np.full(n, np.nan)}
    cols = {
        "reward_pct": reward_pct, "disagreement": dis,
        "coverage_pct": cov["coverage_pct"] if cov else np.full(n, np.nan),
        "coverage_margin": cov["coverage_margin"] if cov else np.full(n, np.nan),
        "is_gap": cov["is_gap"].astype(np.float64) if cov else np.full(n, np.nan),
        "drift_share": np.array([d.share for d in drifts]),
        "drift_lost": np.array([float(d.lost) for d in drifts]),
        "drift_pct": _drift_pct(drifts, drift_reference),
        "has_enhanced": has_enh.astype(np.float64), "sim_gap": sim["sim_gap"],
        **{k: cov[k] if cov else np.full(n, np.nan) for k in COVERAGE_SIDES},
    }
    features = np.stack([np.asarray(cols[f], np.float64) for f in FEATURES], axis=1)
    details = [dict(drift=drifts[i].explain(), dropped=drifts[i].dropped, substituted=drifts[i].substituted,
                    reward_heads=per_head[i], reward_top=top_head[i], rating=ratings[i],
                    weakest_phrase=cov["weakest_phrase"][i] if cov else None,
                    coverage_pct=float(cov["coverage_pct"][i]) if cov else None,
                    coverage_threshold=float(cov["coverage_threshold"][i]) if cov else None,
                    sim_prompt=_f(sim["sim_prompt"][i]), sim_enhanced=_f(sim["sim_enhanced"][i]))
               for i in range(n)]
    return SignalTable(list(feedback_ids), features, details)


def _drift_pct(drifts: list, reference: Sequence[np.ndarray | None] | None) -> np.ndarray:
    """Each failure's drift share as a percentile of its reference (NaN without one)."""
    out = np.full(len(drifts), np.nan)
    groups: dict[int, tuple[np.ndarray, list[int]]] = {}  # failures of one serving version share a reference
    for i, ref in enumerate(reference or ()):
        if ref is not None and len(ref):
            groups.setdefault(id(ref), (ref, []))[1].append(i)
    for ref, at in groups.values():
        out[at] = sg.percentile(np.array([drifts[i].share for i in at]), ref)
    return out


def _f(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


@dataclass
class Decision:
    causes: list[str]
    confidence: np.ndarray
    triager: str

    def __len__(self) -> int:
        return len(self.causes)


# ---------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------


@dataclass
class RuleTriager:
    """Calibrated rules. Each threshold is relative to a distribution the workspace owns:
    coverage against gap search's own alpha threshold, reward against its reference
    percentile; drift counts the user's content words the enhancer lost."""

    # Gap search flags a prompt covered worse than all but alpha (2%) of the training set's
    # own prompts of its length: strict, since most prompts it sees are fine. A failure is
    # a third likely to be missing knowledge before any signal, so triage takes the bottom
    # tenth of that same calibrated scale.
    knowledge_below: float = 0.10
    min_lost_words: int = 1  # an insertion enhancer loses none; one lost word is a changed intent
    # An enhancer that rewords loses words on outputs people liked too: then drift counts
    # only beyond what it does on those (its percentile among the well-rated outputs').
    drift_beyond: float = 0.95
    reward_liked: float = 0.5  # percentile: the reward rated the failure like a median reference output
    version: str = RULES_VERSION

    def decide(self, s: SignalTable) -> Decision:
        lost, share = s.col("drift_lost"), s.col("drift_share")
        gap, margin = s.col("is_gap"), s.col("coverage_margin")
        pct = s.col("reward_pct")
        dpct = s.col("drift_pct")
        usual = np.isfinite(dpct) & (dpct < self.drift_beyond)
        prompt = (s.col("has_enhanced") > 0) & (lost >= self.min_lost_words) & ~usual
        cpct = s.col("coverage_pct")
        uncovered = (gap > 0) | (np.nan_to_num(cpct, nan=1.0) < self.knowledge_below)
        knowledge = ~prompt & uncovered
        causes = np.where(prompt, "prompt", np.where(knowledge, "knowledge", "rl"))
        # Confidence: how clearly the deciding signal fired, and how little the others argue.
        conf = np.empty(len(s))
        conf[prompt] = 0.7 + 0.3 * np.clip(share[prompt] * 2, 0, 1)
        conf[prompt & uncovered] -= 0.2  # the concept is also missing: both may be at fault
        # Below gap search's own threshold is clear; between it and knowledge_below, less so.
        conf[knowledge] = np.where(gap[knowledge] > 0, 0.8 + 0.2 * np.clip(-np.nan_to_num(margin[knowledge]) / 0.05, 0, 1),
                                   0.55 + 0.25 * (1 - cpct[knowledge] / self.knowledge_below))
        rl = ~prompt & ~knowledge
        liked = np.nan_to_num(pct[rl], nan=0.5)
        known = np.isfinite(gap[rl])  # without coverage, rl is only what is left
        conf[rl] = np.where(known, 0.55, 0.4) + 0.4 * np.clip((liked - self.reward_liked) / (1 - self.reward_liked), 0, 1)
        return Decision(causes.tolist(), np.clip(conf, 0.05, 0.99), self.version)


# ---------------------------------------------------------------------------------------
# Learned
# ---------------------------------------------------------------------------------------


def design_matrix(features: np.ndarray) -> np.ndarray:
    """Features with missing values as 0 beside an is-missing column for each: a signal that
    could not be measured says something too (no coverage index, no logged scores)."""
    missing = ~np.isfinite(features)
    return np.concatenate([np.where(missing, 0.0, features), missing.astype(np.float64)], axis=1)


@dataclass
class LearnedTriager:
    """Multinomial logistic regression on the signals, stored as plain numbers (JSON)."""

    coef: np.ndarray  # (n_classes, n_inputs)
    intercept: np.ndarray  # (n_classes,)
    mean: np.ndarray
    scale: np.ndarray
    classes: tuple[str, ...]
    version: str = "learned/unsaved"
    metrics: dict = field(default_factory=dict)

    @classmethod
    def fit(cls, s: SignalTable, causes: Sequence[str], c: float = 1.0, seed: int = 0) -> "LearnedTriager":
        from sklearn.linear_model import LogisticRegression

        x = design_matrix(s.features)
        mean, scale = x.mean(0), x.std(0)
        scale[scale == 0] = 1.0
        lr = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        lr.fit((x - mean) / scale, list(causes))
        coef, icpt = lr.coef_, lr.intercept_
        if len(lr.classes_) == 2:  # sklearn stores one row for two classes
            coef, icpt = np.vstack([-coef, coef]), np.concatenate([-icpt, icpt])
        return cls(coef, icpt, mean, scale, tuple(lr.classes_))

    def proba(self, s: SignalTable) -> np.ndarray:
        z = ((design_matrix(s.features) - self.mean) / self.scale) @ self.coef.T + self.intercept
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(1, keepdims=True)

    def decide(self, s: SignalTable) -> Decision:
        p = self.proba(s)
        k = p.argmax(1)
        return Decision([self.classes[i] for i in k], p[np.arange(len(k)), k], self.version)

    def to_json(self) -> dict:
        return dict(coef=self.coef.tolist(), intercept=self.intercept.tolist(), mean=self.mean.tolist(),
                    scale=self.scale.tolist(), classes=list(self.classes), features=list(FEATURES))

    @classmethod
    def from_json(cls, d: dict, version: str, metrics: dict | None = None) -> "LearnedTriager":
        if d.get("features") != list(FEATURES):
            raise ValueError(f"triager {version} was trained on features {d.get('features')}, not {list(FEATURES)}")
        return cls(np.array(d["coef"]), np.array(d["intercept"]), np.array(d["mean"]), np.array(d["scale"]),
                   tuple(d["classes"]), version, metrics or {})


def accuracy(decision: Decision, truth: Sequence[str]) -> float:
    return float(np.mean([a == b for a, b in zip(decision.causes, truth)])) if len(truth) else float("nan")


def per_cause(decision: Decision, truth: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision and recall of each cause."""
    out = {}
    for c in CAUSES:
        tp = sum(a == c and b == c for a, b in zip(decision.causes, truth))
        pred = sum(a == c for a in decision.causes)
        real = sum(b == c for b in truth)
        out[c] = {"precision": tp / pred if pred else float("nan"), "recall": tp / real if real else float("nan"),
                  "n": real}
    return out


def confusion(decision: Decision, truth: Sequence[str]) -> dict[str, dict[str, int]]:
    """truth -> predicted -> count."""
    return {t: {p: sum(a == p and b == t for a, b in zip(decision.causes, truth)) for p in CAUSES} for t in CAUSES}


def held_out(ids: Sequence[str], share: float = 0.3) -> np.ndarray:
    """A stable split of reviewed failures: True for the held-out ones (by a hash of the id,
    so a review stays on its side as more arrive)."""
    import hashlib

    return np.array([hashlib.sha1(i.encode()).digest()[0] < 256 * share for i in ids])


def compare(s: SignalTable, truth: Sequence[str], rules: RuleTriager | None = None,
            share: float = 0.3, min_reviews: int = 30) -> tuple[LearnedTriager | None, dict]:
    """Fit a learned triager on the reviewed failures not held out and score it beside the
    rules on the held-out ones. Returns (the model or None, metrics with `wins`)."""
    rules = rules or RuleTriager()
    truth = list(truth)
    test = held_out(s.feedback_ids, share)
    train = ~test
    metrics: dict = {"reviews": len(truth), "train": int(train.sum()), "held_out": int(test.sum())}
    if train.sum() < min_reviews or test.sum() < max(10, min_reviews // 3) or len({truth[i] for i in np.flatnonzero(train)}) < 2:
        metrics.update(wins=False, why=f"too few reviews to learn from ({int(train.sum())} to train, "
                                       f"{int(test.sum())} held out; need {min_reviews} and "
                                       f"{max(10, min_reviews // 3)}, of at least two causes)")
        return None, metrics
    sub = lambda m: SignalTable([s.feedback_ids[i] for i in np.flatnonzero(m)], s.features[m])  # noqa: E731
    model = LearnedTriager.fit(sub(train), [truth[i] for i in np.flatnonzero(train)])
    t_truth = [truth[i] for i in np.flatnonzero(test)]
    learned_acc = accuracy(model.decide(sub(test)), t_truth)
    rules_acc = accuracy(rules.decide(sub(test)), t_truth)
    metrics.update(learned_accuracy=learned_acc, rules_accuracy=rules_acc, wins=learned_acc > rules_acc,
                   why=(f"learned {learned_acc:.3f} vs rules {rules_acc:.3f} on {int(test.sum())} held-out reviews"))
    model.metrics = metrics
    return model, metrics


def evidence_text(cause: str, d: dict, features: np.ndarray) -> str:
    """One line a curator can read: the signals that decided, with their values."""
    f = dict(zip(FEATURES, features))
    parts = []
    if d.get("reward_top") is not None:
        pct = d["reward_heads"][d["reward_top"]]
        rating = f"a rating of {d['rating']}" if d.get("rating") is not None else "an evaluation failure"
        parts.append(f"reward {d['reward_top']} at the {pct:.0%} percentile on {rating}")
    else:
        parts.append("no reward scores")
    if np.isfinite(f["is_gap"]):
        phrase = f" (weakest phrase {d['weakest_phrase']!r})" if d.get("weakest_phrase") else ""
        state = "NOT covered" if f["is_gap"] > 0 else "covered"
        where = (f"coverage percentile {d['coverage_pct']:.3f} vs threshold {d['coverage_threshold']:.3f}"
                 if d.get("coverage_pct") is not None else f"{f['coverage_margin']:+.3f} from the threshold")
        parts.append(f"concept {state}: {where}{phrase}")
    else:
        parts.append("coverage unknown (no index)")
    if f["has_enhanced"] > 0:
        parts.append(d.get("drift") or f"enhanced prompt loses {f['drift_lost']:.0f} of the prompt's content words")
    else:
        parts.append("no enhanced prompt")
    if d.get("sim_enhanced") is not None:
        parts.append(f"output-prompt similarity {d['sim_prompt']:.2f}, output-enhanced {d['sim_enhanced']:.2f}")
    return f"{cause}: " + "; ".join(parts)


def rows_of(s: SignalTable, decision: Decision, now: datetime | None = None) -> list[dict]:
    """Triage table rows (schema TRIAGE): evidence holds the text, the signals and details."""
    now = now or datetime.now(timezone.utc)
    out = []
    for i, fid in enumerate(s.feedback_ids):
        ev = {"text": evidence_text(decision.causes[i], s.details[i], s.features[i]),
              "signals": {k: _f(v) for k, v in zip(FEATURES, s.features[i])}, **s.details[i]}
        out.append(dict(feedback_id=fid, cause=decision.causes[i], confidence=float(decision.confidence[i]),
                        evidence=json.dumps(ev, default=str), triager=decision.triager, triaged_at=now))
    return out


def table_from_evidence(rows: Sequence[dict]) -> SignalTable:
    """The signals stored with earlier triage rows (for learning from their reviews)."""
    feats = []
    for r in rows:
        sig = json.loads(r["evidence"])["signals"]
        feats.append([np.nan if sig.get(k) is None else sig[k] for k in FEATURES])
    return SignalTable([r["feedback_id"] for r in rows], np.array(feats, np.float64).reshape(len(rows), len(FEATURES)))

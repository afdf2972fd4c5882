"""Signals of a failure, each a number a triage rule or model can weigh:

- reward: how well the reward heads rated the failed output, as a percentile against a
  reference distribution (never a fixed constant), and its disagreement with a person's
  rating. A failure the reward liked points at the reward (RL's cause).
- coverage: whether the prompt's concepts are in the training set (gap search's
  combined percentile against its own alpha threshold). An uncovered concept points at
  missing knowledge.
- intent drift: what of the user's prompt the enhanced prompt lost or changed (word
  alignment, no vocabulary of any dataset), and whether the output looks more like the
  enhanced prompt than the user's (CLIP similarities). Drift points at the prompt module.

`drift` is pure text; `coverage_signals` and `similarity_signals` take stored vectors,
so triage of stored failures runs without embedding anything.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

# ---------------------------------------------------------------------------------------
# Intent drift: which of the user's words the enhanced prompt kept
# ---------------------------------------------------------------------------------------

# English function words: what an enhancer may drop or change without changing the intent.
FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every all both either neither no
of in on at to from by with without for into onto over under above below behind beside
between among through across near next around along against upon within off out up down
and or but nor so yet as than then there here where when while which who whom whose what
is are was were be been being am has have had having do does did can could will would
shall should may might must it its it's they them their he she his her we our you your
i me my mine ours yours theirs one's image picture photo photograph shot view
very really just quite rather also too please show shows showing make made draw drawn
""".split())
NUMBER_WORDS = {"one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10", "single": "1", "pair": "2"}
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


@functools.lru_cache(maxsize=1 << 16)  # a vocabulary repeats; triage normalises millions of words
def _norm(word: str) -> str:
    """A word as compared: lower case, numbers as digits, a plural's -s/-es off, 'colour' as 'color'."""
    w = word.lower().replace("colour", "color").replace("grey", "gray")
    w = NUMBER_WORDS.get(w, w)
    if w.endswith("'s"):
        w = w[:-2]
    if len(w) > 4 and w.endswith("ies"):
        w = w[:-3] + "y"
    elif len(w) > 4 and w.endswith(("ches", "shes", "sses", "xes")):
        w = w[:-2]
    elif len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    return w


# Compared after normalising, as words are ("this" -> "thi", "was" -> "wa").
FUNCTION_WORDS = FUNCTION_WORDS | frozenset(_norm(w) for w in FUNCTION_WORDS)


def words(text: str) -> list[str]:
    return [_norm(w) for w in _WORD.findall(text.lower())]


def content_words(text: str) -> list[str]:
    return [w for w in words(text) if w not in FUNCTION_WORDS]


@dataclass
class Drift:
    """What the enhanced prompt did with the user's content words."""

    n_content: int  # content words in the user's prompt
    dropped: list[str] = field(default_factory=list)  # gone, nothing in their place
    substituted: list[tuple[str, str]] = field(default_factory=list)  # (user's, enhancer's) in the same slot

    @property
    def lost(self) -> int:
        return len(self.dropped) + len(self.substituted)

    @property
    def share(self) -> float:
        """Share of the user's content words not kept (0 when nothing was lost)."""
        return self.lost / self.n_content if self.n_content else 0.0

    def explain(self) -> str:
        parts = []
        if self.substituted:
            parts.append("replaces " + ", ".join(f"{a!r} with {b!r}" for a, b in self.substituted))
        if self.dropped:
            parts.append("drops " + ", ".join(repr(w) for w in self.dropped))
        return "enhanced prompt " + (" and ".join(parts) if parts else "keeps every content word of the prompt")


def drift(prompt: str, enhanced: str | None) -> Drift:
    """Align the user's words with the enhanced prompt's: a content word of the prompt that
    appears nowhere in the enhanced prompt is lost; it was substituted when the aligned
    slot holds other content words (a changed attribute), dropped otherwise."""
    p = words(prompt)
    n = sum(w not in FUNCTION_WORDS for w in p)
    if enhanced is None:
        return Drift(n)
    e = words(enhanced)
    present = set(e)
    out = Drift(n)
    if all(w in present for w in p if w not in FUNCTION_WORDS):
        return out  # every content word is still there: no alignment can find one lost
    sm = difflib.SequenceMatcher(None, p, e, autojunk=False)
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op in ("equal", "insert"):
            continue
        lost = [w for w in p[i1:i2] if w not in FUNCTION_WORDS and w not in present]
        if not lost:
            continue  # function words, or content words that moved elsewhere
        # A slot closed by a kept word on its right was rewritten; an open end was cut off
        # and whatever the enhancer appended there is new detail, not a replacement.
        closed = op == "replace" and i2 < len(p)
        instead = [w for w in e[j1:j2] if w not in FUNCTION_WORDS and w not in p] if closed else []
        # Right-aligned: detail an enhancer adds goes before what it keeps ("a large blue
        # star" for "a red star": red's slot holds "blue", not "large").
        shift = len(instead) - len(lost)
        for k, w in enumerate(lost):
            if 0 <= k + shift < len(instead):
                out.substituted.append((w, instead[k + shift]))
            else:
                out.dropped.append(w)
    return out


# ---------------------------------------------------------------------------------------
# Reward: percentiles against a reference, and disagreement with a rating
# ---------------------------------------------------------------------------------------


def percentile(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Share of `reference` strictly below each value, ties counted half (a rank, 0-1;
    NaN against an empty reference): gap search's mid-rank, on an unsorted reference."""
    from dataengine.gaps import midrank

    ref = np.sort(np.asarray(reference, np.float64))
    if len(ref) == 0:
        return np.full(len(values), np.nan)
    return midrank(ref, np.asarray(values, np.float64))


def reward_percentiles(scores: Sequence[dict[str, float] | None],
                       reference: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str | None], list[dict]]:
    """Per record: the mean percentile of its heads' scores against each head's reference,
    the head that rated it highest, and every head's percentile (NaN/None without scores)."""
    heads = sorted({h for s in scores if s for h in s})
    per_head = {h: percentile(np.array([s.get(h, np.nan) if s else np.nan for s in scores]), reference[h])
                for h in heads if h in reference and len(reference[h])}
    mean = np.full(len(scores), np.nan)
    top: list[str | None] = [None] * len(scores)
    each: list[dict] = [{} for _ in scores]
    for i, s in enumerate(scores):
        got = {h: float(per_head[h][i]) for h in per_head if s and h in s}
        if got:
            mean[i] = float(np.mean(list(got.values())))
            top[i] = max(got, key=got.get)
            each[i] = got
    return mean, top, each


def reference_from_feedback(scores: Sequence[dict[str, float] | None], ratings: Sequence[int | None],
                            min_rated: int = 20) -> dict[str, np.ndarray]:
    """Each head's reference distribution from the feedback itself: the logged scores of
    outputs people rated well (4-5) when there are `min_rated` of them, else every logged
    score of that head (then a percentile ranks a failure among the failures)."""
    heads = sorted({h for s in scores if s for h in s})
    out = {}
    for h in heads:
        good = [s[h] for s, r in zip(scores, ratings) if s and h in s and r is not None and r >= 4]
        out[h] = np.array(good if len(good) >= min_rated else [s[h] for s in scores if s and h in s])
    return out


def disagreement(reward_pct: np.ndarray, ratings: Sequence[int | None]) -> np.ndarray:
    """How much better the reward rated an output than its person did, -1..1: the reward's
    percentile minus the rating on a 0-1 scale. A failure without a rating counts as
    rated 1 (it is a failure: an evaluation flagged it)."""
    r = np.array([(x - 1) / 4.0 if x is not None else 0.0 for x in ratings])
    return reward_pct - r


# ---------------------------------------------------------------------------------------
# Coverage and image-text similarity, from vectors
# ---------------------------------------------------------------------------------------


def coverage_signals(reports) -> dict[str, np.ndarray | list]:
    """Gap search reports -> how far below (negative) or above its threshold each prompt's
    combined percentile is, whether it is a gap, and the weakest phrase."""
    from dataengine.gaps import missing_phrases

    margin = np.array([r.percentile - r.threshold for r in reports], np.float64)
    weakest = []
    n = len(reports)
    sides = {"caption_pct": np.full(n, np.nan), "image_pct": np.full(n, np.nan),
             "phrase_train_sim": np.full(n, np.nan), "phrase_ref_gain": np.full(n, np.nan)}
    for i, r in enumerate(reports):
        low = min(r.phrases, key=lambda m: m.margin) if r.phrases else None
        miss = missing_phrases(r)
        weakest.append(miss[0].phrase if miss else (low.phrase if low else None))
        sides["image_pct"][i] = r.sides.get("image", {}).get("percentile", np.nan)
        sides["caption_pct"][i] = r.sides.get("caption", {}).get("percentile", np.nan)
        if low is not None:
            # Does train say anything like the least covered phrase, and does the reference
            # corpus say it better (a concept the world has and the training set lacks)?
            sides["phrase_train_sim"][i] = low.train_similarity
            sides["phrase_ref_gain"][i] = low.reference_similarity - low.train_similarity
    return {"coverage_margin": margin, "is_gap": np.array([r.is_gap for r in reports]),
            "coverage_pct": np.array([r.percentile for r in reports]),
            "coverage_threshold": np.array([r.threshold for r in reports]), "weakest_phrase": weakest, **sides}


def similarity_signals(image_vecs: np.ndarray, prompt_vecs: np.ndarray,
                       enhanced_vecs: np.ndarray | None, has_enhanced: np.ndarray) -> dict[str, np.ndarray]:
    """CLIP cosine of each output to its user prompt and to its enhanced prompt, and the
    difference (enhanced minus user; 0 without an enhanced prompt). An output that matches
    the enhanced prompt better than the user's followed the enhancer away from the user."""
    s_prompt = np.einsum("nd,nd->n", image_vecs, prompt_vecs)
    if enhanced_vecs is None:
        return {"sim_prompt": s_prompt, "sim_enhanced": np.full(len(s_prompt), np.nan),
                "sim_gap": np.zeros(len(s_prompt))}
    s_enh = np.einsum("nd,nd->n", image_vecs, enhanced_vecs)
    gap = np.where(has_enhanced, s_enh - s_prompt, 0.0)
    return {"sim_prompt": s_prompt, "sim_enhanced": np.where(has_enhanced, s_enh, np.nan), "sim_gap": gap}


def parse_scores(text: str | None) -> dict[str, float] | None:
    return json.loads(text) if text else None

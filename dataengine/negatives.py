"""Attribute-swap hard negatives: a caption with one attribute changed, for contrastive training.

A caption and its image are a positive pair; the same caption with two colour words
swapped ("a red star beside a blue ring" -> "a blue star beside a red ring"), one colour
or count replaced, or a position turned to its opposite is a negative that differs only
in which attribute goes where. Trained against such negatives, an embedding has to bind
attributes to their objects instead of pooling them (NegCLIP's recipe, Yuksekgonul et
al. 2023, with the degrade lexicon's generic English word lists instead of a parser).

Replacements are drawn from the words the corpus itself uses (`AttributeWords.from_captions`),
so a negative stays in the register of the captions it is made from.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Iterable

from dataengine.degrade.taxonomy import LEXICON

_WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "upper": "lower",
             "lower": "upper", "above": "below", "below": "above", "front": "back", "back": "front"}
KINDS = ("swap", "colour", "count", "position")


def _kind_of(word: str) -> str | None:
    feats = LEXICON.get(word.lower(), set())
    if "COLOUR" in feats:
        return "colour"
    if "NUM" in feats or "ONE" in feats:
        return "count"
    if word.lower() in _OPPOSITE:
        return "position"
    return None


@dataclass
class AttributeWords:
    """The colour and count words a corpus uses: what a replacement may be drawn from."""

    colour: list[str] = field(default_factory=list)
    count: list[str] = field(default_factory=list)

    @classmethod
    def from_captions(cls, captions: Iterable[str]) -> "AttributeWords":
        seen: dict[str, set[str]] = {"colour": set(), "count": set()}
        for c in captions:
            for w in _WORD.findall(c or ""):
                kind = _kind_of(w)
                if kind in seen:
                    seen[kind].add(w.lower())
        return cls(sorted(seen["colour"]), sorted(seen["count"]))


def _cased(new: str, old: str) -> str:
    return new.capitalize() if old[:1].isupper() else new


def attribute_negative(caption: str, words: AttributeWords, rng: random.Random) -> tuple[str, str] | None:
    """(the caption with one attribute changed, which kind of change), or None when it
    states no attribute this can change."""
    spots = [(m.start(), m.end(), m.group(), _kind_of(m.group())) for m in _WORD.finditer(caption)]
    spots = [s for s in spots if s[3] is not None]
    colours = [s for s in spots if s[3] == "colour"]
    options = []
    if len({s[2].lower() for s in colours}) >= 2:
        options.append("swap")
    for kind in ("colour", "count"):
        if any(s[3] == kind for s in spots) and len(getattr(words, kind)) >= 2:
            options.append(kind)
    if any(s[3] == "position" for s in spots):
        options.append("position")
    if not options:
        return None
    kind = rng.choice(options)
    edits: list[tuple[int, int, str]] = []
    if kind == "swap":
        a = rng.choice(colours)
        b = rng.choice([s for s in colours if s[2].lower() != a[2].lower()])
        edits = [(a[0], a[1], _cased(b[2].lower(), a[2])), (b[0], b[1], _cased(a[2].lower(), b[2]))]
    else:
        s = rng.choice([s for s in spots if s[3] == kind])
        if kind == "position":
            new = _OPPOSITE[s[2].lower()]
        else:
            new = rng.choice([w for w in getattr(words, kind) if w != s[2].lower()])
        edits = [(s[0], s[1], _cased(new, s[2]))]
    out = caption
    for start, end, text in sorted(edits, reverse=True):
        out = out[:start] + text + out[end:]
    return (out, kind) if out != caption else None

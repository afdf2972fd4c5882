"""Casual tags: a caption's scene-wide details as the short phrases users type after a prompt.

People write "a dog on a beach, oil painting, golden hour", not "... The image is an oil
painting. The light is the golden glow of the late afternoon." Degradation deletes such
details outright; `casual_tags` reads each detected scene-wide span (lighting, background,
style, camera, mood) down to its core phrase, so an enhancer can also train on prompts
that state a detail as a tag and learn to put that tag back inside its full sentence
instead of writing a second, different one.

    casual_tags("A red car. This is a watercolor painting.")   # [Tag(10, 'style', 'watercolor painting')]

The core phrase of a span: split it at copulas and finite verbs ("The light | comes from
a spotlight on the left"), keep the part with the most words of the category's own
lexicon (the later one on a tie: "The background | is a plain backdrop"), and trim function words and participles from its ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from .detect import analyse

# Details that hold for the whole image, so a prompt states each at most once.
SCENE_WIDE: tuple[str, ...] = ("lighting", "background", "style", "camera", "mood")

# The lexicon features (taxonomy.py) that make a word part of each category's detail.
_FEATURES: dict[str, frozenset[str]] = {
    "lighting": frozenset({"LIGHTN", "LIGHTA", "LIT", "TIMEDAY", "WEATHER"}),
    "background": frozenset({"BGN", "BGOBJ", "PLACE", "ARCH", "SETA"}),
    "style": frozenset({"MEDIUM", "MEDADJ", "STYLEA", "STYLEN"}),
    "camera": frozenset({"SHOTN", "CAMA", "FOCUSA", "CAMN", "BRAND"}),
    "mood": frozenset({"MOODA", "MOODN", "MOODV"}),
}
_SPLIT = frozenset({"COP", "VERB"})
_EDGE = frozenset({"FUNC", "ED", "P", "END", "COMMA"})  # trimmed from a tag's ends


@dataclass(frozen=True, slots=True)
class Tag:
    """The core phrase `text` of a `category` span that starts at character `start`."""

    start: int
    category: str
    text: str


def casual_tags(caption: str, categories: tuple[str, ...] = SCENE_WIDE, max_words: int = 5) -> list[Tag]:
    """The core phrase of each detected span of `categories` (of SCENE_WIDE) in `caption`,
    in text order; spans with no content word, and phrases of more than `max_words` words (no longer a
    tag: "natural light coming in on the right and far left sides of ..."), are left out."""
    a = analyse(caption)
    t = a.tokens
    out = []
    for c in a.spans:
        if c.category not in categories:
            continue
        parts, cur = [], []
        for k in range(c.i, c.j):
            if t.feats(k) & _SPLIT:
                parts.append(cur)
                cur = []
            else:
                cur.append(k)
        parts.append(cur)
        own = _FEATURES[c.category]
        content = lambda part: sum(bool(t.feats(k) & own) for k in part)  # noqa: E731
        best = max(reversed(parts), key=content)  # max keeps the first of a tie: the later part
        while best and t.feats(best[0]) & _EDGE:
            best = best[1:]
        while best and t.feats(best[-1]) & _EDGE:
            best = best[:-1]
        if best and sum("W" in t.feats(k) for k in best) <= max_words:
            out.append(Tag(t.starts[c.i], c.category, caption[t.starts[best[0]]:t.ends[best[-1]]]))
    return out


__all__ = ["SCENE_WIDE", "Tag", "casual_tags"]

"""Measures of a prompt enhancer on held-out scene-world prompts, scored against ground truth.

A terse prompt from the scene world names objects ("two red stars and a blue ring"); its
scene JSON says what is really there. An enhanced prompt should keep every intended
attribute (intent preservation) and add details (richness), and the details it adds
should be true of the scene (faithful richness).

    items = heldout_terse_prompts(500)                       # [(terse prompt, scene json)]
    terse = [p for p, _ in items]
    evaluate(terse, terse, [s for _, s in items])            # the identity baseline
    evaluate(terse, reference_enhancements(items), [s for _, s in items])   # the pairs' targets

Facts are (attribute, value) pairs read with the scene world's vocabulary:
("object", "red star"), ("count", "red star=2"), ("size" | "texture" | "position" |
"arrangement", "red star=..."), ("background" | "lighting" | "style", value).
"""

from __future__ import annotations

import json
import random
import re
from typing import Any, Iterable, Sequence

from .degrade import detect  # the detail categories of caption degradation
from .sceneworld import (
    ARRANGEMENTS, BACKGROUNDS, COLOURS, COUNT_FORMS, LIGHTINGS, PLURALS, POSITIONS, SHAPES, STYLES,
    TEXTURES, Scene, caption_for, sample_scene, scene_rngs,
)
from .sceneworld import captions as _cap

Fact = tuple[str, str]
GLOBAL_ATTRS = ("background", "lighting", "style")
OBJECT_ATTRS = ("count", "size", "texture", "position", "arrangement")

# ---------------------------------------------------------------------------------------
# Vocabulary: phrases -> placeholder tokens, words -> values
# ---------------------------------------------------------------------------------------

# Whole phrases the captioner uses, replaced by one placeholder token each before words are
# read: "a red brick wall" must not read as a red object, nor "a spotlight on the left" as
# a position. Longest first, so "a grassy field under a blue sky" is grass, not sky.
_PHRASES: list[tuple[str, str]] = []
for _v, _forms in _cap.BACKGROUND_NP.items():
    _PHRASES += [(f, f"background:{_v}") for f in _forms]
for _v, _forms in _cap.BACKGROUND_PP.items():
    _PHRASES += [(f, f"background:{_v}") for f in _forms]
for _v, _forms in _cap.LIGHT_SENTENCE.items():
    _PHRASES += [(f.rstrip("."), f"lighting:{_v}") for f in _forms]
for _v, _forms in _cap.LIGHT_NP.items():
    _PHRASES += [(f, f"lighting:{_v}") for f in _forms]
for _table in (_cap.STYLE_NP, _cap.STYLE_OF):
    for _v, _forms in _table.items():
        _PHRASES += [(f, f"style:{_v}") for f in _forms]
_PHRASES += [(f, f"style:{v}") for v, f in _cap.STYLE_TAG.items()]
_PHRASES += [(f"soft shadows fall {side}", "shadow:") for side in set(_cap.SHADOW_SIDE.values())]
# Object modifiers that come after the noun, and multi-word counts.
for _v, (_pre, _post, _with) in _cap.TEXTURE_WORDS.items():
    _PHRASES += [(f, f"texture:{_v}") for f in _with]
for _v, _forms in _cap.ARRANGEMENT_WORDS.items():
    _PHRASES += [(f, f"arrangement:{_v}") for f in _forms]
for _table in (_cap.POSITION_AT, _cap.POSITION_TO):
    for _v, _forms in _table.items():
        _PHRASES += [(f, f"position:{_v}") for f in _forms]
for _n, _forms in COUNT_FORMS.items():
    _PHRASES += [(f, f"count:{_n}") for f in _forms if " " in f]
_PHRASES += [("a couple of", "count:2")]
_PHRASES = [(p.lower(), tag) for p, tag in _PHRASES]
_PHRASES.sort(key=lambda pt: -len(pt[0]))
_PHRASE_RE = re.compile("|".join(rf"(?<![\w-]){re.escape(p)}(?![\w-])" for p, _ in _PHRASES))
_PHRASE_TAG = dict(_PHRASES)

# Paraphrases a model may produce beyond the captioner's exact phrases: read after the
# phrases, on what they left. Order matters (multi-word first).
_KEYWORDS: list[tuple[str, str]] = [
    (r"\bspotlight\b[^.;,]*?\b(?:from|on|at) the (left|right)\b", "lighting:spotlight-{0}"),
    (r"\bdaylight\b|\bsunlight\b", "lighting:daylight"),
    (r"\bdim(?:ly)?\b|\bsubdued\b", "lighting:dim"),
    (r"\bsunset\b", "lighting:sunset"),
    (r"\bmoon(?:light|lit)\b", "lighting:moonlight"),
    (r"\bwooden floor\b|\bfloorboards\b|\bindoors?\b|\binterior\b|\broom\b", "background:indoor"),
    (r"\bgrass(?:y)?\b|\bmeadow\b|\blawn\b", "background:grass"),
    (r"\bbeach\b|\bseaside\b|\bsand(?:y)?\b", "background:beach"),
    (r"\bnight\b|\bstarry\b", "background:night"),
    (r"\bbricks?\b", "background:brick"),
    (r"\b(?:plain|cream|blank)\b[ ,a-z]*?\b(?:backdrop|background)\b", "background:plain"),
    (r"\bwatercolou?rs?\b", "style:watercolor"),
    (r"\bpixel[- ]art\b|\bpixelated\b", "style:pixel-art"),
    (r"\bpencil\b|\bsketch(?:ed)?\b", "style:pencil-sketch"),
    (r"\bcartoons?\b", "style:cartoon"),
    (r"\bflat(?:-style)? vector\b|\bvector\b", "style:flat"),
    (r"\b(?:top|upper)[- ]left\b", "position:top-left"),
    (r"\b(?:top|upper)[- ]right\b", "position:top-right"),
    (r"\b(?:bottom|lower)[- ]left\b", "position:bottom-left"),
    (r"\b(?:bottom|lower)[- ]right\b", "position:bottom-right"),
    (r"\b(?:in|at|to) the (?:center|middle)\b|\bcentered\b", "position:center"),
]
_SKY = (re.compile(r"\bsky\b"), "background:sky")  # only when no other background was read

# Every tag names a value of the scene world's vocabulary.
_VOCAB = {"background": BACKGROUNDS, "lighting": LIGHTINGS, "style": STYLES, "texture": TEXTURES,
          "arrangement": ARRANGEMENTS, "position": tuple(POSITIONS)}
assert all(tag.partition(":")[2] in _VOCAB[tag.partition(":")[0]]
           for tag in list(_PHRASE_TAG.values()) + [t for _, t in _KEYWORDS]
           if tag.partition(":")[0] in _VOCAB and "{" not in tag)

_SHAPE_OF = {s: s for s in SHAPES} | {p: s for s, p in PLURALS.items()}
_PLURAL_WORDS = set(PLURALS.values())
_COLOUR_OF = {c: c for c in COLOURS} | {"gray": "grey"}
_COUNT_OF = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5,
             "1": 1, "2": 2, "3": 3, "4": 4, "5": 5, "both": 2}
_VAGUE = {"some", "few", "several", "many", "multiple", "various", "the", "these", "those"}
_SIZE_OF = {w: s for s, ws in _cap.SIZE_WORDS.items() for w in ws} | {
    "small": "small", "tiny": "small", "medium": "medium", "big": "large", "huge": "large"}
_TEXTURE_OF = {w: t for t, (pre, post, _) in _cap.TEXTURE_WORDS.items() for w in pre + post}
_TOKEN = re.compile(r"§[^§]+§|[a-z0-9]+(?:-[a-z0-9]+)*|[.!?;]")
_SENTENCE_END = {".", "!", "?", ";"}
_FORWARD_CUES = {"there", "you"}  # "in the top left there is ...": the place belongs to what follows


def _normalise(text: str) -> str:
    text = text.lower().replace("colour", "color").replace("centre", "center")
    return re.sub(r"\bgray\b", "grey", text)


# ---------------------------------------------------------------------------------------
# Reading facts from text
# ---------------------------------------------------------------------------------------


def extract_attributes(text: str) -> set[Fact]:
    """The (attribute, value) facts `text` names, read with the scene world's vocabulary:
    objects as (colour, shape), their counts, sizes, textures, places and arrangements,
    and the background, lighting and style."""
    facts: set[Fact] = set()
    tags: list[str] = []  # a matched phrase becomes "§<index into tags>§": no words inside

    def placeholder(tag: str) -> str:
        tags.append(tag)
        return f" §{len(tags) - 1}§ "

    t = _PHRASE_RE.sub(lambda m: placeholder(_PHRASE_TAG[m.group(0)]), _normalise(text))
    for pattern, tag in _KEYWORDS:
        t = re.sub(pattern, lambda m, tag=tag: placeholder(tag.format(*m.groups())), t)
    if not any(tag.startswith("background:") for tag in tags):
        t = _SKY[0].sub(lambda m: placeholder(_SKY[1]), t)
    tokens = [f"§{tags[int(tok[1:-1])]}§" if tok.startswith("§") else tok for tok in _TOKEN.findall(t)]

    # Global attributes; object modifiers wait for their object.
    modifiers: list[tuple[int, str, str]] = []  # (token index, attribute, value)
    for i, tok in enumerate(tokens):
        if tok.startswith("§"):
            attr, _, value = tok.strip("§").partition(":")
            if attr in GLOBAL_ATTRS:
                facts.add((attr, value))
            elif attr in ("texture", "position", "arrangement"):
                modifiers.append((i, attr, value))

    # Objects: a shape noun and the noun phrase before it ("a pair of small striped red stars").
    mentions: list[tuple[int, str]] = []  # (token index of the noun, subject)
    for i, tok in enumerate(tokens):
        shape = _SHAPE_OF.get(tok)
        if shape is None:
            continue
        colour = count = size = texture = None
        vague = False
        j = i - 1
        while j >= 0:
            w = tokens[j]
            if w in _COLOUR_OF and colour is None:
                colour = _COLOUR_OF[w]
            elif w in _SIZE_OF and size is None:
                size = _SIZE_OF[w]
            elif w in _TEXTURE_OF and texture is None:
                texture = _TEXTURE_OF[w]
            elif w in _VAGUE:
                vague = True
            elif w in _COUNT_OF or w.startswith("§count:"):
                n = int(w[7:-1]) if w.startswith("§") else _COUNT_OF[w]
                # "a few red stars" is no count; nor is "a" before a plural noun.
                if not vague and not (n == 1 and tok in _PLURAL_WORDS and w in ("a", "an")):
                    count = n
                break  # the count opens the noun phrase
            else:
                break
            j -= 1
        subject = f"{colour} {shape}" if colour else shape
        mentions.append((i, subject))
        facts.add(("object", subject))
        for attr, value in (("count", count), ("size", size), ("texture", texture)):
            if value is not None:
                facts.add((attr, f"{subject}={value}"))

    # Modifiers after a noun ("three stars in a row on the left") or before a clause
    # ("in the top left there is a ring"): within the sentence, the previous object takes it
    # unless "there"/"you" follows, then the next one does.
    ends = [i for i, tok in enumerate(tokens) if tok in _SENTENCE_END] + [len(tokens)]
    for i, attr, value in modifiers:
        end = next(e for e in ends if e > i)
        start = max([e for e in ends if e < i], default=-1)
        before = [s for k, s in mentions if start < k < i]
        after = [s for k, s in mentions if i < k < end]
        forward = i + 1 < len(tokens) and tokens[i + 1] in _FORWARD_CUES
        if forward and after:
            subject = after[0]
        elif before or after:
            subject = before[-1] if before else after[0]
        else:
            continue  # a place with no object in its sentence
        facts.add((attr, f"{subject}={value}"))
    return facts


# ---------------------------------------------------------------------------------------
# Facts against a scene
# ---------------------------------------------------------------------------------------


def _scene(scene: Scene | dict[str, Any] | str) -> Scene:
    return scene if isinstance(scene, Scene) else Scene.from_json(scene)


def _groups_of(subject: str, scene: Scene) -> list:
    words = subject.split(" ")
    colour, shape = (words[0], words[1]) if len(words) == 2 else (None, words[0])
    return [g for g in scene.groups if g.shape == shape and (colour is None or g.colour == colour)]


def true_of(fact: Fact, scene: Scene | dict[str, Any] | str) -> bool:
    """Whether `fact` holds in the ground-truth `scene`."""
    sc = _scene(scene)
    attr, value = fact
    if attr in GLOBAL_ATTRS:
        return getattr(sc, attr) == value
    if attr == "object":
        return bool(_groups_of(value, sc))
    subject, _, v = value.partition("=")
    return any(str(getattr(g, attr)) == v for g in _groups_of(subject, sc))


def contradicted(fact: Fact, named: set[Fact], scene: Scene | dict[str, Any] | str,
                 allowed: set[Fact] = frozenset()) -> bool:
    """Whether `named` gives `fact`'s slot another value: another background, another count
    for the same object, or the object's shape in a colour that is neither in the scene nor
    in `allowed` (the terse prompt's own facts) -- a recoloured object."""
    attr, value = fact
    if attr in GLOBAL_ATTRS:
        return any(a == attr and v != value for a, v in named)
    if attr == "object":
        words = value.split(" ")
        if len(words) != 2:
            return False
        colour, shape = words
        for a, v in named:
            other = v.split(" ")
            if (a == "object" and len(other) == 2 and other[1] == shape and other[0] != colour
                    and (a, v) not in allowed and not true_of((a, v), scene)):
                return True
        return False
    subject, _, v = value.partition("=")
    for a, x in named:
        s, _, w = x.partition("=")
        if a == attr and s == subject and w != v:
            return True
    return False


# ---------------------------------------------------------------------------------------
# The measures
# ---------------------------------------------------------------------------------------


def _categories(text: str) -> set[str]:
    return {span.category for span in detect(text)}


def evaluate(
    terse_prompts: Sequence[str], enhanced_prompts: Sequence[str],
    scenes: Sequence[Scene | dict[str, Any] | str],
) -> dict[str, Any]:
    """Intent preservation, richness gain and faithful richness of `enhanced_prompts`
    against their `terse_prompts` and ground-truth `scenes` (one of each per prompt)."""
    if not len(terse_prompts) == len(enhanced_prompts) == len(scenes):
        raise ValueError(f"lengths differ: {len(terse_prompts)} terse, {len(enhanced_prompts)} "
                         f"enhanced, {len(scenes)} scenes")
    scores, full, contra_share, intents = [], 0, [], 0
    gains, cats_t, cats_e, added_n, true_n = [], [], [], [], []
    for terse, enh, scene in zip(terse_prompts, enhanced_prompts, scenes):
        sc = _scene(scene)
        t_facts, e_facts = extract_attributes(terse), extract_attributes(enh)
        # Intent: what the user asked for and the scene has (a false claim is not intent).
        intended = [f for f in t_facts if true_of(f, sc)]
        if intended:
            lost_by = [contradicted(f, e_facts, sc, t_facts) for f in intended]
            kept = [f in e_facts and not c for f, c in zip(intended, lost_by)]
            scores.append(sum(kept) / len(intended))
            contra_share.append(sum(lost_by) / len(intended))
            full += all(kept)
            intents += len(intended)
        ct, ce = _categories(terse), _categories(enh)
        cats_t.append(len(ct))
        cats_e.append(len(ce))
        gains.append(len(ce) - len(ct))
        added = e_facts - t_facts
        added_n.append(len(added))
        true_n.append(sum(true_of(f, sc) for f in added))

    n = len(terse_prompts)
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    return {
        "n": n,
        "prompts_with_intent": len(scores),
        "intended_per_prompt": round(intents / len(scores), 3) if scores else None,
        "intent_preservation": mean(scores),  # share of intended facts kept, uncontradicted
        "fully_preserved": round(full / len(scores), 4) if scores else None,
        "intent_contradicted": mean(contra_share),  # share of intended facts given another value
        "categories_terse": mean(cats_t),
        "categories_enhanced": mean(cats_e),
        "richness_gain": mean(gains),  # detail categories added per prompt
        "added_facts": mean(added_n),  # checkable facts the enhancer added per prompt
        "faithful_added_facts": mean(true_n),  # ... of which true of the scene
        "faithful_share": round(sum(true_n) / sum(added_n), 4) if sum(added_n) else None,
    }


# ---------------------------------------------------------------------------------------
# Held-out prompts and the reference contender
# ---------------------------------------------------------------------------------------

EVAL_SPLIT = "enhancer-eval"  # a seed space of its own: no demo split draws these scenes


def heldout_terse_prompts(n: int = 500, seed: int = 0, split: str = EVAL_SPLIT, size: int = 256) -> list[tuple[str, dict[str, Any]]]:
    """`n` (terse prompt, scene JSON) pairs from scenes an enhancer trained on the scene
    world's train/pool/eval splits never saw (seeded like the world's samples, by split)."""
    out = []
    for i in range(n):
        scene_rng, words = scene_rngs(seed, split, i)
        scene = sample_scene(scene_rng, size, size)
        out.append((caption_for(scene, words, detail="terse"), scene.to_json()))
    return out


def reference_enhancements(items: Iterable[tuple[str, dict[str, Any] | str]], seed: int = 0) -> list[str]:
    """The rich caption of each held-out scene: what an enhancer that had learned its
    training pairs' targets perfectly would write."""
    return [caption_for(_scene(scene), random.Random(f"{seed}/{i}"), detail="rich")
            for i, (_, scene) in enumerate(items)]


def compare(items: Sequence[tuple[str, dict[str, Any] | str]], contenders: dict[str, Sequence[str]]) -> dict[str, dict[str, Any]]:
    """`evaluate` for each named list of enhanced prompts over the same held-out `items`."""
    terse = [p for p, _ in items]
    scenes = [json.loads(s) if isinstance(s, str) else s for _, s in items]
    return {name: evaluate(terse, list(enhanced), scenes) for name, enhanced in contenders.items()}


__all__ = ["EVAL_SPLIT", "compare", "contradicted", "evaluate", "extract_attributes",
           "heldout_terse_prompts", "reference_enhancements", "true_of"]

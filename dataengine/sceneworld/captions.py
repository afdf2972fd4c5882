"""Scene world: captions and edit instructions in varied, fluent English.

Ground-truth words (colour, shape, position, count) are used as they are or in a form
that maps back one-to-one (`three`/`3`/`a trio of`); synonyms go to the words around them
("sits", "rests", "is placed"). Every text passes through `_tidy`, which fixes a/an,
spacing and capitals, so templates can be composed freely.
"""

from __future__ import annotations

import random
import re

from .scene import PLURALS, POSITIONS, Edit, Group, Scene

# ---------------------------------------------------------------------------------------
# Phrase tables
# ---------------------------------------------------------------------------------------

# Every form names the count exactly; tests read them back from here.
COUNT_FORMS: dict[int, tuple[str, ...]] = {
    1: ("a", "one", "a single"),
    2: ("two", "2", "a pair of"),
    3: ("three", "3", "a trio of"),
    4: ("four", "4"),
    5: ("five", "5"),
}
_COUNT_WEIGHTS = {1: (6, 1, 2), 2: (5, 2, 2), 3: (5, 2, 2), 4: (3, 1), 5: (3, 1)}

SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium-sized", "mid-sized"), "large": ("large", "big")}

# texture -> (adjectives before the colour, adjectives after it, "with ..." phrases)
TEXTURE_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "solid": (("solid", "plain"), (), ("with a flat solid fill", "in one solid tone")),
    "striped": (("striped",), (), ("with diagonal stripes", "covered in stripes")),
    "dotted": (("polka-dot", "dotted", "spotted"), (), ("covered in dots", "with a polka-dot pattern")),
    "checkered": (("checkered", "checkerboard"), (), ("with a checkerboard pattern",)),
    "metallic": ((), ("metallic",), ("with a metallic sheen", "with a brushed-metal finish")),
    "wooden": ((), ("wooden", "wood-grain"), ("with a wood-grain texture", "carved from wood")),
    "glossy": (("glossy", "shiny"), (), ("with a glossy finish", "with a glossy highlight")),
}

POSITION_AT: dict[str, tuple[str, ...]] = {
    "top-left": ("in the top-left corner", "at the top left", "in the upper left"),
    "top": ("at the top", "near the top edge", "along the top of the frame"),
    "top-right": ("in the top-right corner", "at the top right", "in the upper right"),
    "left": ("on the left", "on the left side", "toward the left"),
    "center": ("in the center", "in the middle", "at the center of the frame"),
    "right": ("on the right", "on the right side", "toward the right"),
    "bottom-left": ("in the bottom-left corner", "at the bottom left", "in the lower left"),
    "bottom": ("at the bottom", "near the bottom edge", "along the bottom of the frame"),
    "bottom-right": ("in the bottom-right corner", "at the bottom right", "in the lower right"),
}
POSITION_TO: dict[str, tuple[str, ...]] = {
    "top-left": ("to the top-left corner", "to the upper left"),
    "top": ("to the top", "up to the top edge"),
    "top-right": ("to the top-right corner", "to the upper right"),
    "left": ("to the left", "over to the left side"),
    "center": ("to the center", "into the middle"),
    "right": ("to the right", "over to the right side"),
    "bottom-left": ("to the bottom-left corner", "to the lower left"),
    "bottom": ("to the bottom", "down to the bottom edge"),
    "bottom-right": ("to the bottom-right corner", "to the lower right"),
}
assert set(POSITION_AT) == set(POSITION_TO) == set(POSITIONS)

ARRANGEMENT_WORDS = {
    "row": ("in a row", "lined up in a row", "side by side in a row"),
    "column": ("in a vertical column", "one above the other in a column"),
    "grid": ("in a neat grid", "arranged in a grid"),
    "scattered": ("scattered loosely", "spread out at random", "loosely scattered"),
    "stacked": ("stacked in a pyramid", "piled into a small pyramid"),
}

VERBS = (("sits", "sit"), ("rests", "rest"), ("is placed", "are placed"), ("appears", "appear"),
         ("is positioned", "are positioned"), ("stands", "stand"))

STYLE_NP = {
    "flat": ("a flat vector illustration", "a clean flat vector graphic", "a flat-style vector drawing"),
    "cartoon": ("a cartoon with thick black outlines", "a cartoon drawing with bold outlines",
                "a cartoon-style picture with heavy outlines"),
    "pixel-art": ("pixel art", "a pixel-art image", "a retro pixel-art scene"),
    "watercolor": ("a watercolor painting", "a soft watercolor painting",
                   "a watercolor illustration on textured paper"),
    "pencil-sketch": ("a pencil sketch", "a colored-pencil sketch", "a hand-drawn pencil sketch"),
}
# Forms that read well followed by "of ...": no trailing modifiers of their own.
STYLE_OF = {
    "flat": ("a flat vector illustration", "a clean flat vector graphic"),
    "cartoon": ("a bold-outlined cartoon", "a thick-outlined cartoon drawing"),
    "pixel-art": ("pixel art", "a pixel-art image", "a retro pixel-art scene"),
    "watercolor": ("a watercolor painting", "a soft watercolor painting"),
    "pencil-sketch": ("a pencil sketch", "a colored-pencil sketch", "a hand-drawn pencil sketch"),
}
STYLE_TAG = {"flat": "flat vector", "cartoon": "cartoon", "pixel-art": "pixel art",
             "watercolor": "watercolor", "pencil-sketch": "pencil sketch"}

BACKGROUND_NP = {
    "plain": ("a plain cream backdrop", "a plain, light backdrop"),
    "sky": ("a clear blue sky", "a bright blue sky"),
    "grass": ("a grassy field under a blue sky", "a green meadow beneath the sky"),
    "beach": ("a sandy beach with the sea behind it", "a beach with sand, sea and sky"),
    "indoor": ("a room with a pale wall and a wooden floor", "an interior with a beige wall and floorboards"),
    "night": ("a starry night sky", "a dark night sky full of stars"),
    "brick": ("a red brick wall", "a weathered brick wall"),
}
BACKGROUND_PP = {  # prepositional forms; the NP forms get "against"/"in front of"
    "grass": ("in a grassy field", "on a green meadow"),
    "beach": ("on a sandy beach by the sea", "at the seaside"),
    "indoor": ("in a room with a pale wall and a wooden floor", "indoors, above a wooden floor"),
    "night": ("under a starry night sky", "beneath a dark sky full of stars"),
}

LIGHT_NP = {
    "daylight": ("bright daylight", "clear, even daylight"),
    "dim": ("dim light", "low, subdued light"),
    "sunset": ("warm sunset light", "the warm glow of a sunset"),
    "moonlight": ("cool moonlight", "cold blue moonlight"),
    "spotlight-left": ("a spotlight from the left", "a single spotlight shining from the left"),
    "spotlight-right": ("a spotlight from the right", "a single spotlight shining from the right"),
}
LIGHT_SENTENCE = {
    "daylight": ("Bright daylight lights the scene evenly.", "Everything is lit by bright daylight."),
    "dim": ("The lighting is dim and subdued.", "The scene is lit only by dim light."),
    "sunset": ("Warm sunset light gives everything an orange glow.", "The light is the warm glow of a sunset."),
    "moonlight": ("Cool moonlight tints the scene blue.", "The scene is lit by cool moonlight."),
    "spotlight-left": ("A spotlight from the left lights the scene.", "The light comes from a spotlight on the left."),
    "spotlight-right": ("A spotlight from the right lights the scene.", "The light comes from a spotlight on the right."),
}
SHADOW_SIDE = {"daylight": "to the lower right", "dim": "straight down", "sunset": "to the left",
               "moonlight": "to the lower left", "spotlight-left": "to the right", "spotlight-right": "to the left"}


# ---------------------------------------------------------------------------------------
# Grammar helpers
# ---------------------------------------------------------------------------------------


def _tidy(text: str, period: bool = True) -> str:
    """One space between words, a/an by the next word's sound, capitals after full stops."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r" +([,.;:])", r"\1", text)
    text = re.sub(r",+", ",", text)

    def article(m: re.Match) -> str:
        a, nxt = m.group(1), m.group(2)
        an = nxt[0].lower() in "aeiou"
        word = "an" if an else "a"
        return (word.capitalize() if a[0].isupper() else word) + " " + nxt

    text = re.sub(r"\b(an?|An?)\s+([A-Za-z0-9])", article, text)
    text = re.sub(r"(^|[.!?] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)
    if period and text and text[-1] not in ".!?":
        text += "."
    return text


def _noun(g: Group, count: int | None = None) -> str:
    n = g.count if count is None else count
    return g.shape if n == 1 else PLURALS[g.shape]


def _count_form(count: int, rng: random.Random) -> str:
    return rng.choices(COUNT_FORMS[count], weights=_COUNT_WEIGHTS[count])[0]


def _is_collective(form: str) -> bool:
    return form.startswith("a pair") or form.startswith("a trio")


def _noun_phrase(g: Group, rng: random.Random, size: bool = True, texture: bool = True) -> tuple[str, bool]:
    """'three small striped red stars' -> (phrase, grammatical plural?)."""
    form = _count_form(g.count, rng)
    words = [form]
    if size:
        words.append(rng.choice(SIZE_WORDS[g.size]))
    pre, post, with_ = TEXTURE_WORDS[g.texture]
    mode = None
    if texture:
        mode = rng.choice([m for m, opts in (("pre", pre), ("post", post), ("with", with_)) if opts])
    if mode == "pre":
        words.append(rng.choice(pre))
    words.append(g.colour)
    if mode == "post":
        words.append(rng.choice(post))
    words.append(_noun(g))
    if mode == "with":
        words.append(rng.choice(with_))
    return " ".join(words), g.count > 1


def _verb(plural: bool, rng: random.Random) -> str:
    return rng.choice(VERBS)[1 if plural else 0]


def _arrangement(g: Group, rng: random.Random) -> str:
    return rng.choice(ARRANGEMENT_WORDS[g.arrangement]) if g.arrangement in ARRANGEMENT_WORDS else ""


def _and_list(items: list[str]) -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + ", and " + items[-1]


def _background_pp(bg: str, rng: random.Random) -> str:
    if bg in BACKGROUND_PP and rng.random() < 0.6:
        return rng.choice(BACKGROUND_PP[bg])
    return rng.choice(("against", "in front of")) + " " + rng.choice(BACKGROUND_NP[bg])


def _light_pp(light: str, rng: random.Random) -> str:
    np_ = rng.choice(LIGHT_NP[light])
    if light.startswith("spotlight"):
        return rng.choice(("lit by", "under")) + " " + np_
    return rng.choice(("in", "under", "bathed in")) + " " + np_


def _ref(g: Group, rng: random.Random) -> str:
    """A definite reference to a group ('the red stars', 'both red stars')."""
    if g.count == 2 and rng.random() < 0.3:
        return f"both {g.colour} {_noun(g)}"
    if g.count > 2 and rng.random() < 0.3:
        return f"the {rng.choice(COUNT_FORMS[g.count][:2])} {g.colour} {_noun(g)}"
    return f"the {g.colour} {_noun(g)}"


# ---------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------


def _group_clause(g: Group, rng: random.Random) -> str:
    """A full clause about one group: what, where and how it is arranged."""
    np_, plural = _noun_phrase(g, rng)
    pos = rng.choice(POSITION_AT[g.position])
    arr = _arrangement(g, rng)
    form = rng.randrange(4)
    if form == 0:
        return f"{np_} {_verb(plural, rng)} {pos}" + (f", {arr}" if arr else "")
    if form == 1:
        be = "are" if plural and not _is_collective(np_) else "is"
        return f"{pos} there {be} {np_}" + (f" {arr}" if arr else "")
    if form == 2 and arr:
        return f"{np_}, {arr}, {_verb(plural, rng)} {pos}"
    return f"{pos} you can see {np_}" + (f" {arr}" if arr else "")


def _group_item(g: Group, rng: random.Random, detail: str) -> str:
    """A noun phrase with its place, for lists ('three red stars on the left')."""
    rich = detail == "rich"
    np_, _ = _noun_phrase(g, rng, size=rich or rng.random() < 0.4, texture=rich)
    # Arrangement before place ("in a row on the left"): after it, it would read as part
    # of the place phrase.
    arr = _arrangement(g, rng) if rich else ""
    return f"{np_} {arr} {rng.choice(POSITION_AT[g.position])}"


def caption_for(scene: Scene, rng: random.Random | int, detail: str = "rich") -> str:
    """A caption of `scene`: "rich" names every attribute, "short" objects, places, style and
    background in one sentence, "terse" is a casual prompt naming only the objects."""
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    groups = list(scene.groups)
    if detail == "terse":
        return _terse(scene, rng)
    if detail == "short":
        rng.shuffle(groups)
        items = _and_list([_group_item(g, rng, detail) for g in groups])
        bg = _background_pp(scene.background, rng)
        if rng.random() < 0.5:
            return _tidy(f"{rng.choice(STYLE_OF[scene.style])} of {items}, {bg}")
        return _tidy(f"{items}, {bg}, as {rng.choice(STYLE_NP[scene.style])}")
    if detail != "rich":
        raise ValueError(f"detail must be rich, short or terse, not {detail!r}")

    rng.shuffle(groups)
    style_np = rng.choice(STYLE_NP[scene.style])
    them = "it" if sum(g.count for g in groups) == 1 else "them"
    context = [
        rng.choice((
            f"The background is {rng.choice(BACKGROUND_NP[scene.background])}.",
            f"The scene is set {_background_pp(scene.background, rng)}.",
            f"Behind {them} is {rng.choice(BACKGROUND_NP[scene.background])}.",
        )),
        rng.choice(LIGHT_SENTENCE[scene.lighting]),
    ]
    if rng.random() < 0.5:
        context.append(f"Soft shadows fall {SHADOW_SIDE[scene.lighting]}.")
    opener = rng.randrange(3)
    if opener == 0:  # "A watercolor painting of X on the left and Y at the top. ..."
        body = f"{rng.choice(STYLE_OF[scene.style])} of {_and_list([_group_item(g, rng, 'rich') for g in groups])}."
    elif opener == 1:  # one sentence per group, style stated at the end
        body = " ".join(_group_clause(g, rng) + "." for g in groups)
        context.append(rng.choice((f"The image is {style_np}.", f"It is rendered as {style_np}.",
                                   f"The whole picture is {style_np}.")))
    else:  # lead with the light, then the groups joined in one sentence
        clauses = [_group_clause(g, rng) for g in groups]
        joined = clauses[0] if len(clauses) == 1 else ", while ".join([", ".join(clauses[:-1]), clauses[-1]])
        body = f"{_light_pp(scene.lighting, rng)}, {joined}."
        context = [c for c in context if c not in LIGHT_SENTENCE[scene.lighting]]
        context.append(f"This is {style_np}.")
    rng.shuffle(context)
    return _tidy(body + " " + " ".join(context))


def _terse(scene: Scene, rng: random.Random) -> str:
    """A casual prompt: objects only, sometimes with counts, sometimes with a style tag."""
    with_counts = rng.random() < 0.6
    parts = []
    for g in scene.groups:
        if with_counts or g.count == 1:
            form = rng.choice(COUNT_FORMS[g.count][:2])
            parts.append(f"{form} {g.colour} {_noun(g)}")
        else:
            parts.append(f"{rng.choice(('some', 'a few', ''))} {g.colour} {_noun(g)}")
    text = rng.choice((" and ", ", ", " with ")).join(parts) if len(parts) == 2 else _and_list(parts)
    if rng.random() < 0.3:
        text += ", " + STYLE_TAG[scene.style]
    text = _tidy(text, period=False)
    # Typed prompts are often all lower case.
    return text[0].lower() + text[1:] if rng.random() < 0.5 else text


# ---------------------------------------------------------------------------------------
# Edit instructions
# ---------------------------------------------------------------------------------------


def instruction_for(edit: Edit, source: Scene, target: Scene, rng: random.Random | int) -> str:
    """A natural-language instruction that turns `source` into `target` by `edit`."""
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    op = edit.op
    if op == "recolor":
        ref, new = _ref(source.groups[edit.group], rng), edit.value
        t = rng.choice((f"Make {ref} {new}", f"Change the color of {ref} to {new}", f"Recolor {ref} {new}",
                        f"Paint {ref} {new}", f"Turn {ref} {new}"))
    elif op == "add":
        g = target.groups[-1]
        np_, _ = _noun_phrase(g, rng, size=rng.random() < 0.7, texture=rng.random() < 0.6)
        where = rng.choice(POSITION_AT[g.position])
        arr = _arrangement(g, rng)
        t = rng.choice(("Add", "Put", "Place", "Insert")) + f" {np_} {where}" + (f", {arr}" if arr else "")
    elif op == "remove":
        ref = _ref(source.groups[edit.group], rng)
        t = rng.choice((f"Remove {ref}", f"Delete {ref}", f"Take away {ref}", f"Get rid of {ref}",
                        f"Erase {ref} from the picture"))
    elif op == "move":
        ref, to = _ref(source.groups[edit.group], rng), rng.choice(POSITION_TO[edit.value])
        t = rng.choice(("Move", "Shift", "Slide", "Relocate")) + f" {ref} {to}"
    elif op == "background":
        bg = rng.choice(BACKGROUND_NP[edit.value])
        t = rng.choice((f"Change the background to {bg}", f"Replace the background with {bg}",
                        f"Swap the backdrop for {bg}", f"Put the objects {_background_pp(edit.value, rng)}"))
    elif op == "lighting":
        t = rng.choice((f"Change the lighting to {rng.choice(LIGHT_NP[edit.value])}",
                        f"Relight the scene with {rng.choice(LIGHT_NP[edit.value])}",
                        f"Show the scene {_light_pp(edit.value, rng)}"))
    elif op == "style":
        s = rng.choice(STYLE_NP[edit.value])
        t = rng.choice((f"Redraw this as {s}", f"Turn the image into {s}", f"Convert the picture to {s}",
                        f"Render it as {s}"))
    else:
        raise ValueError(f"unknown edit op {op!r}")
    return _tidy(t)

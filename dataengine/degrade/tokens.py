"""Tokens and their tags: the caption as a string of one character per token.

Every token gets a *tag character* that stands for its feature set (taxonomy.py): a
lexicon word gets its own character, an unknown word one of a few characters by its shape
(-ly, -ing, -ed, plural, number, capitalised). The detectors' rules are regular
expressions over that tag string, written with feature classes:

    <DET>?<HUE>?<COLOUR>        a colour phrase
    <W~FUNC>                    any content word (word, not a function word)
    <@of>                       the word "of"
    <LIGHTN|LIT>, <!END>        union, complement; '&' intersects, '~' excludes

so one compiled regex scans a whole caption at C speed, and a match's start/end are token
indices. Quoted strings are single tokens, so no rule can cut one in half.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .taxonomy import (
    ABBREVIATIONS, ADJ_FEATURES, ED_NOUNS, FUNCTION_FEATURES, IRREGULAR_PLURALS, ING_NOUNS, LEXICON, LY_NOT_ADV,
)

# A quoted string is one token; an apostrophe inside a word ("knight’s", "pins'") is not a
# quote. Words keep internal joiners: "bird's-eye", "f/1.8", "9-24", "3.5".
_TOKEN = re.compile(
    r'"[^"\n]{1,300}"'
    r"|“[^”\n]{1,300}”"
    r"|(?<![\w'’])['‘](?=[^\s'‘’])[^'‘’\n]{1,80}?['’](?!\w)"
    r"|[^\W_]+(?:['’./\-&][^\W_]+)*"
    r"|\S"
)

_PUNCT = {
    ",": "COMMA", ".": "END", "!": "END", "?": "END", "…": "END", ";": "SEMI", ":": "SEMI",
    "(": "LPAR", "[": "LPAR", "{": "LPAR", ")": "RPAR", "]": "RPAR", "}": "RPAR",
    "-": "DASH", "–": "DASH", "—": "DASH", '"': "OQ", "“": "OQ", "”": "OQ", "'": "OQ",
    "‘": "OQ", "’": "OQ",
}
_SHAPES = ("", "ADV", "ING", "ED", "PL", "NUMD", "DIG", "ADJ")
_ADJ_SUFFIXES = ("ous", "ful", "ive", "ic", "ical", "able", "ible", "less", "ish", "like", "-sized",
                 "-shaped", "-looking", "-style", "esque")
_LENS = re.compile(r"f/\d+(?:\.\d+)?|\d+(?:\.\d+)?mm|1/\d+s?|iso\d+|\d+k")
_COLOUR_SUFFIX = ("-colored", "-coloured", "-toned", "-hued", "-tinted", "-colored", "ish")
_CASES = ("", "CAP", "UPPER")


# ---------------------------------------------------------------------------------------
# The tag alphabet: one character per feature set
# ---------------------------------------------------------------------------------------


def _shape(low: str) -> str:
    """The morphological class of an unknown (or known) lower-case word."""
    if low.isdigit() or re.fullmatch(r"\d+(?:[.,]\d+)?", low):
        return "NUMD"
    if any(c.isdigit() for c in low):
        return "DIG"
    n = len(low)
    if n > 4 and low.endswith("ly") and low not in LY_NOT_ADV:
        return "ADV"
    if n > 5 and low.endswith("ing") and low not in ING_NOUNS:
        return "ING"
    if n > 4 and low.endswith("ed") and low not in ED_NOUNS:
        return "ED"
    if low in IRREGULAR_PLURALS or (
        n > 3 and low.endswith("s") and not low.endswith(("ss", "us", "is", "ous", "'s", "’s"))
    ):
        return "PL"
    if n > 4 and (low.endswith(_ADJ_SUFFIXES) or "-" in low):
        return "ADJ"
    return ""


# Lexicon features that do not stop a word from reading as a participle ("scattered").
_PARTICIPLE_OK = frozenset({"KW", "ARRV", "LIT", "TEXTV", "MOODV", "TEXA", "ADJ"})


def _word_features(low: str, literal: bool) -> frozenset[str]:
    feats = set(LEXICON.get(low, ()))
    shape = _shape(low)
    if shape and not (shape in ("ING", "ED") and feats - FUNCTION_FEATURES - _PARTICIPLE_OK):
        # A lexicon noun/adjective ending in -ing/-ed ("painting", "lit") is not a participle.
        feats.add(shape)
    if shape == "NUMD":
        feats.add("NUM")
    if feats & FUNCTION_FEATURES:
        feats.add("FUNC")
    if feats & ADJ_FEATURES:
        feats.add("ADJ")
    feats.add("W")
    if literal:
        feats.add("=" + low)
    return frozenset(feats)


class Alphabet:
    """Assigns a character to each feature set and builds character classes over them.

    Words that rules name literally (`<@of>`) get a character of their own; other lexicon
    words share one per feature set, which keeps the classes (and the regexes) small.
    """

    def __init__(self, literals: frozenset[str]) -> None:
        missing = sorted(w for w in literals if w not in LEXICON)
        if missing:
            raise ValueError(f"words named in rules but in no lexicon: {missing}")
        self.feats: dict[str, frozenset[str]] = {}
        self._by_feats: dict[frozenset[str], str] = {}
        self.word_char: dict[str, str] = {}
        self.unknown_char: dict[tuple[str, str], str] = {}
        self.punct_char: dict[str, str] = {}
        self._next = 0x100
        for w in sorted(LEXICON):
            self.word_char[w] = self._char(_word_features(w, w in literals))
        for shape in _SHAPES:
            for case in _CASES:
                fs = {"W"} | ({shape} if shape else set()) | ({case} if case else set())
                if shape == "NUMD":
                    fs.add("NUM")
                self.unknown_char[(shape, case)] = self._char(frozenset(fs))
        for name in sorted(set(_PUNCT.values()) | {"QUOTED", "PUNCT", "DOT"}):
            self.punct_char[name] = self._char(frozenset({name, "P"}))
        self._index: dict[str, set[str]] = {}
        for ch, fs in self.feats.items():
            for f in fs:
                self._index.setdefault(f, set()).add(ch)
        self._all = set(self.feats)
        self._classes: dict[str, str] = {}

    def _char(self, feats: frozenset[str]) -> str:
        ch = self._by_feats.get(feats)
        if ch is None:
            while chr(self._next).isspace():
                self._next += 1
            ch = chr(self._next)
            self._next += 1
            self.feats[ch] = feats
            self._by_feats[feats] = ch
        return ch

    def _term(self, t: str) -> set[str]:
        if t == "*":
            return self._all
        key = "=" + t[1:] if t.startswith("@") else t
        if key not in self._index:
            raise ValueError(f"unknown feature or word {t!r}")
        return self._index[key]

    def chars(self, expr: str) -> frozenset[str]:
        """The tag characters a class expression admits."""
        neg = expr.startswith("!")
        chars: set[str] = set()
        for alt in (expr[1:] if neg else expr).split("|"):
            must, *exclude = alt.split("~")
            got = set(self._all)
            for t in must.split("&"):
                got &= self._term(t)
            for t in exclude:
                got -= self._term(t)
            chars |= got
        return frozenset(self._all - chars if neg else chars)

    def cls(self, expr: str) -> str:
        """`A|B&C~D`, `!A`, `@word`, `*` -> a regex character class."""
        if expr in self._classes:
            return self._classes[expr]
        chars = set(self.chars(expr))
        if not chars:
            raise ValueError(f"<{expr}> matches no token")
        # Tag strings hold only alphabet characters, so the smaller side can be written.
        rest = self._all - chars
        if len(rest) < len(chars):
            out = "[^" + "".join(re.escape(c) for c in sorted(rest)) + "]" if rest else "(?s:.)"
        else:
            out = "[" + "".join(re.escape(c) for c in sorted(chars)) + "]"
        self._classes[expr] = out
        return out


_CLASS = re.compile(r"(?<!\?P)<([^<>]+)>")
_MACRO = re.compile(r"%(\w+)%")
_LITERAL = re.compile(r"@([^|&~<>]+)")
ALPHABET: Alphabet = None  # type: ignore[assignment]  # set by build_alphabet


def expand(dsl: str, macros: dict[str, str] | None = None) -> str:
    """The rule with whitespace removed and `%NAME%` macros expanded."""
    src = "".join(dsl.split())
    for _ in range(8):  # macros may use macros
        new = _MACRO.sub(lambda m: "".join((macros or {})[m.group(1)].split()), src)
        if new == src:
            break
        src = new
    return src


def build_alphabet(rules: list[str]) -> Alphabet:
    """Fix the tag alphabet for these (expanded) rules; call once before `compile_rule`."""
    global ALPHABET
    literals = frozenset(w for r in rules for cls in _CLASS.findall(r) for w in _LITERAL.findall(cls))
    ALPHABET = Alphabet(literals)
    _init_tables()
    return ALPHABET


def compile_rule(src: str) -> re.Pattern[str]:
    """Compile an expanded rule: `<...>` feature classes, the rest ordinary regex syntax."""
    return re.compile(_CLASS.sub(lambda m: ALPHABET.cls(m.group(1)), src))


# ---------------------------------------------------------------------------------------
# Tokenising
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Tokens:
    """A caption split into tokens, with character offsets into `text` and one tag each."""

    text: str
    words: list[str]
    starts: list[int]
    ends: list[int]
    space: list[bool]  # whitespace before the token in the source
    tags: str
    sent: list[int]  # sentence number of each token
    bounds: list[tuple[int, int]]  # token range of each sentence

    def __len__(self) -> int:
        return len(self.words)

    def feats(self, i: int) -> frozenset[str]:
        return ALPHABET.feats[self.tags[i]]


_tag_cache: dict[tuple[str, bool], str] = {}
_END = ""
_COLOURS = frozenset(w for w, f in LEXICON.items() if "COLOUR" in f)
_COLOURISH = _COLOURS | frozenset(w for w, f in LEXICON.items() if "HUE" in f) | {"and", "or"}


def _init_tables() -> None:
    global _END
    _END = ALPHABET.punct_char["END"]
    _tag_cache.clear()


def _tag(word: str, initial: bool) -> str:
    key = (word, initial)
    ch = _tag_cache.get(key)
    if ch is not None:
        return ch
    first = word[0]
    if len(word) > 2 and first in "\"“'‘" and word[-1] in "\"”'’":
        ch = ALPHABET.punct_char["QUOTED"]
    elif word in _PUNCT:
        ch = ALPHABET.punct_char[_PUNCT[word]]
    elif not first.isalnum():
        ch = ALPHABET.punct_char["PUNCT"]
    else:
        low = word.lower()
        if word.isupper() and sum(c.isalpha() for c in word) > 1:
            case = "UPPER"
        elif first.isupper() and not initial:
            case = "CAP"
        else:
            case = ""
        known = ALPHABET.word_char.get(low)
        if known is None and not case:
            known = _shape_word(low)
        if known is not None and (not case or "FUNC" in ALPHABET.feats[known]):
            ch = known
        else:
            # A capitalised word mid-sentence is part of a name: keep its shape only.
            ch = ALPHABET.unknown_char[(_shape(low), case)]
    if len(_tag_cache) > 500_000:
        _tag_cache.clear()
    _tag_cache[key] = ch
    return ch


def _shape_word(low: str) -> str | None:
    """The stand-in lexicon word for a lens figure or a colour compound, if `low` is one."""
    if _LENS.fullmatch(low):
        return ALPHABET.word_char["<lensnum>"]
    if "-" in low:
        parts = low.split("-")
        colourish = [p in _COLOURISH for p in parts]
        if all(colourish) and any(p in _COLOURS for p in parts):
            return ALPHABET.word_char["<colourword>"]
        if low.endswith(_COLOUR_SUFFIX[:-1]) and len(parts) == 2:
            return ALPHABET.word_char["<colourword>"]
    return None


def tokenize(text: str) -> Tokens:
    """Split `text` into tokens and tag them; offsets refer to `text` itself."""
    ms = list(_TOKEN.finditer(text))
    words = [m.group() for m in ms]
    starts = [m.start() for m in ms]
    ends = [m.end() for m in ms]
    n = len(words)
    space = [False] + [starts[i] > ends[i - 1] for i in range(1, n)]
    cache = _tag_cache
    # Tag every token as if mid-sentence, then fix full stops that end no sentence and
    # the words that start one.
    tags = [cache.get((w, False)) or _tag(w, False) for w in words]
    dot = ALPHABET.punct_char["DOT"]
    k = tags.index(_END) if _END in tags else -1
    ends_at: list[int] = []
    while k >= 0:
        w = words[k]
        if w == "." and k + 1 < n and (
            (words[k - 1].lower() in ABBREVIATIONS and not words[k + 1][0].isupper())
            or (not space[k + 1] and words[k + 1][0].isalnum())  # "3.5"-like joins
        ):
            tags[k] = dot
        else:
            ends_at.append(k)
        try:
            k = tags.index(_END, k + 1)
        except ValueError:
            k = -1
    sent: list[int] = []
    bounds: list[tuple[int, int]] = []
    first = 0
    for s, e in enumerate(ends_at + ([n - 1] if n and (not ends_at or ends_at[-1] != n - 1) else [])):
        sent.extend([s] * (e + 1 - first))
        bounds.append((first, e + 1))
        i = first
        while i <= e and words[i] in _OPENING:
            i += 1
        if i <= e:
            tags[i] = cache.get((words[i], True)) or _tag(words[i], True)
        first = e + 1
    return Tokens(text, words, starts, ends, space, "".join(tags), sent, bounds)


_OPENING = frozenset('"“‘\'([')

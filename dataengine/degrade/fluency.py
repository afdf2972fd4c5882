"""Removing spans from a caption and keeping what is left fluent.

A `Doc` is the caption's tokens with a live flag each. Removing a span kills its tokens
and then repairs the *seam* (the last live token before it, the first after it) until
nothing more applies:

- a comma, semicolon or dash left before closing punctuation, or at a sentence start, goes;
  a phrase that was set off by two commas takes both ("a dog, in soft light, runs");
- a conjunction, preposition, article or relative word left hanging at a clause edge
  goes ("with." / "and,"), unless it is a verb's particle ("light coming in,");
- empty brackets go; "a"/"an" follows the next word's sound; a new sentence start is
  capitalised.

A removed modifier also takes the comma or "and" that tied it to a neighbouring
modifier ("thick, fluffy clouds" -> "thick clouds"). Rendering joins live tokens with
the source's spacing; across a cut there is a space if the source had one anywhere in
the gap, and closing punctuation never gets one before it.
"""

from __future__ import annotations

from .tokens import Tokens

_CLOSERS = frozenset({",", ".", ";", ":", "!", "?", ")", "]", "}", "…"})
_OPENERS = frozenset({"(", "[", "{"})
_SEPARATORS = frozenset({",", ";", ":", "-", "–", "—"})
_ENDS = frozenset({".", "!", "?", "…"})
_PAIRS = {"(": ")", "[": "]", "{": "}"}
# Words that cannot end a clause: a removal that leaves one there takes it too.
_DANGLE = frozenset(
    "and or but nor yet while whereas although though because with without of in on at by to "
    "from into onto under beneath against across for like than between among amid amidst "
    "toward towards via upon featuring including such the a an its their his her this these "
    "those that which who whose where very quite as whilst atop near all so".split())
# Prepositions that may end a clause as a verb's particle ("light coming in.").
_PARTICLES = frozenset("in on up down out off over around through along by behind above below "
                       "inside outside across about near".split())
# Conjunctions that cannot start a clause or follow a preposition.
_LEAD_CONJ = frozenset("and or but nor yet while whereas whilst".split())
_ARTICLES = frozenset({"a", "an", "the"})
_DETERMINERS = _ARTICLES | {"its", "their", "his", "her", "this", "these", "those", "some", "each", "every"}
_VERBISH = frozenset({"VERB", "ING", "ED", "LIT", "SEEM", "COP"})
_MODIFIER = frozenset({"ADJ", "ED"})

# a/an by sound: the common exceptions to "vowel letter = vowel sound".
_AN_CONSONANT = ("uni", "use", "usu", "uti", "ura", "ure", "uro", "eu", "one", "once", "ubiq",
                 "ukr", "u-")
_A_VOWEL = ("hour", "honest", "honor", "honour", "heir", "herb")
_AN_NUMBERS = frozenset({"11", "18"})  # "an eleven", "an eighteen"; any 8... is "an eight..."


def article_for(word: str) -> str:
    """"a" or "an" for the word that follows it (by sound, for common cases)."""
    w = word.lower().lstrip("\"'“‘(")
    if not w:
        return "a"
    if w[0].isdigit():
        lead = w.split("-")[0].rstrip("stndrh")
        return "an" if w[0] == "8" or lead in _AN_NUMBERS else "a"
    if w.startswith(_A_VOWEL):
        return "an"
    if w[0] in "aeiou":
        return "a" if w.startswith(_AN_CONSONANT) else "an"
    return "a"


class Doc:
    """A caption being cut down: live tokens, their current text, and seam repair."""

    def __init__(self, tokens: Tokens, protected: frozenset[int] = frozenset()) -> None:
        self.t = tokens
        self.text = list(tokens.words)
        self.low = [w.lower() for w in tokens.words]
        self.alive = bytearray(b"\x01" * len(tokens.words))  # 1: live; find/rfind skip dead runs in C
        self.protected = protected
        self._lo: int | None = None
        self._hi: int | None = None
        # Each token's rendered text with the space before it; dead tokens are "".
        words, space = self.text, tokens.space
        self.piece = [w if (not sp or w in _CLOSERS or (k and words[k - 1] in _OPENERS)) else " " + w
                      for k, (w, sp) in enumerate(zip(words, space))]

    # -- navigation ----------------------------------------------------------------------
    def prev(self, i: int) -> int:
        """The live token before `i`, or -1."""
        return self.alive.rfind(1, 0, max(i, 0))

    def next(self, i: int) -> int:
        """The live token after `i`, or -1."""
        return self.alive.find(1, i + 1)

    def live_text(self, i: int, j: int) -> str:
        """The current text of the live tokens in `i:j`, spaced as rendered."""
        return "".join(self.piece[i:j]).lstrip(" ")

    def render(self) -> str:
        return "".join(self.piece)

    def _piece(self, k: int, prev: int) -> str:
        """Token `k` with the space before it, given the live token `prev` before it."""
        w = self.text[k]
        if prev < 0 or w in _CLOSERS or self.text[prev] in _OPENERS:
            return w
        space = self.t.space
        # Across a cut, a space if the source had one anywhere in the gap.
        sp = space[k] if prev == k - 1 else any(space[prev + 1:k + 1])
        return " " + w if sp else w

    def _refresh(self) -> None:
        """Recompute the pieces around what the last edit touched."""
        if self._lo is None:
            return
        lo, hi = self._lo, self._hi
        self._lo = self._hi = None
        k = self.prev(lo)
        if k < 0:
            k = self.next(-1)
        prev = self.prev(k) if k >= 0 else -1
        stop = self.next(hi)
        while k >= 0:
            self.piece[k] = self._piece(k, prev)
            if k == stop or (stop < 0 and k > hi):
                break
            prev, k = k, self.next(k)

    def _touch(self, k: int) -> None:
        self._lo = k if self._lo is None or k < self._lo else self._lo
        self._hi = k if self._hi is None or k > self._hi else self._hi

    # -- editing -------------------------------------------------------------------------
    def _kill(self, k: int) -> None:
        if k in self.protected:
            raise ValueError(f"token {k} ({self.text[k]!r}) is protected")
        self.alive[k] = 0
        self.piece[k] = ""
        self._touch(k)

    def _set_text(self, k: int, w: str) -> None:
        self.text[k] = w
        self.low[k] = w.lower()
        self._touch(k)

    def remove(self, i: int, j: int, kind: str = "pp", repl: str | None = None) -> bool:
        """Remove tokens `i:j` (or put `repl` in their place) and repair the seam; False
        if nothing in the range was live."""
        live = [k for k in range(i, j) if self.alive[k]]
        if not live:
            return False
        if any(k in self.protected for k in live):
            raise ValueError(f"span {i}:{j} covers a protected token")
        if repl is not None:
            self._set_text(live[0], repl)
            for k in live[1:]:
                self._kill(k)
            self._repair(self.prev(live[0]), live[0], kind)
            self._repair(live[0], self.next(live[0]), kind)
        else:
            alive, piece = self.alive, self.piece
            for k in live:
                alive[k] = 0
                piece[k] = ""
            self._touch(live[0])
            self._touch(live[-1])
            if kind == "mod":
                self._untie_modifier(live[0], live[-1])
            self._repair(self.prev(live[0]), self.next(live[-1]), kind)
        self._refresh()
        return True

    def _untie_modifier(self, first: int, last: int) -> None:
        """'thick, fluffy clouds' - 'fluffy' -> 'thick clouds': drop one connector."""
        feats = self.t.feats
        r = self.next(last)
        if r >= 0 and self.low[r] in (",", "and", "or"):
            r2 = self.next(r)
            if r2 >= 0 and feats(r2) & _MODIFIER:
                self._kill(r)
                return
        lft = self.prev(first)
        if lft >= 0 and self.low[lft] in (",", "and", "or"):
            l2 = self.prev(lft)
            if l2 >= 0 and feats(l2) & _MODIFIER:
                self._kill(lft)

    def _repair(self, L: int, R: int, kind: str) -> None:
        """Fix the seam between live tokens `L` and `R` (-1: none) until nothing applies."""
        feats = self.t.feats
        for _ in range(16):
            lw = self.low[L] if L >= 0 else None
            rw = self.low[R] if R >= 0 else None
            r_closer = rw is None or rw in _CLOSERS or rw in _SEPARATORS
            l_start = lw is None or lw in _ENDS or lw in _OPENERS
            if lw in _PAIRS and rw == _PAIRS[lw]:
                self._kill(L)
                self._kill(R)
                L, R = self.prev(L), self.next(R)
                continue
            if lw == "," and rw == "," and kind != "mod":
                self._kill(L)
                self._kill(R)
                L, R = self.prev(L), self.next(R)
                continue
            if lw in (";", ":") and rw == ",":
                self._kill(R)  # "swim; , mountains" -> "swim; mountains"
                R = self.next(R)
                continue
            if lw in _SEPARATORS and r_closer and not (lw in ("-", "–", "—") and rw == ","):
                self._kill(L)
                L = self.prev(L)
                continue
            if l_start and rw in _SEPARATORS:
                self._kill(R)
                R = self.next(R)
                continue
            if lw in _DETERMINERS and rw == ",":
                self._kill(R)  # "a [centered], tall vase" -> "a tall vase"
                R = self.next(R)
                continue
            if lw in _DANGLE and r_closer and L not in self.protected:
                before = self.prev(L)
                if not (lw in _PARTICLES and before >= 0 and feats(before) & _VERBISH):
                    self._kill(L)
                    L = self.prev(L)
                    continue
            if rw in _LEAD_CONJ and (l_start or lw in _SEPARATORS or lw in _DANGLE) and R not in self.protected:
                self._kill(R)
                R = self.next(R)
                continue
            if rw == "," and L >= 0 and "FUNC" not in feats(L) and "P" not in feats(L):
                nx = self.next(R)
                if nx >= 0 and feats(nx) & {"VERB", "COP", "SEEM", "AUX"}:
                    self._kill(R)  # "A carving, depicts" -> "A carving depicts"
                    R = self.next(R)
                    continue
            if lw in _ARTICLES and rw in _ARTICLES:
                self._kill(L)
                L = self.prev(L)
                continue
            if lw in ("a", "an") and R >= 0 and self.text[R][:1].isalnum():
                want = article_for(self.text[R])
                if want != lw:
                    self._set_text(L, want.capitalize() if self.text[L][0].isupper() else want)
            if (L < 0 or lw in _ENDS) and R >= 0:
                w = self.text[R]
                if w[:1].islower():
                    self._set_text(R, w[0].upper() + w[1:])
            break

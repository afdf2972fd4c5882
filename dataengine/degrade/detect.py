"""Span detectors: where a caption states each category of detail.

A detector is a set of rules over the tag string (tokens.py). Each rule names the
phrase-level unit that can be removed cleanly: a modifier inside a noun phrase ("a *red*
car"), a prepositional phrase ("*under soft morning light*"), a participle phrase
("*taken from a low angle*"), a frame ("*A watercolor painting of* a fox"), a clause
("*is pale tan and* appears fuzzy") or a whole sentence ("*The lighting is warm.*").
A phrase rule never fires right after a copula ("the car is *in the corner*"): the copula
would be left with nothing to say.

`detect` gathers every rule's matches, drops those that touch the caption's subject (see
`find_subject`), and resolves overlaps: the longer span wins, ties go to the category
earlier in `_PRIORITY`; neighbouring spans of one category joined only by commas or
"and" merge into one. The result is deterministic and non-overlapping.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from . import tokens as _tokens
from .taxonomy import CATEGORIES, CONTAINER_NOUNS
from .tokens import Tokens, build_alphabet, compile_rule, expand, tokenize


@dataclass(frozen=True, slots=True)
class Span:
    """A detected detail: characters `start:end` of the caption, of `category`."""

    start: int
    end: int
    category: str
    text: str


@dataclass(slots=True)
class Cand:
    """A span in token indices, with what removal needs to know about it."""

    i: int
    j: int
    category: str
    kind: str  # mod | det | pp | clause | sent | frame | tag
    repl: str | None = None  # text that replaces the span's first token instead of deletion
    rank: int = 0


@dataclass(slots=True)
class Subject:
    """The caption's subject: the head noun(s) no step may remove, and its sentence."""

    heads: tuple[int, ...]
    np_start: int
    np_end: int  # after the head and an "of" phrase that completes it
    sentence: int


@dataclass(slots=True)
class Analysis:
    tokens: Tokens
    subject: Subject | None
    spans: list[Cand] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Grammar macros (see tokens.py for the <...> class syntax)
# ---------------------------------------------------------------------------------------

M = {
    "CW": "<W~FUNC~ADV>",  # a content word
    "PW": "<W~FUNC~ADV~ING~ED~NUM~ONE>",  # a content word that can head a noun phrase
    "CWX": "(?!<@side><@by>)<W~FUNC~ADV>",  # a content word that does not start "side by side"
    # A modifier; a participle counts only right before another content word.
    "MODW": "(?:(?:<ADV><COMMA>?)*(?:<W~FUNC~ADV~ING~ED>|<ING|ED>(?=<COMMA>?<ADV>*%CWX%)))",
    # Modifiers joined by a comma (after an adjective-like word: not "material, stone") or "and".
    "JOIN": "(?:(?:(?<=<ADJ|ED|ING|NUM|ADV>)<COMMA><@and|@or>?|<@and|@or>)(?=<ADV>*<W~FUNC~ADV>))",
    "MODS": "(?:%MODW%%JOIN%?)*",
    # The noun phrase ends here: no further head word, nor a participle that modifies one.
    "NPEND": "(?!<ADV>*(?!<@side><@by>)(?:<W~FUNC~ADV~NUM~ONE~ING~ED~@full>|<ING|ED>(?=<ADV>*%CWX%)))",
    "BOS": "(?:^|(?<=<END>))",
    "REST": "<!END>*(?:<END>|$)",
    "OFNP": "(?:<@of><DET|NUM>?%MODS%%PW%%NPEND%)",
    "NP": "(?:<DET|NUM|QDET|ONE>*%MODS%%PW%%NPEND%)",
    # A clause's subject; lazy, since a required verb follows (cheap to fail).
    "SUBJ": "(?:<DET|NUM|QDET>?(?:%MODW%%JOIN%?)*?%PW%%NPEND%(?:<@of><DET|NUM>?(?:%MODW%%JOIN%?)*?%PW%%NPEND%)?"
            "|<PRON>|<@this|@these>)",
    "PARTICIPLE": "(?:<ED|@taken|@shot|@seen|@drawn|@done|@made|@shown|@lit>)",
    "LINK": "(?:<LINKER>|<@looks><@down|@up|@out>?<@on|@at|@over|@into>)",
    "LINKV": "(?:<LINKER~@of>|<@looks><@down|@up|@out>?<@on|@at|@over|@into>)",
    "COLW": "(?:<ADV>*<HUE>*<COLOUR>)",
    "COLLIST": "(?:%COLW%(?:(?:<COMMA><@and|@or>?|<@and|@or>|<@to>)%COLW%)*)",
}


@dataclass(slots=True)
class Rule:
    category: str
    kind: str
    src: str  # the expanded rule; compiled once the alphabet is fixed
    # The replacement for a match (None: delete it; False: drop the match).
    repl: Callable[[Tokens, int, int], str | None | bool] | None = None
    check_cop: bool = True  # refuse a phrase that directly follows a copula
    anchored: bool = False  # matches only at a sentence start (tried there alone: faster)
    # Optional context to the left, written right to left; matched on the reversed tags, it
    # extends the span. Rules start with a required token so the regex engine can skip
    # ahead to it, which makes them several times faster than a leading optional part.
    left: str | None = None
    not_after: str | None = None  # a class: the span may not follow such a token
    rx: re.Pattern[str] = None  # type: ignore[assignment]
    left_rx: re.Pattern[str] | None = None
    not_after_chars: frozenset[str] = frozenset()


_PRIORITY = {c: k for k, c in enumerate(
    ("text", "count", "camera", "style", "lighting", "mood", "background", "layout", "texture", "colour"))}
assert set(_PRIORITY) == set(CATEGORIES)


def _rules() -> list[Rule]:
    R: list[Rule] = []

    def add(category: str, kind: str, dsl: str, repl=None, check_cop: bool | None = None,
            left: str | None = None, not_after: str | None = None) -> None:
        src = expand(dsl, M)
        bos = expand("%BOS%", M)
        anchored = src.startswith(bos)
        R.append(Rule(category, kind, src[len(bos):] if anchored else src, repl,
                      kind in ("mod", "pp", "tag") if check_cop is None else check_cop, anchored,
                      expand(left, M) if left else None, not_after))

    def sentence(category: str, dsl: str) -> None:
        add(category, "sent", f"%BOS%(?P<s>{dsl}%REST%)")

    # Predicates: "The stem is pale tan." (the sentence), "... is pale tan and appears
    # fuzzy" (the copula, predicate and "and"), "X is red, while Y ..." (the clause).
    preds: dict[str, str] = {}

    def predicate(category: str, words: str, need: str) -> None:
        preds[category] = f"(?:<ADV>*(?:<@to><@be>)?(?:{words})*{need}(?:{words})*)"

    def predicates() -> None:
        # One regex per shape for all categories: the predicate is an alternation whose
        # group (c_<category>) names the category; categories earlier in _PRIORITY first.
        order = [c for c in _PRIORITY if c in preds]
        pred = "(?:" + "|".join(f"(?P<c_{c}>{preds[c]})" for c in order) + ")"
        cop = "<COP|SEEM>"
        sentence("*", f"%SUBJ%<ADV>*{cop}{pred}(?=<END>|$)")
        add("*", "clause", f"(?P<s>{cop}{pred}<@and>)(?=<ADV>*<VERB|SEEM|COP|AUX>)", check_cop=False)
        add("*", "clause", f"%BOS%(?P<s>%SUBJ%<ADV>*{cop}{pred}<COMMA>?<@while|@whereas|@but|@and>)"
            f"(?=<DET|PRON|THERE>)", check_cop=False)
        add("*", "clause", f"(?P<s><@while|@whereas|@but|@and>%SUBJ%<ADV>*{cop}{pred})(?=<END>|$)",
            check_cop=False, left="<COMMA>?")

    # -- text ------------------------------------------------------------------------------
    quoted = "(?:<QUOTED>|<UPPER>+(?=<COMMA|END|PREP|CONJ|REL>|$))"
    sentence("text", f"%SUBJ%<ADV>*<@reads|@says|@spells|@displays|@bears|@shows><!END>*{quoted}")
    # "that reads "OPEN"", "reading "OPEN"", 'labeled "X"'; a finite verb only after a
    # relative word or at the clause end ('A sign reads "OPEN".'), else it is the clause's
    # own verb ('A menu displays the words "Soup"': only the quoted string goes).
    text_tail = f"<@out>?(?:<DET><ADV>*%MODS%<TEXTN>)?<SEMI>?{quoted}"
    finite = "@reads|@read|@says|@say|@spells|@spell|@displays|@display|@shows|@bears"
    add("text", "pp", f"(?P<s><REL><ADV>*(?:<SEEM><@to>)?<TEXTV>{text_tail})", check_cop=False)
    add("text", "pp", f"(?P<s><TEXTV~{finite.replace('|', '~')}>{text_tail})", check_cop=False, left="<ADV>*")
    add("text", "pp", f"(?P<s><{finite}>{text_tail})(?=<END|COMMA>|$)", check_cop=False)
    add("text", "pp", "(?<=<TEXTN>)(?P<s><SEMI>?(?:<QUOTED>|<UPPER>+))", check_cop=False)

    def quote_repl(t: Tokens, i: int, j: int) -> str | None | bool:
        # A quoted string in argument position ('the "30 minute limit" printed on',
        # 'with "COFFEE" written on it') becomes "text"; after a noun it just goes. A short
        # one in argument position ('the "O"') stays: "text" would not be shorter.
        prev = t.feats(i - 1) if i > 0 else frozenset({"END"})
        if prev & {"ART", "DET", "PREP", "VERB", "END", "COMMA", "TEXTV", "SEMI"}:
            return "Text" if "END" in prev else "text" if len(t.words[i]) > 6 else False
        return None

    add("text", "tag", "(?P<s><QUOTED>)", repl=quote_repl)

    # -- count -------------------------------------------------------------------------------
    # ... a plural head; one followed by a word that is no plural is taken as its verb
    # ("three apes lounge").
    plural_np = "(?=(?:%MODW%<COMMA>?)*<PL>(?:%NPEND%|(?=<W~FUNC~ADV~PL~ADJ~ING~ED>)))"
    add("count", "det", f"(?P<s><NUM>(?:<@or|@to|@and|DASH><NUM>)?<COMMA>?){plural_np}",
        not_after="CAP|UPPER|@number|@no", left="(?:<@or|@to|@and><ONE|NUM>)?")  # "one or two birds"

    def agrees(t: Tokens, i: int, j: int) -> bool | None:
        # "A pair of boots sits": without "a pair of" the verb would not agree; keep it.
        k = j
        while k < len(t) and not t.feats(k) & {"FUNC", "P"}:
            k += 1
        if k < len(t) and (t.words[k].lower() in ("is", "was", "has") or (
                "VERB" in t.feats(k) and t.words[k].lower().endswith("s"))):
            return False
        return None

    add("count", "det", "(?P<s><QTY><@of>)(?=<DET>?<ADV>*%CW%)", left="<ART>?", repl=agrees)
    add("count", "det", f"(?P<s><QDET>){plural_np}", left="<ART>?")
    add("count", "det", f"(?P<s><ART><@dozen|@couple>){plural_np}")
    add("count", "det", "(?P<s><SINGLE>)(?=<ADV>*%CW%)", not_after="!ART")

    def one_repl(t: Tokens, i: int, j: int) -> str:
        return "A" if t.words[i][0].isupper() else "a"

    add("count", "det", not_after="ART|DET", dsl="(?P<s><ONE>)(?=%MODS%%PW%%NPEND%)(?!<ADV>*<@other|@another>)",
        repl=one_repl)

    # -- camera ------------------------------------------------------------------------------
    cam_head = "<SHOTN~@photo~@photograph~@picture~@image~@capture>"
    frame_tail = ("(?:(?:<COMMA><!END|COMMA>{1,8}<COMMA>|%PARTICIPLE%<!END|VERB|COP|COMMA>{0,8}?<COMMA>?"
                  "|<PREP~@of><!END|VERB|COP|COMMA|LINKER~@of>{0,8}?|<REL><!END|COMMA|LINKER>{0,6}?){1,2}"
                  "<ADV>*%LINKV%|%PARTICIPLE%<!END|VERB|COP|COMMA>{0,8}?<COMMA><ADV>*%LINK%|<ADV>*%LINK%)"
                  "<@down|@up|@out|@at|@on|@over|@in>*")
    add("camera", "frame", f"%BOS%(?P<s><DET>?(?:%MODW%<COMMA|@and>?)*?{cam_head}%NPEND%{frame_tail})",
        check_cop=False)
    add("camera", "frame", f"%BOS%(?P<s><@in|@from><DET>?(?:%MODW%<COMMA|@and>?)*?{cam_head}%NPEND%)"
        f"(?=<COMMA|PREP|DET>)", check_cop=False)
    sentence("camera", "(?:<DET>?%MODS%<FRAMEN|MEDIUM>%NPEND%|<PRON>)<COP|AUX>*<ADV>*"
             "<@taken|@shot|@photographed|@captured|@filmed>")
    sentence("camera", "<DET>?%MODS%<CAMN|@depth>%NPEND%%OFNP%?<COP|SEEM|VERB>")
    predicate("camera", "<FOCUSA|COMMA|@and|@slightly|@out|@of|@focus|@in|@soft|@sharp>",
              "(?:<FOCUSA>|<@focus>)")
    add("camera", "pp", left="<ADV>*", dsl="(?P<s><@taken|@photographed|@captured|@filmed|@seen|@viewed|@pictured>"
        "<ADV>*<@from|@with|@on|@using|@through|@at|@in>%NP%%OFNP%?)")
    add("camera", "pp", "(?P<s><@shot><@on|@with|@using><DET>?%MODS%<CAMN|BRAND|LENSNUM>%NPEND%)")
    add("camera", "pp", left="(?:<ADV>*<@taken|@photographed|@shot|@captured|@filmed|@seen|@viewed|@pictured>)?",
        dsl="(?P<s><@from><DET>?%MODS%(?:<@angle|@angles|@perspective|@viewpoint|@vantage"
        "|@height|@distance|@level|@view>(?:<@point>)?|<@above|@below|@overhead|@afar>)%NPEND%)")
    add("camera", "pp", "(?P<s><@at><@eye|@ground|@street><@level>|<@at><DET>?%MODS%<@angle>%NPEND%"
        "|<@at><LENSNUM>)")
    add("camera", "pp", "(?P<s><@depth|@bokeh>(?:(?<=<@depth>)<@of><@field>|(?<=<@bokeh>)"
        "<@effect|@background|@blur>?)%NPEND%)", left="<@shallow|@deep|@narrow|@wide|@soft|@creamy|@selective"
        "|@sharp|@extreme|@strong|@heavy>*<ADV>*<DET>?<@with|@using|@in>?")
    add("camera", "pp", "(?P<s><@in|@out>(?:(?<=<@in>)<ADV>*<@sharp|@soft|@selective|@crisp|@clear|@perfect>*"
        "|(?<=<@out>)<@of>)<@focus>)", left="<ADV>*")
    add("camera", "pp", "(?P<s><@with|@on|@using|@through><DET>?%MODS%(?:<CAMN~@depth~@field~@focus>"
        "|<BRAND>%MODS%)%NPEND%)")
    add("camera", "mod", left="<ADV>*", dsl="(?P<s><FOCUSA~@sharp~@crisp~@hazy~@grainy~@pixelated|@close-up|@closeup"
        "|@wide-angle|@macro|@telephoto|@aerial|@panoramic|@candid|@low-angle|@high-angle"
        "|@eye-level>(?:<COMMA|@and>?<ADV>*<FOCUSA~@sharp~@crisp~@hazy>)*)(?=<ADV>*%CW%)")
    add("camera", "tag", "(?P<s><COMMA>(?:<ADV>*<CAMA|FOCUSA|LENSNUM|CAMN|SHOTN|BRAND|@photography"
        "|@lens>)+)(?=<COMMA|END>|$)")
    add("camera", "mod", "(?P<s><LENSNUM>)(?=<ADV>*%CW%)")

    # -- style -------------------------------------------------------------------------------
    style_head = "(?:%MODS%<MEDIUM>|(?:%MODW%)*<MEDADJ>(?:%MODW%)*<@scene|@piece|@work|@style|@image" \
                 "|@picture|@graphic|@drawing|@art>)"
    add("style", "frame", f"%BOS%(?P<s>(?:<@this|@it><COP>)?<DET>?{style_head}%NPEND%"
        f"(?:<@with|@on|@in><DET>?%MODS%%PW%%NPEND%)?{frame_tail})", check_cop=False)
    sentence("style", f"(?:<@this|@it>|<DET>?%MODS%<FRAMEN|MEDIUM|@piece|@artwork|@work>%NPEND%)<COP>"
             f"<ADV>*(?:<@rendered|@painted|@drawn|@done|@made|@created|@executed|@styled"
             f"|@illustrated>(?:<@in|@as|@with|@like>)?)?<DET>?{style_head}%NPEND%")
    sentence("style", "<DET>?%MODS%<STYLEN>%NPEND%%OFNP%?<COP|SEEM|VERB>")
    add("style", "pp", "(?P<s><@in><DET>?%MODS%<STYLEN>%NPEND%(?:<@of><!END|COMMA|PREP|CONJ>{1,6}?"
        "(?=<COMMA|END|PREP|CONJ>|$))?)")
    add("style", "pp", f"(?P<s><@rendered|@painted|@drawn|@done|@made|@created|@executed|@styled"
        f"|@depicted|@illustrated|@as|@in>(?:(?<=<@as|@in>)|<@in|@as|@with>)<DET>?{style_head}%NPEND%"
        f"(?:<@with|@on><DET>?%MODS%%PW%%NPEND%)?)")
    add("style", "mod", left="<ADV>*", dsl="(?P<s><STYLEA>(?:<COMMA|@and>?<ADV>*<STYLEA>)*)(?=<ADV>*%CW%)")
    add("style", "tag", "(?P<s><COMMA>(?:<ADV>*<MEDADJ|STYLEA|MEDIUM|STYLEN>)+)(?=<COMMA|END>|$)")
    add("style", "tag", "(?P<s><@trending><@on><W>)", left="<COMMA>?")
    add("style", "tag", "(?P<s><@by><CAP|UPPER>+)(?=<COMMA|END>|$)", not_after="!MEDIUM|COMMA")

    # -- lighting ----------------------------------------------------------------------------
    sentence("lighting", "<DET|NEG>?%MODS%<LIGHTN>%NPEND%")
    sentence("lighting", "(?:<DET>?%MODS%<FRAMEN|PLACE|MEDIUM>%NPEND%|<PRON>|<@everything>)<COP|SEEM>"
             "<ADV>*<LIT|LIGHTA>")
    sentence("lighting", "<THERE><COP><NEG|DET>?%MODS%<LIGHTN>")
    light_pp = "%MODS%<LIGHTN>%NPEND%(?:<@of><DET>?%MODS%%PW%%NPEND%)?" \
               "(?:<@from|@coming><@in>?<DET>?%MODS%<POSN|@above|@below|@behind|@overhead|@window" \
               "|@windows|@outside>%NPEND%)?"
    add("lighting", "pp", f"(?P<s><@in|@under|@by|@with|@beneath|@against|@from><DET>?{light_pp})",
        left="(?:<ADV>*<@lit|@bathed|@washed|@illuminated|@backlit|@silhouetted|@lighted><ADV>*)?")
    add("lighting", "pp", "(?P<s><@lit|@illuminated|@backlit|@lighted><ADV>*<@from><DET>?<POSA|ADV>*"
        "<POSN|@above|@below|@behind|@overhead|@outside>%NPEND%)", left="<ADV>*")
    add("lighting", "pp", left="<ADV>*", dsl=f"(?P<s><@casting|@throwing|@creating|@producing><DET>?{light_pp})")
    add("lighting", "pp", "(?P<s><@at|@during|@in|@on><DET>?%MODS%<TIMEDAY~@day~@hour>%NPEND%)")
    add("lighting", "pp", "(?P<s><@on|@in|@at|@during><DET>?<ADV>*(?:%MODW%%JOIN%?)*<WEATHER|LIGHTA>%JOIN%?"
        "(?:%MODW%%JOIN%?)*<@day|@afternoon|@morning|@evening|@night|@hour>%NPEND%)")
    add("lighting", "mod", left="<ADV>*", dsl="(?P<s><LIT|@sunny|@shadowy|@shady|@dimly-lit|@well-lit"
        "|@brightly-lit|@unlit>)(?=<COMMA>?<ADV>*%CW%)")
    predicate("lighting", "<LIGHTA|LIT|COMMA|@and|@or|@by|@evenly>", "<LIT|LIGHTA>")

    # -- mood --------------------------------------------------------------------------------
    sentence("mood", "<DET>?%MODS%<MOODN>%NPEND%%OFNP%?<ADV>*<COP|SEEM|VERB|MOODV>")
    sentence("mood", "(?:<DET>?%MODS%<FRAMEN|PLACE|MEDIUM>%NPEND%|<PRON>)<ADV>*<MOODV|@feels|@feel>")
    predicate("mood", "<MOODA|COMMA|@and|@or>", "<MOODA>")
    mood_np = "(?:<DET>?%MODS%<MOODN>%NPEND%(?:<@of><DET>?%MODS%%PW%%NPEND%)?)"
    add("mood", "pp", f"(?P<s><@creating|@evoking|@giving|@lending|@adding|@conveying|@suggesting|@imbuing|@exuding"
        "|@radiating|@capturing|@enhancing|@instilling><PRON|@everything>?(?:<@the><FRAMEN|PLACE>)?<@to>?{mood_np})")
    add("mood", "pp", "(?P<s><@with|@in><DET>?(?:%MODW%)*<MOODA>(?:%MODW%)*<MOODN>%NPEND%)")
    add("mood", "pp", left="<DET>?<@with|@in>?",
        dsl="(?P<s><@sense|@feeling|@air|@aura><@of><ADV>*(?:<MOODA|MOODN>|%PW%)%NPEND%)")
    add("mood", "mod", left="<ADV>*", dsl="(?P<s><MOODA~LIGHTA~HUE~COLOUR~TEXA~ADV>(?:<COMMA|@and|@or>?<ADV>*"
        "<MOODA~LIGHTA~HUE~COLOUR~TEXA~ADV>)*)(?=<COMMA>?<ADV>*<W~FUNC~ADV~LIGHTN~COLOUR>)")

    # -- background --------------------------------------------------------------------------
    sentence("background", "<DET>?%MODS%<BGN>%NPEND%")
    sentence("background", "<DET>?<@background|@backdrop>%MODS%%PW%%NPEND%<COP|SEEM|VERB>")
    sentence("background", "<@in|@at|@toward|@towards><DET>?%MODS%<@background|@distance|@back>%NPEND%")
    sentence("background", "<@behind><!END|VERB|COP>*?<COP|VERB>")
    sentence("background", "(?:<DET>?%MODS%<FRAMEN|@setting>%NPEND%|<PRON>)<COP><ADV>*<@set|@located"
             "|@situated>")
    bg_tail = "(?:<@and><DET>?%MODS%<BGOBJ|BGN|PLACE|ARCH>%NPEND%)*" \
              "(?:<ED><@in|@with|@by><DET>?%MODS%%PW%%NPEND%)?" \
              "(?:<@full><@of>%NP%|<@with|@by|@near|@beside|@above|@under|@beneath><DET>?%MODS%" \
              "<PLACE|BGOBJ|ARCH|BGN>%NPEND%(?:<@and><DET>?%MODS%<PLACE|BGOBJ|ARCH>%NPEND%)*)*"
    add("background", "pp", f"(?P<s><@in|@on|@at|@against|@with|@into|@toward|@towards><DET>?%MODS%<BGN>"
        f"%NPEND%(?:<@of>%NP%)?{bg_tail})")
    add("background", "pp", f"(?P<s><@set>?(?:<@against>|<@in><@front><@of>|<@before>)<DET>?%MODS%"
        f"<BGOBJ|BGN|PLACE>%NPEND%{bg_tail})")
    add("background", "pp", left="<@set>?", dsl=f"(?P<s><@in|@on|@at|@inside|@across|@along|@by|@near"
        f"|@through|@beside|@within|@over|@outside|@amid|@amidst|@toward|@towards|@into|@onto><DET>?%MODS%"
        f"<PLACE>%NPEND%(?:<@of>%NP%)?{bg_tail})")
    add("background", "pp", "(?P<s><@indoors|@outdoors|@outside>(?:<COMMA>?<PREP><DET>?%MODS%"
        "<ARCH|PLACE|BGOBJ>%NPEND%)?)(?=<COMMA|END|CONJ|PREP>|$)")
    add("background", "mod", "(?P<s><SETA~@inside>)(?=<ADV>*%CW%)")

    # -- layout ------------------------------------------------------------------------------
    sentence("layout", "%SUBJ%<ADV>*<@fills|@occupies|@takes|@consumes|@spans|@dominates|@covers>"
             "<!END>*<@frame|@image|@photo|@picture|@composition>")
    sentence("layout", "(?:<DET>?%MODS%<FRAMEN>%NPEND%|<PRON>)<COP><ADV>*<@framed|@composed|@centered"
             "|@centred|@symmetrical|@balanced|@divided|@split>")
    sentence("layout", "<DET>?%MODS%<@composition|@layout|@arrangement|@framing>%NPEND%<COP|SEEM|VERB>")
    pos_pp = "<@in|@at|@on|@near|@along|@toward|@towards|@to|@across|@from|@into|@around|@by>" \
             "<DET>?<POSA|ADV|@very>*<POSN>%NPEND%(?:<@of><DET>?%MODS%<FRAMEN|POSN|BGN>%NPEND%|(?!<@of>))"
    arr_pp = "<@in|@into|@along|@across|@on><DET|ONE>?%MODS%<ARRN>" \
             "%NPEND%(?:<@of><DET|NUM>?%MODS%%PW%%NPEND%)?"
    add("layout", "pp", f"(?P<s>{pos_pp})", left="<ADV>*", not_after="ONE|DET|PRON")
    add("layout", "pp", f"(?P<s>{arr_pp})", left="(?:<@up|@out>?<ADV>*<ARRV><ADV>*)?")
    add("layout", "pp", "(?P<s><ONE>(?:<@next><@to>|<@above|@below|@beside|@behind|@after|@atop>)<@the>"
        "<@other|@another>)")
    add("layout", "pp", "(?P<s><@side><@by><@side>|<@side-by-side>)")
    add("layout", "pp", "(?P<s><@from><@left|@right|@top|@bottom><@to><@left|@right|@top|@bottom>)")
    add("layout", "pp", "(?P<s><@next><@to><@each><@other>|<@at><@random>)")
    add("layout", "pp", "(?P<s><ARRV~@dotted~@lined~@placed~@positioned>(?:<ADV>|<@out><@at><@random>"
        "|<@about|@throughout|@around><DET|PRON>?(?:%MODS%%PW%%NPEND%)?)*)(?=<COMMA|END|CONJ|PREP>|$)",
        left="<ADV>*", not_after="COP|AUX")
    add("layout", "pp", left="<ADV>*", dsl="(?P<s><@filling|@occupying|@taking|@centered|@centred|@framed|@positioned>"
        "<@up>?<!END|COMMA>{0,6}?<@of|@in|@within><@the><FRAMEN>%NPEND%)")
    add("layout", "pp", "(?P<s><@with|@in><DET>?%MODS%<@composition|@framing|@layout>%NPEND%)")
    add("layout", "mod", left="<ADV>*", dsl="(?P<s><LAYADV>)(?!<ADV>*<@of>)")

    # -- texture -----------------------------------------------------------------------------
    sentence("texture", f"%SUBJ%<ADV>*<COP|SEEM><ADV>*(?:<@to><@be>)?<@made|@crafted|@carved|@built"
             f"|@constructed><@of|@from|@out>+")
    predicate("texture", "<TEXA|MAT|COMMA|@and|@or|@to|@touch>", "<TEXA>")
    add("texture", "pp", left="(?:<ED|ING><ADV>*(?!<COP|SEEM>))?",
        dsl="(?P<s><@with|@in><DET|ONE>?%MODS%<TEXN>"
        "%NPEND%(?:<@of><DET>?%MODS%%PW%%NPEND%)?)")
    add("texture", "pp", "(?P<s><@covered|@coated|@finished|@painted><@in|@with><DET>?%MODS%<TEXN>%NPEND%)")
    add("texture", "pp", "(?P<s><@in><@one|@a><@solid|@single|@flat><@tone|@color|@colour>)")
    add("texture", "pp", left="<ADV>*", not_after="COP|SEEM",
        dsl="(?P<s><@carved|@made|@crafted|@cast|@built|@constructed"
        "|@formed|@fashioned|@sculpted|@woven|@hewn><@out>?<@of|@from><DET>?%MODS%<MAT>%NPEND%)")
    add("texture", "mod", left="<ADV>*", dsl="(?P<s><TEXA|MAT>(?:<COMMA|@and|@or>?<ADV>*<TEXA|MAT>)*)"
        "(?=<ADV>*<W~FUNC~ADV~ING~ED~NUM~ONE~LIT~LIGHTA>)")

    # -- colour ------------------------------------------------------------------------------
    sentence("colour", "%SUBJ%<ADV>*<COP|SEEM|VERB>?<ADV>*<@painted|@colored|@coloured>?<@in>?"
             "<DET>?<@shades|@hues|@tones><@of>")
    predicate("colour", "<ART|ADV|HUE|COLOUR|COLOURN|COMMA|@and|@or|@in|@of|@with>", "<COLOUR>")
    add("colour", "mod", "(?P<s><HUE|COLOUR>(?:(?<=<COLOUR>)|<HUE>*<COLOUR>)(?:(?:<COMMA><@and|@or>?|<@and|@or>"
        "|<@to>)%COLW%)*)(?=<ADV>*%CW%)", left="<ADV>*")
    add("colour", "pp", "(?P<s><@in|@of><ADV>*(?:<DET>?<@shades|@hues|@tones><@of>)?%COLLIST%)%NPEND%")
    add("colour", "pp", "(?P<s><@in><COLOURN>(?:<@between|@from|@ranging>%COLLIST%)?)")
    add("colour", "pp", left="<@painted|@colored|@coloured|@tinted|@dyed|@done>?",
        dsl="(?P<s><@in><DET>?(?:%MODW%)*%COLW%"
        "(?:%MODW%)*<COLOURN>%NPEND%)")
    add("colour", "pp", "(?P<s><@painted|@colored|@coloured|@tinted|@dyed><ADV>*%COLLIST%)%NPEND%")
    return R


RULES = _rules()
_EXTRA = {name: expand(dsl, M) for name, dsl in {
    "there": "<THERE><COP>|<@you><AUX><@see>",
    # A leading phrase ("Under warm light,", "perhaps from a plane,", "lit from the right,");
    # an inverted verb right after one ("..., are two pillows") is skipped with it.
    "lead_pp": "<ADV>*(?:<PREP>|<ED|LIT>)"
               "(?:<!END|VERB|COP|THERE|@you>{0,20}?<COMMA>(?=<DET|NUM|QDET|ONE|PRON|THERE|CAP>)"
               "|<!COMMA|END|VERB|COP|THERE|@you>{0,14}?(?:<COMMA>|(?=<THERE><COP>|<@you><AUX><@see>)))"
               "(?:<COP>(?=<DET|NUM|QDET|ONE>))?",
    # An adjective-looking word heads the phrase only if no comma or "and" follows it
    # ("A broad, pale shelf").
    "subj_np": "(?:<ART>?<QTY><@of>)?<DET|NUM|QDET|ONE|SINGLE>*(?:%MODW%%JOIN%?)*"
               "(?:<W~FUNC~ADV~ING~ED~NUM~ONE~ADJ>|<ADJ~FUNC~ADV~NUM~ONE~ING~ED>(?!<COMMA|@and|@or>)|<QUOTED>)%NPEND%",
    "ofnp": "%OFNP%",
    "pw": "<W~FUNC~ADV~ING~ED~NUM~ONE>",
}.items()}
build_alphabet([r.src for r in RULES] + [r.left for r in RULES if r.left]
               + [f"<{r.not_after}>" for r in RULES if r.not_after] + list(_EXTRA.values()))
for _r in RULES:
    _r.rx = compile_rule(_r.src)
# The sentence-start rules run as one regex: at each sentence start every rule is tried as
# a lookahead that captures its match (group r<k>, span group s<k>).
_ANCHORED_RX = compile_rule("".join(
    f"(?:(?=(?P<r{k}>{r.src.replace('(?P<s>', f'(?P<s{k}>').replace('(?P<c_', f'(?P<c{k}_')}))|)"
    for k, r in enumerate(RULES) if r.anchored))
_GROUP = _ANCHORED_RX.groupindex
_ANCHORED = [(k, r, _GROUP[f"s{k}"], [(c, _GROUP[f"c{k}_{c}"]) for c in _PRIORITY if f"(?P<c_{c}>" in r.src])
             for k, r in enumerate(RULES) if r.anchored]
_FIRST = re.compile(r"\(\?P<s>(<[^<>]+>)(?![?*{])")


def _trigger(rule: Rule) -> frozenset[str] | None:
    """The tags a match must start with, when the rule names one (else None): a caption
    without any of them skips the rule."""
    m = _FIRST.match(rule.src)
    return _tokens.ALPHABET.chars(m.group(1)[1:-1]) if m else None


_FLOATING = [(k, r, [(c, f"c_{c}") for c in _PRIORITY if f"(?P<c_{c}>" in r.src], _trigger(r))
             for k, r in enumerate(RULES) if not r.anchored]
for _r in RULES:
    _r.left_rx = compile_rule(_r.left) if _r.left else None
    _r.not_after_chars = _tokens.ALPHABET.chars(_r.not_after) if _r.not_after else frozenset()

# Frames and leading phrases that come before the subject (find_subject); there, a frame
# may also follow a leading phrase ("From above, a detailed view of a corbel").
_FRAMES = [r.rx for r in RULES if r.kind == "frame"]
_THERE = compile_rule(_EXTRA["there"])
_LEAD_PP = compile_rule(_EXTRA["lead_pp"])
_SUBJ_NP = compile_rule(_EXTRA["subj_np"])
_PW_CLASS = compile_rule(_EXTRA["pw"])
_OFNP = compile_rule(_EXTRA["ofnp"])
_COMMA = _tokens.ALPHABET.punct_char["COMMA"]
_END = _tokens.ALPHABET.punct_char["END"]
_NOUNISH = frozenset({"LIGHTN", "MAT", "PLACE", "BGOBJ", "BGN", "ARCH", "MOODN", "TEXN", "SHOTN",
                      "MEDIUM", "COLOURN", "CAMN", "TEXTN", "ARRN", "POSN"})
_NOT_SUBJECT = frozenset({"TIMEDAY", "LIGHTN", "MOODN", "BGN"})


# ---------------------------------------------------------------------------------------
# Subject
# ---------------------------------------------------------------------------------------


def find_subject(t: Tokens) -> Subject | None:
    """The head noun of the first sentence's main noun phrase.

    Leading frames ("A close-up shot of", "In a low-angle shot,", "A watercolor painting
    of", "This is a photo of"), leading prepositional phrases ending in a comma ("Under warm
    light,") and "there is"/"you can see" are skipped; the next noun phrase's last noun is
    the head. For "a pair of shoes" the head is "shoes" (the quantity may go); for "a cup of
    tea" both "cup" and "tea" are kept. With no such phrase, the first content word. A
    first sentence about the light, mood or background ("The lighting is warm.") is passed
    over for the next sentence whose subject is a thing.
    """
    first = None
    for lo, end in t.bounds[:4]:
        subj = _subject_in(t, lo, end)
        if subj is None:
            continue
        if not any(t.feats(h) & _NOT_SUBJECT for h in subj.heads):
            return subj
        first = first or subj
    return first


def _subject_in(t: Tokens, lo: int, end: int) -> Subject | None:
    tags = t.tags
    i = lo
    for _ in range(6):
        moved = False
        for rx in _FRAMES:
            m = rx.match(tags, i, end)
            if m and m.end() > i:
                i, moved = m.end(), True
                break
        if not moved:
            for rx in (_LEAD_PP, _THERE):
                m = rx.match(tags, i, end)
                if m:
                    i, moved = m.end(), True
                    break
        if not moved and i < end and tags[i] == _COMMA:
            i, moved = i + 1, True
        if not moved:
            break
    m = _SUBJ_NP.search(tags, i, end)
    if m is None:
        m2 = _PW_CLASS.search(tags, lo, end)
        if m2 is None:
            return None
        return Subject((m2.start(),), m2.start(), m2.end(), t.sent[lo])
    head = m.end() - 1
    head = _verb_not_head(t, m.start(), head, end)
    if t.feats(head) & _NOT_SUBJECT and head + 1 < end and "PREP" in t.feats(head + 1):
        # "looks down on a sunny day at the peaks": the day is when, the peaks are what.
        m2 = _SUBJ_NP.match(tags, head + 2, end)
        if m2:
            m, head = m2, m2.end() - 1
    heads = [head]
    low = t.words[head].lower()
    if head + 1 < end and t.words[head + 1].lower() == "of":
        inner = _SUBJ_NP.match(tags, head + 2, end)
        if inner and ("QTY" in t.feats(head) or low in CONTAINER_NOUNS):
            if "QTY" in t.feats(head):
                heads = [inner.end() - 1]
            else:
                heads.append(inner.end() - 1)
    np_end = max(heads) + 1
    of = _OFNP.match(tags, np_end, end)
    if of:
        np_end = of.end()
    return Subject(tuple(heads), m.start(), np_end, t.sent[head])


def _verb_not_head(t: Tokens, start: int, head: int, end: int) -> int:
    """The chunker reads unknown verbs as nouns ("white light emanates from", "three apes
    lounge on"): a last word that agrees as a verb with the word before it, and is followed
    by a preposition, determiner or adverb, is the verb, and the word before is the head."""
    if (head - 1 < start or head + 1 >= end or not (t.feats(head + 1) & {"PREP", "DET", "ADV"})
            or t.words[head + 1].lower() == "of"):
        return head
    prev, cur = t.feats(head - 1), t.feats(head)
    if (prev & {"FUNC", "ADV", "NUM", "ONE", "P"} or ("ADJ" in prev and not prev & _NOUNISH)
            or cur & {"ADJ", "LIGHTN", "MOODN", "BGN"}):
        return head
    plural_np = any(t.feats(k) & {"NUM", "QDET", "QTY"} or t.words[k].lower() in ("these", "those")
                    for k in range(start, head))
    w = t.words[head].lower()
    if ("PL" in cur and "PL" not in prev and not plural_np and w.endswith("s")
            and not prev & {"MAT", "TEXA", "COLOUR", "PLACE", "ARCH"}):
        return head - 1  # "bark serves as"
    if "PL" in prev and "PL" not in cur and not w.endswith("s"):
        return head - 1  # "apes lounge on"
    return head


# ---------------------------------------------------------------------------------------
# Candidates, resolution
# ---------------------------------------------------------------------------------------

_COP_LIKE = frozenset({"COP", "SEEM"})


def _after_copula(t: Tokens, i: int) -> bool:
    k = i - 1
    while k >= 0 and "ADV" in t.feats(k):
        k -= 1
    return k >= 0 and bool(t.feats(k) & _COP_LIKE)


def _fronted(t: Tokens, i: int, j: int) -> bool:
    """A sentence-initial phrase that the verb follows directly: "At the left is a leaf"."""
    return (i == 0 or "END" in t.feats(i - 1)) and j < len(t) and bool(t.feats(j) & {"COP", "VERB", "AUX"})


def candidates(t: Tokens) -> list[Cand]:
    """Every rule's matches, overlapping, in rule order."""
    tags = t.tags
    n = len(tags)
    found: list[tuple[int, Rule, int, int, str]] = []
    p = 0
    while p < n:  # sentence starts
        regs = _ANCHORED_RX.match(tags, p).regs
        for k, rule, s_group, cat_groups in _ANCHORED:
            i, j = regs[s_group]
            if i >= 0:
                cat = rule.category if not cat_groups else next(c for c, g in cat_groups if regs[g][0] >= 0)
                found.append((k, rule, i, j, cat))
        p = tags.find(_END, p) + 1
        if p <= 0:
            break
    present = set(tags)
    for k, rule, cat_groups, trigger in _FLOATING:
        if trigger is not None and trigger.isdisjoint(present):
            continue
        for m in rule.rx.finditer(tags):
            cat = rule.category if not cat_groups else next(c for c, g in cat_groups if m.start(g) >= 0)
            found.append((k, rule, *m.span("s"), cat))
    found.sort(key=lambda f: f[0])
    rev = tags[::-1]
    out: list[Cand] = []
    for rank, rule, i, j, cat in found:
        if j <= i:
            continue
        if rule.left_rx is not None:
            ml = rule.left_rx.match(rev, n - i)
            if ml:
                i = n - ml.end()
        if i > 0 and tags[i - 1] in rule.not_after_chars:
            continue
        if rule.check_cop and (_after_copula(t, i) or _fronted(t, i, j)):
            continue
        repl = rule.repl(t, i, j) if rule.repl else None
        if repl is False:
            continue
        out.append(Cand(i, j, cat, rule.kind, repl, rank))
    return out


_CONNECT = frozenset({",", "and", "or", ", and"})


def resolve(t: Tokens, cands: list[Cand], protected: frozenset[int]) -> list[Cand]:
    """Non-overlapping spans: none touching `protected`; longer first, then category
    priority, then position; then merge same-category neighbours joined by connectors."""
    cands = [c for c in cands if not any(c.i <= p < c.j for p in protected)]
    cands.sort(key=lambda c: (-(c.j - c.i), _PRIORITY[c.category], c.i, c.rank))
    taken = [False] * len(t)
    chosen: list[Cand] = []
    for c in cands:
        if any(taken[c.i:c.j]):
            continue
        for k in range(c.i, c.j):
            taken[k] = True
        chosen.append(c)
    chosen.sort(key=lambda c: c.i)
    merged: list[Cand] = []
    for c in chosen:
        if merged:
            p = merged[-1]
            gap = " ".join(w.lower() for w in t.words[p.j:c.i]).replace(" ,", ",")
            if (p.category == c.category and p.kind not in ("sent", "frame") and c.kind not in ("sent", "frame")
                    and p.repl is None and c.repl is None and (p.j == c.i or gap in _CONNECT)):
                kind = "mod" if p.kind == c.kind == "mod" else "pp"
                merged[-1] = Cand(p.i, c.j, p.category, kind, None, p.rank)
                continue
        merged.append(c)
    return merged


def analyse(caption: str) -> Analysis:
    """Tokens, subject and resolved spans of `caption` (what the chains work from)."""
    t = tokenize(caption)
    subj = find_subject(t)
    protected = frozenset(subj.heads) if subj else frozenset()
    return Analysis(t, subj, resolve(t, candidates(t), protected))


def detect(caption: str) -> list[Span]:
    """The category spans of `caption`, non-overlapping and in text order; the subject's
    head noun is never inside one."""
    a = analyse(caption)
    t = a.tokens
    return [Span(t.starts[c.i], t.ends[c.j - 1], c.category, caption[t.starts[c.i]:t.ends[c.j - 1]])
            for c in a.spans]

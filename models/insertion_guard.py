"""What an enhancer inserts may not contradict the user's prompt.

The insertion format (models/keep_words.py) keeps the user's words; it does not stop the
model from writing, between them, a second style ("..., pixel art" then "This is a
watercolor painting.") or more of an object the user already counted ("2 pink rings"
then "two little orange rings"). A small model does both often: it tracks which words it
still has to copy, not which details the prompt has settled. Three rules cut such text,
never touching a word the decoder copied from the prompt:

- scene-wide: a detected span (caption degradation's detectors) of a category that holds
  for the whole image (style, lighting, background, camera, mood) which the prompt
  itself gives;
- new instances: a chunk (a sentence or a comma-bounded part of one) that brings in
  another instance of a thing the prompt names: a noun the prompt uses as a head, after
  an indefinite determiner, a number, a quantity word or none ("a", "two", "a pair of",
  "rings"). A definite mention ("the ring's shadow") describes the user's own and stays;
- repeats: a chunk whose words an earlier chunk already said (a small model on a prompt
  unlike its training data loops: "..., in sunset, in sunset, in sunset").

Cuts go through degradation's seam repair, so what is left reads as a degradation
chain's texts do. When a repair would change one of the user's words (an article made
"an"), the text is returned as it was.

    text, copied = copied_spans(tokenizer, generated_ids, prompt)   # from the <|copy|> markers
    guard_insertions(prompt, text, copied)
"""

from __future__ import annotations

from typing import Sequence

from dataengine.degrade import analyse
from dataengine.degrade.fluency import Doc
from dataengine.degrade.tags import SCENE_WIDE
from dataengine.degrade.tokens import Tokens

from .keep_words import copy_forms, kept_in_order

__all__ = ["RULES", "copied_spans", "guard_insertions", "prompt_heads"]

RULES = ("scene-wide", "new-instance", "repeat")  # guard_insertions' rules, all on by default

# Features of words that cannot head a noun phrase (function words, numbers, modifiers).
_NOT_HEAD = frozenset({"FUNC", "NUM", "ONE", "QDET", "QTY", "SINGLE", "ADJ", "ADV", "ED", "ING", "VERB", "P",
                       "END", "COMMA"})
_DEFINITE = frozenset("the this these those that its their his her my our your each every".split())


def copied_spans(tokenizer, ids: Sequence[int], prompt: str) -> tuple[str, list[tuple[int, int]]]:
    """(decoded text, character spans of the words the decoder copied) for one generated
    row of an insertion-format enhancer: after each <|copy|> comes the prompt's next word
    as `models.keep_words.CopyWords` wrote it (with or without its leading space). Special
    tokens are dropped and decoding stops at <|eos|>, as `enhance` does."""
    from .enhancer import copy_id

    cid, eos = copy_id(tokenizer), tokenizer.eos_token_id
    special = set(tokenizer.all_special_ids)
    words = copy_forms(tokenizer, prompt)
    text, spans, run, n, k = "", [], [], 0, 0

    def flush() -> None:
        nonlocal text, run
        text += tokenizer.decode(run, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        run = []

    while k < len(ids) and ids[k] != eos:
        t = ids[k]
        if t == cid and n < len(words):
            k += 1
            for form in words[n]:
                if list(ids[k:k + len(form)]) == form:
                    flush()
                    word = tokenizer.decode(form, clean_up_tokenization_spaces=False)
                    lead = len(word) - len(word.lstrip(" "))
                    spans.append((len(text) + lead, len(text) + len(word)))
                    text += word
                    k += len(form)
                    break
            n += 1
            continue
        if t not in special:
            run.append(t)
        k += 1
    flush()
    return text, spans


def _singular(word: str) -> str:
    w = word.lower()
    if w.endswith(("ses", "xes", "ches", "shes")):
        return w[:-2]
    return w[:-1] if w.endswith("s") and not w.endswith(("ss", "us", "is")) else w


def _heads(t: Tokens, skip: frozenset[int] = frozenset()) -> list[int]:
    """Tokens that end a noun phrase: a word that can head one, not followed by another."""
    can = [not (t.feats(k) & _NOT_HEAD) and "W" in t.feats(k) and k not in skip for k in range(len(t))]
    return [k for k in range(len(t)) if can[k] and not (k + 1 < len(t) and can[k + 1])]


def _prompt_facts(prompt: str) -> tuple[set[str], set[str]]:
    """(the scene-wide categories the prompt gives, the nouns (singular, lower-case) that
    head its noun phrases outside those spans: "pixel art" names no thing in the picture)."""
    a = analyse(prompt)
    wide = [c for c in a.spans if c.category in SCENE_WIDE]
    skip = frozenset(k for c in wide for k in range(c.i, c.j))
    return {c.category for c in wide}, {_singular(a.tokens.words[k]) for k in _heads(a.tokens, skip)}


def prompt_heads(prompt: str) -> set[str]:
    """The nouns (singular, lower-case) that head the prompt's noun phrases, outside its
    scene-wide spans."""
    return _prompt_facts(prompt)[1]


def _new_instance(t: Tokens, k: int, lo: int) -> bool:
    """Whether the noun phrase headed by token `k` (within a chunk starting at `lo`)
    introduces a thing rather than pointing back at one."""
    j = k - 1
    while j >= lo and not (t.feats(j) & {"FUNC", "NUM", "ONE", "QDET", "QTY", "P"}):
        j -= 1  # back over the modifiers
    return j < lo or t.words[j].lower() not in _DEFINITE


def guard_insertions(prompt: str, text: str, copied: Sequence[tuple[int, int]] = (),
                     rules: Sequence[str] = RULES) -> str:
    """`text` without its inserted spans that restate a scene-wide category of `prompt`, its
    inserted chunks that add another instance of a thing `prompt` names and those that repeat
    an earlier chunk (`rules`, a subset of RULES, picks which); nothing that overlaps a
    `copied` character span (the user's own words) is cut."""
    unknown = set(rules) - set(RULES)
    if unknown:
        raise ValueError(f"unknown guard rules {sorted(unknown)}; choose from {RULES}")
    if not text.strip():
        return text
    stated, nouns = _prompt_facts(prompt) if {"scene-wide", "new-instance"} & set(rules) else (set(), set())
    stated = stated if "scene-wide" in rules else set()
    nouns = nouns if "new-instance" in rules else set()
    repeats = "repeat" in rules
    a = analyse(text)
    t = a.tokens
    mine = frozenset(k for k in range(len(t)) for s, e in copied if t.starts[k] < e and s < t.ends[k])
    free = lambda i, j: not any(i <= k < j for k in mine)  # noqa: E731
    cuts = [(c.i, c.j, c.kind, c.repl) for c in a.spans if c.category in stated and free(c.i, c.j)]
    heads = set(_heads(t))
    said: set[tuple[str, ...]] = set()  # the chunks so far, as their lower-case words
    lo = 0
    for k in range(len(t) + 1):
        if k < len(t) and not (t.feats(k) & {"COMMA", "END"}):
            continue
        words = tuple(t.words[i].lower() for i in range(lo, k) if "W" in t.feats(i))
        if k > lo and free(lo, k) and ((repeats and words in said) or any(
                h in heads and _singular(t.words[h]) in nouns and _new_instance(t, h, lo) for h in range(lo, k))):
            cuts.append((lo, k, "clause", None))
        if words:
            said.add(words)
        lo = k + 1
    if not cuts:
        return text
    doc = Doc(t, mine)
    for i, j, kind, repl in sorted(cuts, key=lambda c: -c[0]):
        try:
            doc.remove(i, j, kind, repl)
        except ValueError:  # its seam repair would cut a copied word: leave this one
            continue
    out = doc.render()
    return out if out.strip() and kept_in_order(prompt, out) else text

"""Insertions never restate a scene-wide detail the user already gave.

An image has one style, one light and one background. When the user's prompt names one
("..., pixel art") an enhancer that then writes a style of its own ("This is a watercolor
painting.") contradicts the user, and a small model does so often: it tracks which words
it still has to copy, not which details the prompt has settled. This guard removes, from
an enhanced prompt, every detected span (caption degradation's detectors, with its seam
repair) of a scene-wide category the prompt itself has, unless the span holds a word the
decoder copied from the prompt. It is the degradation step run on the model's own
insertions, so what it leaves reads as a degradation chain's texts do.

    copied = copied_spans(tokenizer, generated_ids, prompt)    # from the <|copy|> markers
    guard_scene_wide(prompt, text, copied)                     # the text, restated spans cut

The user's words stay in order: when a seam repair would change one (an article made
"an"), the text is returned unguarded.
"""

from __future__ import annotations

from typing import Sequence

from dataengine.degrade import analyse, detect
from dataengine.degrade.fluency import Doc
from dataengine.degrade.tags import SCENE_WIDE

from .keep_words import WORD, kept_in_order

__all__ = ["copied_spans", "guard_scene_wide"]


def copied_spans(tokenizer, ids: Sequence[int], prompt: str) -> tuple[str, list[tuple[int, int]]]:
    """(decoded text, character spans of the words the decoder copied) for one generated
    row of an insertion-format enhancer: after each <|copy|> comes the prompt's next word
    as `models.keep_words.CopyWords` wrote it (with or without its leading space). Special
    tokens are dropped and decoding stops at <|eos|>, as `enhance` does."""
    from .enhancer import copy_id

    cid, eos = copy_id(tokenizer), tokenizer.eos_token_id
    special = set(tokenizer.all_special_ids)
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    words = [(enc(" " + w), enc(w)) for w in WORD.findall(prompt)]
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


def guard_scene_wide(prompt: str, text: str, copied: Sequence[tuple[int, int]] = ()) -> str:
    """`text` without the spans that restate a scene-wide category of `prompt`, except spans
    that overlap a `copied` character span (the user's own words)."""
    stated = {s.category for s in detect(prompt)} & set(SCENE_WIDE)
    if not stated or not text.strip():
        return text
    a = analyse(text)
    t = a.tokens
    mine = frozenset(k for k in range(len(t)) for s, e in copied
                     if t.starts[k] < e and s < t.ends[k])
    cuts = [c for c in a.spans if c.category in stated and not any(c.i <= k < c.j for k in mine)]
    if not cuts:
        return text
    doc = Doc(t, mine)
    for c in sorted(cuts, key=lambda c: -c.i):
        try:
            doc.remove(c.i, c.j, c.kind, c.repl)
        except ValueError:  # its seam repair would cut a copied word: leave this span
            continue
    out = doc.render().strip()
    return out if kept_in_order(prompt, out) and out else text

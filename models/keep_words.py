"""Decoding that keeps the user's words: enhancement as insertion.

Caption degradation only deletes words, so every training target holds its terse prompt's
words in order, with detail inserted around them. `KeepWords` holds the enhancer to that
at generation time, whatever the model has learned: the output's words must contain the
prompt's words as a subsequence (case and punctuation aside). It is a transformers
`LogitsProcessor`, so it works with greedy search, sampling and beams:

    ids = generate(..., logits_processor=LogitsProcessorList([KeepWords(tok, prompts, width, 96)]))

Two rules, applied to each row at each step from the text decoded so far (no hidden
state, so beams and reordered rows need nothing special):
- end-of-sequence is masked while a prompt word is still owed;
- when the tokens left are only just enough to spell the owed words, the row is forced
  to spell them (so the budget can never run out first).
Between those, the model inserts freely; `nudge` adds to the logit of the token that
would continue the next owed word, so that the words come where the model would put
them rather than all at the end.

`CopyWords` is the same guarantee for an enhancer trained in the insertion format
(models/enhancer.py: <|copy|> before each word a target takes from its prompt). The model
only decides where the user's next word goes, by emitting <|copy|>; the processor then
writes that word's tokens. End-of-sequence waits for the last word, <|copy|> is masked
once every word is out, and near the budget <|copy|> is forced.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

__all__ = ["CopyWords", "KeepWords", "WORD", "copy_forms", "prompt_words", "kept_in_order"]

WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")  # letters/digits, with inner apostrophes
OPENERS = "-/([{\"'‘“"  # a word written right after one of these takes no space


def prompt_words(text: str) -> list[str]:
    """The words of `text` as the constraint reads them: lower-case, punctuation dropped."""
    return [w.lower() for w in WORD.findall(text)]


def kept_in_order(prompt: str, output: str) -> bool:
    """Whether `output`'s words contain `prompt`'s words in order."""
    return _matched(prompt_words(prompt), prompt_words(output)) == len(prompt_words(prompt))


def copy_forms(tokenizer, prompt: str) -> list[tuple[list[int], list[int]]]:
    """The token ids `CopyWords` writes for each of `prompt`'s words (their case kept): as
    it reads after text (a leading space) and at the start or after an opener."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    return [(enc(" " + w), enc(w)) for w in WORD.findall(prompt)]


def _matched(need: Sequence[str], have: Sequence[str]) -> int:
    """How many of `need` a greedy left-to-right scan of `have` finds, in order."""
    j = 0
    for w in have:
        if j < len(need) and w == need[j]:
            j += 1
    return j


class KeepWords:
    """A logits processor that makes each row's output keep its prompt's words in order.

    `prompts[i]` belongs to row i (with `num_beams` rows per prompt, in generate's order);
    `prompt_width` is the padded prompt length (the first generated column) and
    `max_new_tokens` the generation budget.
    """

    def __init__(self, tokenizer, prompts: Sequence[str], prompt_width: int, max_new_tokens: int,
                 num_beams: int = 1, nudge: float = 0.0):
        self.tok = tokenizer
        self.width = prompt_width
        self.budget = max_new_tokens
        self.nudge = nudge
        self.words = [prompt_words(p) for p in prompts for _ in range(num_beams)]
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ValueError("KeepWords needs a tokenizer with an end-of-sequence token")

    def owed(self, words: Sequence[str], text: str) -> tuple[str, bool]:
        """(the text that would complete the owed words, whether the row may end now).

        The last word of `text` may still grow (the next token can continue it): it counts
        as the next owed word only if the row ends here or a non-word token follows."""
        found = prompt_words(text)
        open_word = bool(text) and bool(WORD.fullmatch(text[-1:] or "")) and bool(found)
        done = found[:-1] if open_word else found
        j = _matched(words, done)
        rest = list(words[j:])
        if not rest:
            return "", True
        if open_word:
            partial = found[-1]
            if partial == rest[0]:
                tail = rest[1:]
                if not tail:  # done, unless the word grows ("star" -> "stars"): then " star" is owed
                    return "", True
                return " " + " ".join(tail), False
            if rest[0].startswith(partial):  # mid-word: finish it
                return rest[0][len(partial):] + "".join(" " + w for w in rest[1:]), False
        sep = "" if not text or text[-1].isspace() else " "
        return sep + " ".join(rest), False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.width
        left = self.budget - step
        out = scores.clone()
        for r in range(input_ids.shape[0]):
            text = self.tok.decode(input_ids[r, self.width:].tolist(), skip_special_tokens=True,
                                   clean_up_tokenization_spaces=False)
            completion, may_end = self.owed(self.words[r], text)
            if may_end:
                # Ending on the last owed word: if a token grew it, the word would be owed
                # again, so near the budget the row ends here.
                if self.words[r] and text[-1:].isalnum() and prompt_words(text)[-1] == self.words[r][-1]:
                    again = len(self.tok.encode(" " + self.words[r][-1], add_special_tokens=False))
                    if left <= again + 1:
                        out[r] = float("-inf")
                        out[r, self.eos] = 0.0
                continue
            out[r, self.eos] = float("-inf")
            if not completion:
                continue
            ids = self.tok.encode(completion, add_special_tokens=False)
            if left <= len(ids) + 1:  # just enough room left: spell the owed words now
                keep = out[r, ids[0]].clone()
                out[r] = float("-inf")
                out[r, ids[0]] = keep if torch.isfinite(keep) else 0.0
            elif self.nudge:
                out[r, ids[0]] += self.nudge
        return out


class CopyWords:
    """Writes each prompt word after the model's <|copy|>, in order; `free` leaves ending
    and copying to the model (no end mask, no forcing), for measuring it bare."""

    def __init__(self, tokenizer, prompts: Sequence[str], prompt_width: int, max_new_tokens: int,
                 num_beams: int = 1, free: bool = False):
        from .enhancer import copy_id

        self.copy = copy_id(tokenizer)
        if self.copy is None:
            raise ValueError("CopyWords needs a tokenizer with <|copy|> (the insertion format)")
        self.tok, self.width, self.budget, self.free = tokenizer, prompt_width, max_new_tokens, free
        self.eos = tokenizer.eos_token_id
        self._opens_cache: dict[int, bool] = {}
        # The user's own words (their case kept), each as it reads after text and at the start.
        self.words = [copy_forms(tokenizer, p) for p in prompts for _ in range(num_beams)]

    def _only(self, row: torch.Tensor, tid: int) -> None:
        row.fill_(float("-inf"))
        row[tid] = 0.0

    def _opens(self, tid: int) -> bool:
        """Does token `tid` end in a character a word follows without a space?"""
        if tid not in self._opens_cache:
            end = self.tok.decode([tid])[-1:]
            self._opens_cache[tid] = end.isspace() or end in OPENERS
        return self._opens_cache[tid]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        left = self.budget - (input_ids.shape[1] - self.width)
        out = scores.clone()
        for r in range(input_ids.shape[0]):
            gen = input_ids[r, self.width:].tolist()
            words = self.words[r]
            copies = [i for i, t in enumerate(gen) if t == self.copy]
            n = len(copies)
            if n > len(words):  # free mode let the model copy past the end: nothing to write
                continue
            if n:  # inside the n-th copied word: write its next token
                last = copies[-1]
                after, first = words[n - 1]
                # As the training targets wrote it: spaced, unless it starts the output or the
                # model's own text just opened it ("medium-" + "sized", "(" + "left").
                opened = last > 0 and self._opens(gen[last - 1])
                want = after if any(t != self.copy for t in gen[:last]) and not opened else first
                tail = gen[last + 1:]
                if len(tail) < len(want):
                    self._only(out[r], want[len(tail)])
                    continue
            if n == len(words):
                out[r, self.copy] = float("-inf")
                continue
            if self.free:
                continue
            out[r, self.eos] = float("-inf")
            need = sum(1 + len(a) for a, _ in words[n:])
            if left <= need:  # just enough room for the words still owed
                self._only(out[r], self.copy)
        return out

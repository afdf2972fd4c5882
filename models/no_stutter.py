"""Decoding that does not stutter: no run of tokens twice back to back.

A small enhancer on a prompt unlike its training data loops ("..., in sunset, in sunset,
in sunset", "covered covered covered"). `NoStutter` bans, at each step, every token that
would end a run of 1 to `longest` generated tokens written twice in a row, so the model
has to write something else there instead (the insertion guard's repeat rule then cuts
whole chunks said twice further apart). Tokens in `exempt` are never banned: the
insertion format's <|copy|> and end-of-sequence, so the user's words and the end stay
reachable, and a processor after this one that forces a token (models/keep_words.py)
overrides the ban. It is a transformers `LogitsProcessor`; like `KeepWords` it reads only
the tokens so far, so beams and reordered rows need nothing special.
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["NoStutter", "stutter_tokens"]


def stutter_tokens(gen: list[int], longest: int) -> set[int]:
    """The tokens that, appended to `gen`, would make its last n tokens equal the n before
    them, for some n in 1..`longest`."""
    banned = set()
    for n in range(1, longest + 1):
        if len(gen) < 2 * n - 1:
            break
        # appending t repeats gen[-(2n-1):-(n-1)] + [t] iff its first n-1 tokens are the last n-1 and t == gen[-n]
        if gen[len(gen) - (2 * n - 1): len(gen) - n] == gen[len(gen) - (n - 1):]:
            banned.add(gen[-n])
    return banned


class NoStutter:
    """Bans the tokens that would repeat, back to back, a run of up to `longest` generated
    tokens (columns from `prompt_width` on); `exempt` tokens are never banned."""

    def __init__(self, prompt_width: int, longest: int = 8, exempt: Iterable[int | None] = ()):
        if longest < 1:
            raise ValueError(f"longest must be >= 1, got {longest}")
        self.width, self.longest = prompt_width, longest
        self.exempt = {t for t in exempt if t is not None}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        out = scores
        for r in range(input_ids.shape[0]):
            banned = stutter_tokens(input_ids[r, self.width:].tolist(), self.longest) - self.exempt
            if banned:
                if out is scores:
                    out = scores.clone()
                out[r, list(banned)] = float("-inf")
        return out

"""Decoding that keeps the user's words (models/keep_words.py)."""

from __future__ import annotations

import pytest
import torch

from models.enhancer import build, enhance, train_tokenizer
from models.keep_words import KeepWords, kept_in_order, prompt_words

TEXTS = [
    "A large red star with a thin outline at the top left, on a white background.",
    "Two small blue rings side by side in the centre, lit by soft daylight.",
    "A woman in a green coat walks a brown dog along a wet street at dusk.",
    "An old wooden boat rests on the sand beside three grey rocks.",
] * 20


@pytest.fixture(scope="module")
def untrained():
    """A random enhancer: left alone it writes noise that keeps nothing."""
    tok = train_tokenizer(TEXTS, vocab_size=400)
    torch.manual_seed(0)
    return build("nano", tok).eval(), tok


def test_words_are_read_case_and_punctuation_blind():
    assert prompt_words("A red-star, isn't it?") == ["a", "red", "star", "isn't", "it"]
    assert kept_in_order("a red star", "A large RED, shiny star.")
    assert not kept_in_order("a red star", "A star that is red.")  # order matters
    assert not kept_in_order("a red star", "A large red starfish.")  # whole words only


def test_owed_text_finishes_a_word_or_adds_the_rest(untrained):
    _, tok = untrained
    k = KeepWords(tok, ["a red star"], prompt_width=0, max_new_tokens=10)
    words = prompt_words("a red star")
    assert k.owed(words, "") == ("a red star", False)
    assert k.owed(words, "A large r") == ("ed star", False)  # mid-word
    assert k.owed(words, "A large red") == (" star", False)
    assert k.owed(words, "A large red st") == ("ar", False)
    assert k.owed(words, "A large red star") == ("", True)  # may end: the word is whole
    assert k.owed(words, "A large red starfish") == (" star", False)
    assert k.owed(words, "A large red star.") == ("", True)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_every_output_keeps_its_prompts_words_within_the_budget(untrained, num_beams):
    model, tok = untrained
    prompts = ["a red star", "two blue rings in the centre", "a dog", "an old boat on the sand"]
    free = enhance(model, tok, prompts, max_new_tokens=24, keep_words=False, num_beams=num_beams)
    assert not all(kept_in_order(p, o) for p, o in zip(prompts, free))  # noise keeps nothing
    kept = enhance(model, tok, prompts, max_new_tokens=24, num_beams=num_beams, nudge=0.0)  # the budget alone
    for p, o in zip(prompts, kept):
        assert kept_in_order(p, o), (p, o)


def test_a_prompt_longer_than_the_budget_is_forced_from_the_first_step(untrained):
    _, tok = untrained
    k = KeepWords(tok, ["two blue rings in the centre"], prompt_width=0, max_new_tokens=2)
    scores = torch.zeros(1, len(tok))
    out = k(torch.zeros(1, 0, dtype=torch.long), scores)
    allowed = (~torch.isinf(out[0])).nonzero().flatten().tolist()
    assert allowed == tok.encode("two", add_special_tokens=False)[:1]  # only the first owed word's first token


@pytest.mark.parametrize("less, rich", [
    ("Two medium-sized stars half-hidden ring", "Two medium-sized red stars, half-hidden (left) and a well-lit ring."),
    ("A sized star", "A medium-sized star and a (sized) ring/star."),
])
def test_copy_words_writes_each_word_as_the_training_target_wrote_it(less, rich):
    """Teacher-forced through the insertion target: wherever CopyWords writes a word's
    token, it is the target's token (a word after a hyphen or bracket gets no space). The
    prompts match the captions' case: CopyWords writes the user's own case by design."""
    from models.enhancer import encode_pair, prompt_ids
    from models.keep_words import CopyWords

    tok = train_tokenizer([less, rich] * 5, vocab_size=300, copy=True)
    ids, _, _ = encode_pair(tok, less, rich, 512)
    p = prompt_ids(tok, less)
    target = ids[len(p):]
    proc = CopyWords(tok, [less], len(p), 96)
    forced = 0
    for k in range(len(target)):
        scores = proc(torch.tensor([p + target[:k]]), torch.zeros(1, len(tok)))[0]
        allowed = torch.isfinite(scores).nonzero().flatten().tolist()
        assert target[k] in allowed, (k, tok.decode(target[:k + 1]))
        forced += len(allowed) == 1
    assert forced >= len(prompt_words(less))  # each copied word was written by the processor

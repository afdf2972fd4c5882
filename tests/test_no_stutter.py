"""Decoding that does not stutter (models/no_stutter.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

from models.enhancer import build, train_tokenizer
from models.no_stutter import NoStutter, stutter_tokens

TEXTS = ["A large red star with a thin outline at the top left, on a white background.",
         "Two small blue rings side by side in the centre, lit by soft daylight."] * 20


def stutters(ids: list[int], longest: int) -> bool:
    return any(ids[i:i + n] == ids[i + n:i + 2 * n] for n in range(1, longest + 1) for i in range(len(ids) - 2 * n + 1))


def test_the_banned_tokens_are_those_that_would_end_a_run_said_twice():
    assert stutter_tokens([], 8) == set()
    assert stutter_tokens([5], 8) == {5}  # "covered covered"
    assert stutter_tokens([1, 2, 3, 1, 2], 8) == {3, 2}  # "1 2 3 1 2 3", and "2 2"
    assert stutter_tokens([7, 1, 2, 3, 1, 2], 2) == {2}  # a run longer than `longest` may repeat
    assert stutter_tokens([1, 2, 1, 3], 8) == {3}


def test_a_random_model_stutters_and_with_the_ban_it_does_not_unless_exempt():
    tok = train_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = build("nano", tok).eval()
    ids = torch.tensor([tok.encode("a red star", add_special_tokens=False)] * 2)
    width, new = ids.shape[1], 40

    def generate(*processors):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             pad_token_id=tok.eos_token_id, eos_token_id=None,
                             logits_processor=LogitsProcessorList(list(processors)))
        return [row[width:] for row in out.tolist()]

    assert any(stutters(row, 8) for row in generate())  # random weights loop
    for row in generate(NoStutter(width, longest=8)):
        assert len(row) == new and not stutters(row, 8), row
    free = generate()[0]
    looped = max(set(free), key=free.count)  # the token it loops on most
    exempt = generate(NoStutter(width, longest=8, exempt=[looped]))[0]
    assert any(exempt[i] == exempt[i + 1] == looped for i in range(len(exempt) - 1))


def test_enhance_takes_one_rule_by_name_and_refuses_an_unknown_one_before_decoding():
    from models.enhancer import enhance

    tok = train_tokenizer(TEXTS, vocab_size=300)
    model = build("nano", tok).eval()
    with pytest.raises(ValueError, match="repeats"):
        enhance(model, tok, ["a red star"], max_new_tokens=4, guard="repeats")
    assert len(enhance(model, tok, ["a red star"], max_new_tokens=4, guard="repeat")) == 1

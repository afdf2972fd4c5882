"""The insertion guard (models/insertion_guard.py): an enhancer's insertions may not
restate a style, light or background the user's prompt already gives, nor add more of a
thing it names; the user's words stay, in order. Also the casual tags that share its
scene-wide categories (dataengine/degrade/tags.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dataengine.degrade.tags import SCENE_WIDE, casual_tags
from models.enhancer import COPY, enhance, load_version, train_tokenizer
from models.keep_words import kept_in_order
from models.insertion_guard import copied_spans, guard_insertions, prompt_heads

IIW = Path(__file__).resolve().parents[2] / "shared/data/iiw400_captions.jsonl"


def spans_of(text: str, *words: str) -> list[tuple[int, int]]:
    """Character spans of `words`, each found after the previous one."""
    out, at = [], 0
    for w in words:
        i = text.index(w, at)
        out.append((i, i + len(w)))
        at = i + len(w)
    return out


# ---------------------------------------------------------------------------------------
# Casual tags
# ---------------------------------------------------------------------------------------


def test_casual_tags_read_scene_wide_sentences_down_to_their_core_phrase():
    caption = ("A red bicycle leans against a wooden fence. The photo is a black-and-white film photograph. "
               "Warm evening light falls across the street.")
    assert [(t.category, t.text) for t in casual_tags(caption)] == [
        ("style", "black-and-white film photograph"), ("lighting", "Warm evening light")]
    # Only the categories asked for; phrases longer than a tag are left out.
    assert [t.text for t in casual_tags(caption, categories=("lighting",))] == ["Warm evening light"]
    assert [t.text for t in casual_tags(caption, max_words=2)] == []
    assert casual_tags("A red bicycle leans against a wooden fence.") == []


@pytest.mark.skipif(not IIW.exists(), reason="needs ../shared/data")
def test_casual_tags_of_human_captions_are_short_phrases_of_their_own_spans():
    seen = 0
    for r in map(json.loads, IIW.read_text().splitlines()[:150]):
        for t in casual_tags(r["caption"]):
            seen += 1
            assert t.category in SCENE_WIDE
            assert r["caption"].find(t.text, t.start) >= t.start  # inside its span, not before it
            assert 1 <= len(t.text.split()) <= 5 and t.text == t.text.strip(" ,.")
    assert seen >= 50


# ---------------------------------------------------------------------------------------
# The guard on text
# ---------------------------------------------------------------------------------------


def test_the_guard_cuts_an_inserted_style_the_prompt_already_gives():
    prompt = "two red cars, watercolor"
    text = "Two red cars parked on a street, watercolor. This is an oil painting. The light is soft."
    copied = spans_of(text, "Two", "red", "cars", "watercolor")
    out = guard_insertions(prompt, text, copied)
    assert out == "Two red cars parked on a street, watercolor. The light is soft."
    assert kept_in_order(prompt, out)
    # The user gave no light, so the inserted light stays; nor a style: nothing is cut.
    assert "oil painting" in guard_insertions("two red cars", text, copied[:3])


def test_the_guard_keeps_a_span_that_holds_the_users_own_word():
    prompt = "a cat, oil painting"
    text = "A cat asleep on a sofa. The whole image is an oil painting."
    # "oil painting" was copied into the style sentence: the sentence is the user's style.
    copied = spans_of(text, "A", "cat") + spans_of(text, "oil", "painting")
    assert guard_insertions(prompt, text, copied) == text
    # Not copied (the decoder wrote the words itself): the user's "oil painting" is owed,
    # so the cut would lose it and the guard leaves the text as it was.
    assert guard_insertions(prompt, text, spans_of(text, "A", "cat")) == text


def test_the_guard_cuts_a_new_instance_of_a_thing_the_prompt_names():
    prompt = "2 pink rings, 4 green squares"
    assert prompt_heads(prompt) == {"ring", "square"}
    text = ("2 pink rings in a column, 4 green squares with a glossy finish, while two little orange rings "
            "sit in the corner. The rings cast soft shadows. A small blue star rests at the top.")
    copied = spans_of(text, "2", "pink", "rings", "4", "green", "squares")
    # More rings go; the rings' own shadow (a definite mention) and a star stay.
    assert guard_insertions(prompt, text, copied) == (
        "2 pink rings in a column, 4 green squares with a glossy finish. The rings cast soft shadows. "
        "A small blue star rests at the top.")
    # A chunk that holds the user's words is theirs, whatever else it says.
    mixed = "2 pink rings beside a pair of rings, 4 green squares."
    assert guard_insertions(prompt, mixed, spans_of(mixed, "2", "pink", "rings") +
                            spans_of(mixed, "4", "green", "squares")) == mixed
    # Scene-wide words in the prompt name nothing in the picture: no heads from them.
    assert prompt_heads("a dog on a beach at sunset, oil painting") == {"dog"}


def test_the_guard_cuts_a_chunk_that_says_again_what_one_before_it_said():
    prompt = "A Globe flower in front of other flowers."
    text = "A Globe flower in front of other flowers at dusk, in soft light, in soft light, in Soft Light."
    copied = spans_of(text, "A", "Globe", "flower", "in", "front", "of", "other", "flowers")
    assert guard_insertions(prompt, text, copied) == "A Globe flower in front of other flowers at dusk, in soft light."
    assert guard_insertions(prompt, text, copied, rules=("scene-wide", "new-instance")) == text  # the rule off
    with pytest.raises(ValueError, match="repeats"):
        guard_insertions(prompt, text, copied, rules=("repeats",))
    # The user's own words are never a repeat to cut, even where they say a thing twice.
    twice = "a red star, a red star, on grey, on grey"
    assert guard_insertions("a red star, a red star", twice,
                            spans_of(twice, "a", "red", "star", "a", "red", "star")) == "a red star, a red star, on grey"


def test_copied_spans_follow_the_copy_markers():
    prompt = "two red cars"
    tok = train_tokenizer(["Two red cars parked on a street. This is an oil painting."] * 20, vocab_size=300)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    cid = tok.convert_tokens_to_ids(COPY)
    ids = ([cid] + enc("two") + [cid] + enc(" red") + enc(" shiny") + [cid] + enc(" cars")
           + enc(". This is an oil painting.") + [tok.eos_token_id] + enc(" after the end"))
    text, spans = copied_spans(tok, ids, prompt)
    assert text == "two red shiny cars. This is an oil painting."
    assert [text[s:e] for s, e in spans] == ["two", "red", "cars"]


# ---------------------------------------------------------------------------------------
# The guard in enhance()
# ---------------------------------------------------------------------------------------


def test_enhance_with_the_guard_leaves_no_style_but_the_users(tmp_path):
    """A nano model overfit on one chain restates its caption's style ("as a flat-style
    vector drawing") whatever style the prompt gives; with the guard, every style phrase
    left in its output holds the user's words."""
    import random

    from dataengine.degrade import DegradeConfig, detect, pairs_table
    from dataengine.sceneworld import caption_for, sample_scene
    from models.train_enhancer import EnhancerTrainConfig, train

    torch.set_num_threads(1)
    for seed in range(200):  # a short caption with a style of its own
        rng = random.Random(seed)
        caption = caption_for(sample_scene(rng, 256, 256), rng, "short")
        if any(t.category == "style" for t in casual_tags(caption)) and len(caption) < 200:
            break
    pairs = pairs_table([("cap-0", caption)], DegradeConfig(seed=0))
    cfg = EnhancerTrainConfig(size="nano", steps=300, batch_size=8, lr=3e-3, warmup_steps=10, eval_fraction=0,
                              seed=0, num_threads=1, progress=False)
    model, tok = load_version(train(pairs, tmp_path, cfg)["path"])
    tersest = min(pairs.column("less").to_pylist(), key=len).rstrip(".")
    prompts = [f"{tersest}, {style}" for style in ("pencil sketch", "oil painting", "watercolor")]
    free = enhance(model, tok, prompts, max_new_tokens=160, guard=False)
    guarded = enhance(model, tok, prompts, max_new_tokens=160)
    # Without the repeat rule (which also steers decoding away from stutters) the guard only cuts.
    cut = enhance(model, tok, prompts, max_new_tokens=160, guard=("scene-wide", "new-instance"))

    def foreign_styles(prompt: str, text: str) -> list[str]:
        mine = set(prompt.lower().split(", ")[-1].split())
        return [s.text for s in detect(text) if s.category == "style" and not mine & set(s.text.lower().split())]

    assert any(foreign_styles(p, f) for p, f in zip(prompts, free))  # the model restates its own style
    for p, f, g, c in zip(prompts, free, guarded, cut):
        assert not foreign_styles(p, g) and not foreign_styles(p, c), (g, c)
        assert kept_in_order(p, g) and kept_in_order(p, c)  # the user's words, in order
        assert kept_in_order(c, f)  # only cut

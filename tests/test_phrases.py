"""Caption phrases, their margins, attribute-swap negatives and the contrastive loss: no model needed.

The encoder here is a bag of hashed words, so which phrase is near which is known
exactly; the captions come from ../shared/data's human-written descriptions where the
check is about real text, and are made up where it is about arithmetic.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dataengine.negatives import AttributeWords, attribute_negative
from dataengine.phrases import build_phrase_index, caption_units, phrase_margins, phrases, query_phrases
from models.train_clip import contrastive_loss

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "iiw400_captions.jsonl"


class BagOfWords:
    """Unit vectors of word counts, one axis per word (plural folded): texts sharing words
    are near, others orthogonal. Axes are handed out in order of first sight, not by
    `hash()`, which Python salts per process: two words sharing a bucket in one run made
    "pink triangle" equal "purple triangle" and the margin test flaky."""

    model_id = "bag-of-words-test"
    dim = 256
    axes: dict[str, int] = {}  # shared by every instance, so all of a test's vectors agree

    def encode_texts(self, texts):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                axis = self.axes.setdefault(w.rstrip("s"), len(self.axes))
                assert axis < self.dim, "more distinct words than axes: raise BagOfWords.dim"
                out[i, axis] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_phrases_split_at_function_words_and_keep_modifiers_with_their_noun():
    got = phrases("Two small purple triangles sit at the top left, beside three red stars on a grassy field.")
    assert got == ["two small purple triangles", "top left", "three red stars", "grassy field"]
    assert phrases("A bird perched on a branch.") == ["bird perched", "branch"]
    assert phrases("") == [] and phrases("and the of") == []
    assert query_phrases("and the of") == ["and the of"]  # a query is never empty


def test_units_are_every_head_final_suffix():
    assert caption_units("three red stars and a blue ring") == [
        "three red stars", "red stars", "stars", "blue ring", "ring"]


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is not beside this checkout")
def test_real_dense_captions_cut_into_short_phrases():
    import json

    caps = [json.loads(line)["caption"] for line in SHARED.read_text().splitlines()[:50]]
    cut = [phrases(c) for c in caps]
    assert all(cut) and all(len(p.split()) <= 8 for ps in cut for p in ps)
    # Dense descriptions yield many phrases each, and their words are the caption's own.
    assert np.mean([len(ps) for ps in cut]) > 10
    for ps, c in zip(cut, caps):
        words = set(re.findall(r"[^\W_]+(?:['’\-][^\W_]+)*", c.lower()))
        assert all(set(p.split()) <= words for p in ps), [p for p in ps if not set(p.split()) <= words]


def _index(tmp_path, name, keys, captions):
    return build_phrase_index(tmp_path / name, keys, captions, BagOfWords())


def test_margin_is_negative_where_only_the_reference_says_the_phrase(tmp_path):
    train = _index(tmp_path, "train", ["t1", "t2", "t3"],
                   ["a pink triangle beside a purple square", "two red stars", "a purple square"])
    ref = _index(tmp_path, "ref", ["p1", "p2"], ["three purple triangles on grass", "two red stars"])
    queries = [query_phrases("a purple triangle"), query_phrases("red stars")]
    enc = BagOfWords()
    margins, matches = phrase_margins(train, ref, queries, [enc.encode_texts(q) for q in queries], k=1)
    # Train's nearest units share one word of two (cosine 1/sqrt(2)); the reference has it whole.
    assert margins[0] == pytest.approx(1 / np.sqrt(2) - 1, abs=1e-5)
    assert matches[0][0].reference_phrase == "purple triangles"
    assert margins[1] == pytest.approx(0.0, abs=1e-6)  # both corpora say it


def test_own_caption_is_left_out(tmp_path):
    train = _index(tmp_path, "train", ["t1", "t2"], ["a green hexagon", "a red star"])
    ref = _index(tmp_path, "ref", ["p1"], ["a green hexagon"])
    q = [query_phrases("green hexagon")]
    vecs = [BagOfWords().encode_texts(q[0])]
    with_own, _ = phrase_margins(train, ref, q, vecs, k=1)
    without, m = phrase_margins(train, ref, q, vecs, k=1, own=["t1"])
    # Without its own caption, train holds no word of it (cosine 0 against the reference's 1).
    assert with_own[0] == pytest.approx(0.0, abs=1e-6) and without[0] == pytest.approx(-1.0, abs=1e-5)
    assert m[0][0].train_phrase != "green hexagon"


def test_rebuild_embeds_only_new_texts(tmp_path):
    first = _index(tmp_path, "train", ["a", "b"], ["a red star", "a blue ring"])
    again = _index(tmp_path, "train", ["a", "b", "c"], ["a red star", "a blue ring", "a blue star"])
    assert first.index.meta["encoded_texts"] == 4
    assert again.index.meta["encoded_texts"] == 1  # only "blue star" is new
    assert len(again) == 6


def test_attribute_negatives_swap_or_replace_one_attribute():
    words = AttributeWords.from_captions(["a red star", "a blue ring", "two green squares", "three cats"])
    rng = random.Random(0)
    kinds = set()
    for _ in range(50):
        neg, kind = attribute_negative("Two red stars beside a blue ring on the left.", words, rng)
        kinds.add(kind)
        assert neg != "Two red stars beside a blue ring on the left."
        if kind == "swap":
            assert neg == "Two blue stars beside a red ring on the left."
        if kind == "position":
            assert neg.endswith("on the right.")
    assert kinds == {"swap", "colour", "count", "position"}
    assert attribute_negative("A bird perched on a branch.", words, rng) is None


def test_contrastive_loss_is_clip_loss_without_negatives_and_a_hard_negative_raises_it():
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.3 * torch.randn(8, 16, generator=g), dim=-1)
    scale = torch.tensor(20.0)
    assert contrastive_loss(img, txt, scale) == pytest.approx(ClipLoss()(img, txt, scale).item(), rel=1e-5)
    near = torch.nn.functional.normalize(img[:3] + 0.05 * torch.randn(3, 16, generator=g), dim=-1)
    far = -img[:3]
    assert contrastive_loss(img, txt, scale, near) > contrastive_loss(img, txt, scale, far)


def test_distinct_texts_give_the_row_index_margins_from_a_smaller_search(tmp_path):
    # Repeated captions, as a real training split has them: most rows are copies of a few texts.
    rng = random.Random(3)
    words = ["red", "blue", "green", "small", "large", "star", "ring", "square", "two", "three"]
    caps = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 4))) + " and a " + rng.choice(words[5:8])
            for _ in range(60)]
    train = _index(tmp_path, "train", [f"t{i}" for i in range(300)], [rng.choice(caps) for _ in range(300)])
    ref = _index(tmp_path, "ref", [f"p{i}" for i in range(200)], [rng.choice(caps) for _ in range(200)])
    view = train.distinct()
    assert view is not None and len(view.rows) < len(train) / 3 and view.counts.sum() == len(train)
    queries = [query_phrases(" ".join(rng.choice(words) for _ in range(3))) for _ in range(40)]
    vecs = [BagOfWords().encode_texts(q) for q in queries]
    for k in (1, 5, 12):
        fast, fm = phrase_margins(train, ref, queries, vecs, k=k)
        # own=[None] * n takes the row-by-row path and leaves nothing out.
        rows, rm = phrase_margins(train, ref, queries, vecs, k=k, own=[None] * len(queries))
        np.testing.assert_allclose(fast, rows, atol=1e-5)
        np.testing.assert_allclose([m.train_similarity for q in fm for m in q],
                                   [m.train_similarity for q in rm for m in q], atol=1e-6)


def test_suffix_units_find_the_pairing_a_known_modifier_hides(tmp_path):
    from dataengine.gaps import QUERY_UNITS

    # Train knows "medium-sized orange ..." and "... crescents", never orange crescents; the pool does.
    train = _index(tmp_path, "train", ["t1", "t2", "t3"],
                   ["a medium-sized orange star", "a medium-sized pink crescent", "an orange ring"])
    ref = _index(tmp_path, "ref", ["p1", "p2"], ["an orange crescent", "a medium-sized orange star"])
    prompt = "a medium-sized orange crescent"
    assert QUERY_UNITS["phrases"](prompt) == ["medium-sized orange crescent"]
    units = QUERY_UNITS["suffixes"](prompt)
    assert units == ["medium-sized orange crescent", "orange crescent", "crescent"]
    enc = BagOfWords()
    whole, _ = phrase_margins(train, ref, [QUERY_UNITS["phrases"](prompt)], [enc.encode_texts([prompt[2:]])], k=1)
    cut, m = phrase_margins(train, ref, [units], [enc.encode_texts(units)], k=1)
    # Two of three words shared with a train phrase hide the gap; the suffix shows it.
    assert cut[0] < whole[0] - 0.1
    assert min(m[0], key=lambda x: x.margin).phrase == "orange crescent"

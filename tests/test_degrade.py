"""Caption degradation: detectors per category, fluent chains, the pairs table.

Three caption sets: free-form captions written here (varied grammar, not templates), the
400 human-written IIW descriptions in ../shared/data, and scene-world captions. Every
chain over them must keep the invariants a trainer relies on: each step strictly
shorter, continuous (step k+1's `more` is step k's `less`), the removed text a detector
span of the claimed category, no new broken-fluency pattern, the subject kept.
"""

from __future__ import annotations

import collections
import json
import random
import re
from pathlib import Path

import pytest

from dataengine.degrade import (
    CATEGORIES, STRUCTURAL, DegradeConfig, analyse, article_for, degrade_chain, detect, normalise,
    pair_id, pairs_table,
)
from dataengine.schema import PAIRS
from dataengine.sceneworld import COLOURS, caption_for, sample_scene

IIW = Path(__file__).resolve().parents[2] / "shared/data/iiw400_captions.jsonl"

FREE = [
    "A golden retriever runs along a sandy beach at sunset, its wet fur glowing in the warm evening light.",
    "Close-up photo of a red apple on a rustic wooden table, shot with a 50mm lens, shallow depth of field.",
    "A watercolor painting of a fox sleeping in the snow under soft morning light.",
    "Three children fly a bright orange kite in a grassy park while their parents watch from a bench.",
    'A neon sign that reads "OPEN 24 HOURS" glows above the door of a small diner at night.',
    "An aerial view of a winding river cutting through a dense green forest, with mist rising from the water.",
    "A macro shot of a dewdrop on a spider web, the background blurred into soft bokeh.",
    "The interior of a cozy library is filled with tall oak bookshelves. Warm lamplight falls across a "
    "leather armchair. The mood is quiet and nostalgic.",
    "A pair of worn leather boots sits on the porch of a weathered farmhouse.",
    "Digital art of a cyberpunk city street at night, neon reflections on wet pavement, highly detailed, 8k",
    "A minimalist product shot of a white ceramic mug on a pale pink backdrop, lit from the left.",
    "An elderly man in a navy coat reads a newspaper on a park bench, pigeons gathered at his feet.",
    "A bustling crowd fills a narrow market street lined with colorful fruit stalls.",
    "In the foreground, two ducks swim across a calm pond; in the background, snow-capped mountains rise "
    "against a clear blue sky.",
    "A low-angle photograph of a glass skyscraper reflecting the clouds.",
    'A chalkboard menu in a cafe displays the words "Soup of the Day" in white handwritten letters.',
    "An orange cat naps on a sunny windowsill next to a potted cactus.",
    "A black-and-white portrait of an old fisherman with a deeply lined face, in the style of Dorothea Lange.",
    "Five colorful hot air balloons float over a patchwork of fields in the early morning haze.",
    "A stack of pancakes topped with fresh blueberries and maple syrup, on a white plate, overhead shot.",
    "A vintage red bicycle leans against a yellow brick wall covered in ivy.",
    "The photo shows a dimly lit jazz club. A saxophonist plays on a small stage bathed in blue light. "
    "The atmosphere feels smoky and intimate.",
    "An oil painting of a stormy sea with a lone lighthouse on a rocky cliff.",
    "A handful of smooth grey pebbles lies scattered across the sand.",
    "A wooden sign reading 'Welcome to Pine Lake' stands beside a gravel path, framed by tall pine trees.",
    "A plate of sushi, photographed from above, with chopsticks resting on a black slate tray.",
    "A snowy owl perches on a fence post in a snowy field, its yellow eyes staring straight at the camera.",
]

CONFIGS = [
    DegradeConfig(policy="fixed"),
    DegradeConfig(seed=1),
    DegradeConfig(seed=2, granularity="span"),
]


# ---------------------------------------------------------------------------------------
# A fluency checker, independent of the package's own repair rules
# ---------------------------------------------------------------------------------------

_FLUENCY = {
    "space before punctuation": re.compile(r" [,.;:!?)]"),
    "doubled punctuation": re.compile(r"[,;:]\s*[,.;:!?]"),
    "double space": re.compile(r"  "),
    "dangling word": re.compile(
        r"\b(?:and|or|but|nor|with|while|whereas|of|the|a|an|its|their|from|into|onto|than|featuring"
        r"|including)\s*[.,;:!?)]", re.I),
    "leading punctuation": re.compile(r"(?:^|[.!?]\s)\s*[,;:]"),
    "a before a vowel": re.compile(r"\b[Aa] (?!(?:one|once|uni|use|usu|uti|eu|ur[aeo]|u-|ubiq)\w*)[aeiouAEIOU]\w*"),
    "an before a consonant": re.compile(
        r"\b[Aa]n (?!(?:hour|honest|honou?r|heir|herb)\w*)[b-df-hj-np-tv-zB-DF-HJ-NP-TV-Z]\w*"),
    "empty brackets or quotes": re.compile(r"\(\s*\)|\"\s*\"|“\s*”"),
    "lower-case sentence start": re.compile(r"(?:^|[.!?]\s+)[a-z]"),
    "bare copula": re.compile(r"\b(?:is|are|was|were)\s*[.,;:]"),
    "conjunction after function word": re.compile(
        r"\b(?:and|or|but|while|with|of|the|a|an)\s+(?:and|or|but|while)\b", re.I),
}


def fluency_problems(text: str) -> collections.Counter:
    return collections.Counter({name: len(rx.findall(text)) for name, rx in _FLUENCY.items()})


def new_problems(less: str, more: str) -> dict[str, int]:
    """Problems `less` has beyond those its `more` already had (the source may have some)."""
    pl, pm = fluency_problems(less), fluency_problems(more)
    return {k: v - pm[k] for k, v in pl.items() if v > pm[k]}


def _segments(removed: str, texts: set[str]) -> list[str] | None:
    """Split a step's `removed` into detector span texts joined by " | " (a span text may
    itself contain " | ")."""
    if removed in texts:
        return [removed]
    for t in texts:
        if removed.startswith(t + " | "):
            rest = _segments(removed[len(t) + 3:], texts)
            if rest is not None:
                return [t, *rest]
    return None


def check_chain(caption: str, chain: list, cfg: DegradeConfig) -> None:
    """Every invariant a chain must keep; raises with the caption and step on failure."""
    spans = detect(caption)
    a = analyse(caption)
    heads = [a.tokens.words[h].lower() for h in a.subject.heads] if a.subject else []
    prev_less = normalise(caption)
    seen_structural = False
    for k, st in enumerate(chain, 1):
        where = f"{caption!r} step {k} ({st.category})"
        assert st.step == k, where
        assert st.more == prev_less, where
        assert len(st.less) < len(st.more), where
        assert st.less.strip() and st.removed.strip(), where
        assert st.category in CATEGORIES + STRUCTURAL, where
        if st.category in CATEGORIES:
            assert not seen_structural, f"{where}: detail step after a structural one"
            assert st.category in cfg.order, where
            pieces = _segments(st.removed, {s.text for s in spans if s.category == st.category})
            assert pieces, f"{where}: removed {st.removed!r} is no {st.category} span"
            if cfg.granularity == "span":
                assert len(pieces) == 1, where
        else:
            seen_structural = True
        assert not new_problems(st.less, st.more), f"{where}: {new_problems(st.less, st.more)} in {st.less!r}"
        for h in heads:
            assert re.search(rf"(?<![\w-]){re.escape(h)}(?![\w-])", st.less.lower()), \
                f"{where}: subject {h!r} lost from {st.less!r}"
        prev_less = st.less


# ---------------------------------------------------------------------------------------
# Detectors
# ---------------------------------------------------------------------------------------

TARGETED = {
    "lighting": (["A barn under soft morning light.", "The lighting is warm and diffused. A cat sleeps.",
                  "A dimly lit room with a piano."], "A barn stands in a field."),
    "texture": (["A glossy ceramic vase on a shelf.", "A chair carved from oak sits here.",
                 "A ball with a metallic sheen rolls away."], "A vase stands on a shelf."),
    "layout": (["A cat sits in the top-left corner.", "Cups stand in a neat row on the table.",
                "Two chairs placed side by side face the sea."], "A cat sits quietly."),
    "colour": (["A red car parks outside.", "An orange cat naps.", "A dress in pale blue hangs there."],
               "A car parks outside."),
    "count": (["Three dogs run on the grass.", "A pair of shoes by the door.",
               "Several birds perch on a wire."], "Dogs run on the grass."),
    "background": (["A horse stands in the background.", "A tree against a clear blue sky.",
                    "A man walks on a sandy beach."], "A horse stands still."),
    "style": (["A watercolor painting of a fox.", "A castle, in the style of Studio Ghibli.",
               "A robot, digital art"], "A fox sleeps."),
    "camera": (["A close-up shot of a bee.", "A tower seen from a low angle.",
                "A rose with a shallow depth of field."], "A bee flies."),
    "mood": (["A serene lake at the edge of town.", "A cabin with a cozy atmosphere.",
              "A street. The mood is eerie and quiet."], "A lake at the edge of town."),
    "text": (['A sign that reads "OPEN" hangs there.', 'A mug with the word "Hello" on it.',
              "A poster reading 'NO ENTRY' on a door."], "A sign hangs there."),
}


def test_categories_are_the_ten_of_the_taxonomy():
    assert CATEGORIES == ("lighting", "texture", "layout", "colour", "count", "background", "style",
                          "camera", "mood", "text")
    assert STRUCTURAL == ("sentence", "clause")


@pytest.mark.parametrize("category", CATEGORIES)
def test_each_detector_finds_its_category(category):
    positives, negative = TARGETED[category]
    for text in positives:
        found = [s for s in detect(text) if s.category == category]
        assert found, f"{category} not found in {text!r}: {detect(text)}"
        for s in found:
            assert text[s.start:s.end] == s.text
    assert not [s for s in detect(negative) if s.category == category], negative


@pytest.mark.parametrize("text, category, span", [
    ("A red car parks outside.", "colour", "red"),
    ("A barn under soft morning light.", "lighting", "under soft morning light"),
    ("The lighting is warm and diffused. A cat sleeps.", "lighting", "The lighting is warm and diffused."),
    ("A watercolor painting of a fox.", "style", "A watercolor painting of"),
    ("Three dogs run on the grass.", "count", "Three"),
    ("A pair of shoes by the door.", "count", "A pair of"),
    ("A tower seen from a low angle.", "camera", "seen from a low angle"),
    ("A horse stands in the background.", "background", "in the background"),
    ('A sign that reads "OPEN" hangs there.', "text", 'that reads "OPEN"'),
])
def test_spans_are_phrase_units(text, category, span):
    assert (category, span) in {(s.category, s.text) for s in detect(text)}


def test_spans_do_not_overlap_and_are_deterministic():
    for caption in FREE:
        spans = detect(caption)
        assert spans == detect(caption)
        for a, b in zip(spans, spans[1:]):
            assert a.end <= b.start, (caption, a, b)


def test_subject_is_never_inside_a_span():
    for caption in FREE:
        a = analyse(caption)
        assert a.subject is not None, caption
        for s in a.spans:
            assert not any(s.i <= h < s.j for h in a.subject.heads), (caption, s)


@pytest.mark.parametrize("caption, head", [
    ("A close-up shot of a red apple on a table.", "apple"),
    ("In a low-angle shot, a wall stands below a wide sky.", "wall"),
    ("Under warm sunset light, on the right there are two white squares.", "squares"),
    ("A pair of worn leather boots sits on the porch.", "boots"),
    ("This is a watercolor painting of a fox.", "fox"),
    ("A broad, pale shelf holds a television.", "shelf"),
])
def test_subject_is_the_head_of_the_first_noun_phrase(caption, head):
    a = analyse(caption)
    assert [a.tokens.words[h] for h in a.subject.heads] == [head]


# ---------------------------------------------------------------------------------------
# Chains: fluency and invariants
# ---------------------------------------------------------------------------------------


def test_article_follows_the_next_word():
    assert article_for("orange") == "an" and article_for("cat") == "a"
    assert article_for("hour") == "an" and article_for("unicorn") == "a" and article_for("8") == "an"
    chain = degrade_chain("An orange cat sleeps on a mat.", DegradeConfig(policy="fixed"))
    assert chain[0].category == "colour" and chain[0].less == "A cat sleeps on a mat."


@pytest.mark.parametrize("caption, category, less", [
    ("Three dogs run on the grass.", "count", "Dogs run on the grass."),
    ("A dog, under soft light, runs home.", "lighting", "A dog runs home."),
    ("In soft light, a dog runs home.", "lighting", "A dog runs home."),
    ("A cat with thick, fluffy fur.", "texture", "A cat with thick fur."),
    ("A tower seen from a low angle, at dusk.", "camera", "A tower, at dusk."),
    ("A dog sleeps. The lighting is warm and diffused.", "lighting", "A dog sleeps."),
    ('A sign that reads "OPEN" hangs on a door.', "text", "A sign hangs on a door."),
])
def test_one_removal_reads_cleanly(caption, category, less):
    chain = degrade_chain(caption, DegradeConfig(policy="fixed", order=(category,), structural=False))
    assert chain and chain[0].less == less, chain


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_free_form_chains_keep_their_invariants(cfg):
    for caption in FREE:
        chain = degrade_chain(caption, cfg, source_id=caption[:20])
        assert chain, caption
        check_chain(caption, chain, cfg)


def test_chain_ends_at_a_terse_prompt_with_the_subject():
    ends = {c: degrade_chain(c, DegradeConfig(policy="fixed"))[-1].less for c in FREE}
    assert ends[FREE[2]] == "A fox sleeping."
    assert ends[FREE[3]] == "Children fly a kite."
    assert ends[FREE[7]] == "The interior of a library is filled with tall bookshelves."
    ratios = sorted(len(e) / len(c) for c, e in ends.items())
    assert ratios[-1] < 1 and ratios[len(ratios) // 2] < 0.6, ends


def test_step_one_is_the_normalised_caption():
    caption = "A  red car\n parks   outside ,  under soft light."
    chain = degrade_chain(caption, DegradeConfig(policy="fixed"))
    assert chain[0].more == normalise(caption) == "A red car parks outside, under soft light."


@pytest.fixture(scope="module")
def iiw() -> list[tuple[str, str]]:
    if not IIW.exists():
        pytest.skip(f"IIW-400 captions not found at {IIW} (they live in ../shared/data beside the repo)")
    return [(r["id"], r["caption"]) for r in map(json.loads, IIW.read_text().splitlines())]


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=lambda c: c.name)
def test_iiw_chains_keep_their_invariants(iiw, cfg):
    lengths = []
    for key, caption in iiw:
        chain = degrade_chain(caption, cfg, source_id=key)
        check_chain(caption, chain, cfg)
        lengths.append(len(chain))
    n = len(lengths)
    at3 = sum(x >= 3 for x in lengths) / n
    at2 = sum(x >= 2 for x in lengths) / n
    print(f"\nIIW-400 [{cfg.name}]: {at3:.1%} of captions give >= 3 steps, {at2:.1%} >= 2, "
          f"mean {sum(lengths) / n:.1f} steps")
    assert at2 >= 0.8 and at3 >= 0.75


def test_iiw_chains_use_most_categories(iiw):
    steps = collections.Counter(st.category for _, c in iiw for st in degrade_chain(c, DegradeConfig(seed=5)))
    for category in CATEGORIES:
        assert steps[category] >= 20, steps  # every detector fires on real captions


def _sceneworld(n: int) -> list[str]:
    out = []
    for i in range(n):
        scene = sample_scene(random.Random(i), 256, 256)
        out.append(caption_for(scene, random.Random(1000 + i), detail="short" if i % 4 == 0 else "rich"))
    return out


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_sceneworld_chains_keep_their_invariants(cfg):
    for caption in _sceneworld(40):
        chain = degrade_chain(caption, cfg)
        assert len(chain) >= 3, caption
        check_chain(caption, chain, cfg)


def test_sceneworld_terse_prompts_lose_colours_and_counts():
    colour = re.compile(r"\b(?:" + "|".join(COLOURS) + r")\b", re.I)
    count = re.compile(r"\b(?:two|three|four|five|[2-5]|pair|trio|single)\b", re.I)
    for caption in _sceneworld(40):
        end = degrade_chain(caption, DegradeConfig(seed=3))[-1].less
        assert not colour.search(end) and not count.search(end), (caption, end)


# ---------------------------------------------------------------------------------------
# Policies and seeds
# ---------------------------------------------------------------------------------------


def test_same_seed_same_chains_and_batch_order_does_not_matter():
    records = [(f"k{i}", c) for i, c in enumerate(FREE)]
    cfg = DegradeConfig(seed=7)
    first = {k: degrade_chain(c, cfg, k) for k, c in records}
    again = {k: degrade_chain(c, cfg, k) for k, c in reversed(records)}
    assert first == again
    t1 = pairs_table(records, cfg).drop_columns(["created_at"])
    t2 = pairs_table(list(reversed(records)), cfg).drop_columns(["created_at"])
    assert sorted(t1.to_pylist(), key=str) == sorted(t2.to_pylist(), key=str)


def test_different_seeds_give_different_orders():
    orders = lambda seed: [tuple(st.category for st in degrade_chain(c, DegradeConfig(seed=seed), "k")) for c in FREE]
    differ = sum(a != b for a, b in zip(orders(0), orders(1)))
    assert differ >= 5


def test_fixed_policy_follows_the_order_and_omits_what_is_left_out():
    order = ("count", "colour", "layout")
    for caption in FREE + _sceneworld(10):
        cats = [st.category for st in degrade_chain(caption, DegradeConfig(policy="fixed", order=order))]
        detail = [c for c in cats if c in CATEGORIES]
        assert detail == [c for c in order if c in detail], (caption, cats)


def test_span_granularity_removes_one_span_per_step():
    caption = FREE[3]
    by_category = degrade_chain(caption, DegradeConfig(policy="fixed", structural=False))
    by_span = degrade_chain(caption, DegradeConfig(policy="fixed", granularity="span", structural=False))
    assert len(by_span) == len(detect(caption)) >= len(by_category)
    assert by_span[-1].less == by_category[-1].less


def test_max_steps_keeps_the_most_detailed_pairs():
    full = degrade_chain(FREE[7], DegradeConfig(seed=1))
    assert degrade_chain(FREE[7], DegradeConfig(seed=1, max_steps=2)) == full[:2]


@pytest.mark.parametrize("kwargs", [{"policy": "shuffle"}, {"granularity": "word"}, {"order": ("hue",)},
                                    {"order": ("colour", "colour")}, {"max_steps": 0}])
def test_bad_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        DegradeConfig(**kwargs)


# ---------------------------------------------------------------------------------------
# Pairs table
# ---------------------------------------------------------------------------------------


def test_pairs_table_has_the_pairs_schema_and_dedups():
    records = [(f"k{i}", c) for i, c in enumerate(FREE[:6])] + [("dup", FREE[0]), ("empty", ""), ("bare", "Hello.")]
    counters: dict[str, int] = {}
    cfg = DegradeConfig(policy="fixed")
    table = pairs_table(records, cfg, counters=counters)
    assert table.schema == PAIRS
    ids = table.column("pair_id").to_pylist()
    assert len(ids) == len(set(ids)) == counters["pairs"] == table.num_rows
    chains = [degrade_chain(c, cfg, k) for k, c in records]
    assert counters["captions"] == len(records)
    assert counters["no_detail"] == sum(not ch for ch in chains) == 2
    assert counters["duplicates"] == len(chains[6]) > 0  # the repeated caption adds nothing
    assert counters["pairs"] + counters["duplicates"] == sum(map(len, chains))
    row = table.slice(0, 1).to_pylist()[0]
    assert row["pair_id"] == pair_id(row["less"], row["more"]) and row["policy"] == cfg.name
    assert row["step"] == 1 and row["source_id"] == "k0" and row["created_at"].tzinfo is not None
    assert set(table.column("category").to_pylist()) <= set(CATEGORIES + STRUCTURAL)


def test_pairs_table_refuses_a_caption_that_is_not_text():
    with pytest.raises(TypeError, match="k1"):
        pairs_table([("k0", "A red car."), ("k1", None)])


def test_empty_input_gives_an_empty_table():
    table = pairs_table([])
    assert table.schema == PAIRS and table.num_rows == 0

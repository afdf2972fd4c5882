"""Each triage signal on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from dataengine import signals as sg
from dataengine.gaps import GapReport
from dataengine.phrases import PhraseMatch


@pytest.mark.parametrize("prompt, enhanced, dropped, substituted", [
    ("a red star", "A large red star on a grassy field, lit from the left.", [], []),
    ("a red star", "A large blue star on a grassy field.", [], [("red", "blue")]),
    ("a red star and a ring", "A large red star on a grassy field.", ["ring"], []),
    ("a star, red", "a red star glowing softly", [], []),  # moved, not lost
    ("two red stars", "A pair of red stars side by side", [], []),  # numbers compared as numbers
    ("three red stars", "Two red stars side by side", [], [("3", "2")]),
    ("a colour photo of a grey cat", "A color photograph of a gray cat asleep", [], []),  # spelling
    ("a cat on a sofa", "a cat", ["sofa"], []),
    ("a cat", None, [], []),
])
def test_drift_finds_words_the_enhancer_dropped_or_replaced(prompt, enhanced, dropped, substituted):
    d = sg.drift(prompt, enhanced)
    assert d.dropped == dropped and d.substituted == substituted
    assert d.lost == len(dropped) + len(substituted)
    assert (d.share > 0) == bool(dropped or substituted)
    assert ("keeps every" in d.explain()) == (not (dropped or substituted))


def test_drift_reads_real_human_captions_and_their_degraded_prompts_as_kept(tmp_path):
    """Terse prompts made by deleting from a caption keep every word in the caption."""
    import json
    from pathlib import Path

    from dataengine.degrade.chains import DegradeConfig, degrade_chain

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "iiw400_captions.jsonl"
    if not path.exists():
        pytest.skip("../shared/data is not beside this checkout")
    caps = [json.loads(line)["caption"] for line in path.open()][:100]
    cfg = DegradeConfig(policy="fixed")
    lost = 0
    for c in caps:
        steps = degrade_chain(c, cfg)
        lost += sg.drift(steps[-1].less if steps else c, c).lost
    assert lost == 0


def test_percentile_ranks_against_the_reference_with_ties_halved():
    ref = np.array([0.0, 1.0, 2.0, 3.0])
    assert sg.percentile(np.array([-1.0, 1.0, 1.5, 9.0]), ref).tolist() == [0.0, 0.375, 0.5, 1.0]
    assert np.isnan(sg.percentile(np.array([1.0]), np.array([]))).all()


def test_reward_percentiles_average_heads_and_name_the_one_that_liked_the_output_most():
    ref = {"fidelity": np.linspace(0, 1, 101), "aesthetics": np.linspace(10, 20, 101)}
    mean, top, each = sg.reward_percentiles([{"fidelity": 0.9, "aesthetics": 11.0}, None, {"other": 1.0}], ref)
    assert mean[0] == pytest.approx((0.9 + 0.1) / 2, abs=0.01) and top[0] == "fidelity"
    assert np.isnan(mean[1]) and top[1] is None
    assert np.isnan(mean[2]) and each[2] == {}  # a head with no reference is not guessed at


def test_reward_reference_uses_well_rated_outputs_when_there_are_enough():
    scores = [{"h": float(i)} for i in range(40)]
    ratings = [5 if i >= 20 else 1 for i in range(40)]
    assert sg.reference_from_feedback(scores, ratings, min_rated=20)["h"].min() == 20.0
    assert sg.reference_from_feedback(scores, ratings, min_rated=21)["h"].min() == 0.0


def test_disagreement_is_the_reward_percentile_above_the_rating():
    d = sg.disagreement(np.array([0.9, 0.9, 0.2, np.nan]), [1, 5, None, 1])
    assert d[:3].tolist() == pytest.approx([0.9, -0.1, 0.2]) and np.isnan(d[3])


def _report(pct: float, thr: float, phrases=()) -> GapReport:
    return GapReport("g", "c", "text", "m", 0.0, 0.5, pct, 1 - pct, thr, pct < thr, [], {}, None,
                     0.0, list(phrases), {"image": {"margin": 0, "percentile": pct, "threshold": 0},
                                          "caption": {"margin": -0.2, "percentile": pct, "threshold": -0.1}})


def test_coverage_signals_are_relative_to_the_searchs_own_threshold():
    weak = PhraseMatch("teal kite", -0.2, "teal ring", 0.6, "teal kite", 0.9)
    reps = [_report(0.01, 0.05, [weak]), _report(0.5, 0.05, [])]
    c = sg.coverage_signals(reps)
    assert c["coverage_margin"].tolist() == pytest.approx([-0.04, 0.45])
    assert c["is_gap"].tolist() == [True, False]
    assert c["weakest_phrase"] == ["teal kite", None]


def test_similarity_gap_says_which_prompt_the_output_looks_like():
    img = np.array([[1.0, 0.0], [1.0, 0.0]])
    prompt = np.array([[0.0, 1.0], [1.0, 0.0]])
    enh = np.array([[1.0, 0.0], [0.0, 1.0]])
    s = sg.similarity_signals(img, prompt, enh, np.array([True, False]))
    assert s["sim_gap"].tolist() == [1.0, 0.0]  # the second has no enhanced prompt

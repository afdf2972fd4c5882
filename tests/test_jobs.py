"""The retrain jobs' shared gate and the pieces of the rl and prompt jobs that need no
training: fault injection, the held-out split, the overrated measure, held-out regressions."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from models.gate import promotion
from models.recalibrate import (RecalibrationConfig, heldout_drop, in_check, in_select, kind_cosines,
                                leave_out_candidates, overrated, subset)
from models.train_reward import PairSet, RewardTrainConfig, flipped


def test_promotion_needs_enough_fixed_and_no_regression():
    assert promotion(10, 6, [], 0.5)[0]
    ok, why = promotion(10, 4, [], 0.5, "prompts")
    assert not ok and "fixes 40% of 10 prompts" in why
    ok, why = promotion(10, 9, ["fidelity 0.70 < 0.80"], 0.5)
    assert not ok and "fidelity 0.70 < 0.80" in why
    ok, why = promotion(0, 0, [], 0.5)
    assert not ok and "nothing to fix" in why


def test_check_share_is_stable_and_close_to_its_size():
    ids = [f"fb-{i}" for i in range(4000)]
    first = [in_check(i, 0.3) for i in ids]
    assert first == [in_check(i, 0.3) for i in ids]
    assert 0.27 < sum(first) / len(ids) < 0.33
    # A larger share keeps everything a smaller one held out.
    assert all(in_check(i, 0.5) for i, f in zip(ids, first) if f)
    with pytest.raises(ValueError, match="check_share"):
        RecalibrationConfig(check_share=1.0)


def test_overrated_is_at_or_above_the_median_well_rated_output():
    good = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    assert overrated(np.array([0.29, 0.3, 0.9]), good).tolist() == [False, True, True]


def test_flip_reverses_only_the_named_attributes_pairs():
    win = {"image": torch.arange(4), "text": torch.arange(4)}
    lose = {"image": torch.arange(4) + 10, "text": torch.arange(4) + 10}
    ps = PairSet("fidelity", win, lose, ["caption_colour", "image_shape", "image_colour", "caption_count"], {})
    out = flipped(ps, ("colour",))
    assert out.win["image"].tolist() == [10, 1, 12, 3] and out.lose["image"].tolist() == [0, 11, 2, 13]
    assert out.win["text"].tolist() == [10, 1, 12, 3]
    assert ps.win["image"].tolist() == [0, 1, 2, 3]  # the original is untouched
    assert flipped(replace(ps, kinds=["blur", "noise", "blur", "cast"]), ("blur",)).win["image"].tolist() == [10, 1, 12, 3]
    assert RewardTrainConfig(flip=["blur", "colour"]).flip == ("blur", "colour")
    with pytest.raises(ValueError, match="flip"):
        RewardTrainConfig(flip=("taste",))


def test_heldout_drop_names_heads_that_fell_beyond_tolerance():
    cur = {"eval": {"heldout": {"fidelity": {"accuracy": 0.80}, "aesthetics": {"accuracy": 0.95}}}}
    new = {"eval": {"heldout": {"fidelity": {"accuracy": 0.79}, "aesthetics": {"accuracy": 0.90}}}}
    assert heldout_drop(new, cur, 0.02) == ["aesthetics 0.900 < 0.950"]


def test_selection_share_is_drawn_apart_from_the_check_share():
    ids = [f"fb-{i}" for i in range(4000)]
    check = {i for i in ids if in_check(i, 0.3)}
    select = {i for i in ids if in_select(i, 0.25)}
    assert 0.22 < len(select) / len(ids) < 0.28
    # Independent draws: about a quarter of the check share is in the selection share too.
    assert 0.2 < len(check & select) / len(check) < 0.3
    with pytest.raises(ValueError, match="select_share"):
        RecalibrationConfig(select_share=0.0)


def test_kind_cosines_find_the_replayed_kind_that_points_against_the_approved_pairs():
    # Four embedding rows: 0 and 1 differ along x, 2 and 3 along y.
    tables = {"img": torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])}
    approved = PairSet("aesthetics", {"image": torch.tensor([0, 0])}, {"image": torch.tensor([1, 1])},
                       ["feedback"] * 2, tables)
    # blur was taught backwards (1 over 0); noise is orthogonal; crop agrees.
    replay = PairSet("aesthetics", {"image": torch.tensor([1, 2, 0])}, {"image": torch.tensor([0, 3, 1])},
                     ["blur", "noise", "crop"], tables)
    cos = kind_cosines(replay, approved)
    assert cos == {"blur": -1.0, "crop": 1.0, "noise": 0.0}
    kept = subset(replay, torch.tensor([k != "blur" for k in replay.kinds]))
    assert kept.kinds == ["noise", "crop"] and kept.win["image"].tolist() == [2, 0]


def test_leave_out_candidates_go_from_nothing_through_single_kinds_to_every_opposed_kind():
    cos = {"aesthetics": {"blur": -0.47, "noise": -0.22, "cast": -0.01, "crop": 0.18},
           "fidelity": {"caption_colour": -0.3, "caption_shape": 0.2}}
    assert leave_out_candidates(cos) == [
        {}, {"aesthetics": ("blur",), "fidelity": ("caption_colour",)}, {"aesthetics": ("noise",)},
        {"aesthetics": ("cast",)}, {"aesthetics": ("blur", "noise", "cast"), "fidelity": ("caption_colour",)}]
    # A confounded kind can point further against the feedback than the reversed one: the
    # reversed one is still a candidate on its own.
    two = leave_out_candidates({"aesthetics": {"cast": -0.725, "blur": -0.68, "crop": 0.3}})
    assert {"aesthetics": ("blur",)} in two and two[-1] == {"aesthetics": ("cast", "blur")}
    assert leave_out_candidates({"aesthetics": {"blur": -0.5, "crop": 0.2}}) == [{}, {"aesthetics": ("blur",)}]
    assert leave_out_candidates({"fidelity": {"caption_colour": 0.3}}) == [{}]

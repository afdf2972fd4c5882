"""Reward heads: the score interface, Bradley-Terry training on scene-world pairs, versions."""

from __future__ import annotations

import random

import pytest
import torch

from dataengine.sceneworld import render, sample_edit, sample_scene
from models.rewards import EDIT_HEADS, GEN_HEADS, HEADS, RewardBatch, RewardModel, load
from models.train_reward import RewardTrainConfig, RewardTrainJob, make_pairs
from models.trainer import LoopConfig, train


@pytest.fixture(scope="module")
def frozen():
    from models.frozen import Frozen

    return Frozen.load("dataengine-clip-lite0")


def _images(scenes) -> torch.Tensor:
    import numpy as np

    arr = np.stack([np.asarray(render(s)) for s in scenes])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _scenes(n: int, seed: int, size: int = 64):
    rng = random.Random(seed)
    return [sample_scene(rng, size, size) for _ in range(n)]


@pytest.fixture(scope="module")
def trained(frozen, tmp_path_factory):
    """A fidelity-only run on a few dozen scenes: the head, its held-out figures, its version."""
    cfg = RewardTrainConfig(heads=("fidelity",), n_train=40, n_eval=24, batch_size=64, hidden=64)
    job = RewardTrainJob(frozen, _scenes(40, 1), _scenes(24, 2), cfg, info={"clip": frozen.spec})
    root = tmp_path_factory.mktemp("models")
    record = train(job, root, LoopConfig(steps=80, lr=3e-3, warmup_steps=5, ckpt_every=1000, progress=False))
    return job, record


def test_generation_batches_get_the_three_generation_scores_and_edits_all_five(trained):
    job, _ = trained
    rng = random.Random(5)
    triples = [sample_edit(rng, 32, 32) for _ in range(3)]
    sources, targets = _images([t[0] for t in triples]), _images([t[2] for t in triples])
    captions = ["a red circle", "two blue stars on the left", "a green square"]
    heads = job.model
    assert isinstance(heads, RewardModel)
    gen = heads.score(RewardBatch(targets, captions))
    assert set(gen) == set(GEN_HEADS)
    edit = heads.score(RewardBatch(targets, captions, sources, ["make it red", "remove it", "add a star"]))
    assert set(edit) == set(HEADS) and set(EDIT_HEADS) < set(edit)
    assert all(v.shape == (3,) and torch.isfinite(v).all() for v in edit.values())
    with pytest.raises(ValueError, match="both sources and instructions"):
        RewardBatch(targets, captions, sources=sources)


def test_bradley_terry_loss_decreases(trained):
    _, record = trained
    m = record["metrics"]
    assert m["last"]["loss_fidelity"] < m["first"]["loss_fidelity"] - 0.1


@pytest.mark.xfail(strict=True, reason="a known limit of the design (issue 5's closing note): the default CLIP's "
                                      "frozen pooled embeddings barely carry single-attribute fidelity: held-out "
                                      "0.44-0.54 here (CLIP cosine 0.53); a bilinear probe trained on 400 scenes reaches "
                                      "0.57. It needs spatial features or a CLIP trained on attribute contrasts")
def test_fidelity_head_beats_chance_on_heldout_scenes(trained):
    _, record = trained
    ev = record["metrics"]["eval"]
    assert ev["heldout"]["fidelity"]["pairs"] >= 100
    assert ev["heldout"]["fidelity"]["accuracy"] > 0.6
    assert ev["fidelity_blurred"]["accuracy"] > 0.55


def test_saved_version_loads_to_identical_scores(trained, frozen):
    job, record = trained
    images = _images(_scenes(4, 9, size=32))
    batch = RewardBatch(images, ["a red circle"] * 4, images.flip(-1), ["flip it"] * 4)
    loaded = load(record["path"], frozen=frozen)
    before, after = job.model.score(batch), loaded.score(batch)
    assert set(before) == set(after) == set(HEADS)
    for k in HEADS:
        assert torch.equal(before[k], after[k]), k


def test_every_head_gets_pairs_and_they_name_their_kind(frozen):
    pairs = make_pairs(_scenes(3, 4), HEADS, frozen, seed=0)
    assert set(pairs) == set(HEADS)
    for h, ps in pairs.items():
        assert len(ps) >= 3 and len(ps.kinds) == len(ps)
        for side in (ps.win, ps.lose):
            assert all(v.shape == (len(ps), frozen.embed_dim) for v in side.values())
    assert {k.split("_", 1)[0] for k in pairs["fidelity"].kinds} <= {"caption", "image"}

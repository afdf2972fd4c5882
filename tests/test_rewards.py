"""Reward heads: the score interface, Bradley-Terry training on scene-world pairs, versions."""

from __future__ import annotations

import random

import pytest
import torch

from dataengine.sceneworld import render, sample_edit, sample_scene
from models.rewards import (EDIT_HEADS, GEN_HEADS, HEAD_INPUTS, HEADS, HELDOUT_BARS, RewardBatch, RewardModel,
                            bar_accuracy, load, weighted_reward)
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
    # Patch tokens at 128 px, not the default 256: the trunk at 256 px was most of this
    # fixture's 166 s, and what these tests check does not need the finer grid.
    cfg = RewardTrainConfig(heads=("fidelity",), n_train=40, n_eval=24, batch_size=64, hidden=64, token_size=128)
    job = RewardTrainJob(frozen, _scenes(40, 1), _scenes(24, 2), cfg, info={"clip": frozen.spec})
    root = tmp_path_factory.mktemp("models")
    # lr 1e-3, the reward's own default: at 3e-3 the neighbours' convolution kept the head at chance.
    record = train(job, root, LoopConfig(steps=160, lr=1e-3, warmup_steps=5, ckpt_every=1000, progress=False))
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


def test_the_weighted_reward_sums_only_the_weighted_heads_and_refuses_a_head_the_reward_lacks():
    scores = {"aesthetics": torch.tensor([2.0, -1.0]), "fidelity": torch.tensor([0.5, 0.25]),
              "portrait": torch.tensor([100.0, 100.0])}
    torch.testing.assert_close(weighted_reward(scores, {"aesthetics": 0.5, "fidelity": 2.0}), torch.tensor([2.0, 0.0]))
    with pytest.raises(KeyError, match="fidelty"):  # a misspelt head fails instead of counting as zero
        weighted_reward(scores, {"fidelty": 1.0})


def test_bradley_terry_loss_decreases(trained):
    _, record = trained
    m = record["metrics"]
    assert m["last"]["loss_fidelity"] < m["first"]["loss_fidelity"] - 0.1


@pytest.mark.xfail(strict=True, reason="this fixture's 40 scenes x 160 steps cannot reach it; benchmarks/rewards.py "
                                      "at the default 2000 scenes x 3000 steps does: colour and shape swaps 0.813 "
                                      "(0.788 at 1500 steps); a test of that size does not fit CI")
def test_fidelity_passes_its_bar_on_attribute_swaps(trained):
    _, record = trained
    assert bar_accuracy("fidelity", record["metrics"]["eval"]["heldout"]["fidelity"]) >= HELDOUT_BARS["fidelity"]


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
        for which in ("win", "lose"):
            side = ps.side(which)
            assert all(side[r].shape == (len(ps), frozen.embed_dim) for r in HEAD_INPUTS[h])
    assert {k.split("_", 1)[0] for k in pairs["fidelity"].kinds} <= {"caption", "image"}



def test_only_the_spatial_heads_images_get_patch_tokens_and_each_pair_reads_its_own(frozen):
    from models.rewards import RewardConfig

    cfg = RewardConfig(clip=frozen.spec, embed_dim=frozen.embed_dim, patch_dim=frozen.patch_dim(RewardConfig.patch_strides),
                       spatial=("fidelity",))  # the edit heads pooled: their images must get no tokens
    pairs = make_pairs(_scenes(3, 4), HEADS, frozen, seed=0, model_cfg=cfg)
    fid = pairs["fidelity"]
    used = torch.cat([fid.win["image"], fid.lose["image"]]).unique()
    assert len(fid.tables["img_tok"]) == len(used) < len(fid.tables["img"])  # aesthetics, edits...: none
    # Token rows map one to one onto the images the pairs show: the same image, the same tokens.
    pooled = torch.cat([fid.win["image"], fid.lose["image"]])
    tok = torch.cat([fid.win["image_tokens"], fid.lose["image_tokens"]])
    assert len(set(zip(pooled.tolist(), tok.tolist()))) == len(used) == len(tok.unique())
    one = fid.side("lose", torch.tensor([len(fid) - 1]))
    assert one["image_tokens"].shape == (1, cfg.grid_cells, cfg.patch_dim)
    assert "image_tokens" not in pairs["aesthetics"].win

def test_patch_tokens_put_each_trunk_map_on_one_grid_and_keep_where_colour_is(frozen):
    from models.rewards import RewardConfig, patch_tokens

    img = -torch.ones(2, 3, 64, 64)  # black
    img[1, 0, :16, :16] = 1.0  # a red square in the top-left quarter of the second image
    cfg = RewardConfig()
    tok = patch_tokens(frozen, img, cfg)
    side = cfg.token_size // cfg.patch_grid
    assert tok.shape == (2, side * side, frozen.patch_dim(cfg.patch_strides)) == (2, side * side, cfg.patch_dim)
    rgb = tok[..., -3:].view(2, side, side, 3)  # each cell's mean colour, row-major
    assert torch.allclose(rgb[0], torch.full_like(rgb[0], -1.0), atol=1e-4)
    assert (rgb[1, : side // 4 - 1, : side // 4 - 1, 0] > 0.9).all() and (rgb[1, side // 2:, :, 0] < -0.9).all()
    # The coarser maps differ where the square is, not only in the colour channels.
    assert (tok[1, 0, :-3] - tok[0, 0, :-3]).abs().max() > 0.1
    # A version saved before the stride-32 map read a stride-8 grid of the stride-8 and -16 maps.
    old = frozen.patch_tokens(img, 128, (8, 16), 8)
    assert old.shape == (2, 16 * 16, frozen.patch_dim((8, 16)))
    with pytest.raises(ValueError, match="trunk stride"):
        frozen.patch_tokens(img, 256, (8, 16), 12)


def test_a_version_saved_before_the_stride_32_map_recalibrates_with_its_own_patch_recipe(tmp_path):
    import json

    from models.recalibrate import _train_cfg

    (tmp_path / "config.json").write_text(json.dumps({"job": {"train": {"heads": ["fidelity"], "token_size": 128}}}))
    old = _train_cfg(tmp_path)
    assert (old.token_size, old.patch_strides, old.patch_grid, old.patch_context) == (128, (8, 16), 8, False)
    (tmp_path / "config.json").write_text(json.dumps({"job": {"train": {"patch_strides": [8, 16, 32], "patch_grid": 16}}}))
    assert _train_cfg(tmp_path).patch_strides == (8, 16, 32)


def test_with_patch_context_a_cell_sees_its_neighbours_and_no_farther(tmp_path, frozen):
    from models.rewards import EmbeddedRewards, RewardConfig, _TokenMatch

    torch.manual_seed(0)
    x = torch.randn(1, 64, 12)
    poked = x.clone()
    poked[0, 3 * 8 + 3] = torch.randn(12)  # row 3, column 3 of an 8x8 grid
    for context, changed in ((False, {27}), (True, {r * 8 + c for r in (2, 3, 4) for c in (2, 3, 4)})):
        head = _TokenMatch(12, 6, 64, 16, context=context).eval()
        if context:  # it starts at zero (the context-free head); give it weights as training would
            torch.nn.init.normal_(head.context[-1].weight)
        with torch.no_grad():
            moved = ((head.cells(poked) - head.cells(x)).abs().amax(-1) > 1e-6)[0]
        assert set(moved.nonzero().flatten().tolist()) == changed, context
    # A version saved before the neighbours' convolution has no such weights: it loads without it.
    import json

    cfg = RewardConfig(clip=frozen.spec, embed_dim=frozen.embed_dim, patch_dim=frozen.patch_dim(RewardConfig.patch_strides),
                       patch_context=False)
    path = EmbeddedRewards(cfg, frozen).save(tmp_path)
    saved = json.loads((path / "config.json").read_text())
    del saved["job"]["model"]["patch_context"]
    (path / "config.json").write_text(json.dumps(saved))
    assert load(path, frozen=frozen).heads["fidelity"].context is None


def test_spatial_edit_heads_read_both_images_and_the_instruction_and_learn_what_changed(frozen, tmp_path):
    from models.rewards import RewardConfig

    spatial = ("instruction", "consistency")
    cfg = RewardTrainConfig(heads=spatial, n_train=24, n_eval=8, batch_size=32, hidden=32, spatial=spatial,
                            token_size=64, patch_grid=16)
    model_cfg = RewardConfig(clip=frozen.spec, embed_dim=frozen.embed_dim, spatial=spatial, token_size=64,
                             patch_grid=16, patch_dim=frozen.patch_dim(cfg.patch_strides), text_dim=frozen.text_dim)
    pairs = make_pairs(_scenes(6, 4), spatial, frozen, seed=0, model_cfg=model_cfg)
    for h in spatial:
        ps = pairs[h]
        assert {"source_tokens", "image_tokens", "instruction_tokens", "instruction_mask"} <= set(ps.win)
        # Each role's token row is its own image's: a source's patch tokens are the source's.
        win = ps.side("win")
        assert torch.equal(win["source"], ps.tables["img"][ps.win["source"]].float())
        assert not torch.equal(win["source_tokens"], win["image_tokens"])  # an edit changed the picture
    unchanged = [i for i, k in enumerate(pairs["instruction"].kinds) if k == "unchanged"]
    lose = pairs["instruction"].side("lose", torch.tensor(unchanged))
    assert torch.equal(lose["source_tokens"], lose["image_tokens"])  # the losing side did nothing
    # A short run learns that doing nothing loses, from what changed between the two images.
    job = RewardTrainJob(frozen, _scenes(24, 5), _scenes(8, 6), cfg, info={"clip": frozen.spec})
    record = train(job, tmp_path, LoopConfig(steps=60, lr=3e-3, warmup_steps=5, ckpt_every=1000, progress=False))
    by_kind = record["metrics"]["eval"]["train"]["instruction"]["by_kind"]
    assert by_kind["unchanged"] >= 0.9, by_kind
    heads = load(record["path"], frozen=frozen)
    src, out = _images(_scenes(2, 7, size=64)), _images(_scenes(2, 8, size=64))
    scores = heads.score(RewardBatch(out, ["a red star"] * 2, src, ["make the star red"] * 2))
    assert set(scores) == set(HEADS) and all(torch.isfinite(v).all() for v in scores.values())

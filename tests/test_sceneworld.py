"""The scene world: deterministic samples, exact ground truth, held-out concepts, shards."""

from __future__ import annotations

import dataclasses
import io
import json
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dataengine.sceneworld import (
    COLOURS, COUNT_FORMS, DEFAULT_FILL_POINT, FILL_POINT, PLURALS, Scene, SceneWorldConfig,
    caption_for, concept_present, generate, make_sample, position_of, render, sample_edit,
    sample_scene, write_scene_world,
)

HOLDOUT = ("purple", "triangle")
SMALL = SceneWorldConfig(n_train=40, n_pool=40, n_eval=20, resolution=64, edit_fraction=0.25)


def _image(sample: dict) -> Image.Image:
    data = sample.get("png") or sample.get("jpg")
    return Image.open(io.BytesIO(data))


def _nearest_colour(rgb) -> str:
    return min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOURS[c], map(int, rgb))))


# ---------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------


def test_same_seed_gives_identical_samples_in_any_order():
    cfg = dataclasses.replace(SMALL, resolution=128)
    in_order = list(generate("pool", cfg, stop=6))
    alone = make_sample("pool", 5, cfg)  # made without samples 0..4: must not matter
    again = list(generate("pool", cfg, stop=6))
    assert alone == in_order[5]
    assert again == in_order
    assert [s["__key__"] for s in in_order] == [f"pool-{i:07d}" for i in range(6)]


def test_different_seed_or_split_gives_different_samples():
    a = make_sample("train", 3, SMALL)
    b = make_sample("train", 3, dataclasses.replace(SMALL, seed=1))
    c = make_sample("eval", 3, SMALL)
    for other in (b, c):
        assert other["txt"] != a["txt"]
        assert other["json"]["scene"] != a["json"]["scene"]


def test_scene_json_round_trips_and_renders_identically():
    scene = sample_scene(random.Random(7), 128, 128)
    back = Scene.from_json(json.loads(json.dumps(scene.to_json())))
    assert back == scene
    assert np.array_equal(np.asarray(render(back)), np.asarray(render(scene)))


# ---------------------------------------------------------------------------------------
# Held-out concepts
# ---------------------------------------------------------------------------------------


def test_holdout_never_in_train_but_present_in_pool_and_eval():
    cfg = dataclasses.replace(SMALL, n_train=150, edit_fraction=0.3)
    train = list(generate("train", cfg))
    assert sum(s["json"]["task"] == "edit" for s in train) >= 30
    for s in train:
        j = s["json"]
        assert not concept_present(j["scene"], *HOLDOUT), s["__key__"]
        if j["task"] == "edit":
            assert not concept_present(j["source_scene"], *HOLDOUT), s["__key__"]
            assert "purple triangle" not in j["instruction"]
    pool = [s["json"] for s in generate("pool", cfg)]
    with_concept = sum(concept_present(j["scene"], *HOLDOUT) for j in pool)
    assert abs(with_concept - cfg.holdout_pool_fraction * cfg.n_pool) <= 1  # 6 of 40
    assert any(concept_present(s["json"]["scene"], *HOLDOUT) for s in generate("eval", cfg))


def test_edit_can_introduce_a_required_concept_without_forbidden_ones():
    forbid = {("red", "star")}
    for k in range(15):
        source, edit, target = sample_edit(random.Random(k), 128, 128, forbid=forbid, require=HOLDOUT)
        assert concept_present(target, *HOLDOUT)
        assert not concept_present(target, "red", "star")
        assert not concept_present(source, "red", "star")


# ---------------------------------------------------------------------------------------
# Ground truth matches pixels
# ---------------------------------------------------------------------------------------


def test_instance_boxes_hold_their_objects_colour():
    # Flat style, solid fill and neutral light keep the palette colours readable in pixels.
    checked = 0
    for k in range(25):
        scene = sample_scene(random.Random(k), 256, 256)
        groups = tuple(dataclasses.replace(g, texture="solid") for g in scene.groups)
        scene = dataclasses.replace(scene, groups=groups, style="flat", lighting="daylight")
        px = np.asarray(render(scene))
        for g in scene.groups:
            fx, fy = FILL_POINT.get(g.shape, DEFAULT_FILL_POINT)
            for x0, y0, x1, y1 in g.boxes:
                x, y = int(x0 + fx * (x1 - x0)), int(y0 + fy * (y1 - y0))
                assert _nearest_colour(px[y, x]) == g.colour, (k, g)
                checked += 1
    assert checked > 50


def test_group_positions_name_the_region_of_their_boxes():
    for s in generate("train", dataclasses.replace(SMALL, resolution=None, n_train=30)):
        scene = s["json"]["scene"]
        w, h = scene["width"], scene["height"]
        for g in scene["groups"]:
            assert len(g["boxes"]) == g["count"]
            for x0, y0, x1, y1 in g["boxes"]:
                assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert position_of(g["boxes"], w, h) == g["position"]
            col = {"left": 0, "right": 2}.get(g["position"].split("-")[-1], 1)
            cx = (min(b[0] for b in g["boxes"]) + max(b[2] for b in g["boxes"])) / 2
            assert col / 3 <= cx / w < (col + 1) / 3


def test_several_resolutions_and_both_formats_match_their_json():
    cfg = SceneWorldConfig(n_train=24, resolution_weights=(1, 1, 1, 1, 1), jpeg_fraction=0.3, edit_fraction=0)
    sizes, formats = set(), set()
    for s in generate("train", cfg):
        img = _image(s)
        assert img.size == (s["json"]["width"], s["json"]["height"])
        sizes.add(img.size[0])
        formats.add("png" if "png" in s else "jpg")
    assert {64, 1024} <= sizes and len(sizes) >= 4
    assert formats == {"png", "jpg"}


# ---------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------


def _assert_fluent(text: str) -> None:
    assert "  " not in text and " ," not in text and ".." not in text, text
    assert not re.search(r"\ba a\b|\ban an\b", text, re.I), text
    for art, word in re.findall(r"\b(an?) (\w+)", text, re.I):
        assert (art.lower() == "an") == (word[0].lower() in "aeiou"), text
    assert "crosss" not in text and "crosse " not in text, text


def test_captions_name_every_group_fluently():
    for k in range(60):
        scene = sample_scene(random.Random(k), 128, 128)
        for detail in ("rich", "short", "terse"):
            text = caption_for(scene, random.Random(k), detail=detail)
            _assert_fluent(text)
            for g in scene.groups:
                noun = g.shape if g.count == 1 else PLURALS[g.shape]
                assert re.search(rf"\b{g.colour}\b", text, re.I), (detail, text)
                assert re.search(rf"\b{noun}\b", text, re.I), (detail, text)
                if detail != "terse":  # terse prompts may say "some red stars"
                    forms = "|".join(re.escape(f) for f in COUNT_FORMS[g.count])
                    assert re.search(rf"(?<![\w-])({forms})\b", text, re.I), (detail, text)


def test_captions_vary_with_the_seed_and_rich_ones_are_longer():
    scene = sample_scene(random.Random(3), 128, 128)
    rich = {caption_for(scene, s) for s in range(8)}
    assert len(rich) >= 6
    terse = [caption_for(scene, s, detail="terse") for s in range(8)]
    assert max(map(len, terse)) < min(map(len, rich))


# ---------------------------------------------------------------------------------------
# Edits and shards
# ---------------------------------------------------------------------------------------


def test_edit_samples_carry_source_instruction_and_a_changed_target():
    cfg = dataclasses.replace(SMALL, edit_fraction=1.0, n_train=14)
    for s in generate("train", cfg):
        j = s["json"]
        assert j["task"] == "edit" and "src.png" in s and "png" in s
        assert j["instruction"].endswith(".") and len(j["instruction"].split()) >= 3
        assert j["source_scene"] != j["scene"]
        src = Image.open(io.BytesIO(s["src.png"]))
        assert src.size == _image(s).size
        assert s["src.png"] != s["png"]
        if j["edit"]["op"] == "recolor":
            assert j["scene"]["groups"][j["edit"]["group"]]["colour"] == j["edit"]["value"]


def test_write_scene_world_writes_readable_shards(tmp_path):
    cfg = dataclasses.replace(SMALL, n_train=12, n_pool=7, n_eval=3, samples_per_shard=5)
    paths = write_scene_world(tmp_path, cfg, progress=False)
    assert [len(paths[s]) for s in ("train", "pool", "eval")] == [3, 2, 1]
    assert paths["train"][0].endswith("train/sceneworld-train-000000.tar")
    keys = [s["__key__"] for url in paths["train"] for s in wds.WebDataset(url, shardshuffle=False)]
    assert keys == [f"train-{i:07d}" for i in range(12)]
    with tarfile.open(paths["pool"][0]) as tf:
        names = tf.getnames()
    assert "pool-0000000.json" in names and "pool-0000000.txt" in names
    # A smaller rerun leaves no stale shards of the bigger one behind.
    paths = write_scene_world(tmp_path, dataclasses.replace(cfg, n_train=4), splits=("train",), progress=False)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["sceneworld-train-000000.tar"]


def test_config_rejects_unknown_holdout_concept():
    with pytest.raises(ValueError, match="vocabulary"):
        SceneWorldConfig(holdout=(("mauve", "triangle"),))


@pytest.mark.slow
def test_ray_writes_the_same_shards_as_one_process(tmp_path):
    """One Ray task per shard gives the same shard files, keys and captions."""
    from dataengine.cluster import ensure_ray
    from dataengine.sceneworld import SceneWorldConfig, write_scene_world

    cfg = SceneWorldConfig(n_train=25, n_pool=12, n_eval=0, samples_per_shard=10, resolution=64)
    ensure_ray(num_cpus=2)
    seq = write_scene_world(tmp_path / "seq", cfg, splits=("train", "pool"), progress=False)
    par = write_scene_world(tmp_path / "par", cfg, splits=("train", "pool"), progress=False, use_ray=True)

    def read(paths):
        return [(s["__key__"], s["txt"]) for p in paths for s in wds.WebDataset(p, shardshuffle=False)]

    for split in ("train", "pool"):
        assert [Path(p).name for p in seq[split]] == [Path(p).name for p in par[split]]
        assert read(seq[split]) == read(par[split])
    assert len(par["train"]) == 3 and len(read(par["train"])) == 25

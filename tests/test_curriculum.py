"""The six-stage curriculum and its sampler over a workspace's shards."""

from __future__ import annotations

import pytest
import torch

from dataengine.curriculum import REPORT_STAGES, CurriculumSampler, NoTrainingData, stages


def test_report_schedule_grows_resolution_and_editing_share():
    res = [s.resolution for s in REPORT_STAGES]
    edit = [s.edit_fraction for s in REPORT_STAGES]
    assert len(REPORT_STAGES) == 6 and res[0] == 256 and res[-1] == 2048
    assert res == sorted(res) and edit == sorted(edit)
    assert edit[0] == pytest.approx(0.1) and edit[-1] == pytest.approx(0.3)  # 9:1 -> 7:3
    assert sum(s.share for s in REPORT_STAGES) == pytest.approx(1.0)


def test_scaled_stages_stay_multiples_of_the_vae_factor():
    small = stages(scale=8)
    assert [s.resolution for s in small] == [32, 64, 96, 128, 192, 256]
    assert all(s.resolution % 16 == 0 for s in stages(scale=7))
    assert max(s.resolution for s in stages(scale=8, max_resolution=100)) == 96
    with pytest.raises(ValueError):
        stages(scale=0)


def test_batches_follow_the_stages_and_are_deterministic(scene_ws):
    sampler = CurriculumSampler(scene_ws.root, batch_size=4, total_steps=100, scale=8)
    first, last = sampler.batch(0), sampler.batch(99)
    assert first.images.shape[-1] == 32 and last.images.shape[-1] == 256
    assert first.images.dtype == torch.float32 and -1.0 <= float(first.images.min()) <= float(first.images.max()) <= 1.0
    again = CurriculumSampler(scene_ws.root, batch_size=4, total_steps=100, scale=8).batch(0)
    assert again.keys == first.keys and torch.equal(again.images, first.images)
    rows = sampler.describe()
    assert [r["stage"] for r in rows] == ["s1", "s2", "s3", "s4", "s5", "s6"]
    assert rows[0]["first_step"] == 0 and rows[-1]["last_step"] == 99
    for r in rows:  # the schedule's table and stage_at agree at every boundary
        assert sampler.stage_at(r["first_step"]).name == r["stage"] == sampler.stage_at(r["last_step"]).name


def test_editing_share_tracks_the_stage_and_edit_batches_carry_sources(scene_ws):
    sampler = CurriculumSampler(scene_ws.root, batch_size=2, total_steps=4000, resolution=32)
    early = [sampler.task_at(s) for s in range(0, 1000)]
    late = [sampler.task_at(s) for s in range(3700, 4000)]
    assert 0.06 < early.count("edit") / len(early) < 0.14
    assert 0.22 < late.count("edit") / len(late) < 0.38
    b = sampler.batch(0, task="edit")
    assert b.task == "edit" and b.sources.shape == b.images.shape == (2, 3, 32, 32)
    assert all(b.instructions) and all(m["task"] == "edit" for m in b.meta)
    assert not torch.equal(b.sources, b.images)  # the source is its own image, not the target
    g = sampler.batch(0, task="gen")
    assert g.sources is None and g.instructions is None and all(m["task"] == "gen" for m in g.meta)


def test_held_out_images_come_from_eval_in_key_order(scene_ws):
    sampler = CurriculumSampler(scene_ws.root, batch_size=2, total_steps=10)
    held = sampler.images(5, split="eval", resolution=32)
    assert held.keys == sorted(held.keys) and all(k.startswith("eval-") for k in held.keys)
    assert not set(held.keys) & {k for s in range(10) for k in sampler.batch(s).keys}
    assert all("scene" in m for m in held.meta)


def test_a_workspace_without_samples_is_a_clear_error(ws):
    with pytest.raises(NoTrainingData, match="ingest"):
        CurriculumSampler(ws.root, batch_size=2, total_steps=10)

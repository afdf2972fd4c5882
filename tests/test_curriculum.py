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


@pytest.fixture(scope="module")
def mixed_ws(tmp_path_factory):
    """Scene-world squares plus scikit-image's real photos, several of them wide or tall."""
    from connectors import skimage_samples
    from dataengine.catalog import Catalog
    from dataengine.ingest import IngestConfig, ingest

    from conftest import make_scene_workspace

    ws = make_scene_workspace(tmp_path_factory.mktemp("mixed") / "ws", n_train=32, n_eval=8)
    skimage_samples.write_shards(ws.shards / "train")  # the folder names the split
    ingest(ws, [str(ws.shards / "train")], IngestConfig(use_ray=False), Catalog(ws))
    return ws


def test_bucket_shapes_keep_the_pixel_count_and_the_aspect():
    from dataengine.curriculum import ASPECTS, bucket_of, bucket_shape

    assert bucket_of(640, 427) == ASPECTS.index(4 / 3) and bucket_of(300, 600) == ASPECTS.index(9 / 16)
    assert bucket_of(None, None) == 0 and bucket_of(512, 512) == 0
    for res in (64, 256):
        for b, a in enumerate(ASPECTS):
            h, w = bucket_shape(res, b)
            assert h % 16 == 0 and w % 16 == 0
            assert abs(h * w / res**2 - 1) < 0.3 and abs(w / h / a - 1) < 0.35


def test_buckets_give_wide_and_tall_batches_whole(mixed_ws):
    from dataengine.curriculum import bucket_of

    sampler = CurriculumSampler(mixed_ws.root, batch_size=2, total_steps=400, resolution=64, buckets=True)
    shapes = {tuple(sampler.batch(s).images.shape[-2:]) for s in range(400)}
    assert (64, 64) in shapes and any(w > h for h, w in shapes) and any(h > w for h, w in shapes)
    for s in range(40):  # every sample of a batch is in the batch's bucket
        b = sampler.batch(s)
        rows = {r["key"]: r for r in sampler.rows}
        assert len({bucket_of(rows[k]["width"], rows[k]["height"]) for k in b.keys}) == 1


@pytest.mark.slow
def test_the_stage_schedule_changes_what_a_vae_job_receives(mixed_ws, tmp_path):
    """A real VAE run on the curriculum's defaults, its steps' stats recorded: the first
    stage at 32 px with few edit batches, the last stages at the 64 px cap with more, and
    wide or tall buckets among the squares."""
    from models.train_vae import VAETrainConfig, make_job
    from models.trainer import LoopConfig, train

    steps = 200
    cfg = VAETrainConfig(size="tiny", factor=16, batch_size=1, max_resolution=64, align=False,
                         eval_images=2, scale_images=2)
    loop = LoopConfig(steps=steps, ckpt_every=1000, progress=False, num_threads=1)
    job = make_job(mixed_ws.root, cfg, loop)
    assert [r["resolution"] for r in job.sampler.describe()] == [32, 64, 64, 64, 64, 64]
    seen, real_step = [], job.step

    def recorded(step):
        stats = real_step(step)
        seen.append((job.sampler.stage_at(step).name, stats))
        return stats

    job.step = recorded
    train(job, tmp_path / "models", loop)
    early = [st for name, st in seen if name == "s1"]
    late = [st for name, st in seen if name in ("s5", "s6")]
    assert len(seen) == steps and early and late
    assert {round(st["resolution"] / 16) * 16 for st in early} == {32}
    assert {round(st["resolution"] / 16) * 16 for st in late} == {64}
    share = lambda sts: sum(st["edit"] for st in sts) / len(sts)  # noqa: E731
    assert share(early) < 0.2 < share(late)
    assert any(st["aspect"] != 1.0 for _, st in seen)  # wide or tall buckets were drawn

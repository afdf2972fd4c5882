"""Embedding: only what is new is embedded, vectors land normalised, failures are quarantined."""

from __future__ import annotations

import numpy as np
import pytest

from dataengine.catalog import Catalog
from dataengine.embed import EmbedConfig, embed, load_vectors, todo
from dataengine.ingest import IngestConfig, ingest
from dataengine.sceneworld import SceneWorldConfig, write_scene_world
from dataengine.status import summarize
from models.clip import load_clip

# The default architecture built from its packaged pretrained trunks, untrained
# projections: real weights, no training needed to exercise the pipeline.
SPEC = "dataengine-clip-lite0"


@pytest.fixture
def small_world(ws):
    cfg = SceneWorldConfig(n_train=24, n_pool=8, n_eval=0, samples_per_shard=12, resolution=64)
    write_scene_world(ws.shards, cfg, splits=("train", "pool"), progress=False)
    ingest(ws, [str(ws.shards)], IngestConfig(use_ray=False), Catalog(ws))
    return ws


def _local(**kw) -> EmbedConfig:
    return EmbedConfig(model=SPEC, use_ray=False, batch_size=8, **kw)


def test_embedding_skips_what_is_done_and_picks_up_new_samples(small_world):
    ws = small_world
    first = embed(ws.root, _local(splits=("train",)), progress=False, load_encoder=load_clip)
    assert first.embedded == {"image": 24, "text": 24} and first.skipped == {"image": 0, "text": 0}

    again = embed(ws.root, _local(splits=("train",)), progress=False, load_encoder=load_clip)
    assert again.embedded == {"image": 0, "text": 0} and again.skipped == {"image": 24, "text": 24}

    rest = embed(ws.root, _local(), progress=False, load_encoder=load_clip)  # every split: only the pool is new
    assert rest.embedded == {"image": 8, "text": 8} and rest.skipped == {"image": 24, "text": 24}

    keys, vecs = load_vectors(Catalog(ws), first.model_id, "image")
    assert len(keys) == 32 == len(set(keys))
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=2e-3)  # float16 storage
    # Another model id is another set of vectors: nothing is done for it yet.
    missing, done = todo(Catalog(ws), "some-other-model", "image", None)
    assert missing.num_rows == 32 and done == 0


def test_images_and_captions_land_in_one_space(small_world):
    ws = small_world
    report = embed(ws.root, _local(splits=("train",)), progress=False, load_encoder=load_clip)
    ik, iv = load_vectors(Catalog(ws), report.model_id, "image")
    tk, tv = load_vectors(Catalog(ws), report.model_id, "text")
    assert ik == tk and iv.shape == tv.shape and iv.shape[1] > 0
    # Same image, same vector: the stored vector is the model's output for the decoded image.
    from dataengine.images import iter_images

    row = Catalog(ws).query("SELECT key, shard, image_offset, image_size FROM samples WHERE key = ?", [ik[0]]).to_pylist()
    bundle = load_clip(SPEC)
    (_, arr, err), = list(iter_images(row, bundle.image_size))
    assert err is None
    assert np.allclose(bundle.encode_images(arr[None])[0], iv[0], atol=3e-3)


def test_an_unreadable_image_is_quarantined_with_its_reason(small_world):
    ws = small_world
    shard = Catalog(ws).query("SELECT DISTINCT shard FROM samples WHERE split = 'pool'")["shard"][0].as_py()
    # The shard is cut short after ingest: its images can no longer be read back.
    with open(shard, "r+b") as f:
        f.truncate(2048)
    report = embed(ws.root, _local(splits=("pool",), kinds=("image",)), progress=False, load_encoder=load_clip)
    assert report.failed["image"] + report.embedded["image"] == 8
    assert report.failed["image"] >= 7
    q = Catalog(ws).query("SELECT key, reason, stage FROM quarantine WHERE stage = 'embed'").to_pylist()
    assert len(q) == report.failed["image"]
    assert all(r["reason"].startswith("embed image:") for r in q)
    # Ingest's own accounting is untouched by a later stage's quarantine.
    assert summarize(Catalog(ws)).exact
    # Each row says which model failed and where the image's bytes lie.
    rows = Catalog(ws).query("SELECT q.model_id, q.offsets, q.sizes, s.image_offset, s.image_size FROM quarantine q "
                             "JOIN samples s USING (key) WHERE q.stage = 'embed'").to_pylist()
    assert all(r["model_id"] == report.model_id and r["offsets"] == [r["image_offset"]]
               and r["sizes"] == [r["image_size"]] for r in rows)
    # A failure is recorded once: the next run does not try (and quarantine) them again.
    again = embed(ws.root, _local(splits=("pool",), kinds=("image",)), progress=False, load_encoder=load_clip)
    assert again.failed["image"] == again.embedded["image"] == 0
    assert Catalog(ws).query("SELECT count(*) n FROM quarantine WHERE stage = 'embed'")["n"][0].as_py() == len(q)


@pytest.mark.slow
def test_ray_data_actor_pool_gives_the_same_vectors(small_world):
    from dataengine.cluster import ensure_ray

    ws = small_world
    ensure_ray(num_cpus=2)
    ray_report = embed(ws.root, EmbedConfig(model=SPEC, use_ray=True, ray_min_rows=0, batch_size=8, splits=("train",)),
                       progress=False, load_encoder=load_clip)
    assert ray_report.embedded == {"image": 24, "text": 24} and ray_report.actors >= 1
    assert ray_report.ran_on == {"image": "ray", "text": "ray"}
    keys, ray_vecs = load_vectors(Catalog(ws), ray_report.model_id, "image")
    from dataengine.images import iter_images

    bundle = load_clip(SPEC)
    rows = Catalog(ws).query(
        "SELECT key, shard, image_offset, image_size FROM samples WHERE split = 'train' ORDER BY key").to_pylist()
    local = {k: a for k, a, _ in iter_images(rows, bundle.image_size)}
    expect = bundle.encode_images(np.stack([local[k] for k in keys]))
    assert np.allclose(expect, ray_vecs, atol=3e-3)


def test_a_job_smaller_than_ray_min_rows_runs_in_process(small_world):
    report = embed(small_world.root, EmbedConfig(model=SPEC, use_ray=True, ray_min_rows=25, batch_size=8,
                                                 splits=("train",)), progress=False, load_encoder=load_clip)
    assert report.embedded == {"image": 24, "text": 24}
    assert report.ran_on == {"image": "local", "text": "local"} and report.actors == 0
    assert "(local)" in report.summary()


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="kinds"):
        EmbedConfig(kinds=("audio",))
    with pytest.raises(ValueError, match="batch_size"):
        EmbedConfig(batch_size=0)
    with pytest.raises(ValueError, match="ray_min_rows"):
        EmbedConfig(ray_min_rows=-1)


def test_requeue_retries_only_the_failed_images_once_the_shard_is_back(small_world):
    from dataengine.requeue import requeue

    ws = small_world
    cat = Catalog(ws)
    shard = cat.query("SELECT DISTINCT shard FROM samples WHERE split = 'pool'")["shard"][0].as_py()
    whole = open(shard, "rb").read()
    with open(shard, "r+b") as f:
        f.truncate(2048)  # e.g. a copy still in flight while embed ran
    first = embed(ws.root, _local(kinds=("image",)), progress=False, load_encoder=load_clip)
    assert first.failed["image"] >= 7 and first.embedded["image"] + first.failed["image"] == 32
    open(shard, "wb").write(whole)  # the copy finished

    calls = []

    def embed_keys(keys, kind):
        calls.append((sorted(keys), kind))
        rep = embed(ws.root, _local(kinds=(kind,)), progress=False, keys=keys, load_encoder=load_clip)
        return rep.embedded[kind], rep.failed[kind]

    rep = requeue(ws, "embed", None, cat, embed_keys, first.model_id)
    assert (rep.matched, rep.accepted, rep.still_quarantined) == (first.failed["image"], first.failed["image"], 0)
    assert len(calls) == 1 and len(calls[0][0]) == first.failed["image"] and calls[0][1] == "image"
    assert cat.query("SELECT count(*) n FROM quarantine WHERE stage = 'embed'")["n"][0].as_py() == 0
    keys, _ = load_vectors(cat, first.model_id, "image")
    assert len(keys) == 32
    # Rows of another model are left alone.
    assert requeue(ws, "embed", None, cat, embed_keys, "another-model").matched == 0

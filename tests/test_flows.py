"""The main job as a Prefect flow (Prefect without a server), on a small scene world."""

from __future__ import annotations

from fnmatch import fnmatchcase

import pytest

from dataengine.config import load_config


@pytest.mark.slow
def test_demo_flow_from_nothing(tmp_path):
    from dataengine.catalog import Catalog
    from dataengine.workspace import Workspace
    from flows.demo import HEADLINES, STACK_DEMO, _flat, _stack_line, demo_flow, train_stack_model

    cfg = load_config(None, sceneworld=dict(n_train=40, n_pool=20, n_eval=10, samples_per_shard=15,
                                            resolution=64), ingest=dict(use_ray=False))
    summary = demo_flow(str(tmp_path / "ws"), cfg, enhancer_steps=10, real_images=False, loop=False)
    assert summary.exact
    assert {s.split: s.accepted for s in summary.splits} == {"train": 40, "pool": 20, "eval": 10}
    assert summary.counts["pairs"] > 40
    # The enhancer, the embedding model and the brief runs of the stack. RL and enhancer
    # phase two are gated: the demo's 80-step reward heads pass no held-out bar, so there
    # is nothing either may optimise.
    versions = Catalog(Workspace.at(tmp_path / "ws")).query(
        "SELECT model, version FROM model_versions ORDER BY model").to_pylist()
    trained = [name for name, _, _ in STACK_DEMO if name not in ("rl", "enhancer-rl")]
    assert sorted(v["model"] for v in versions) == sorted(["enhancer", "clip"] + trained)
    from models.rl import UntrustedReward, default_weights

    with pytest.raises(UntrustedReward, match="no generation head passes its held-out bar"):
        default_weights(tmp_path / "ws")
    # Each brief run's printed headline figures exist under those names in its metrics.
    for name in trained:
        record = train_stack_model(str(tmp_path / "ws"), name, {}, 1)  # reuses the version
        line = _stack_line(record)
        assert record["reused"] and line.startswith(f"{name} v0001 (reused)")
        flat = _flat(record["metrics"]["eval"])
        for pattern in HEADLINES[name]:
            if pattern.startswith("real."):  # this world has no real images to reconstruct
                continue
            assert any(fnmatchcase(k, pattern) for k in flat), (name, pattern)
            assert pattern.split(".")[-1] in line
    from flows.stages import train_flow

    assert train_flow(str(tmp_path / "ws"), "vae", reuse=True) | {"metrics": None} == \
        train_stack_model(str(tmp_path / "ws"), "vae", {}, 1) | {"metrics": None}
    assert summary.counts["embeddings"] == 2 * 70  # an image and a caption vector per sample
    assert summary.counts["gaps"] == 3  # the held-out concept and two covered ones, searched
    # A second run finds the same shards, pairs and vectors, reuses every model and adds only
    # the patch the first run wrote (shards/patches/: training data, ingested and embedded);
    # the searches are recorded again (each search is a row).
    patch_shards = list((tmp_path / "ws" / "shards" / "patches").glob("*.tar"))
    again = demo_flow(str(tmp_path / "ws"), cfg, enhancer_steps=10, real_images=False, loop=False)
    patched = Catalog(Workspace.at(tmp_path / "ws")).query(
        "SELECT count(*) AS n FROM samples WHERE split = 'patches'").to_pylist()[0]["n"]
    assert (patched > 0) == bool(patch_shards)
    grown = {"samples": patched, "embeddings": 2 * patched, "shards": len(patch_shards)}
    assert {k: v for k, v in again.counts.items() if k != "gaps"} == \
        {k: v + grown.get(k, 0) for k, v in summary.counts.items() if k != "gaps"}
    assert again.counts["gaps"] == 2 * summary.counts["gaps"]

"""The demo's gap search as a Prefect flow (Prefect without a server), on the demo's own
scene world. A file of its own: the two demo-flow tests each take minutes, and the test
workers take a file at a time."""

from __future__ import annotations

import pytest

from dataengine.config import load_config


@pytest.mark.slow
def test_demo_workspace_finds_and_patches_its_held_out_concept(tmp_path):
    """The demo's own scene world (its default config, without the real images and the
    stack's brief runs): the held-out concept is a gap, the covered ones are not, and the
    patch is on target by the pool's ground truth."""
    from flows.demo import demo_flow, find_and_patch_gaps

    cfg = load_config(None, ingest=dict(use_ray=False))
    demo_flow(str(tmp_path / "ws"), cfg, enhancer_steps=2, real_images=False, train_stack=False, loop=False)
    rows = find_and_patch_gaps.fn(str(tmp_path / "ws"), cfg.sceneworld)
    held = [r for r in rows if r["held_out"]]
    covered = [r for r in rows if not r["held_out"]]
    assert held and covered
    assert all(r["is_gap"] for r in held), held
    assert not any(r["is_gap"] for r in covered), covered
    for r in held:
        assert r["patched"] >= 8 and r["hits"] / r["patched"] >= 0.8, r
    # The same search as the engine's stage flow, which knows nothing of the scene world.
    from flows.stages import gaps_flow

    got = gaps_flow(str(tmp_path / "ws"), [held[0]["concept"], covered[0]["concept"]], patch=True, patch_size=8)
    assert [g["is_gap"] for g in got] == [True, False] and got[0]["patched"] == 8 and "patched" not in got[1]

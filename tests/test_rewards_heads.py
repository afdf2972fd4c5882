"""The reward heads other than fidelity against their held-out bars, trained once on a
few hundred scene-world scenes. A file of its own (apart from tests/test_rewards.py): its
fixture trains for about two minutes, and the test workers take a file at a time."""

from __future__ import annotations

import pytest

from models.rewards import HELDOUT_BARS
from models.train_reward import RewardTrainConfig, RewardTrainJob
from models.trainer import LoopConfig, train

from test_rewards import _scenes, frozen  # noqa: F401 (a fixture; tests/ is on sys.path)


@pytest.fixture(scope="module")
def other_heads(frozen, tmp_path_factory):
    # The edit heads pooled (spatial=()): their default spatial form reads both images'
    # patch tokens at 256 px, which at this size would more than double the fixture's time.
    cfg = RewardTrainConfig(heads=("aesthetics", "portrait", "instruction", "consistency"), n_train=OTHER_SCENES,
                            n_eval=100, spatial=())
    job = RewardTrainJob(frozen, _scenes(OTHER_SCENES, 21), _scenes(100, 22), cfg, info={"clip": frozen.spec})
    loop = LoopConfig(steps=400, lr=1e-3, warmup_steps=10, ckpt_every=10**6, progress=False)
    return train(job, tmp_path_factory.mktemp("others"), loop)["metrics"]["eval"]


OTHER_SCENES = 500
# Pooled, the edit heads stay under their bars even at benchmark size (2000 scenes: instruction
# 0.74-0.82 across five runs, consistency 0.63-0.72). Their default spatial form clears both
# there (0.850, 0.853; benchmarks/results/rewards-cpu.md) but not at this fixture's size
# (500 scenes x 400 steps, patch tokens at 128 px: 0.760, 0.780), and a run of benchmark size
# (17 minutes) does not fit the suite; tests/test_rewards.py checks what the spatial form learns.
BELOW_BAR = {"instruction": "pooled: 0.74-0.82 even at 2000 scenes; under the bar at this size",
             "consistency": "pooled: 0.63-0.72 even at 2000 scenes; moves and re-seeds near chance"}


@pytest.mark.slow
@pytest.mark.parametrize("head", [
    "aesthetics", "portrait",
    *(pytest.param(h, marks=pytest.mark.xfail(strict=True, reason=why)) for h, why in BELOW_BAR.items())])
def test_each_other_head_passes_its_bar_on_held_out_scenes(other_heads, head):
    got = other_heads["heldout"][head]
    assert got["pairs"] >= 80
    assert got["accuracy"] >= HELDOUT_BARS[head], got
    assert head in other_heads["trusted"]

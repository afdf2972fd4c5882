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
    cfg = RewardTrainConfig(heads=("aesthetics", "portrait", "instruction", "consistency"), n_train=OTHER_SCENES,
                            n_eval=100)
    job = RewardTrainJob(frozen, _scenes(OTHER_SCENES, 21), _scenes(100, 22), cfg, info={"clip": frozen.spec})
    loop = LoopConfig(steps=400, lr=1e-3, warmup_steps=10, ckpt_every=10**6, progress=False)
    return train(job, tmp_path_factory.mktemp("others"), loop)["metrics"]["eval"]


OTHER_SCENES = 500
# Held-out accuracy at the default run (benchmarks/rewards.py, 2000 scenes): instruction
# 0.74-0.82 across four runs, consistency 0.63-0.72. Neither clears 0.80 reliably yet.
BELOW_BAR = {"instruction": "0.74-0.82 at the default run; under the bar at this size",
             "consistency": "0.63-0.72 at the default run: moves and re-seeds are judged near chance"}


@pytest.mark.slow
@pytest.mark.parametrize("head", [
    "aesthetics", "portrait",
    *(pytest.param(h, marks=pytest.mark.xfail(strict=True, reason=why)) for h, why in BELOW_BAR.items())])
def test_each_other_head_passes_its_bar_on_held_out_scenes(other_heads, head):
    got = other_heads["heldout"][head]
    assert got["pairs"] >= 80
    assert got["accuracy"] >= HELDOUT_BARS[head], got
    assert head in other_heads["trusted"]

"""The shared training loop: versions, registry, checkpoints and exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from dataengine.catalog import Catalog
from models.trainer import LoopConfig, TrainingInterrupted, TrainJob, latest, load_weights, lr_scale, train, versions


class LinearJob(TrainJob):
    """Fit y = A x with noisy x drawn from torch's global RNG (as diffusion noise is)."""

    name = "toy"

    def __init__(self, width: int = 4):
        self.width = width

    def setup(self):
        self.net = torch.nn.Linear(self.width, self.width)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=self.loop.lr)
        self.target = torch.arange(self.width * self.width, dtype=torch.float32).view(self.width, self.width) / 10

    def config(self):
        return {"width": self.width}

    def modules(self):
        return {"net": self.net}

    def optimizers(self):
        return {"opt": self.opt}

    def step(self, step):
        x = torch.randn(16, self.width)
        loss = torch.nn.functional.mse_loss(self.net(x), x @ self.target.T)
        self.opt.zero_grad()
        loss.backward()
        self.clip(self.net.parameters())
        self.opt.step()
        return {"loss": loss.item()}

    def evaluate(self):
        return {"error": float((self.net.weight.detach() - self.target).abs().mean())}


def loop(**kw):
    return LoopConfig(**({"steps": 30, "lr": 0.05, "ckpt_every": 10, "progress": False} | kw))


def test_a_run_saves_a_registered_version_with_its_metrics(ws):
    rec = train(LinearJob(), ws.models, loop(), catalog=Catalog(ws))
    assert rec["version"] == "v0001" and rec["status"] == "promoted" and rec["resumed_from"] is None
    m = rec["metrics"]
    assert m["last"]["loss"] < m["first"]["loss"] / 5  # it learned
    states, config, metrics = load_weights(rec["path"])
    assert set(states) == {"net"} and config["job"] == {"width": 4} and metrics["eval"]["error"] < 1
    row = Catalog(ws).query("SELECT * FROM model_versions WHERE model = 'toy'").to_pylist()
    assert len(row) == 1 and json.loads(row[0]["metrics"])["steps"] == 30
    rec2 = train(LinearJob(), ws.models, loop())
    assert rec2["version"] == "v0002" and rec2["status"] == "candidate"
    assert versions(ws.models, "toy") == ["v0001", "v0002"] and latest(ws.models, "toy").name == "v0002"
    assert not (ws.models / "toy" / "runs").exists() or not any((ws.models / "toy" / "runs").iterdir())


def test_a_crashed_run_resumes_from_its_checkpoint_and_ends_where_an_unbroken_one_does(tmp_path):
    whole = load_weights(train(LinearJob(), tmp_path / "a", loop())["path"])[0]["net"]
    with pytest.raises(TrainingInterrupted):
        train(LinearJob(), tmp_path / "b", loop(), stop_after=17)  # dies after step 17; last checkpoint at 10
    assert (next((tmp_path / "b" / "toy" / "runs").iterdir()) / "last.pt").is_file()
    rec = train(LinearJob(), tmp_path / "b", loop())
    assert rec["resumed_from"] == 10 and rec["metrics"]["resumed_from"] == 10
    resumed = load_weights(rec["path"])[0]["net"]
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k


def test_a_changed_config_does_not_resume_someone_elses_run(tmp_path):
    with pytest.raises(TrainingInterrupted):
        train(LinearJob(), tmp_path, loop(), stop_after=12)
    assert train(LinearJob(), tmp_path, loop(lr=0.01))["resumed_from"] is None


def test_the_loop_config_says_whether_to_resume_and_is_not_part_of_the_runs_identity(tmp_path):
    with pytest.raises(TrainingInterrupted):
        train(LinearJob(), tmp_path, loop(), stop_after=12)
    assert train(LinearJob(), tmp_path, loop(resume=False))["resumed_from"] is None  # --no-resume
    with pytest.raises(TrainingInterrupted):
        train(LinearJob(), tmp_path, loop(resume=False), stop_after=12)
    assert train(LinearJob(), tmp_path, loop())["resumed_from"] == 10  # the same run, picked up


class SlowDataJob(LinearJob):
    """LinearJob whose batches take 20 ms to arrive, marked as the DiT job marks its data."""

    def step(self, step):
        import time

        from torch.profiler import record_function

        with record_function("data"):
            time.sleep(0.02)
        return super().step(step)


def test_a_profiled_run_says_where_its_steps_time_goes_and_profiling_is_not_part_of_its_identity(tmp_path):
    with pytest.raises(TrainingInterrupted):
        train(SlowDataJob(), tmp_path, loop(), stop_after=12)
    record = train(SlowDataJob(), tmp_path, loop(profile_steps=4))
    assert record["resumed_from"] == 10  # the same run: profiling does not change what it trains
    prof = record["metrics"]["profile"]
    assert prof["steps"] == 4 and prof["device"] == "cpu"
    assert 18 <= prof["labels"]["data"] <= prof["wall_ms"]  # the 20 ms wait, inside the step's wall time
    assert {"matmul", "optimiser"} <= set(prof["groups"])  # the linear layer and AdamW
    assert prof["top"] and prof["busy_ms"] == pytest.approx(sum(prof["groups"].values()), abs=1e-3)
    assert "profile" not in train(LinearJob(), tmp_path / "plain", loop())["metrics"]
    with pytest.raises(ValueError, match="profile_steps"):
        loop(profile_steps=-1)


def test_a_diverging_run_stops_with_a_clear_error(tmp_path):
    class Nan(LinearJob):
        def step(self, step):
            return {"loss": float("nan")}

    with pytest.raises(FloatingPointError, match="step 0"):
        train(Nan(), tmp_path, loop())


def test_schedule_warms_up_then_decays():
    cfg = loop(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_scale(0, cfg) == pytest.approx(0.1) and lr_scale(9, cfg) == pytest.approx(1.0)
    assert lr_scale(99, cfg) == pytest.approx(0.1, abs=0.01)
    assert all(lr_scale(s, cfg) >= lr_scale(s + 1, cfg) for s in range(10, 99))


def test_a_run_whose_evaluation_fails_keeps_its_last_step_and_reruns_only_the_evaluation(tmp_path):
    class FailsOnce(LinearJob):
        fail, steps_run = True, 0

        def step(self, step):
            FailsOnce.steps_run += 1
            return super().step(step)

        def evaluate(self):
            if FailsOnce.fail:
                FailsOnce.fail = False
                raise RuntimeError("the evaluation set went away")
            return super().evaluate()

    with pytest.raises(RuntimeError, match="went away"):
        train(FailsOnce(), tmp_path, loop(ckpt_every=1000))  # no periodic checkpoint at all
    assert FailsOnce.steps_run == 30
    rec = train(FailsOnce(), tmp_path, loop(ckpt_every=1000))
    assert rec["resumed_from"] == 30 and FailsOnce.steps_run == 30  # nothing trained twice
    whole = load_weights(train(LinearJob(), tmp_path / "b", loop(ckpt_every=1000))["path"])[0]["net"]
    assert torch.equal(load_weights(rec["path"])[0]["net"]["weight"], whole["weight"])


def test_a_fine_tune_starts_from_a_saved_versions_weights(tmp_path):
    first = train(LinearJob(), tmp_path, loop(steps=60))
    cold = train(LinearJob(), tmp_path, loop(steps=2, seed=1))
    warm = train(LinearJob(), tmp_path, loop(steps=2, seed=1, init_from=first["path"]))
    # Two steps from scratch are far from the target; two steps from the fitted weights are not.
    assert warm["metrics"]["eval"]["error"] < cold["metrics"]["eval"]["error"] / 3
    assert load_weights(warm["path"])[1]["loop"]["init_from"] == first["path"]  # part of the run's identity
    with pytest.raises(ValueError, match="does not fit"):
        train(LinearJob(width=3), tmp_path, loop(steps=2, init_from=first["path"]))

"""Flow-GRPO (models/rl.py): the SDE's marginals and sign, advantages, log-probs, and that
CFG is used when sampling and never in the optimisation loss."""

from __future__ import annotations

import math

import pytest
import torch

from models import rl as rl_mod
from models.distill import Prompts
from models.dit import DiTConfig, build, timesteps
from models.rl import (
    RLConfig, RLJob, gaussian_log_prob, grpo_loss, group_advantages, per_head_advantages, sample_trajectories,
    sde_step,
)
from models.trainer import LoopConfig, load_weights, train


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread avoids oversubscribing a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


C, H, TD, L = 4, 2, 8, 3  # latent channels, latent side, text width, text length


def nano(seed: int = 0, perturb: float = 0.05):
    """A nano DiT whose conditioning matters (zero-initialised layers nudged off zero)."""
    torch.manual_seed(seed)
    model = build(DiTConfig(size="nano", latent_channels=C, text_dim=TD, max_text_len=L))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(perturb * torch.randn_like(p))
    return model


def prompts(n: int = 2, seed: int = 1) -> Prompts:
    g = torch.Generator().manual_seed(seed)
    return Prompts([f"prompt {i}" for i in range(n)], torch.randn(n, L, TD, generator=g),
                   torch.ones(n, L, dtype=torch.bool))


def brightness(x0: torch.Tensor, p: Prompts) -> dict[str, torch.Tensor]:
    return {"brightness": x0.flatten(1).mean(1)}


def small_cfg(**kw) -> RLConfig:
    base = dict(group_size=4, prompts_per_step=2, sample_steps=4, cfg_scale=3.0, reward_weights={"brightness": 1.0})
    return RLConfig(**(base | kw))


# ---------------------------------------------------------------------------------------
# The SDE
# ---------------------------------------------------------------------------------------


def gaussian_velocity(m: float, s: float):
    """Exact flow velocity E[eps - x0 | x_t] for 1-D data x0 ~ N(m, s^2), x_t = (1-t) x0 + t eps."""
    def v(x: torch.Tensor, t: float) -> torch.Tensor:
        var = (1 - t) ** 2 * s**2 + t**2
        centred = x - (1 - t) * m
        return t / var * centred - (m + (1 - t) * s**2 / var * centred)
    return v


def test_sde_keeps_the_ode_marginals_and_runs_from_noise_to_data():
    # With the exact velocity of a known data law, the SDE from pure noise must land on that
    # law: a wrong sign in the drift correction (or a missing one) inflates or collapses it.
    torch.manual_seed(0)
    m, s, a, steps = 1.5, 0.5, 0.7, 200
    v = gaussian_velocity(m, s)
    ts = timesteps(steps)
    x = torch.randn(40000, 1)
    for i in range(steps):
        t, tn = float(ts[i]), float(ts[i + 1])
        mean, std = sde_step(x, v(x, t), t, tn, a, float(ts[1]))
        x = mean + std * torch.randn_like(x)
    assert abs(float(x.mean()) - m) < 0.05
    assert abs(float(x.std()) - s) < 0.05


def test_sde_step_without_noise_is_the_euler_step():
    x, v = torch.randn(3, C, H, H), torch.randn(3, C, H, H)
    mean, std = sde_step(x, v, 0.6, 0.5, 0.0, 0.9)
    assert std == 0.0
    torch.testing.assert_close(mean, x - 0.1 * v)


def test_recorded_log_prob_is_the_gaussian_of_the_conditional_mean():
    model, p = nano(), prompts(3)
    torch.manual_seed(2)
    traj = sample_trajectories(model, p.text, p.mask, torch.randn(3, C, H, H), steps=4, a=0.7, cfg_scale=3.0)
    assert traj.xs.shape == (5, 3, C, H, H) and traj.log_probs.shape == (4, 3)
    for i in range(4):
        normal = torch.distributions.Normal(traj.means[i], float(traj.stds[i]))
        expected = normal.log_prob(traj.xs[i + 1]).flatten(1).mean(1)
        torch.testing.assert_close(traj.log_probs[i], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gaussian_log_prob(traj.xs[i + 1], traj.means[i], float(traj.stds[i])), expected)
        # The recorded mean is the conditional model's (no guidance), step i's.
        with torch.no_grad():
            v = model(traj.xs[i], traj.ts[i].expand(3), p.text, p.mask)
        mean, _ = sde_step(traj.xs[i], v, float(traj.ts[i]), float(traj.ts[i + 1]), 0.7, traj.t_cap)
        torch.testing.assert_close(traj.means[i], mean, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------


def test_group_advantages_are_centred_and_scaled_per_group():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0, -1.0, 5.0, 0.0, 2.0])
    adv = group_advantages(r, 4).view(3, 4)
    torch.testing.assert_close(adv.mean(1), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv[1], torch.zeros(4))  # one reward for the whole group: no signal
    assert abs(float(adv[0].std(unbiased=False)) - 1) < 1e-3
    assert adv[0].argsort().tolist() == [0, 1, 2, 3]


def test_per_head_advantages_give_a_narrow_head_its_weight():
    # One group of four: the loud head orders samples 0 and 1, the quiet head 2 and 3.
    scores = {"loud": torch.tensor([1e4, -1e4, 0.0, 0.0]), "quiet": torch.tensor([0.0, 0.0, 0.1, -0.1])}
    weights = {"loud": 0.5, "quiet": 0.5}
    summed = group_advantages(sum(w * scores[k] for k, w in weights.items()), 4)
    assert summed[2] < 0.01 * summed[0]  # the sum hears only the loud head
    adv = per_head_advantages(scores, weights, 4)
    torch.testing.assert_close(adv[2], adv[0], rtol=5e-3, atol=0)  # each head pulls by its weight (eps aside)
    assert abs(float(adv.std(unbiased=False)) - 1) < 1e-3
    with pytest.raises(KeyError, match="portrait"):
        per_head_advantages(scores, {"portrait": 1.0}, 4)
    with pytest.raises(ValueError, match="advantages"):
        small_cfg(advantages="mean")


def test_per_head_runs_raise_a_narrow_head_the_sum_drowns(tmp_path):
    """Two optimised heads, one a million times wider than the other and blind to what the
    narrow one wants: with "sum" the narrow head does not rise, with "per_head" it does."""
    fixed = prompts(2)
    heldout = Prompts(fixed.captions * 4, fixed.text.repeat(4, 1, 1), fixed.mask.repeat(4, 1))

    def judged(x0, p):
        return {"loud": 1000.0 * (x0[:, 0, 0, 0] - x0[:, 0, 0, 1]), "quiet": 1e-3 * x0.flatten(1).mean(1)}

    def rise(mode, root):
        job = RLJob(nano(perturb=0.0), lambda step: fixed, judged, (C, H, H),
                    small_cfg(updates_per_step=2, kl_beta=0.01, reward_weights={"loud": 0.5, "quiet": 0.5},
                              advantages=mode), heldout=heldout)
        loop = LoopConfig(steps=8, lr=1e-2, warmup_steps=0, progress=False, num_threads=1)
        ev = train(job, root, loop)["metrics"]["eval"]["samplers"]
        return ev["after"]["reward_quiet"] - ev["before"]["reward_quiet"]

    summed, per_head = rise("sum", tmp_path / "sum"), rise("per_head", tmp_path / "per_head")
    assert per_head > 2 * abs(summed), (summed, per_head)  # measured: -6.0e-05 against +2.3e-04


def test_ratio_starts_at_one_although_samples_used_cfg():
    # Old log-probs are the conditional policy's, as is the loss: same family, ratio 1.
    model, p = nano(), prompts(2)
    torch.manual_seed(3)
    cfg = small_cfg()
    traj = sample_trajectories(model, p.text, p.mask, torch.randn(2, C, H, H), 4, 0.7, cfg_scale=3.0)
    adv = torch.tensor([1.0, -1.0])
    for i in range(cfg.k):
        _, stats, _ = grpo_loss(model, model, traj, i, p.text, p.mask, adv, cfg)
        assert abs(stats["ratio"] - 1) < 1e-4 and stats["clip_frac"] == 0.0 and stats["kl"] < 1e-8


class Spy:
    """Records every forward of the models it watches: the phase it ran in, whether any
    row carried the null ("no caption") text, and its timestep."""

    def __init__(self, *models):
        self.phase, self.calls = "other", []
        for m in models:
            m.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        x, t, text = args[0], args[1], args[2]
        null, _ = module.null_text(text.shape[0], text.shape[1])
        is_null = (text == null.to(text)).flatten(1).all(1)
        self.calls.append({"phase": self.phase, "null_rows": int(is_null.sum()), "t": sorted(set(t.tolist())),
                           "batch": x.shape[0]})

    def wrap(self, fn, phase):
        def wrapped(*a, **kw):
            before, self.phase = self.phase, phase
            try:
                return fn(*a, **kw)
            finally:
                self.phase = before
        return wrapped


def test_cfg_is_used_when_sampling_and_never_in_the_loss(monkeypatch):
    model = nano()
    job = RLJob(model, lambda step: prompts(2, seed=step), brightness, (C, H, H), small_cfg(updates_per_step=2))
    job.loop, job.device = LoopConfig(lr=1e-3), torch.device("cpu")
    job.setup()
    spy = Spy(job.policy, job.reference)
    monkeypatch.setattr(rl_mod, "sample_trajectories", spy.wrap(rl_mod.sample_trajectories, "sample"))
    monkeypatch.setattr(rl_mod, "grpo_loss", spy.wrap(rl_mod.grpo_loss, "loss"))
    job.step(0)

    sampling = [c for c in spy.calls if c["phase"] == "sample"]
    loss = [c for c in spy.calls if c["phase"] == "loss"]
    assert sampling and all(c["null_rows"] == c["batch"] // 2 for c in sampling)  # CFG: cond + null per forward
    assert loss and all(c["null_rows"] == 0 for c in loss)  # the loss path never sees the null text
    assert not [c for c in spy.calls if c["phase"] == "other"]  # and nothing runs outside the two
    # Only the first K transitions enter the loss (K = 4 // 2 = 2), policy and reference alike.
    first_k = {float(t) for t in timesteps(4)[:2]}
    assert {t for c in loss for t in c["t"]} == first_k
    # updates_per_step=2: 2 policy forwards per transition, the reference's once (cached).
    assert len(loss) == 2 * 2 + 2


def test_the_spy_catches_cfg_in_a_loss():
    # The detector itself: a loss that used CFG would be seen.
    from models.dit import velocity

    model = nano()
    spy = Spy(model)
    p = prompts(2)
    spy.phase = "loss"
    velocity(model, torch.randn(2, C, H, H), torch.full((2,), 0.5), p.text, p.mask, cfg_scale=3.0)
    assert spy.calls[-1]["null_rows"] == 2


def test_a_few_steps_raise_the_reward_and_save_a_loadable_dit(tmp_path):
    model = nano(perturb=0.0)
    fixed = prompts(2)
    heldout = Prompts(fixed.captions * 4, fixed.text.repeat(4, 1, 1), fixed.mask.repeat(4, 1))
    job = RLJob(model, lambda step: fixed, brightness, (C, H, H), small_cfg(updates_per_step=2, kl_beta=0.01),
                heldout=heldout)
    loop = LoopConfig(steps=8, lr=1e-2, warmup_steps=0, progress=False, num_threads=1)
    record = train(job, tmp_path / "models", loop)
    ev = record["metrics"]["eval"]["samplers"]
    assert ev["after"]["reward"] > ev["before"]["reward"] + 0.2
    from models.dit import load_dit

    tuned = load_dit(record["path"])
    states, config, _ = load_weights(record["path"])
    assert config["job"]["rl"]["sample_steps"] == 4 and set(states) == {"dit"}
    torch.testing.assert_close(tuned.state_dict()["final.linear.bias"], job.policy.state_dict()["final.linear.bias"])


def test_resume_keeps_the_start_model_as_reference(tmp_path):
    from models.trainer import TrainingInterrupted

    start = nano(perturb=0.0)
    start_bias = start.final.linear.bias.detach().clone()
    loop = LoopConfig(steps=4, lr=1e-2, warmup_steps=0, ckpt_every=2, progress=False, num_threads=1)

    def make():
        return RLJob(nano(perturb=0.0), lambda step: prompts(2), brightness, (C, H, H), small_cfg())

    with pytest.raises(TrainingInterrupted):
        train(make(), tmp_path, loop, stop_after=2)
    job = make()
    record = train(job, tmp_path, loop)
    assert record["resumed_from"] == 2
    torch.testing.assert_close(job.reference.final.linear.bias, start_bias)
    assert not torch.equal(job.policy.final.linear.bias, start_bias)


def test_config_validation_and_resolution():
    with pytest.raises(ValueError):
        RLConfig(group_size=1)
    with pytest.raises(ValueError):
        RLConfig(sample_steps=4, train_steps=5)
    with pytest.raises(ValueError):
        RLConfig(noise_level=0.0)
    dit = RLConfig().resolved()
    assert (dit.sample_steps, dit.cfg_scale, dit.k) == (10, 4.0, 5)
    student = RLConfig().resolved(student_steps=4)
    assert (student.sample_steps, student.cfg_scale, student.k) == (4, 1.0, 2)
    assert math.isclose(RLConfig(sample_steps=8, cfg_scale=2.0).resolved(4).cfg_scale, 2.0)


def test_a_run_whose_reward_rises_while_a_held_out_measure_falls_is_flagged(tmp_path):
    """RL optimises brightness; a held-out head that prefers dark images must fall, and the
    run must say so. A held-out head that agrees with the reward rises: that run helped."""
    fixed = prompts(2)
    heldout = Prompts(fixed.captions * 4, fixed.text.repeat(4, 1, 1), fixed.mask.repeat(4, 1))

    def judged(x0, p):
        b = x0.flatten(1).mean(1)
        return {"brightness": b, "darkness": -b, "also_bright": 2 * b}

    def run(weights, root):
        job = RLJob(nano(perturb=0.0), lambda step: fixed, judged, (C, H, H),
                    small_cfg(updates_per_step=2, kl_beta=0.01, reward_weights=weights), heldout=heldout)
        loop = LoopConfig(steps=8, lr=1e-2, warmup_steps=0, progress=False, num_threads=1)
        return train(job, root, loop)["metrics"]["eval"]["verdict"]

    hacked = run({"brightness": 1.0}, tmp_path / "a")
    assert hacked["optimised"]["moved"] == "rose"
    assert "reward_darkness" in hacked["heldout_fell"] and "reward_also_bright" in hacked["heldout_rose"]
    assert "reward_brightness" not in hacked["heldout"]  # the optimised head is not its own check
    assert hacked["reward_hacking"] and not hacked["helped"]


def test_verdict_needs_changes_beyond_their_standard_error():
    before = {"reward": torch.zeros(8), "reward_other": torch.zeros(8), "accuracy": torch.full((8,), 0.5)}
    noisy = {"reward": torch.ones(8), "reward_other": torch.tensor([1., -1.] * 4) - 0.01,
             "accuracy": torch.full((8,), 0.75)}
    v = rl_mod.verdict(before, noisy, ("main",))
    assert v["heldout"]["reward_other"]["moved"] == "flat"  # a mean of -0.01 inside its noise
    assert v["heldout"]["accuracy"]["moved"] == "rose" and v["helped"] and not v["reward_hacking"]
    worse = noisy | {"accuracy": torch.tensor([0.5, 0.25] * 4)}
    v = rl_mod.verdict(before, worse, ("main",))
    assert v["heldout_fell"] == ["accuracy"] and v["reward_hacking"]


def test_the_default_reward_is_the_heads_that_passed_their_held_out_bars(ws):
    from models.rewards import EmbeddedRewards, RewardConfig

    def save(accuracies):
        held = {h: {"accuracy": a, "pairs": 100, "by_kind": {}} for h, a in accuracies.items()}
        EmbeddedRewards(RewardConfig(hidden=8, spatial=())).save(ws.models, {"eval": {"heldout": held}})

    with pytest.raises(FileNotFoundError, match="train one first"):
        rl_mod.default_weights(ws.root)
    save({"aesthetics": 0.6, "fidelity": 0.55, "portrait": 0.7, "instruction": 0.99})
    with pytest.raises(rl_mod.UntrustedReward, match="fidelity"):  # an edit head cannot stand in
        rl_mod.default_weights(ws.root)
    save({"aesthetics": 0.95, "fidelity": 0.85, "portrait": 0.7})  # the newest version decides
    # fidelity's figure without its swap kinds shows nothing: only aesthetics passes
    assert rl_mod.default_weights(ws.root) == {"aesthetics": 1.0}


def test_fidelity_is_trusted_on_its_attribute_swaps_not_its_position_pairs(ws):
    """The issue's fidelity test is the colour and shape swaps; positions near chance do not
    keep out a head that passes it, and a failed swap kind does."""
    from models.rewards import EmbeddedRewards, RewardConfig, trusted

    def save(by_kind):
        held = {"aesthetics": {"accuracy": 0.6, "by_kind": {}},
                "fidelity": {"accuracy": sum(by_kind.values()) / len(by_kind), "by_kind": by_kind}}
        metrics = {"eval": {"heldout": held}}
        EmbeddedRewards(RewardConfig(hidden=8, spatial=())).save(ws.models, metrics)
        return metrics

    passing = {"caption_colour": 0.88, "image_colour": 0.87, "caption_shape": 0.74, "image_shape": 0.76,
               "caption_position": 0.45, "image_position": 0.52}  # the benchmark's 3000-step head
    metrics = save(passing)
    assert metrics["eval"]["heldout"]["fidelity"]["accuracy"] < 0.80
    assert trusted(metrics) == {"fidelity": pytest.approx(0.8125)}
    assert rl_mod.default_weights(ws.root) == {"fidelity": 1.0}
    save(passing | {"image_shape": 0.60, "caption_position": 0.99, "image_position": 0.99})
    with pytest.raises(rl_mod.UntrustedReward, match="fidelity"):
        rl_mod.default_weights(ws.root)

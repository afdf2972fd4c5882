"""RL fine-tuning of the DiT with Flow-GRPO: groups per prompt, group-normalised advantages.

    record = rl("ws", RLConfig(group_size=4, prompts_per_step=4), LoopConfig(steps=40, lr=2e-5))

Each step samples G images for each of P prompts with a stochastic sampler whose
marginals are those of the Euler ODE (so the policy has a log-likelihood), scores them
with the reward heads, normalises the rewards within each prompt's group, and takes
PPO-clipped policy-gradient steps on the first K (high-noise) transitions only, with a KL
penalty to the frozen starting model.

Sign conventions (those of models/dit.py): t runs from 1 (noise) to 0 (data),
x_t = (1-t) x0 + t eps, the model predicts v = eps - x0 (dx/dt along the path), so the
ODE step towards the data is x_{t-d} = x_t - d v; x0 = x_t - t v and eps = x_t + (1-t) v.

The SDE with the ODE's marginals (Flow-GRPO). The forward-time SDE dx = [v + g^2/2 s] dt + g dw,
with s the score of p_t, keeps p_t for any g; run backwards in time its drift is
v - g^2/2 s. On our path s(x_t) = -eps_hat / t = -(x_t + (1-t) v) / t, so one step of size
d from t to t-d is the Gaussian

    x_{t-d} ~ N( x_t - d [v + sigma_t^2/(2t) (x_t + (1-t) v)],  sigma_t^2 d ),
    sigma_t = a sqrt(t / (1-t)),

the extra drift removing the noise the step adds (a = 0 gives the Euler ODE step back).
At t = 1 the factor t/(1-t) diverges; as Flow-GRPO does, 1-t is taken at the grid's
second point there.

Where classifier-free guidance is and is not used:
  - sampling (`sample_trajectories`): each transition is drawn around the CFG mean (cond
    and null text in one batched forward), because guided samples are what the model is
    deployed with and what the rewards should judge;
  - the recorded "old" log-prob of each transition is its density under the CONDITIONAL
    model's mean (the cond half of that same forward), not under the CFG mean;
  - the loss (`grpo_loss`) recomputes the mean with one conditional forward (cfg_scale 1,
    no null text), and the KL reference likewise.
Old and new log-probs thus belong to one policy family (the conditional model with the
same sigma): the ratio starts at exactly 1 and the clip measures how far the update has
moved the model. Had the old log-prob been the CFG policy's, the ratio cond/CFG would
start far from 1 for every sample and the clip would zero most gradients. The price: the
samples come from the guided policy while the gradient is the conditional one's, an
off-policy estimate whose fixed importance weight (cond/CFG density) is dropped. It moves
the conditional model toward the rewarded guided samples, and the guided sampler built on
it moves with it; the loss costs one forward instead of two.
Log-probs are averaged over latent elements (Flow-GRPO does the same): the sum over
thousands of elements would make ratios explode; the mean is a fixed rescaling of the
gradient and keeps the clip range meaningful across latent sizes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .distill import (
    CaptionPrompts, Judge, Prompts, RewardFn, compare_samplers, heldout_prompts, load_stack, ode_sampler,
    workspace_judge,
)
from .dit import config_dict, timesteps
from .trainer import LoopConfig, TrainJob, latest, train

__all__ = [
    "RLConfig", "Trajectory", "RLJob", "rl", "verdict", "default_weights", "UntrustedReward", "sde_sigma",
    "sde_step", "gaussian_log_prob", "sample_trajectories", "group_advantages", "per_head_advantages", "grpo_loss",
    "cond_and_guided",
]

MODEL_NAME = "rl"


@dataclass
class RLConfig:
    """The knobs of one Flow-GRPO run (the loop's steps, lr schedule and grad clip come
    from LoopConfig)."""

    group_size: int = 4  # G samples per prompt
    prompts_per_step: int = 4  # P prompts per step: a batch of P * G trajectories
    # SDE steps per sample and the guidance of sampling; None: 10 steps with CFG 4 from a
    # DiT, the student's own steps without CFG from a distilled student (start="distill").
    sample_steps: int | None = None
    cfg_scale: float | None = None
    train_steps: int | None = None  # K: the first K (high-noise) transitions enter the loss; None: steps // 2
    noise_level: float = 0.7  # a in sigma_t = a sqrt(t / (1-t))
    clip_range: float = 1e-3  # PPO clip on the element-mean log-prob ratio
    adv_clip: float = 5.0  # advantages clipped to +-this
    kl_beta: float = 0.04  # weight of the KL to the frozen reference (start) model
    updates_per_step: int = 1  # optimiser updates on each sampled batch (PPO epochs)
    shift: float = 1.0  # timestep shift of the sampling grid
    lr: float | None = None  # None: the loop's lr
    weight_decay: float = 0.0
    # The optimised reward: a weighted sum over the reward heads' keys; None: equal weights
    # on the generation heads whose held-out accuracy clears its bar (rewards.trusted), so
    # RL never optimises a head that judges at chance. The checker's accuracy and the heads
    # left out are never optimised, only reported (the run's verdict).
    reward_weights: dict[str, float] | None = None
    # How the heads' scores become advantages. "sum": the weighted sum, normalised within its
    # group, so the head whose scores spread widest rules it (on the CPU runs of
    # benchmarks/results/rl-cpu.md aesthetics' and portrait's changes spread 25-50x wider than
    # fidelity's). "per_head": each head normalised within its group first, then weighted, so
    # each moves the policy by its weight.
    advantages: str = "sum"
    resolution: int = 64  # image side in px (latent side = resolution / VAE factor)
    eval_prompts: int = 32  # held-out eval captions for before/after
    start: str = "dit"  # start from the newest "dit" or the newest "distill" (the student)

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are relative within a group), got {self.group_size}")
        if self.prompts_per_step < 1 or self.updates_per_step < 1:
            raise ValueError("prompts_per_step and updates_per_step must be >= 1")
        if self.sample_steps is not None and not 1 <= self.k <= self.sample_steps:
            raise ValueError(f"train_steps must be in [1, sample_steps={self.sample_steps}], got {self.train_steps}")
        if self.noise_level <= 0:
            raise ValueError(f"noise_level must be > 0 (the policy needs a density), got {self.noise_level}")
        if self.advantages not in ("sum", "per_head"):
            raise ValueError(f"advantages must be 'sum' or 'per_head', got {self.advantages!r}")
        if self.start not in ("dit", "distill"):
            raise ValueError(f"start must be 'dit' or 'distill', got {self.start!r}")

    def resolved(self, student_steps: int | None = None) -> "RLConfig":
        """sample_steps and cfg_scale filled in for a DiT (student_steps None) or a student.
        On a student the SDE keeps its exploration noise but no longer has the ODE's
        marginals (the student's steps are not a flow's); it is still a valid policy."""
        steps = self.sample_steps or student_steps or 10
        scale = self.cfg_scale if self.cfg_scale is not None else (1.0 if student_steps else 4.0)
        return replace(self, sample_steps=steps, cfg_scale=scale)

    @property
    def k(self) -> int:
        if self.sample_steps is None:
            raise ValueError("sample_steps is unresolved; call RLConfig.resolved() first")
        return self.train_steps if self.train_steps is not None else max(1, self.sample_steps // 2)


# ---------------------------------------------------------------------------------------
# The SDE sampler and its Gaussian transitions
# ---------------------------------------------------------------------------------------


def sde_sigma(t: float, a: float, t_cap: float) -> float:
    """sigma_t = a sqrt(t / (1-t)), with 1-t taken at `t_cap` (the grid's second point) when
    t is above it, so the first step from t = 1 stays finite."""
    return a * math.sqrt(t / (1.0 - min(t, t_cap)))


def sde_step(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float, a: float,
             t_cap: float) -> tuple[torch.Tensor, float]:
    """The Gaussian of one reverse step from t to t_next < t: (mean, std)."""
    d = t - t_next
    sigma = sde_sigma(t, a, t_cap)
    mean = x - d * (v + sigma**2 / (2 * t) * (x + (1 - t) * v))  # ODE step + noise-removing drift
    return mean, sigma * math.sqrt(d)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """log N(x; mean, std^2), averaged over each sample's elements -> (B,)."""
    lp = -((x - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def cond_and_guided(model, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
                    cfg_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional velocity, guided velocity) from one batched forward over cond and uncond.
    The guided one is the contract's CFG: uncond + s * (cond - uncond)."""
    if cfg_scale == 1.0:
        v = model(x, t, text, mask)
        return v, v
    b = x.shape[0]
    null, null_mask = model.null_text(b, text.shape[1])
    v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, null.to(text)]),
              torch.cat([mask.bool(), null_mask.to(mask.device)]))  # (2B, C, h, w)
    cond, uncond = v[:b], v[b:]
    return cond, uncond + cfg_scale * (cond - uncond)


@dataclass
class Trajectory:
    """One batch of sampled trajectories: states, times and the transitions' Gaussians."""

    xs: torch.Tensor  # (T+1, B, C, h, w): x at ts[0] = 1 (noise) ... ts[T] = 0 (the sample)
    ts: torch.Tensor  # (T+1,) from 1 to 0
    means: torch.Tensor  # (T, B, C, h, w): the CONDITIONAL policy's mean of each transition
    stds: torch.Tensor  # (T,): each transition's std (the same for every sample)
    log_probs: torch.Tensor  # (T, B): log N(xs[i+1]; means[i], stds[i]^2), element-mean
    t_cap: float  # where sigma's 1-t is capped (ts[1])

    @property
    def x0(self) -> torch.Tensor:
        return self.xs[-1]


@torch.no_grad()
def sample_trajectories(model, text: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor, steps: int,
                        a: float, cfg_scale: float, shift: float = 1.0) -> Trajectory:
    """Sample with the SDE around the CFG mean; record each transition's conditional
    Gaussian (the policy the loss optimises: see the module docstring)."""
    ts = timesteps(steps, shift).to(noise.device, torch.float32)  # (T+1,) 1 -> 0
    t_cap = float(ts[1])
    b = noise.shape[0]
    x = noise
    xs, means, stds, log_probs = [x], [], [], []
    for i in range(steps):
        t, t_next = float(ts[i]), float(ts[i + 1])
        cond, guided = cond_and_guided(model, x, ts[i].expand(b), text, mask, cfg_scale)
        mean_guided, std = sde_step(x, guided, t, t_next, a, t_cap)
        mean_cond, _ = sde_step(x, cond, t, t_next, a, t_cap)
        x = mean_guided + std * torch.randn_like(x)
        xs.append(x)
        means.append(mean_cond)
        stds.append(std)
        log_probs.append(gaussian_log_prob(x, mean_cond, std))
    return Trajectory(xs=torch.stack(xs), ts=ts, means=torch.stack(means),
                      stds=torch.tensor(stds, device=noise.device), log_probs=torch.stack(log_probs), t_cap=t_cap)


# ---------------------------------------------------------------------------------------
# GRPO: advantages and the clipped loss
# ---------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps); rewards are (P*G,), group-major."""
    r = rewards.float().view(-1, group_size)  # (P, G)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)
    return adv.view(-1)


def per_head_advantages(scores: dict[str, torch.Tensor], weights: dict[str, float], group_size: int,
                        eps: float = 1e-4) -> torch.Tensor:
    """Each head's scores normalised within their group, weighted, summed, and rescaled to unit
    spread over the batch: a head's pull on the policy is its weight, whatever its score scale.
    (The weights' keys are checked against the scores by `Judge.weighted`, which every rollout runs.)"""
    adv = sum(w * group_advantages(scores[k], group_size, eps) for k, w in weights.items())
    return adv / (adv.std(unbiased=False) + eps)


def grpo_loss(model, reference, traj: Trajectory, i: int, text: torch.Tensor, mask: torch.Tensor,
              adv: torch.Tensor, cfg: RLConfig, ref_mean: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """The clipped policy-gradient loss + beta * KL of transition `i`, from ONE conditional
    forward of `model` (cfg_scale 1: no guidance, no null text). Returns (loss, stats,
    the reference mean for reuse by later updates on the same batch)."""
    x, x_next = traj.xs[i], traj.xs[i + 1]
    t, t_next = float(traj.ts[i]), float(traj.ts[i + 1])
    tb = traj.ts[i].expand(x.shape[0])
    v = model(x, tb, text, mask)  # conditional only
    mean, std = sde_step(x, v, t, t_next, cfg.noise_level, traj.t_cap)
    log_prob = gaussian_log_prob(x_next, mean, std)  # (B,)
    ratio = torch.exp(log_prob - traj.log_probs[i])
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)
    policy = torch.maximum(unclipped, clipped).mean()
    loss = policy
    kl = torch.zeros((), device=x.device)
    if cfg.kl_beta > 0:
        if ref_mean is None:
            with torch.no_grad():
                ref_mean, _ = sde_step(x, reference(x, tb, text, mask), t, t_next, cfg.noise_level, traj.t_cap)
        # KL between two Gaussians of equal std, element-mean: |mu - mu_ref|^2 / (2 std^2)
        kl = ((mean - ref_mean) ** 2).flatten(1).mean(1).div(2 * std**2).mean()
        loss = loss + cfg.kl_beta * kl
    ratio = ratio.detach()
    stats = {"policy": policy.item(), "kl": kl.item(), "ratio": ratio.mean().item(),
             "clip_frac": ((ratio - 1).abs() > cfg.clip_range).float().mean().item()}
    return loss, stats, ref_mean


# ---------------------------------------------------------------------------------------
# The training job
# ---------------------------------------------------------------------------------------


class RLJob(TrainJob):
    """Flow-GRPO on `model`. One step: sample P prompts x G trajectories without grad,
    score them, then `updates_per_step` optimiser updates over the first K transitions.
    The KL reference is a frozen copy of the model as it was at setup (the start model);
    the saved version keeps the policy under the DiT's module name and config."""

    name = MODEL_NAME

    def __init__(self, model, prompts: Callable[[int], Prompts], reward: RewardFn, latent_shape: tuple[int, int, int],
                 cfg: RLConfig | None = None, judge: Judge | None = None, heldout: Prompts | None = None,
                 info: dict | None = None, eval_seed: int = 0):
        self.model, self.prompts, self.reward = model, prompts, reward
        self.latent_shape = tuple(latent_shape)
        self.cfg = (cfg or RLConfig()).resolved()
        self.judge, self.heldout, self.info, self.eval_seed = judge, heldout, info or {}, eval_seed
        # The optimised scalar: the judge's weighting when there is one, else the config's.
        self.weigher = judge or Judge(weights=self.cfg.reward_weights)
        self.weigh = self.weigher.weighted

    def setup(self) -> None:
        self.policy = self.model.to(self.device).requires_grad_(True)
        # Copied before any restore: a resumed run keeps the start model as its reference.
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=self.cfg.lr or self.loop.lr,
                                     weight_decay=self.cfg.weight_decay)

    def config(self) -> dict:
        return {"model": config_dict(self.model.cfg), "rl": asdict(self.cfg),
                "latent_shape": list(self.latent_shape)} | self.info

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"policy": self.policy}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"policy": self.opt}

    def exported(self) -> dict[str, torch.nn.Module]:
        from .dit import MODEL_NAME as DIT

        return {DIT: self.policy}

    def rollout(self, step: int) -> tuple[Prompts, Trajectory, dict[str, torch.Tensor], torch.Tensor]:
        """Sample the step's groups (no grad): prompts (repeated G times), trajectories,
        per-sample reward scores and the optimised reward."""
        c = self.cfg
        p = self.prompts(step)[: c.prompts_per_step].repeat(c.group_size).to(self.device)
        noise = torch.randn(len(p), *self.latent_shape, device=self.device)
        traj = sample_trajectories(self.policy, p.text, p.mask, noise, c.sample_steps, c.noise_level,
                                   c.cfg_scale, c.shift)
        scores = {k: v.to(self.device).float() for k, v in self.reward(traj.x0, p).items()}
        return p, traj, scores, self.weigh(scores)

    def step(self, step: int) -> dict[str, float]:
        c = self.cfg
        p, traj, scores, reward = self.rollout(step)
        if c.advantages == "per_head":
            weights = self.weigher.weights or {k: 1.0 / len(scores) for k in scores}
            adv = per_head_advantages(scores, weights, c.group_size)
        else:
            adv = group_advantages(reward, c.group_size)
        adv = adv.clamp(-c.adv_clip, c.adv_clip)
        ref_means: list[torch.Tensor | None] = [None] * c.k
        totals: dict[str, float] = {}
        grad_norm = 0.0
        for _ in range(c.updates_per_step):
            self.opt.zero_grad(set_to_none=True)
            for i in range(c.k):  # the first K transitions: the high-noise ones
                loss, stats, ref_means[i] = grpo_loss(self.policy, self.reference, traj, i, p.text, p.mask, adv, c,
                                                      ref_means[i])
                (loss / c.k).backward()  # one graph at a time: memory of one forward
                for k, v in (stats | {"loss": loss.item()}).items():
                    totals[k] = totals.get(k, 0.0) + v / (c.k * c.updates_per_step)
            grad_norm = self.clip(self.policy.parameters())
            self.opt.step()
        group_std = reward.view(-1, c.group_size).std(1, unbiased=False).mean()
        return {"loss": totals["loss"], "reward": float(reward.mean()), "reward_group_std": float(group_std),
                **{f"reward_{k}": float(v.mean()) for k, v in scores.items()},
                **{k: v for k, v in totals.items() if k != "loss"}, "grad_norm": grad_norm}

    def evaluate(self) -> dict[str, Any]:
        """Held-out prompts, the same noise, the deployed sampler (Euler ODE with CFG):
        the start model ("before") vs the tuned one ("after") on the optimised reward and
        the held-out, never optimised, checker accuracy."""
        if self.heldout is None:
            return {}
        c = self.cfg
        p = self.heldout.to(self.device)
        gen = torch.Generator().manual_seed(self.eval_seed)
        noise = torch.randn(len(p), *self.latent_shape, generator=gen).to(self.device)
        judge = self.judge or Judge(reward=self.reward, weights=c.reward_weights)
        each: dict[str, dict[str, torch.Tensor]] = {}
        figures = compare_samplers({"before": ode_sampler(self.reference, c.sample_steps, c.cfg_scale, c.shift),
                                    "after": ode_sampler(self.policy, c.sample_steps, c.cfg_scale, c.shift)},
                                   p, noise, judge, samples=each, repeats=1)  # rewards, not speed
        return {"samplers": figures, "n_prompts": len(p),
                "verdict": verdict(each["before"], each["after"], tuple(c.reward_weights or (
                    k[len("reward_"):] for k in each["before"] if k.startswith("reward_"))))}


def verdict(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], optimised_heads: tuple[str, ...],
            z: float = 2.0) -> dict[str, Any]:
    """Did RL help? The optimised reward's change beside every measure it did not optimise
    (the checker's accuracy, the heads outside the reward's weights), each as a paired mean
    change over the same prompts and noise with its standard error.

    A measure "rose" or "fell" when its change is beyond `z` standard errors. The run is
    flagged `reward_hacking` when the optimised reward rose while a held-out measure fell:
    the policy found what the reward likes that the other judges do not."""
    held = [k for k in before if k in after and k not in ("reward",)
            and (k == "accuracy" or (k.startswith("reward_") and k[len("reward_"):] not in optimised_heads))]

    def change(k: str) -> dict[str, Any]:
        d = after[k].float() - before[k].float()
        se = float(d.std(unbiased=True) / len(d) ** 0.5) if len(d) > 1 else float("inf")
        mean = float(d.mean())
        moved = "rose" if mean > z * se else "fell" if mean < -z * se else "flat"
        return {"before": round(float(before[k].float().mean()), 4), "after": round(float(after[k].float().mean()), 4),
                "change": round(mean, 4), "se": round(se, 4), "moved": moved}

    opt = change("reward") if "reward" in before and "reward" in after else None
    measures = {k: change(k) for k in held}
    fell = sorted(k for k, v in measures.items() if v["moved"] == "fell")
    rose = sorted(k for k, v in measures.items() if v["moved"] == "rose")
    hacked = bool(opt and opt["moved"] == "rose" and fell)
    return {"optimised": opt, "heldout": measures, "heldout_fell": fell, "heldout_rose": rose,
            "reward_hacking": hacked, "helped": bool(opt and opt["moved"] == "rose" and not fell and rose),
            "z": z}


# ---------------------------------------------------------------------------------------
# The workspace entry
# ---------------------------------------------------------------------------------------


class UntrustedReward(ValueError):
    """No reward head passed its held-out bar, so there is nothing RL may optimise by default."""


def default_weights(workspace_root: str | Path) -> dict[str, float]:
    """Equal weights on the newest reward version's generation heads that passed their
    held-out bars; a clear error when none did."""
    from dataengine.workspace import Workspace

    from .rewards import GEN_HEADS, HELDOUT_BARS, bar_accuracy, trusted
    from .trainer import load_weights

    path = latest(Workspace.at(workspace_root).models, "reward")
    if path is None:
        raise FileNotFoundError(f"{workspace_root}: no reward version to optimise; "
                                "train one first (`dataengine train reward`)")
    metrics = load_weights(path)[2]
    ok = trusted(metrics, GEN_HEADS)
    if not ok:
        held = {h: bar_accuracy(h, v) for h, v in metrics.get("eval", {}).get("heldout", {}).items()}
        held = {h: "not measured" if a is None else round(a, 4) for h, a in held.items()}
        raise UntrustedReward(f"{path}: no generation head passes its held-out bar (accuracies {held}, "
                              f"fidelity's on its colour and shape swaps; bars {HELDOUT_BARS}); train the heads "
                              "longer or on more scenes, or name the heads to optimise with reward_weights")
    return {h: 1.0 / len(ok) for h in ok}


def rl(workspace_root: str | Path, cfg: RLConfig | None = None, loop: LoopConfig | None = None,
       progress: bool = True) -> dict[str, Any]:
    """Flow-GRPO from the workspace's newest DiT (or distilled student, cfg.start) on the
    reward heads of its newest `reward` version; saved as the next `rl` version."""
    from dataengine.catalog import Catalog
    from dataengine.curriculum import CurriculumSampler
    from dataengine.workspace import Workspace

    cfg = cfg or RLConfig()
    loop = replace(loop or LoopConfig(), progress=progress)
    ws = Workspace.at(workspace_root)
    stack = load_stack(ws.root, cfg.start)
    student_steps = int(stack.config["distill"]["student_steps"]) if cfg.start == "distill" else None
    cfg = cfg.resolved(student_steps)
    if stack.vae is None:
        raise FileNotFoundError(f"{ws.root}: no VAE version; rewards judge decoded images (`dataengine train vae`)")
    if cfg.reward_weights is None:
        cfg = replace(cfg, reward_weights=default_weights(ws.root))
    judge = workspace_judge(ws.root, stack, cfg.reward_weights, progress=progress)
    if judge.reward is None:
        raise FileNotFoundError(f"{ws.root}: no reward version to optimise; "
                                "train one first (`dataengine train reward`)")
    factor = stack.vae.factor
    if cfg.resolution % factor:
        raise ValueError(f"resolution {cfg.resolution} is not a multiple of the VAE's factor {factor}")
    shape = (stack.model.cfg.latent_channels, cfg.resolution // factor, cfg.resolution // factor)
    sampler = CurriculumSampler(ws.root, cfg.prompts_per_step, loop.steps, seed=loop.seed, resolution=cfg.resolution)
    job = RLJob(stack.model, CaptionPrompts(sampler, stack.frozen, stack.max_text_len), judge.reward, shape, cfg,
                judge=judge, heldout=heldout_prompts(sampler, stack.frozen, cfg.eval_prompts, cfg.resolution,
                                                     stack.max_text_len),
                info=stack.info | {"start": cfg.start}, eval_seed=loop.seed)
    return train(job, ws.models, loop, catalog=Catalog(ws))

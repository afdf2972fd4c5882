"""4-step distillation of the DiT by distribution matching (DMD2-style, no GAN, no regression).

    record = distill("ws", DistillConfig(), LoopConfig(steps=300))   # -> models/distill/vNNNN

A student (initialised as a copy of the teacher) samples in 4 Euler steps without
guidance. Only its final output x0 is matched to the teacher's distribution, never the
teacher's trajectory: the generator's gradient on x0 is the difference between two
denoisers' x0 predictions at a re-noised copy of it,

    x_t = (1-t) x0 + t eps, t ~ U(0.02, 0.98)
    real = x_t - t v_teacher^CFG(x_t)       (the frozen teacher with guidance: the target)
    fake = x_t - t v_fake(x_t)              (an online model of the student's own outputs)
    grad = (fake - real) / mean|x0 - real|  (per sample; DMD's normalisation)
    loss = 0.5 |x0 - stopgrad(x0 - grad)|^2 (so d loss / d x0 = grad)

Descending it moves x0 along real - fake, i.e. up the teacher's density relative to the
student's own (the gradient of KL(p_student || p_teacher) in x0-parameterisation; the
score of a flow path is -(x_t - (1-t) x0_pred) / t^2, so score differences are x0-prediction
differences times (1-t)/t^2, which the per-sample normalisation absorbs). The fake model
is a copy of the teacher kept trained, by the flow-matching loss on the student's
detached samples, to denoise the student's distribution; it takes `fake_updates` steps
per generator step (DMD2's two time-scale rule) so that it tracks the moving student.

Sign conventions are those of models/dit.py: t = 1 is noise, t = 0 data, v = eps - x0,
x0 = x_t - t v, an Euler step toward the data is x - (t_i - t_{i+1}) v.

Where CFG is used: the real score (teacher, cfg_scale) and the 40-step teacher baseline.
Not in the student (it learns the guided distribution and samples with one forward per
step) nor in the fake score (it models the student's outputs for their caption).

This module also holds what distill and RL share: `Prompts` (captions with their text
tokens and ground truth), `CaptionPrompts` (captions of the curriculum's generation
batches), `Judge` (checker accuracy + reward heads on generated latents),
`compare_samplers` (held-out figures with wall time) and `load_stack` (a DiT version with
the VAE and text encoder it was trained with).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .dit import DiT, config_dict, sample, timesteps, velocity
from .rewards import weighted_reward
from .trainer import LoopConfig, TrainJob, latest, load_weights, train

__all__ = [
    "DistillConfig", "DistillJob", "distill", "Prompts", "CaptionPrompts", "Judge", "Stack",
    "load_stack", "compare_samplers", "student_sample", "dmd_loss", "fake_score_loss", "MODEL_NAME",
]

MODEL_NAME = "distill"

# A reward function: per-sample scores of generated latents for their prompts, by name.
RewardFn = Callable[[torch.Tensor, "Prompts"], dict[str, torch.Tensor]]


@dataclass
class DistillConfig:
    """The knobs of one distillation run (the loop's steps and schedule come from LoopConfig)."""

    student_steps: int = 4
    teacher_steps: int = 40  # the baseline the student is measured against
    cfg_scale: float = 4.0  # guidance of the real score (and of the teacher baseline)
    fake_updates: int = 5  # fake-score steps per generator step (DMD2's two time-scale rule)
    lr_student: float | None = None  # None: the loop's lr
    lr_fake: float | None = None  # None: the student's lr
    # Adam betas of both: short memory, as both targets move (the fake chases the student
    # and the student the fake); on the tests' toy it closed the gap faster than (0.9, 0.999).
    betas: tuple[float, float] = (0.0, 0.99)
    t_min: float = 0.02  # re-noising times of the generator and fake losses, U(t_min, t_max)
    t_max: float = 0.98
    backprop: str = "all"  # "all": through every student step | "last": the last step only
    shift: float = 1.0  # timestep shift of the samplers' grid
    batch_size: int = 8
    resolution: int = 64  # image side in px (latent side = resolution / VAE factor)
    eval_prompts: int = 32  # held-out eval captions (scene world ones: they carry ground truth)

    def __post_init__(self) -> None:
        if self.student_steps < 1 or self.teacher_steps < 1 or self.fake_updates < 0:
            raise ValueError("student_steps and teacher_steps must be >= 1, fake_updates >= 0")
        if not 0.0 < self.t_min < self.t_max < 1.0:
            raise ValueError(f"need 0 < t_min < t_max < 1, got {self.t_min}, {self.t_max}")
        if self.backprop not in ("all", "last"):
            raise ValueError(f"backprop must be 'all' or 'last', got {self.backprop!r}")
        self.betas = tuple(self.betas)


# ---------------------------------------------------------------------------------------
# Prompts, judging, comparing samplers (shared with models/rl.py)
# ---------------------------------------------------------------------------------------


@dataclass
class Prompts:
    """A batch of text conditioning: captions, their token states (B, L, text_dim) and mask
    (B, L), and each sample's json when known (scene world: the ground truth "scene")."""

    captions: list[str]
    text: torch.Tensor
    mask: torch.Tensor
    meta: list[dict] | None = None

    def __len__(self) -> int:
        return self.text.shape[0]

    def __getitem__(self, s: slice) -> "Prompts":
        return Prompts(self.captions[s], self.text[s], self.mask[s], None if self.meta is None else self.meta[s])

    def to(self, device) -> "Prompts":
        return replace(self, text=self.text.to(device), mask=self.mask.to(device).bool())

    def repeat(self, n: int) -> "Prompts":
        """Each prompt n times in a row (GRPO's groups: prompt-major)."""
        return Prompts([c for c in self.captions for _ in range(n)], self.text.repeat_interleave(n, 0),
                       self.mask.repeat_interleave(n, 0),
                       None if self.meta is None else [m for m in self.meta for _ in range(n)])


class CaptionPrompts:
    """Prompts of step `step`: the captions of the curriculum sampler's generation batch,
    encoded by the frozen text encoder (deterministic in (seed, step) like the batch)."""

    def __init__(self, sampler, frozen, max_len: int = 32):
        self.sampler, self.frozen, self.max_len = sampler, frozen, max_len

    def __call__(self, step: int) -> Prompts:
        batch = self.sampler.batch(step, task="gen")
        return encode_prompts(self.frozen, batch.captions, self.max_len, batch.meta)


def encode_prompts(frozen, captions: list[str], max_len: int = 32, meta: list[dict] | None = None) -> Prompts:
    text, mask = frozen.text_tokens(list(captions), max_len)
    return Prompts(list(captions), text, mask, meta)


class Judge:
    """Figures of generated latents: the scene-world checker's attribute accuracy against
    the prompts' ground truth (needs `decode` and scenes in `meta`) and the reward heads'
    mean scores plus their weighted sum ("reward")."""

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor] | None = None, checker=None,
                 reward: RewardFn | None = None, weights: dict[str, float] | None = None, batch_size: int = 32):
        self.decode, self.checker, self.reward = decode, checker, reward
        self.weights, self.batch_size = weights, batch_size

    def weighted(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """The optimised scalar per sample: sum of weight * score over the weights' keys
        (all keys, equally weighted, when no weights are given)."""
        return weighted_reward(scores, self.weights or {k: 1.0 / len(scores) for k in scores})

    @torch.no_grad()
    def per_sample(self, latents: torch.Tensor, prompts: Prompts) -> dict[str, torch.Tensor]:
        """The figures of each sample (N,): checker accuracy ("accuracy", "acc_<attr>"), each
        head's score ("reward_<head>") and the optimised sum ("reward")."""
        out: dict[str, torch.Tensor] = {}
        meta = prompts.meta or []
        scenes = [m["scene"] for m in meta] if meta and all("scene" in m for m in meta) else None
        if self.checker is not None and self.decode is not None and scenes:
            images = torch.cat([self.decode(latents[i: i + self.batch_size]).float().clamp(-1, 1).cpu()
                                for i in range(0, len(latents), self.batch_size)])
            res = self.checker.check(images, scenes)
            out |= {f"acc_{k}" if k != "accuracy" else k: torch.as_tensor(v).float() for k, v in res.items()}
        if self.reward is not None:
            scores: dict[str, list[torch.Tensor]] = {}
            for i in range(0, len(latents), self.batch_size):
                for k, v in self.reward(latents[i: i + self.batch_size], prompts[i: i + self.batch_size]).items():
                    scores.setdefault(k, []).append(v.float().cpu())
            cat = {k: torch.cat(v) for k, v in scores.items()}
            out |= {f"reward_{k}": v for k, v in cat.items()}
            out["reward"] = self.weighted(cat)
        return out

    def __call__(self, latents: torch.Tensor, prompts: Prompts) -> dict[str, float]:
        return {k: float(v.float().mean()) for k, v in self.per_sample(latents, prompts).items()}


Sampler = Callable[[Prompts, torch.Tensor], torch.Tensor]  # (prompts, noise) -> latents


@torch.no_grad()
def compare_samplers(samplers: dict[str, Sampler], prompts: Prompts, noise: torch.Tensor, judge: Judge | None,
                     batch_size: int = 16, samples: dict[str, dict[str, torch.Tensor]] | None = None,
                     repeats: int = 3) -> dict[str, dict[str, float]]:
    """Every sampler on the same prompts and noise: the judge's figures and the wall time
    per image of sampling (latents only; decoding is the same for all and left out).
    The time is the fastest of `repeats` passes: on a shared machine the slow passes
    measure the neighbours, not the sampler (CI once read a 5x ratio as 1.97x).
    Pass a dict as `samples` to get each sampler's per-sample figures in it too."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    out = {}
    for name, fn in samplers.items():
        fn(prompts[:1], noise[:1])  # warm-up: first-call allocations are not the sampler's cost
        best = float("inf")
        for _ in range(repeats):
            latents, seconds = [], 0.0
            for i in range(0, len(prompts), batch_size):
                t0 = time.perf_counter()
                latents.append(fn(prompts[i: i + batch_size], noise[i: i + batch_size]))
                seconds += time.perf_counter() - t0
            best = min(best, seconds)
        seconds = best
        z = torch.cat(latents)
        out[name] = {"ms_per_image": 1e3 * seconds / len(prompts), "latent_std": float(z.std())}
        if judge is not None:
            each = judge.per_sample(z, prompts)
            out[name] |= {k: float(v.float().mean()) for k, v in each.items()}
            if samples is not None:
                samples[name] = each
    return out


def ode_sampler(model: DiT, steps: int, cfg_scale: float, shift: float = 1.0) -> Sampler:
    """The contract's Euler ODE sampler as a `Sampler`."""
    return lambda p, noise: sample(model, p.text, p.mask, tuple(noise.shape), steps=steps, cfg_scale=cfg_scale,
                                   noise=noise, shift=shift)


# ---------------------------------------------------------------------------------------
# DMD: the student's sampler and the two losses
# ---------------------------------------------------------------------------------------


def student_sample(student: DiT, noise: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, steps: int = 4,
                   backprop: str = "all", shift: float = 1.0) -> torch.Tensor:
    """The student's Euler sampler (no guidance) from `noise` at t=1 to x0. With grad
    enabled, "all" keeps the graph of every step and "last" only of the final one."""
    ts = timesteps(steps, shift).to(noise.device)
    b = noise.shape[0]
    x = noise
    grad_on = torch.is_grad_enabled()
    for i in range(steps):
        keep = grad_on and (backprop == "all" or i == steps - 1)
        with torch.set_grad_enabled(keep):
            v = student(x, ts[i].expand(b), text, mask)  # (B, C, h, w)
            x = x - (ts[i] - ts[i + 1]) * v
    return x


def dmd_loss(x0: torch.Tensor, teacher: DiT, fake: DiT, text: torch.Tensor, mask: torch.Tensor,
             cfg: DistillConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The generator's distribution-matching loss on student samples x0 (with grad)."""
    b = x0.shape[0]
    with torch.no_grad():
        t = cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand(b, device=x0.device)  # (B,)
        tt = t.view(b, 1, 1, 1)
        x_t = (1 - tt) * x0.detach() + tt * torch.randn_like(x0)  # (B, C, h, w)
        real = x_t - tt * velocity(teacher, x_t, t, text, mask, cfg_scale=cfg.cfg_scale)  # guided teacher x0
        fake_x0 = x_t - tt * fake(x_t, t, text, mask)  # the student's own denoiser, unguided
        norm = (x0.detach() - real).abs().flatten(1).mean(1).clamp_min(1e-6).view(b, 1, 1, 1)
        grad = torch.nan_to_num((fake_x0 - real) / norm)
    loss = 0.5 * F.mse_loss(x0.float(), (x0 - grad).detach().float())
    return loss, {"dmd_gap": float((fake_x0 - real).abs().mean()), "to_real": float(norm.mean())}


def fake_score_loss(fake: DiT, x0: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
                    cfg: DistillConfig) -> torch.Tensor:
    """Flow matching of the fake score on (detached) student samples, no caption dropout.
    t ~ U(t_min, t_max) rather than the teacher's logit-normal: the fake score has to be
    right wherever the generator loss queries it, uniformly over that range (logit-normal
    t puts 3% of its mass below 0.1 or above 0.9, where the generator loss puts 16%)."""
    b = x0.shape[0]
    x0 = x0.detach()
    t = cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand(b, device=x0.device)
    tt = t.view(b, 1, 1, 1)
    noise = torch.randn_like(x0)
    v = fake((1 - tt) * x0 + tt * noise, t, text, mask)  # (B, C, h, w)
    return F.mse_loss(v.float(), (noise - x0).float())


# ---------------------------------------------------------------------------------------
# The training job
# ---------------------------------------------------------------------------------------


class DistillJob(TrainJob):
    """DMD of `teacher` into a 4-step student. Modules: student and fake score (trained and
    checkpointed); the teacher stays frozen. The saved version keeps the student under the
    DiT's module name with the DiT's config, so `load_dit` reads it like any DiT version."""

    name = MODEL_NAME

    def __init__(self, teacher: DiT, prompts: Callable[[int], Prompts], latent_shape: tuple[int, int, int],
                 cfg: DistillConfig | None = None, judge: Judge | None = None, heldout: Prompts | None = None,
                 info: dict | None = None, eval_seed: int = 0):
        self.teacher, self.prompts = teacher, prompts
        self.latent_shape = tuple(latent_shape)
        self.cfg = cfg or DistillConfig()
        self.judge, self.heldout, self.info, self.eval_seed = judge, heldout, info or {}, eval_seed

    def setup(self) -> None:
        c, dev = self.cfg, self.device
        self.teacher = self.teacher.to(dev).eval().requires_grad_(False)
        self.student = copy.deepcopy(self.teacher).requires_grad_(True)
        self.fake = copy.deepcopy(self.teacher).requires_grad_(True)
        lr_s = c.lr_student or self.loop.lr
        lr_f = c.lr_fake or lr_s
        self.opt_student = torch.optim.AdamW(self.student.parameters(), lr=lr_s, betas=c.betas, weight_decay=0.0)
        self.opt_fake = torch.optim.AdamW(self.fake.parameters(), lr=lr_f, betas=c.betas, weight_decay=0.0)

    def config(self) -> dict:
        return {"model": config_dict(self.teacher.cfg), "distill": asdict(self.cfg),
                "latent_shape": list(self.latent_shape)} | self.info

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"student": self.student, "fake": self.fake}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"student": self.opt_student, "fake": self.opt_fake}

    def exported(self) -> dict[str, torch.nn.Module]:
        from .dit import MODEL_NAME as DIT

        return {DIT: self.student}

    def _student_x0(self, p: Prompts) -> torch.Tensor:
        noise = torch.randn(len(p), *self.latent_shape, device=self.device)
        return student_sample(self.student, noise, p.text, p.mask, self.cfg.student_steps, self.cfg.backprop,
                              self.cfg.shift)

    def step(self, step: int) -> dict[str, float]:
        p = self.prompts(step).to(self.device)
        # Fake score first, on fresh student samples, so the generator step reads a fake
        # score that has seen the current student.
        fake_loss = 0.0
        for _ in range(self.cfg.fake_updates):
            with torch.no_grad():
                x0 = self._student_x0(p)
            loss_f = fake_score_loss(self.fake, x0, p.text, p.mask, self.cfg)
            self.opt_fake.zero_grad(set_to_none=True)
            loss_f.backward()
            self.clip(self.fake.parameters())
            self.opt_fake.step()
            fake_loss += loss_f.item() / self.cfg.fake_updates
        x0 = self._student_x0(p)  # with grad through the sampler
        loss, stats = dmd_loss(x0, self.teacher, self.fake, p.text, p.mask, self.cfg)
        self.opt_student.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = self.clip(self.student.parameters())
        self.opt_student.step()
        return {"loss": loss.item(), "fake_loss": fake_loss, **stats, "grad_norm": grad_norm}

    def samplers(self) -> dict[str, Sampler]:
        """The student (4 steps, no CFG), the teacher at full steps with CFG, and the naive
        baseline the distillation has to beat: the teacher with CFG at the student's steps."""
        c = self.cfg
        return {
            f"student {c.student_steps}-step": lambda p, n: student_sample(self.student, n, p.text, p.mask,
                                                                            c.student_steps, shift=c.shift),
            f"teacher {c.teacher_steps}-step cfg": ode_sampler(self.teacher, c.teacher_steps, c.cfg_scale, c.shift),
            f"teacher {c.student_steps}-step cfg": ode_sampler(self.teacher, c.student_steps, c.cfg_scale, c.shift),
        }

    def evaluate(self) -> dict[str, Any]:
        if self.heldout is None:
            return {}
        p = self.heldout.to(self.device)
        gen = torch.Generator().manual_seed(self.eval_seed)
        noise = torch.randn(len(p), *self.latent_shape, generator=gen).to(self.device)
        self.student.eval()
        figures = compare_samplers(self.samplers(), p, noise, self.judge)
        c = self.cfg
        student, teacher = figures[f"student {c.student_steps}-step"], figures[f"teacher {c.teacher_steps}-step cfg"]
        return {"samplers": figures, "speedup": teacher["ms_per_image"] / max(student["ms_per_image"], 1e-9),
                "n_prompts": len(p)}


# ---------------------------------------------------------------------------------------
# The workspace entry
# ---------------------------------------------------------------------------------------


@dataclass
class Stack:
    """A DiT version with what it was trained with."""

    model: DiT
    path: Path
    config: dict  # the version's saved job config
    vae: Any  # models.vae.VAE or None when the version names none
    frozen: Any  # models.frozen.Frozen
    max_text_len: int

    @property
    def info(self) -> dict:
        """What a derived version records about its origin (and keeps for its loaders)."""
        keep = {k: v for k, v in self.config.items() if k in ("vae", "text_encoder", "clip", "frozen", "text")}
        return keep | {"base": str(self.path)}


def _find(config: dict, *keys: str) -> Any:
    for k in keys:
        if config.get(k):
            return config[k]
    return None


def _resolve_vae(models_root: Path, ref: str | None) -> Path | None:
    """The VAE version a DiT names: its recorded path, or when that is gone (a moved or
    copied workspace) the version of that name under this workspace. A DiT that names
    none gets the newest; one whose VAE is lost is an error (another VAE's latents differ)."""
    if not ref:
        return latest(models_root, "vae")
    for path in (Path(ref), models_root / ref, models_root / "vae" / Path(ref).name):
        if path.is_dir():
            return path
    raise FileNotFoundError(f"the DiT was trained with VAE {ref}, which is neither there "
                            f"nor under {models_root / 'vae'}")


def load_stack(workspace_root: str | Path, name: str = "dit", device: str | torch.device = "cpu") -> Stack:
    """The newest version of `name` (dit, or distill for the student) with the VAE and
    the text encoder its saved config names (else the workspace's newest VAE and CLIP)."""
    from dataengine.workspace import Workspace

    from .dit import load_dit
    from .frozen import Frozen, workspace_clip_spec
    from .vae import load_vae

    ws = Workspace.at(workspace_root)
    path = latest(ws.models, name)
    if path is None:
        raise FileNotFoundError(f"{ws.root}: no saved {name!r} version; train one first (`dataengine train {name}`)")
    _, config, _ = load_weights(path)
    job = config.get("job", config)
    model = load_dit(path, device)
    vae_ref = _find(job, "vae", "vae_path")
    if isinstance(vae_ref, dict):
        vae_ref = vae_ref.get("path")
    vae_path = _resolve_vae(ws.models, vae_ref)
    vae = load_vae(vae_path, device) if vae_path is not None else None
    text_ref = _find(job, "text_encoder", "clip", "frozen", "text")
    if isinstance(text_ref, dict):
        text_ref = text_ref.get("spec") or text_ref.get("path")
    frozen = Frozen.load(str(text_ref) if text_ref else workspace_clip_spec(ws.root))
    return Stack(model, path, job, vae, frozen, model.cfg.max_text_len)


def heldout_prompts(sampler, frozen, n: int, resolution: int, max_len: int) -> Prompts:
    """The first n eval-split generation captions: scene-world ones (they carry ground
    truth for the checker) when the workspace has them, else any."""
    from dataengine.curriculum import NoTrainingData

    try:
        batch = sampler.images(n, split="eval", resolution=resolution, source="sceneworld")
    except NoTrainingData:
        batch = sampler.images(n, split="eval", resolution=resolution)
    return encode_prompts(frozen, batch.captions, max_len, batch.meta)


def workspace_judge(workspace_root: str | Path, stack: Stack, weights: dict[str, float] | None = None,
                    progress: bool = False) -> Judge:
    """The checker (trained once into models/checker) and, when the workspace has a
    `reward` version, its heads, over latents decoded by the stack's VAE."""
    from dataengine.sceneworld.checker import Checker
    from dataengine.workspace import Workspace

    ws = Workspace.at(workspace_root)
    if stack.vae is None:
        return Judge()
    checker = Checker.load_or_train(ws.models / "checker", progress=progress)
    return Judge(stack.vae.decode, checker, reward_heads(ws.root, stack), weights)


def reward_heads(workspace_root: str | Path, stack: Stack) -> RewardFn | None:
    """The newest `reward` version as a `RewardFn` on latents (decoded by the stack's VAE),
    or None when the workspace has none."""
    from dataengine.workspace import Workspace

    path = latest(Workspace.at(workspace_root).models, "reward")
    if path is None or stack.vae is None:
        return None
    from . import rewards

    heads = rewards.load(path)

    @torch.no_grad()
    def score(latents: torch.Tensor, prompts: Prompts) -> dict[str, torch.Tensor]:
        images = stack.vae.decode(latents).float().clamp(-1, 1)
        return {k: torch.as_tensor(v).float() for k, v in heads.score(
            rewards.RewardBatch(images=images, captions=prompts.captions)).items()}

    return score


def distill(workspace_root: str | Path, cfg: DistillConfig | None = None, loop: LoopConfig | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Distil the workspace's newest DiT into a 4-step student saved as the next
    `distill` version (registered in the catalog); returns the version's record."""
    from dataengine.catalog import Catalog
    from dataengine.curriculum import CurriculumSampler
    from dataengine.workspace import Workspace

    cfg = cfg or DistillConfig()
    loop = replace(loop or LoopConfig(), progress=progress)
    ws = Workspace.at(workspace_root)
    stack = load_stack(ws.root, "dit")
    if stack.vae is None:
        raise FileNotFoundError(f"{ws.root}: no VAE version; the DiT's latents need one (`dataengine train vae`)")
    factor = stack.vae.factor
    if cfg.resolution % factor:
        raise ValueError(f"resolution {cfg.resolution} is not a multiple of the VAE's factor {factor}")
    shape = (stack.model.cfg.latent_channels, cfg.resolution // factor, cfg.resolution // factor)
    sampler = CurriculumSampler(ws.root, cfg.batch_size, loop.steps, seed=loop.seed, resolution=cfg.resolution)
    job = DistillJob(stack.model, CaptionPrompts(sampler, stack.frozen, stack.max_text_len), shape, cfg,
                     judge=workspace_judge(ws.root, stack, progress=progress),
                     heldout=heldout_prompts(sampler, stack.frozen, cfg.eval_prompts, cfg.resolution,
                                             stack.max_text_len),
                     info=stack.info, eval_seed=loop.seed)
    return train(job, ws.models, loop, catalog=Catalog(ws))

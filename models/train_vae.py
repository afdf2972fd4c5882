"""Train the VAE on the workspace's curriculum and save it as a new version.

    record = train_vae("ws", VAETrainConfig(size="tiny"), LoopConfig(steps=300))  # -> models/vae/vNNNN
    python -m models.train_vae -w ws --factor 8 --no-align --steps 300

Loss per step, on the images of `CurriculumSampler.batch(step)` (edit batches add their
source images): the curriculum's stages set the resolution (capped at `max_resolution`)
and the gen:edit mix, and each batch is one aspect bucket; `resolution` pins one square size:

    L1(x_hat, x) + w_p * perceptual(x_hat, x) + w_align(step) * (mcos + mdms) + w_kl * KL

- perceptual: LPIPS without learned weights: squared distance between the channel-
  normalised feature maps of the frozen image trunk (`Frozen.perceptual_features`),
  summed over channels, averaged over positions and layers.
- alignment (VA-VAE's VF loss): the latent mean, projected by a 1x1 conv to the frozen
  trunk's feature width, is pulled toward the trunk's stride-16 features resized to the
  latent grid. mcos = mean_i relu(1 - m1 - cos(z_i, f_i)) per position;
  mdms = mean_ij relu(|cos(z_i, z_j) - cos(f_i, f_j)| - m2) over position pairs of one
  image. The margins leave the latent free once it is close enough. The weight decays
  by a cosine from align_start to align_end: structure early, reconstruction late.
- no discriminator, no GAN loss.

The frozen model is the workspace's promoted CLIP (else the packaged lite0 trunks);
`features` names any other spec `Frozen.load` accepts. Evaluation after the last step
sets the latent scale (1 / std of training latents) and measures PSNR, SSIM and the
perceptual distance on held-out scene-world images and on real images kept out of
training.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .trainer import LoopConfig, TrainJob, train
from .vae import VAE, VAEConfig, build, config_dict, kl_loss, n_params

__all__ = [
    "VAETrainConfig", "VAEJob", "train_vae", "ssim", "psnr", "perceptual_distance", "vf_loss",
    "align_weight", "reconstruction_metrics",
]

SCENEWORLD = "sceneworld"  # the scene world's `source`; anything else counts as a real image


@dataclass
class VAETrainConfig:
    """The knobs of one VAE training run (the loop's own are in LoopConfig)."""

    size: str = "tiny"  # a key of VAE_SIZES
    factor: int = 16  # 16 | 8 (the baseline, same parameter budget)
    latent_channels: int | None = None  # None: 16 for f16, 4 for f8 (same numbers per image)
    resolution: int | None = None  # px of every (square) batch; None: the curriculum's stages and aspect buckets
    max_resolution: int = 64  # cap on the stages' resolutions (the embedded default trains on a CPU)
    batch_size: int = 16
    align: bool = True  # VA-VAE's alignment to the frozen model's features
    align_start: float = 1.0  # alignment weight at step 0, cosine-decayed to...
    align_end: float = 0.1  # ...this at the last step
    align_margin_cos: float = 0.5  # m1: positions with cos(z, f) >= 1 - m1 cost nothing
    align_margin_dist: float = 0.25  # m2: slack on each pairwise cosine difference
    perceptual_weight: float = 0.25  # 1.0 cost ~1.5 dB PSNR at the same perceptual score (60-step trial)
    kl_weight: float = 1e-4  # on the per-element mean KL: a light pull that keeps latents bounded
    weight_decay: float = 0.0
    features: str | None = None  # a Frozen spec (e.g. a DINOv2 path); None: the workspace's clip
    eval_images: int = 64  # held-out images per set (scene world; real)
    scale_images: int = 128  # training images whose latent std sets the scale

    def __post_init__(self) -> None:
        self.model_config()  # validates size, factor, latent channels
        for name in ("resolution", "max_resolution"):
            px = getattr(self, name)
            if px is not None and (px % self.factor or px < self.factor):
                raise ValueError(f"{name} {px} must be a positive multiple of the factor {self.factor}")
        for name in ("batch_size", "eval_images", "scale_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("align_start", "align_end", "perceptual_weight", "kl_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def model_config(self) -> VAEConfig:
        return VAEConfig(size=self.size, factor=self.factor, latent_channels=self.latent_channels)


# ---------------------------------------------------------------------------------------
# Losses and metrics
# ---------------------------------------------------------------------------------------


def perceptual_distance(feats_a: list[torch.Tensor], feats_b: list[torch.Tensor]) -> torch.Tensor:
    """(B,) LPIPS-style distance without learned weights: per layer, the squared distance of
    unit-normalised channel vectors averaged over positions; then averaged over layers."""
    per_layer = [(F.normalize(a, dim=1, eps=1e-6) - F.normalize(b, dim=1, eps=1e-6)).pow(2).sum(1).mean((1, 2))
                 for a, b in zip(feats_a, feats_b)]  # each (B,)
    return torch.stack(per_layer).mean(0)


def vf_loss(z: torch.Tensor, f: torch.Tensor, m1: float, m2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """VA-VAE's marginal cosine (mcos) and marginal distance-matrix (mdms) losses between a
    projected latent z (B, D, h, w) and frozen features f (B, D, h, w) on the same grid."""
    z = F.normalize(z.flatten(2).transpose(1, 2), dim=-1)  # (B, N, D), N = h*w
    f = F.normalize(f.flatten(2).transpose(1, 2), dim=-1)  # (B, N, D)
    mcos = F.relu(1 - m1 - (z * f).sum(-1)).mean()
    gz, gf = z @ z.transpose(1, 2), f @ f.transpose(1, 2)  # (B, N, N) cosine matrices
    mdms = F.relu((gz - gf).abs() - m2).mean()
    return mcos, mdms


def align_weight(step: int, total: int, start: float, end: float) -> float:
    """Cosine from `start` at step 0 to `end` at the last step."""
    t = step / max(1, total - 1)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return (g / g.sum()).float()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(B,) mean SSIM of images (B, C, H, W) (Wang et al. 2004: Gaussian window 11 / 1.5,
    K1 0.01, K2 0.03), over the positions where the window fits, averaged over channels:
    what skimage's structural_similarity(gaussian_weights=True, use_sample_covariance=False) gives."""
    c = x.shape[1]
    g = _gaussian_window(size, sigma).to(x.device)
    kx, ky = g.view(1, 1, 1, size).repeat(c, 1, 1, 1), g.view(1, 1, size, 1).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable, "valid": no padding
        return F.conv2d(F.conv2d(t, kx, groups=c), ky, groups=c)

    x, y = x.double(), y.double()
    kx, ky = kx.double(), ky.double()
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean((1, 2, 3)).float()


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """(B,) peak signal-to-noise ratio in dB."""
    mse = (x.float() - y.float()).pow(2).mean((1, 2, 3)).clamp(min=1e-10)
    return 10 * torch.log10(data_range ** 2 / mse)


@torch.no_grad()
def reconstruction_metrics(vae: VAE, images: torch.Tensor, frozen, batch_size: int = 32) -> dict[str, float]:
    """Mean PSNR (dB), SSIM and perceptual distance of `vae`'s reconstructions of `images`
    (B, 3, H, W) in [-1, 1], reconstructed from the latent mean and clamped to [-1, 1]."""
    device = next(vae.parameters()).device
    was_training = vae.training
    vae.eval()
    out: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": [], "perceptual": []}
    for i in range(0, len(images), batch_size):
        x = images[i: i + batch_size].to(device)
        x_hat = vae.decode(vae.encode(x)).clamp(-1, 1)
        out["psnr"].append(psnr(x_hat, x).cpu())
        out["ssim"].append(ssim(x_hat, x).cpu())
        out["perceptual"].append(perceptual_distance(frozen.perceptual_features(x_hat),
                                                     frozen.perceptual_features(x)).cpu())
    vae.train(was_training)
    return {k: round(float(torch.cat(v).mean()), 4) for k, v in out.items()} | {"n": len(images)}


# ---------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------


class VAEJob(TrainJob):
    """L1 + perceptual + scheduled alignment + KL on curriculum images; the feature model stays frozen."""

    name = "vae"

    def __init__(self, sampler, frozen, cfg: VAETrainConfig, info: dict | None = None):
        # info: JSON facts that identify the run beyond cfg (the resolved feature spec).
        self.sampler, self.frozen, self.cfg, self.info = sampler, frozen, cfg, info or {}
        self.model_cfg = cfg.model_config()
        self.heldout_real = _hold_out_real(sampler, cfg.eval_images)

    def setup(self) -> None:
        dev = self.device
        self.vae: VAE = build(self.model_cfg).to(dev).train()
        params = list(self.vae.parameters())
        if self.cfg.align:
            self.proj = nn.Conv2d(self.model_cfg.latent_channels, self.frozen.feature_dim, 1).to(dev)
            params += list(self.proj.parameters())
        self.opt = torch.optim.AdamW(params, lr=self.loop.lr, betas=(0.9, 0.99),
                                     weight_decay=self.cfg.weight_decay, fused=dev.type == "cuda" or None)
        self.frozen_strides = (2, 4, 8) + ((16,) if self.cfg.align else ())

    def config(self) -> dict:
        return {"model": config_dict(self.model_cfg), "train": asdict(self.cfg)} | self.info

    def modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae} | ({"align": self.proj} if self.cfg.align else {})

    def exported(self) -> dict[str, nn.Module]:
        return {"vae": self.vae}  # the projection only serves the loss

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"vae": self.opt}

    @property
    def eval_resolution(self) -> int:
        """Held-out figures are taken square at the run's final resolution."""
        return self.cfg.resolution or self.sampler.stages[-1].resolution

    def images(self, step: int) -> torch.Tensor:
        """The step's images: targets, plus sources for an editing batch."""
        return self._stack(self.sampler.batch(step))

    def _stack(self, batch) -> torch.Tensor:
        x = batch.images if batch.sources is None else torch.cat([batch.images, batch.sources])
        return x.to(self.device)

    def losses(self, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Every term of the loss on images x (B, 3, H, W), and their weighted sum as "loss"."""
        cfg = self.cfg
        x_hat, mean, logvar = self.vae(x)  # (B, 3, H, W), (B, C, h, w) x2
        with torch.no_grad():
            # One trunk pass gives the perceptual targets and the stride-16 alignment
            # features (image_features at stride 16 is that same stage).
            target = self.frozen.perceptual_features(x, strides=self.frozen_strides)
        terms = {"l1": (x_hat - x).abs().mean(),
                 "perceptual": perceptual_distance(self.frozen.perceptual_features(x_hat), target[:3]).mean(),
                 "kl": kl_loss(mean, logvar)}
        loss = terms["l1"] + cfg.perceptual_weight * terms["perceptual"] + cfg.kl_weight * terms["kl"]
        if cfg.align:
            f = F.interpolate(target[3], size=mean.shape[-2:], mode="bilinear", align_corners=False)  # (B, D, h, w)
            mcos, mdms = vf_loss(self.proj(mean), f, cfg.align_margin_cos, cfg.align_margin_dist)
            w = align_weight(step, self.loop.steps, cfg.align_start, cfg.align_end)
            terms |= {"mcos": mcos, "mdms": mdms, "w_align": torch.tensor(w)}
            loss = loss + w * (mcos + mdms)
        return {"loss": loss} | terms

    def step(self, step: int) -> dict[str, float]:
        batch = self.sampler.batch(step)
        x = self._stack(batch)
        terms = self.losses(x, step)
        h, w = x.shape[-2:]
        self.opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        grad_norm = self.clip(p for g in self.opt.param_groups for p in g["params"])
        self.opt.step()
        return {k: float(v.detach()) for k, v in terms.items()} | {
            "grad_norm": grad_norm, "images": len(x), "resolution": float((h * w) ** 0.5), "aspect": float(w / h),
            "edit": float(batch.task == "edit")}

    @torch.no_grad()
    def set_scale(self) -> float:
        """Scale latents to unit std over `scale_images` training images (the steps' own batches)."""
        means, n, s = [], 0, 0
        while n < self.cfg.scale_images:
            x = self.images(s)
            means.append(self.vae.posterior(x)[0].cpu().flatten(1))  # buckets differ in shape
            n, s = n + len(x), s + 1
        return self.vae.set_scale(torch.cat([m.flatten() for m in means]))

    def evaluate(self) -> dict[str, Any]:
        self.vae.eval()
        scale = self.set_scale()
        from dataengine.curriculum import NoTrainingData

        res, n = self.eval_resolution, self.cfg.eval_images
        try:
            scene = self.sampler.images(n, split="eval", resolution=res, source=SCENEWORLD).images
        except NoTrainingData:  # a workspace of real images only: no scene-world eval split
            scene = None
        real = self.heldout_real_images()
        return {"params": n_params(self.vae), "factor": self.model_cfg.factor,
                "latent_channels": self.model_cfg.latent_channels, "resolution": res, "scale": round(scale, 5),
                "sceneworld": None if scene is None else reconstruction_metrics(self.vae, scene, self.frozen),
                "real": None if real is None else reconstruction_metrics(self.vae, real, self.frozen)}

    def heldout_real_images(self) -> torch.Tensor | None:
        """The held-out real images at the run's resolution (None when the workspace has none)."""
        if self.heldout_real is None:
            return None
        split, n = self.heldout_real
        return self.sampler.images(n, split=split, resolution=self.eval_resolution, source="!" + SCENEWORLD).images


def _hold_out_real(sampler, n: int) -> tuple[str, int] | None:
    """Where the held-out real images come from, as (split, count). Real images in the eval
    split are held out already; otherwise the first `n` real train images by key are taken
    out of the sampler's training pool (the connectors write real images to train)."""
    from dataengine.curriculum import NoTrainingData

    try:
        return "eval", len(sampler.images(n, split="eval", source="!" + SCENEWORLD))
    except NoTrainingData:
        pass
    rows = sorted((r for r in sampler.rows if r["split"] == "train" and r["source"] != SCENEWORLD
                   and r["task"] != "edit"), key=lambda r: r["key"])
    if len(rows) < 2:
        return None
    n = min(n, len(rows) // 2)  # never hold out more than half: the VAE should see real images
    held = {r["key"] for r in rows[:n]}  # the ones sampler.images(n, "train", source=...) returns
    sampler.gen = [i for i in sampler.gen if sampler.rows[i]["key"] not in held]
    return "train", n


# ---------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------


def make_job(workspace_root: str | Path, cfg: VAETrainConfig, loop: LoopConfig) -> VAEJob:
    """The job for `cfg` over the workspace's train (+ patches) splits."""
    from dataengine.curriculum import CurriculumSampler

    from .frozen import Frozen, workspace_clip_spec
    from .trainer import device_of

    spec = cfg.features or workspace_clip_spec(workspace_root)
    frozen = Frozen.load(spec, device=str(device_of(loop.device)))
    sampler = CurriculumSampler(workspace_root, cfg.batch_size, loop.steps, seed=loop.seed, resolution=cfg.resolution,
                                max_resolution=cfg.max_resolution, buckets=cfg.resolution is None,
                                multiple=cfg.factor)
    return VAEJob(sampler, frozen, cfg, info={"features": spec})


def train_vae(workspace_root: str | Path, cfg: VAETrainConfig | None = None, loop: LoopConfig | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Train a VAE on the workspace's curriculum; save it as the next models/vae/ version,
    registered in the catalog. Returns the version's record (metrics as a dict)."""
    from dataengine.catalog import Catalog
    from dataengine.workspace import Workspace

    cfg = cfg or VAETrainConfig()
    loop = replace(loop or LoopConfig(steps=300, lr=2e-3), progress=progress)
    ws = Workspace.at(workspace_root)
    return train(make_job(ws.root, cfg, loop), ws.models, loop, catalog=Catalog(ws))


def main(argv: list[str] | None = None) -> int:
    """`python -m models.train_vae -w WS [config and loop flags]`."""
    import argparse
    import dataclasses
    import json
    import typing

    ap = argparse.ArgumentParser(prog="python -m models.train_vae", description=__doc__.splitlines()[0])
    ap.add_argument("-w", "--workspace", required=True)
    for cls in (VAETrainConfig, LoopConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "progress":
                continue
            flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
            if hint is bool:
                ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
            else:
                base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
                ap.add_argument(flag, type=base if base in (int, float, str) else str, default=f.default)
    ap.set_defaults(steps=300, lr=2e-3)  # the VAE's own loop defaults (models/stack.py)
    args = vars(ap.parse_args(argv))
    cfg = VAETrainConfig(**{f.name: args[f.name] for f in dataclasses.fields(VAETrainConfig)})
    loop = LoopConfig(**{f.name: args[f.name] for f in dataclasses.fields(LoopConfig) if f.name != "progress"})
    record = train_vae(args["workspace"], cfg, loop)
    print(json.dumps(record | {"created_at": record["created_at"].isoformat()}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    import sys

    from dataengine.runtime import apply_offline_defaults

    apply_offline_defaults()
    sys.exit(main())

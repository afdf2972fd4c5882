"""Train the DiT on the workspace's curriculum, in the latent space of a frozen VAE.

    record = train_dit("ws", DiTTrainConfig(size="tiny"), LoopConfig(steps=300))  # -> models/dit/vNNNN

Each step draws `CurriculumSampler.batch(step)`: generation batches condition on the
caption, editing batches put the clean source latent in the sequence and condition on
the instruction. Images go through the frozen VAE (latent means, no grad) and texts
through the frozen text encoder (`Frozen.text_tokens`); both are cached by sample key /
text for the run, since a run revisits its data many times. The objective and the
sampler are models/dit.py's (rectified flow, logit-normal t, caption dropout for CFG).

Evaluation after the last step: the flow loss on held-out eval images (fixed t and
noise, no caption dropout; editing samples apart), and sample fidelity: the model
generates, with CFG, images for held-out scene-world captions, the VAE decodes them and
the scene-world checker scores their attributes against the scenes' ground truth. The
same checker's score on the real eval images and on their VAE reconstructions is
reported beside it: the ceiling the samples can reach.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.profiler import record_function

from .dit import DiT, DiTConfig, build, config_dict, flow_matching_loss, n_params, sample
from .trainer import LoopConfig, TrainJob, latest, train

__all__ = ["DiTTrainConfig", "DiTJob", "train_dit", "resolve_vae", "TextCache", "LatentCache"]


@dataclass
class DiTTrainConfig:
    """The knobs of one DiT training run (the loop's own are in LoopConfig)."""

    size: str = "tiny"  # a key of DIT_SIZES
    ffn: str = "swiglu"  # | gelu
    modulation: str = "scale"  # | shift_scale
    patch: int = 1
    resolution: int | None = None  # px of every (square) batch; None: the curriculum's stages and aspect buckets
    max_resolution: int = 64  # cap on the stages' resolutions (the embedded default trains on a CPU)
    batch_size: int = 16
    cond_drop: float = 0.1  # caption dropout (trains the null text for CFG)
    weight_decay: float = 0.0
    vae: str | None = None  # a saved VAE version folder; None: the workspace's promoted/newest
    text_encoder: str | None = None  # a Frozen spec; None: the workspace's clip, else the packaged one
    # Text tokens the DiT reads (the frozen tokenizer's, CLS and SEP included): 104 covers 95%
    # of rich scene-world captions (p95 95-97 across draws), the enhancer's targets (benchmarks/text_lengths.py).
    max_text_len: int = 104
    eval_images: int = 32  # held-out images for the eval flow loss
    eval_prompts: int = 16  # held-out scene-world captions to generate for the fidelity score
    sample_steps: int = 20  # Euler steps of the fidelity samples
    cfg_scale: float = 4.0
    fidelity: bool = True  # score samples with the scene-world checker (trains it once, ~1 min)

    def __post_init__(self) -> None:
        DiTConfig(size=self.size, ffn=self.ffn, modulation=self.modulation, patch=self.patch,
                  cond_drop=self.cond_drop)  # validates those fields
        for name in ("batch_size", "max_text_len", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("resolution", "max_resolution"):
            if getattr(self, name) is not None and getattr(self, name) < 16:
                raise ValueError(f"{name} must be >= 16 px, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------
# Frozen inputs: the VAE version to use, cached latents and text tokens
# ---------------------------------------------------------------------------------------


def resolve_vae(workspace_root: str | Path, spec: str | None) -> Path:
    """The VAE version folder for `spec`: a path (absolute, or relative to the workspace's
    models/), or None for the workspace's promoted version (else its newest)."""
    from dataengine.catalog import Catalog
    from dataengine.workspace import Workspace

    ws = Workspace.at(workspace_root)
    if spec:
        for path in (Path(spec), ws.models / spec):
            if path.is_dir():
                return path.resolve()
        raise FileNotFoundError(f"VAE version {spec!r} not found (as a path or under {ws.models})")
    rows = Catalog(ws).query(
        "SELECT path FROM model_versions WHERE model = 'vae' AND status = 'promoted' "
        "ORDER BY created_at DESC LIMIT 1").to_pylist()
    if rows and Path(rows[0]["path"]).is_dir():
        return Path(rows[0]["path"]).resolve()
    newest = latest(ws.models, "vae")
    if newest is None:
        raise FileNotFoundError(f"{ws.root}: no VAE version to encode latents with; "
                                "run `dataengine train vae` first (or set vae=PATH)")
    return newest.resolve()


class LatentCache:
    """VAE latents by (sample key, image shape), kept on the CPU for the run."""

    def __init__(self, vae, device: torch.device):
        self.vae, self.device = vae, device
        self.items: dict[tuple[str, int, int], torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, keys: list[str], images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images of `keys` -> (B, C, H/f, W/f) latents on the device."""
        res = tuple(images.shape[-2:])
        missing = [i for i, k in enumerate(keys) if (k, *res) not in self.items]
        if missing:
            z = self.vae.encode(images[missing].to(self.device)).float().cpu()  # (M, C, h, w)
            for i, zi in zip(missing, z):
                self.items[(keys[i], *res)] = zi
        return torch.stack([self.items[(k, *res)] for k in keys]).to(self.device)


class TextCache:
    """Text-encoder token states by text (unpadded), collated per batch."""

    def __init__(self, frozen, max_len: int, device: torch.device):
        self.frozen, self.max_len, self.device = frozen, max_len, device
        self.items: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (B, L, text_dim) token states, zero-padded to the batch's longest, and (B, L) mask."""
        missing = sorted({t for t in texts if t not in self.items})
        if missing:
            hidden, mask = self.frozen.text_tokens(missing, self.max_len)  # (M, L', d), (M, L')
            for t, h, m in zip(missing, hidden.cpu(), mask.cpu()):
                self.items[t] = h[: max(1, int(m.sum()))]
        states = [self.items[t] for t in texts]
        L = max(s.shape[0] for s in states)
        text = torch.zeros(len(texts), L, states[0].shape[1])
        mask = torch.zeros(len(texts), L, dtype=torch.bool)
        for i, s in enumerate(states):
            text[i, : len(s)], mask[i, : len(s)] = s, True
        return text.to(self.device), mask.to(self.device)


# ---------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------


class DiTJob(TrainJob):
    """Rectified-flow training of a DiT on curriculum batches; the VAE and text encoder stay frozen."""

    name = "dit"

    def __init__(self, sampler, vae, frozen, cfg: DiTTrainConfig, info: dict, checker=None):
        # checker: a scene-world Checker; None loads (or trains once) the workspace's.
        self.sampler, self.vae, self.frozen, self.cfg = sampler, vae, frozen, cfg
        self.info, self.checker = info, checker
        self.model_cfg = DiTConfig(size=cfg.size, latent_channels=vae.cfg.latent_channels, patch=cfg.patch,
                                   text_dim=frozen.text_dim, max_text_len=cfg.max_text_len, ffn=cfg.ffn,
                                   modulation=cfg.modulation, cond_drop=cfg.cond_drop)

    def setup(self) -> None:
        dev = self.device
        self.model: DiT = build(self.model_cfg).to(dev).train()
        self.vae = self.vae.to(dev).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.loop.lr, betas=(0.9, 0.99),
                                     weight_decay=self.cfg.weight_decay, fused=dev.type == "cuda" or None)
        self.latents = LatentCache(self.vae, dev)
        self.texts = TextCache(self.frozen, self.cfg.max_text_len, dev)

    def config(self) -> dict:
        return {"model": config_dict(self.model_cfg), "train": asdict(self.cfg)} | self.info

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"dit": self.model}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"dit": self.opt}

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def inputs(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x0, text, mask, source latent or None) of a curriculum batch."""
        x0 = self.latents(batch.keys, batch.images)  # (B, C, h, w)
        if batch.task == "edit":
            source = self.latents([k + "#source" for k in batch.keys], batch.sources)  # (B, C, h, w)
            text, mask = self.texts(batch.instructions)
        else:
            source = None
            text, mask = self.texts(batch.captions)
        return x0, text, mask, source

    def step(self, step: int) -> dict[str, float]:
        with record_function("data"):  # shards, VAE latents and the text cache (LoopConfig.profile_steps)
            batch = self.sampler.batch(step)
            x0, text, mask, source = self.inputs(batch)
        with self.autocast():
            loss = flow_matching_loss(self.model, x0, text, mask, source, self.cfg.cond_drop)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = self.clip(self.model.parameters())
        self.opt.step()
        stats = {"loss": float(loss.detach()), "grad_norm": grad_norm, "edit": float(batch.task == "edit")}
        h, w = batch.images.shape[-2:]
        return stats | {"resolution": float((h * w) ** 0.5), "aspect": float(w / h)}

    # Evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def eval_loss(self, batch, repeats: int = 4, seed: int = 0) -> float:
        """Mean flow loss over `repeats` fixed draws of (t, noise), no caption dropout."""
        x0, text, mask, source = self.inputs(batch)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            with self.autocast():
                losses = [float(flow_matching_loss(self.model, x0, text, mask, source, cond_drop=0.0))
                          for _ in range(repeats)]
        return sum(losses) / len(losses)

    def resolution(self) -> int:
        return self.cfg.resolution or self.sampler.stages[-1].resolution

    def evaluate(self) -> dict[str, Any]:
        from dataengine.curriculum import NoTrainingData

        self.model.eval()
        res = self.resolution()
        out: dict[str, Any] = {"params": n_params(self.model), "resolution": res}
        for task in ("gen", "edit"):
            try:
                batch = self.sampler.images(self.cfg.eval_images, "eval", res, task=task)
            except NoTrainingData:
                continue
            out[f"eval_loss_{task}"] = round(self.eval_loss(batch, seed=self.loop.seed), 5)
            out[f"eval_{task}_samples"] = len(batch)
        if "eval_loss_gen" in out:
            out["eval_loss"] = out["eval_loss_gen"]
        out["fidelity"] = self.fidelity(res) if self.cfg.fidelity else {"skipped": "fidelity=False"}
        self.model.train()
        return out

    def fidelity(self, res: int) -> dict[str, Any]:
        """Checker attribute accuracy of CFG samples for held-out scene-world captions,
        beside the real images' and their VAE reconstructions' (the ceiling)."""
        from dataengine.curriculum import NoTrainingData
        from dataengine.sceneworld.checker import ATTRIBUTES, Checker, scenes_of

        try:
            batch = self.sampler.images(self.cfg.eval_prompts, "eval", res, source="sceneworld")
        except NoTrainingData:
            return {"skipped": "no scene-world eval samples to check against"}
        t0 = time.perf_counter()
        # Outside no_grad: the first call trains the checker (once per workspace).
        checker = self.checker or Checker.load_or_train(self.sampler.ws.models / "checker",
                                                        progress=self.loop.progress)
        scenes = scenes_of(batch.meta)
        with torch.no_grad():
            text, mask = self.texts(batch.captions)
            z_real = self.latents(batch.keys, batch.images)  # (B, C, h, w)
            gen = torch.Generator().manual_seed(self.loop.seed)
            noise = torch.randn(z_real.shape, generator=gen).to(self.device)
            t1 = time.perf_counter()
            with self.autocast():
                z = sample(self.model, text, mask, tuple(z_real.shape), self.cfg.sample_steps, self.cfg.cfg_scale,
                           noise=noise)
            sample_s = time.perf_counter() - t1
            figures = {}
            for name, images in (("samples", self.vae.decode(z.float())),
                                 ("reconstructions", self.vae.decode(z_real)), ("real", batch.images)):
                checked = checker.check(images.float().clamp(-1, 1).cpu(), scenes)
                figures[name] = {k: round(float(checked[k].mean()), 4) for k in (*ATTRIBUTES, "accuracy")}
        return {"accuracy": figures["samples"]["accuracy"], **figures, "n_prompts": len(batch),
                "cfg_scale": self.cfg.cfg_scale, "sample_steps": self.cfg.sample_steps,
                "ms_per_image": round(1000 * sample_s / len(batch), 1),
                "seconds": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------------------
# The workspace entry
# ---------------------------------------------------------------------------------------


def train_dit(workspace_root: str | Path, cfg: DiTTrainConfig | None = None, loop: LoopConfig | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Train a DiT on the workspace's curriculum and save it as the next `dit` version
    (registered in the catalog); returns the version's record."""
    from dataengine.catalog import Catalog
    from dataengine.curriculum import CurriculumSampler
    from dataengine.workspace import Workspace

    from .frozen import Frozen, workspace_clip_spec
    from .vae import load_vae

    cfg = cfg or DiTTrainConfig()
    loop = replace(loop or LoopConfig(), progress=progress)
    ws = Workspace.at(workspace_root)
    vae_path = resolve_vae(ws.root, cfg.vae)
    vae = load_vae(vae_path)
    if cfg.resolution is not None and cfg.resolution % vae.factor:
        raise ValueError(f"resolution {cfg.resolution} is not a multiple of the VAE's factor {vae.factor}")
    text_spec = cfg.text_encoder or workspace_clip_spec(ws.root)
    frozen = Frozen.load(text_spec)
    sampler = CurriculumSampler(ws.root, cfg.batch_size, loop.steps, seed=loop.seed, resolution=cfg.resolution,
                                max_resolution=cfg.max_resolution, buckets=cfg.resolution is None,
                                multiple=vae.factor * cfg.patch)  # latents must split into whole patches
    job = DiTJob(sampler, vae, frozen, cfg, info={"vae": str(vae_path), "text_encoder": str(text_spec)})
    return train(job, ws.models, loop, catalog=Catalog(ws))

"""The image autoencoder: a 16x convolutional VAE with parameter-free shortcuts (f8 baseline).

    vae = build(VAEConfig(size="tiny"))              # f16, 16 latent channels
    z = vae.encode(images)                           # (B, 3, H, W) in [-1, 1] -> (B, 16, H/16, W/16)
    x = vae.decode(z)                                # -> (B, 3, H, W), ~[-1, 1]
    vae = load_vae("ws/models/vae/v0003")            # a version saved by models/train_vae.py

A residual conv encoder (light) and decoder (heavier), no attention, GroupNorm + SiLU.
Every down stage carries a shortcut without parameters, as in DC-AE's residual
autoencoding: space-to-channel (pixel_unshuffle 2) then averaging groups of channels down
to the stage's width; every up stage mirrors it (duplicate channels, pixel_shuffle 2).
The bottleneck has a global skip of the same kind (the encoder's last features averaged
to the latent channels, added to the latent mean; the latent duplicated to the decoder's
width, added to its first conv). The shortcuts let a deep, high-compression autoencoder
start as "move pixels into channels and back" and learn the residual.

The posterior is a diagonal Gaussian trained with a small KL weight; `encode` returns its
mean times `scale`, a buffer set after training so that latents have ~unit std (the
diffusion model's noise scale), saved with the weights; `decode` divides it back out.

Sizes are named (`VAE_SIZES`); the f8 variant of a size is widened by `stage_widths`
until its parameter count matches the f16 model's, so f16 vs f8 compares at equal
parameters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VAE_SIZES", "VAEConfig", "VAE", "build", "load_vae", "n_params", "stage_widths",
    "DEFAULT_LATENT_CHANNELS", "MODEL_NAME", "kl_loss", "config_dict",
]

MODEL_NAME = "vae"

# Presets, written for the f16 model: the base width, the width multiplier of each of the
# five resolution levels (full, /2, /4, /8, /16) and the residual blocks per level.
# The decoder is heavier than the encoder (more blocks), as decoding is the harder half.
# Widths are kept multiples of `quantum` (8 unless given) so GroupNorm groups divide them.
VAE_SIZES: dict[str, dict] = {
    "nano": dict(width=8, mults=(1, 2, 4, 4, 4), enc_blocks=1, dec_blocks=2, quantum=4),  # tests
    "tiny": dict(width=16, mults=(1, 2, 4, 4, 8), enc_blocks=1, dec_blocks=2),    # 2-core demo
    "S": dict(width=64, mults=(1, 2, 4, 4, 8), enc_blocks=2, dec_blocks=3),       # one GPU
    "B": dict(width=128, mults=(1, 2, 4, 4, 8), enc_blocks=2, dec_blocks=3),
}

# f16 with 16 channels and f8 with 4 hold the same numbers per image (H*W/16), which makes
# them the fair pair to compare: the f8 model gets no larger latent to store detail in.
DEFAULT_LATENT_CHANNELS = {16: 16, 8: 4}
INIT_LOGVAR = -4.0


@dataclass
class VAEConfig:
    """Architecture of one VAE; `latent_channels` None picks 16 for f16 and 4 for f8."""

    size: str = "tiny"
    factor: int = 16  # spatial downsampling: 16 | 8
    latent_channels: int | None = None
    widths: tuple[int, ...] = ()  # one per level; () derives them from size and factor
    enc_blocks: int = 0  # 0: from size
    dec_blocks: int = 0  # 0: from size

    def __post_init__(self) -> None:
        if self.size not in VAE_SIZES:
            raise ValueError(f"unknown VAE size {self.size!r}; expected one of {sorted(VAE_SIZES)}")
        if self.factor not in (8, 16):
            raise ValueError(f"factor must be 8 or 16, got {self.factor}")
        if self.latent_channels is None:
            self.latent_channels = DEFAULT_LATENT_CHANNELS[self.factor]
        preset = VAE_SIZES[self.size]
        self.enc_blocks = self.enc_blocks or preset["enc_blocks"]
        self.dec_blocks = self.dec_blocks or preset["dec_blocks"]
        self.widths = tuple(self.widths) or stage_widths(self.size, self.factor, self.latent_channels)
        if len(self.widths) != self.levels:
            raise ValueError(f"factor {self.factor} needs {self.levels} widths, got {self.widths}")

    @property
    def levels(self) -> int:
        """Resolution levels: full size, then one per halving."""
        return int(math.log2(self.factor)) + 1


# ---------------------------------------------------------------------------------------
# Parameter-free shortcuts
# ---------------------------------------------------------------------------------------


def channel_average(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Average groups of neighbouring channels down to `out_channels` (DC-AE's shortcut).
    Exact groups when the counts divide; otherwise adaptive (uneven) groups."""
    b, c, h, w = x.shape
    if c == out_channels:
        return x
    if c % out_channels == 0:
        return x.view(b, out_channels, c // out_channels, h, w).mean(dim=2)
    y = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(b * h * w, 1, c), out_channels)  # (BHW, 1, C')
    return y.view(b, h, w, out_channels).permute(0, 3, 1, 2)


def channel_duplicate(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Repeat each channel up to `out_channels` (the decoder's mirror of channel_average)."""
    b, c, h, w = x.shape
    if c == out_channels:
        return x
    if out_channels % c == 0:
        return x.repeat_interleave(out_channels // c, dim=1)
    idx = (torch.arange(out_channels, device=x.device) * c) // out_channels  # nearest source channel
    return x.index_select(1, idx)


class DownShortcut(nn.Module):
    """(B, C, H, W) -> (B, C', H/2, W/2): space-to-channel, then channel averaging."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_average(F.pixel_unshuffle(x, 2), self.out_channels)  # (B, 4C, H/2, W/2) -> (B, C', ..)


class UpShortcut(nn.Module):
    """(B, C, H, W) -> (B, C', 2H, 2W): channel duplication, then channel-to-space."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(channel_duplicate(x, 4 * self.out_channels), 2)  # (B, 4C', H, W) -> (B, C', 2H, 2W)


# ---------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 8 channels. Groups of one channel are an
    instance norm, which erases each channel's mean over the image: the colour of a flat
    background would have nowhere to go."""
    groups = math.gcd(channels, 32)
    while groups > 1 and channels // groups < 8:
        groups //= 2
    return nn.GroupNorm(groups, channels, eps=1e-6)


def zero_init(conv: nn.Conv2d) -> nn.Conv2d:
    """Start a conv at zero: a fresh network is its shortcuts (DC-AE's point: the model
    learns only the residual to "move pixels into channels and back")."""
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ResBlock(nn.Module):
    """GN-SiLU-conv, twice, plus identity; the last conv starts at zero so that a fresh
    network is its shortcuts."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1, self.conv1 = norm(channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2, self.conv2 = norm(channels), nn.Conv2d(channels, channels, 3, padding=1)
        zero_init(self.conv2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, C, H, W)
        return x + h


class Down(nn.Module):
    """Stride-2 conv plus the parameter-free down shortcut; the conv starts at zero."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = zero_init(nn.Conv2d(cin, cout, 3, stride=2, padding=1))
        self.shortcut = DownShortcut(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.shortcut(x)  # (B, C', H/2, W/2)


class Up(nn.Module):
    """Conv to 4x channels then pixel_shuffle, plus the parameter-free up shortcut; the
    conv starts at zero."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = zero_init(nn.Conv2d(cin, 4 * cout, 3, padding=1))
        self.shortcut = UpShortcut(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.conv(x), 2) + self.shortcut(x)  # (B, C', 2H, 2W)


# ---------------------------------------------------------------------------------------
# Encoder, decoder, VAE
# ---------------------------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        w = cfg.widths
        self.latent_channels = cfg.latent_channels
        self.conv_in = nn.Conv2d(3, w[0], 3, padding=1)
        self.stages = nn.ModuleList()
        for i in range(cfg.levels):
            blocks: list[nn.Module] = [ResBlock(w[i]) for _ in range(cfg.enc_blocks)]
            if i + 1 < cfg.levels:
                blocks.append(Down(w[i], w[i + 1]))
            self.stages.append(nn.Sequential(*blocks))
        self.norm_out = norm(w[-1])
        self.conv_out = zero_init(nn.Conv2d(w[-1], 2 * cfg.latent_channels, 3, padding=1))
        # The posterior starts narrow (std e^-2): unit noise would drown the small fresh latent.
        nn.init.constant_(self.conv_out.bias[cfg.latent_channels:], INIT_LOGVAR)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv_in(x)  # (B, w0, H, W)
        for stage in self.stages:
            h = stage(h)  # ... -> (B, w[-1], H/f, W/f)
        mean, logvar = self.conv_out(F.silu(self.norm_out(h))).chunk(2, dim=1)  # (B, C, H/f, W/f) each
        mean = mean + channel_average(h, self.latent_channels)  # global skip around the bottleneck
        return mean, logvar.clamp(-30.0, 20.0)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        w = cfg.widths
        self.width = w[-1]
        self.conv_in = zero_init(nn.Conv2d(cfg.latent_channels, w[-1], 3, padding=1))
        self.stages = nn.ModuleList()
        for i in reversed(range(cfg.levels)):
            blocks: list[nn.Module] = [ResBlock(w[i]) for _ in range(cfg.dec_blocks)]
            if i > 0:
                blocks.append(Up(w[i], w[i - 1]))
            self.stages.append(nn.Sequential(*blocks))
        self.norm_out = norm(w[0])
        self.conv_out = nn.Conv2d(w[0], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z) + channel_duplicate(z, self.width)  # (B, w[-1], h, w): global skip
        for stage in self.stages:
            h = stage(h)  # ... -> (B, w0, H, W)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)


class VAE(nn.Module):
    """Encoder + Gaussian latent + decoder. `encode`/`decode` speak scaled latents."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # Multiplies the posterior mean so latents have ~unit std; set by set_scale after
        # training, saved in the state dict.
        self.register_buffer("scale", torch.ones(()))

    @property
    def factor(self) -> int:
        return self.cfg.factor

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled (mean, logvar), each (B, C, H/f, W/f); H and W must divide by f."""
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the factor {self.factor}")
        return self.encoder(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> the scaled latent mean (B, C, H/f, W/f)."""
        return self.posterior(x)[0] * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """A scaled latent (B, C, h, w) -> image (B, 3, h*f, w*f), ~[-1, 1]."""
        return self.decoder(z / self.scale)

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction, mean, logvar), latent stats unscaled."""
        mean, logvar = self.posterior(x)  # (B, C, h, w) each
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
        return self.decoder(z), mean, logvar  # (B, 3, H, W), ...

    @torch.no_grad()
    def set_scale(self, means: torch.Tensor) -> float:
        """Set `scale` to 1 / std of these unscaled latent means; returns the scale."""
        self.scale.fill_(1.0 / means.float().std().clamp(min=1e-6).item())
        return float(self.scale)


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over latent elements."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


# ---------------------------------------------------------------------------------------
# Sizes, building, loading
# ---------------------------------------------------------------------------------------


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _round(x: float, quantum: int) -> int:
    return max(quantum, quantum * round(x / quantum))


def _count(size: str, factor: int, latent_channels: int, widths: tuple[int, ...]) -> int:
    with torch.device("meta"):  # no memory, no init cost: only the shapes are needed
        return n_params(VAE(VAEConfig(size=size, factor=factor, latent_channels=latent_channels, widths=widths)))


@lru_cache(maxsize=None)
def stage_widths(size: str, factor: int, latent_channels: int | None = None) -> tuple[int, ...]:
    """The per-level widths of `size` at `factor`. f16 takes the preset; a smaller factor
    drops the deepest levels and scales every width by the one factor (searched on a fine
    grid, rounded to the size's quantum) that brings its parameter count closest to the f16
    model's with its default latent channels."""
    preset = VAE_SIZES[size]
    q = preset.get("quantum", 8)
    base = tuple(_round(preset["width"] * m, q) for m in preset["mults"])
    if factor == 16:
        return base
    levels = int(math.log2(factor)) + 1
    target = _count(size, 16, DEFAULT_LATENT_CHANNELS[16], base)
    lat = latent_channels or DEFAULT_LATENT_CHANNELS[factor]
    # One scale for every level (1.00 .. 4.00): the count grows with it, so bisect for the
    # first scale at or above the target; then try its neighbours with the deepest level
    # nudged by a quantum either way (fine steps for the small sizes, whose widths are few
    # quanta). About twenty counts, each a model built on the meta device.
    scaled = sorted({tuple(_round(w * k / 100, q) for w in base[:levels]) for k in range(100, 401)})
    count = lru_cache(maxsize=None)(lambda ws: _count(size, factor, lat, ws))
    lo, hi = 0, len(scaled) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(scaled[mid]) < target else (lo, mid)
    candidates = {ws[:-1] + (ws[-1] + nudge * q,) for ws in scaled[max(0, lo - 1): lo + 2]
                  for nudge in (-1, 0, 1) if ws[-1] + nudge * q >= ws[-2]}
    return min(sorted(candidates), key=lambda ws: abs(count(ws) - target))


def build(cfg: VAEConfig | None = None) -> VAE:
    """A fresh VAE of `cfg` (default: tiny f16)."""
    return VAE(cfg or VAEConfig())


def config_dict(cfg: VAEConfig) -> dict:
    """JSON-ready form of `cfg` (what a saved version stores under "model")."""
    d = asdict(cfg)
    d["widths"] = list(d["widths"])
    return d


def load_vae(path: str | Path, device: str | torch.device = "cpu") -> VAE:
    """The VAE saved in a version folder (models/vae/vNNNN), scale included, in eval mode."""
    from .trainer import load_weights

    states, config, _ = load_weights(path)
    model_cfg = config.get("job", config).get("model", config)  # the trainer nests the job's config
    cfg = VAEConfig(**{k: (tuple(v) if k == "widths" else v) for k, v in model_cfg.items()
                       if k in VAEConfig.__dataclass_fields__})
    vae = build(cfg)
    vae.load_state_dict(states[MODEL_NAME])
    return vae.to(device).eval()

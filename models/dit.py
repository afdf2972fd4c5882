"""The diffusion transformer: one stream of text, source and image tokens, rectified flow.

    model = build(DiTConfig(size="tiny"))
    loss = flow_matching_loss(model, x0, text, text_mask)               # training
    z = sample(model, text, text_mask, (B, 16, 4, 4), steps=40, cfg_scale=4.0)  # generation
    model = load_dit("ws/models/dit/v0002")                             # a saved version

Single stream: the frozen text encoder's token states (projected to the model width),
the clean source latent's patches (edits only) and the noisy latent's patches are
concatenated into ONE sequence, and every block runs joint self-attention over all of it;
padding text tokens are masked out as keys. Pre-norm blocks with RMSNorm, query/key
RMSNorm, 2-D RoPE on latent tokens, and a feed-forward of SwiGLU (default) or GELU.

Conditioning on the timestep is adaLN-single (PixArt-alpha): one MLP maps the timestep
embedding to a set of global modulation vectors, and each block adds its own learned
offset table to them, instead of every block owning an adaLN MLP. Two modulations:

- "scale" (default, the report's design): h = norm(x) * (1 + scale), and the branch
  output enters the residual through tanh(gate). No shift anywhere in the token path:
  no modulation shift, RMSNorm has no bias, and the block linears have no bias, so a
  block maps an all-zero stream to zero for every timestep (tests/test_dit.py).
- "shift_scale" (the baseline of benchmarks/dit.py): classic DiT adaLN,
  h = norm(x) * (1 + scale) + shift, linear gates, biases in the block linears.

Everything that conditions starts at zero as in adaLN-Zero (the modulation MLP's last
layer, the per-block offsets, the output layer), so at step 0 every block is the
identity and the prediction is 0: training starts stable at any depth.

Objective (rectified flow): x_t = (1 - t) x0 + t * noise, t ~ logit-normal(0, 1); the
model predicts the velocity v = noise - x0. Sampling integrates dx/dt = v with Euler
steps from t = 1 (noise) to t = 0. Classifier-free guidance: captions are dropped to a
learned null text with probability cond_drop in training; `velocity` mixes the
conditional and null predictions.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DIT_SIZES", "DiTConfig", "DiT", "build", "load_dit", "config_dict", "n_params",
    "flow_matching_loss", "velocity", "timesteps", "sample", "activation_peaks", "ActivationPeaks",
    "MODEL_NAME",
]

MODEL_NAME = "dit"

# Named sizes. head_dim = dim / heads must divide by 4 (2-D RoPE rotates pairs on 2 axes).
DIT_SIZES: dict[str, dict] = {
    "nano": dict(depth=2, dim=64, heads=2),       # tests
    "tiny": dict(depth=6, dim=192, heads=3),      # 2-core demo (~3.0 M parameters)
    "S": dict(depth=12, dim=384, heads=6),        # one GPU (~22 M)
    "B": dict(depth=12, dim=768, heads=12),       # (~89 M)
}


@dataclass
class DiTConfig:
    """One DiT architecture; depth, dim and heads come from `size` unless given."""

    size: str = "tiny"
    latent_channels: int = 16
    patch: int = 1  # latent pixels per token side (the f16 VAE already compresses 16x)
    text_dim: int = 384  # width of the frozen text encoder's states (MiniLM: 384)
    # Text tokens the DiT reads (the frozen tokenizer's, CLS and SEP included): 104 covers 95%
    # of rich scene-world captions (p95 95-97 across draws), the enhancer's targets (benchmarks/text_lengths.py).
    max_text_len: int = 104
    ffn: str = "swiglu"  # | "gelu" (4x MLP, the baseline)
    modulation: str = "scale"  # | "shift_scale" (the baseline)
    qk_norm: bool = True
    cond_drop: float = 0.1  # caption dropout probability in flow_matching_loss
    rope_theta: float = 10000.0
    depth: int | None = None
    dim: int | None = None
    heads: int | None = None

    def __post_init__(self) -> None:
        if self.size not in DIT_SIZES:
            raise ValueError(f"unknown DiT size {self.size!r}; expected one of {sorted(DIT_SIZES)}")
        for k, v in DIT_SIZES[self.size].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.ffn not in ("swiglu", "gelu"):
            raise ValueError(f"ffn must be 'swiglu' or 'gelu', got {self.ffn!r}")
        if self.modulation not in ("scale", "shift_scale"):
            raise ValueError(f"modulation must be 'scale' or 'shift_scale', got {self.modulation!r}")
        if self.dim % self.heads or (self.dim // self.heads) % 4:
            raise ValueError(f"dim {self.dim} / heads {self.heads} must give a head_dim divisible by 4")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ValueError(f"cond_drop must be in [0, 1), got {self.cond_drop}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def ffn_hidden(self) -> int:
        # SwiGLU at 8/3 * dim (rounded to 8) has the parameters of a 4x GELU MLP.
        return 4 * self.dim if self.ffn == "gelu" else 8 * round(8 * self.dim / 3 / 8)

    @property
    def block_vectors(self) -> int:
        """Modulation vectors per block: (scale, gate) x (attn, ffn) [+ a shift each]."""
        return 4 if self.modulation == "scale" else 6

    @property
    def final_vectors(self) -> int:
        return 1 if self.modulation == "scale" else 2


# ---------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x), times a learned gain when `affine`. No bias, ever."""

    def __init__(self, dim: int, affine: bool = True, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).to(x.dtype)
        return x * self.weight if self.weight is not None else x


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) t in [0, 1] -> (B, dim) sinusoidal features of 1000 * t."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# 2-D RoPE. The head vector is split in two halves, one per axis (rows, columns); each
# half is rotated rotate-half style by angles position * theta^(-2i/d_half).
#
# Latent tokens sit on a grid centred on 0 (row and column offsets from the image centre),
# and source tokens share their target pixel's position, so "same place in the source"
# is relative offset 0 for an edit. Text tokens get NO rotation, i.e. they sit at the
# origin = the image centre. Why not a 1-D text RoPE: the frozen text encoder already
# wrote word order into its states, and rotating text on the image axes would tie word i
# to image row/column i (a bias toward the top-left for the first words); at the centre,
# text-image attention carries only a symmetric "distance from centre" bias, the same at
# every resolution of the curriculum.


def rope_angles(rows: int, cols: int, head_dim: int, theta: float, device=None) -> torch.Tensor:
    """(rows*cols, head_dim // 2) rotation angles of a centred grid, row axis first."""
    d_axis = head_dim // 2
    freqs = theta ** (-torch.arange(0, d_axis, 2, device=device, dtype=torch.float32) / d_axis)  # (d_axis/2,)
    y = torch.arange(rows, device=device, dtype=torch.float32) - (rows - 1) / 2
    x = torch.arange(cols, device=device, dtype=torch.float32) - (cols - 1) / 2
    yy, xx = torch.meshgrid(y, x, indexing="ij")  # (rows, cols) each
    return torch.cat([yy.reshape(-1, 1) * freqs, xx.reshape(-1, 1) * freqs], dim=-1)  # (N, d_axis)


def rope_cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, head_dim/2) angles -> cos, sin (S, head_dim), laid out for `apply_rope`."""
    a = angles.unflatten(-1, (2, -1))  # (S, axis, d/4)
    a = torch.cat([a, a], dim=-1).flatten(-2)  # (S, head_dim): each axis' angles for both halves
    return a.cos(), a.sin()


def apply_rope(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate q (..., S, head_dim) by the per-token angles (S, head_dim); zero angle = identity."""
    q4 = q.unflatten(-1, (2, 2, -1))  # (..., S, axis, half, d/4)
    rot = torch.stack((-q4[..., 1, :], q4[..., 0, :]), dim=-2).flatten(-3)  # (..., S, head_dim)
    return q * cos + rot * sin


class Attention(nn.Module):
    """Joint multi-head self-attention with q/k RMSNorm and RoPE."""

    def __init__(self, cfg: DiTConfig, bias: bool):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=bias)
        self.q_norm = RMSNorm(cfg.head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim) if cfg.qk_norm else nn.Identity()
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, S, hd)
        q = apply_rope(self.q_norm(q), cos, sin)  # (B, H, S, hd)
        k = apply_rope(self.k_norm(k), cos, sin)  # (B, H, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, S, hd); mask (B, 1, 1, S)
        return self.out(y.transpose(1, 2).reshape(B, S, D))  # (B, S, D)


class FeedForward(nn.Module):
    """SwiGLU (silu(a) * b, hidden ~8/3 dim) or GELU MLP (4x). `hidden` is exposed so the
    activation probe can read the FFN's inner activations."""

    def __init__(self, cfg: DiTConfig, bias: bool):
        super().__init__()
        self.kind = cfg.ffn
        width = 2 * cfg.ffn_hidden if cfg.ffn == "swiglu" else cfg.ffn_hidden
        self.up = nn.Linear(cfg.dim, width, bias=bias)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=bias)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            a, b = self.up(x).chunk(2, dim=-1)  # (B, S, hidden) each
            return F.silu(a) * b
        return F.gelu(self.up(x), approximate="tanh")  # (B, S, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.hidden(x))


# ---------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm joint-attention block modulated by global vectors + its own offset table.

    scale:       x += tanh(g_a) * Attn(n(x) * (1 + s_a));  x += tanh(g_f) * FFN(n(x) * (1 + s_f))
    shift_scale: x += g_a * Attn(n(x) * (1 + s_a) + b_a);  x += g_f * FFN(n(x) * (1 + s_f) + b_f)
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.shift = cfg.modulation == "shift_scale"
        self.norm1 = RMSNorm(cfg.dim, affine=False)  # the modulation's (1 + scale) is the gain
        self.attn = Attention(cfg, bias=self.shift)
        self.norm2 = RMSNorm(cfg.dim, affine=False)
        self.ffn = FeedForward(cfg, bias=self.shift)
        # adaLN-single: this block's learned offsets to the global modulation vectors.
        self.mod_offset = nn.Parameter(torch.zeros(cfg.block_vectors, cfg.dim))
        self.probe = None  # set by activation_peaks: called with (residual, ffn hidden, valid)

    def modulation(self, mod: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, block_vectors, D) global vectors -> this block's named (B, 1, D) vectors."""
        names = ("scale_a", "gate_a", "scale_f", "gate_f") + (("shift_a", "shift_f") if self.shift else ())
        m = (mod + self.mod_offset).unsqueeze(2)  # (B, V, 1, D)
        return {n: m[:, i] for i, n in enumerate(names)}

    def modulate(self, x_norm: torch.Tensor, m: dict, which: str) -> torch.Tensor:
        """norm(x) * (1 + scale) [+ shift in the baseline]."""
        h = x_norm * (1 + m[f"scale_{which}"])
        return h + m[f"shift_{which}"] if self.shift else h

    def gate(self, m: dict, which: str) -> torch.Tensor:
        g = m[f"gate_{which}"]
        return g if self.shift else torch.tanh(g)

    def forward(self, x: torch.Tensor, mod: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, valid: torch.Tensor | None = None) -> torch.Tensor:
        m = self.modulation(mod)
        h = self.modulate(self.norm1(x), m, "a")  # (B, S, D)
        x = x + self.gate(m, "a") * self.attn(h, cos, sin, mask)  # (B, S, D)
        h = self.ffn.hidden(self.modulate(self.norm2(x), m, "f"))  # (B, S, ffn_hidden)
        x = x + self.gate(m, "f") * self.ffn.down(h)  # (B, S, D)
        if self.probe is not None:
            self.probe(x, h, valid)
        return x


class FinalLayer(nn.Module):
    """norm, scale (+ shift) modulation, linear to patch*patch*C per image token."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.shift = cfg.modulation == "shift_scale"
        self.norm = RMSNorm(cfg.dim, affine=False)
        self.mod_offset = nn.Parameter(torch.zeros(cfg.final_vectors, cfg.dim))
        self.linear = nn.Linear(cfg.dim, cfg.patch * cfg.patch * cfg.latent_channels)

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        m = (mod + self.mod_offset).unsqueeze(2)  # (B, V, 1, D)
        h = self.norm(x) * (1 + m[:, 0])  # (B, N, D)
        if self.shift:
            h = h + m[:, 1]  # (B, N, D)
        return self.linear(h)  # (B, N, p*p*C)


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Single-stream DiT: velocity of a latent given t, text tokens and an optional source."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D, p, C = cfg.dim, cfg.patch, cfg.latent_channels
        # Token embedders: input embeddings, the same in both modulations (biases kept:
        # they embed, they do not modulate), so the benchmark compares the blocks only.
        self.patch_embed = nn.Linear(C * p * p, D)
        self.text_norm = RMSNorm(cfg.text_dim)  # frozen encoder states have their own scale
        self.text_proj = nn.Linear(cfg.text_dim, D)
        # Tells clean source tokens from noisy target tokens at the same RoPE position.
        self.source_embed = nn.Parameter(torch.zeros(D))
        # The null caption: one learned token (the rest of any length is masked padding),
        # so the unconditional branch is the same whatever the text length.
        self.null_token = nn.Parameter(torch.randn(cfg.text_dim))
        # Timestep -> embedding -> ALL modulation vectors (adaLN-single).
        self.t_embed = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.t_mod = nn.Sequential(nn.SiLU(), nn.Linear(D, (cfg.block_vectors + cfg.final_vectors) * D))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg)
        self._init()

    def _init(self) -> None:
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
        nn.init.normal_(self.t_embed[0].weight, std=0.02)
        nn.init.normal_(self.t_embed[2].weight, std=0.02)
        # adaLN-Zero: scales, shifts and gates start at 0 (blocks = identity), output = 0.
        nn.init.zeros_(self.t_mod[1].weight)
        nn.init.zeros_(self.t_mod[1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    # Tokens ---------------------------------------------------------------------------

    def patchify(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h/p * w/p, C*p*p), row-major patches."""
        B, C, h, w = z.shape
        p = self.cfg.patch
        if h % p or w % p:
            raise ValueError(f"latent size {(h, w)} is not a multiple of the patch {p}")
        z = z.reshape(B, C, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h/p, w/p, C, p, p)
        return z.reshape(B, (h // p) * (w // p), C * p * p)

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, N, C*p*p) -> (B, C, h, w)."""
        B, p, C = tokens.shape[0], self.cfg.patch, self.cfg.latent_channels
        z = tokens.reshape(B, h // p, w // p, C, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/p, p, w/p, p)
        return z.reshape(B, C, h, w)

    def null_text(self, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned "no caption" (B, length, text_dim) and its mask (B, length): token 0
        is real, the rest is masked padding."""
        length = max(1, length)
        text = torch.zeros(batch, length, self.cfg.text_dim, device=self.null_token.device,
                           dtype=self.null_token.dtype)
        text[:, 0] = self.null_token
        mask = torch.zeros(batch, length, dtype=torch.bool, device=self.null_token.device)
        mask[:, 0] = True
        return text, mask

    # Forward --------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                source: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity (B, C, h, w) of the noisy latent x at time t (B,) given text tokens
        (B, L, text_dim) with mask (B, L) and, for edits, the clean source latent."""
        cfg = self.cfg
        B, C, h, w = x.shape
        L, p = text.shape[1], cfg.patch
        img = self.patch_embed(self.patchify(x))  # (B, N, D), N = h*w / p^2
        N = img.shape[1]
        txt = self.text_proj(self.text_norm(text))  # (B, L, D)
        parts, valid = [txt], [text_mask.bool()]  # valid: (B, L)
        if source is not None:
            if source.shape != x.shape:
                raise ValueError(f"source latent {tuple(source.shape)} must match x {tuple(x.shape)}")
            parts.append(self.patch_embed(self.patchify(source)) + self.source_embed)  # (B, N, D)
            valid.append(torch.ones(B, N, dtype=torch.bool, device=x.device))
        parts.append(img)
        valid.append(torch.ones(B, N, dtype=torch.bool, device=x.device))
        seq = torch.cat(parts, dim=1)  # (B, S, D), S = L [+ N] + N
        valid = torch.cat(valid, dim=1)  # (B, S)
        mask = valid[:, None, None, :]  # (B, 1, 1, S): padding text tokens are never keys

        grid = rope_angles(h // p, w // p, cfg.head_dim, cfg.rope_theta, x.device)  # (N, hd/2)
        angles = torch.cat([grid.new_zeros(L, grid.shape[1])] + [grid] * (len(parts) - 1))  # (S, hd/2)
        cos, sin = rope_cos_sin(angles)  # (S, hd) each

        temb = self.t_embed(timestep_embedding(t.to(x.dtype).expand(B)).to(x.dtype))  # (B, D)
        mod = self.t_mod(temb).view(B, -1, cfg.dim)  # (B, block_vectors + final_vectors, D)
        block_mod, final_mod = mod[:, :cfg.block_vectors], mod[:, cfg.block_vectors:]

        for block in self.blocks:
            seq = block(seq, block_mod, cos, sin, mask, valid)  # (B, S, D)
        out = self.final(seq[:, -N:], final_mod)  # (B, N, p*p*C): image tokens only
        return self.unpatchify(out, h, w)  # (B, C, h, w)


# ---------------------------------------------------------------------------------------
# Massive-activation probe
# ---------------------------------------------------------------------------------------


@dataclass
class ActivationPeaks:
    """Per block, over every forward inside `activation_peaks`: the max |x| of the residual
    stream after the block, the median |x| (of the last forward), the channel holding the
    max, and the max |h| of the FFN's hidden activations. Padding tokens are ignored."""

    residual_max: list[float] = field(default_factory=list)
    residual_median: list[float] = field(default_factory=list)
    residual_channel: list[int] = field(default_factory=list)
    ffn_max: list[float] = field(default_factory=list)

    def ratios(self) -> list[float]:
        """Peak / median per block: the "massive activation" factor."""
        return [m / max(d, 1e-12) for m, d in zip(self.residual_max, self.residual_median)]


@contextmanager
def activation_peaks(model: DiT) -> Iterator[ActivationPeaks]:
    """`with activation_peaks(model) as peaks: model(...)` fills `peaks` per block."""
    depth = len(model.blocks)
    peaks = ActivationPeaks([0.0] * depth, [0.0] * depth, [-1] * depth, [0.0] * depth)

    def probe_for(i: int):
        @torch.no_grad()
        def probe(x: torch.Tensor, h: torch.Tensor, valid: torch.Tensor | None) -> None:
            if valid is not None:
                x, h = x[valid], h[valid]  # (tokens, D), (tokens, hidden)
            ax = x.detach().abs().float()
            top = float(ax.max())
            if top >= peaks.residual_max[i]:
                peaks.residual_max[i] = top
                peaks.residual_channel[i] = int(ax.amax(dim=0).argmax())
            peaks.residual_median[i] = float(ax.median())
            peaks.ffn_max[i] = max(peaks.ffn_max[i], float(h.detach().abs().max()))
        return probe

    for i, block in enumerate(model.blocks):
        block.probe = probe_for(i)
    try:
        yield peaks
    finally:
        for block in model.blocks:
            block.probe = None


# ---------------------------------------------------------------------------------------
# Rectified flow: loss, guided velocity, sampler
# ---------------------------------------------------------------------------------------


def drop_captions(model: DiT, text: torch.Tensor, text_mask: torch.Tensor,
                  p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each sample's text by the null text with probability p (torch's RNG)."""
    if p <= 0:
        return text, text_mask
    B, L = text_mask.shape
    drop = torch.rand(B, device=text.device) < p  # (B,)
    null, null_mask = model.null_text(B, L)
    text = torch.where(drop[:, None, None], null.to(text.dtype), text)  # (B, L, text_dim)
    return text, torch.where(drop[:, None], null_mask, text_mask.bool())  # (B, L)


def flow_matching_loss(model: DiT, x0: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                       source: torch.Tensor | None = None, cond_drop: float | None = None) -> torch.Tensor:
    """Rectified-flow MSE: x_t = (1-t) x0 + t noise with logit-normal t, target noise - x0;
    captions dropped to the null text with prob cond_drop (default model.cfg.cond_drop)."""
    B = x0.shape[0]
    t = torch.sigmoid(torch.randn(B, device=x0.device))  # (B,) logit-normal(0, 1)
    noise = torch.randn_like(x0)  # (B, C, h, w)
    tt = t.view(B, 1, 1, 1).to(x0.dtype)
    x_t = (1 - tt) * x0 + tt * noise  # (B, C, h, w)
    p = model.cfg.cond_drop if cond_drop is None else cond_drop
    text, text_mask = drop_captions(model, text, text_mask, p)
    v = model(x_t, t, text, text_mask, source)  # (B, C, h, w)
    return F.mse_loss(v.float(), (noise - x0).float())


def velocity(model: DiT, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
             source: torch.Tensor | None = None, cfg_scale: float = 1.0) -> torch.Tensor:
    """The (guided) velocity. cfg_scale == 1: one conditional forward; otherwise one
    forward over [cond; null] stacked on the batch, uncond + s * (cond - uncond)."""
    B = x.shape[0]
    t = t.expand(B) if t.ndim else t.reshape(1).expand(B)
    if cfg_scale == 1.0:
        return model(x, t, text, text_mask, source)
    null, null_mask = model.null_text(B, text.shape[1])
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, null.to(text.dtype)]),
                 torch.cat([text_mask.bool(), null_mask]),
                 None if source is None else torch.cat([source, source]))  # (2B, C, h, w)
    cond, uncond = both.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    """(steps+1,) times from 1.0 down to 0.0; shift > 1 spends more steps at high noise
    (t' = shift t / (1 + (shift - 1) t), as in SD3)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def sample(model: DiT, text: torch.Tensor, text_mask: torch.Tensor, shape: tuple[int, ...], steps: int = 40,
           cfg_scale: float = 4.0, source: torch.Tensor | None = None, noise: torch.Tensor | None = None,
           shift: float = 1.0) -> torch.Tensor:
    """Euler ODE from t=1 (`noise`, or fresh Gaussian noise) to t=0 -> latents of `shape`."""
    device = next(model.parameters()).device
    x = noise.to(device).clone() if noise is not None else torch.randn(shape, device=device)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"noise shape {tuple(x.shape)} differs from shape {tuple(shape)}")
    ts = timesteps(steps, shift).to(device)
    for i in range(steps):
        v = velocity(model, x, ts[i].expand(x.shape[0]), text, text_mask, source, cfg_scale)  # (B, C, h, w)
        x = x + (ts[i + 1] - ts[i]) * v  # dt < 0: toward the data
    return x


# ---------------------------------------------------------------------------------------
# Sizes, building, loading
# ---------------------------------------------------------------------------------------


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(cfg: DiTConfig | None = None) -> DiT:
    """A fresh DiT of `cfg` (default: tiny, SwiGLU, scale-only)."""
    return DiT(cfg or DiTConfig())


def config_dict(cfg: DiTConfig) -> dict:
    """JSON-ready form of `cfg` (what a saved version stores under "model")."""
    return asdict(cfg)


def load_dit(path: str | Path, device: str | torch.device = "cpu") -> DiT:
    """The DiT saved in a version folder (models/dit/vNNNN), in eval mode."""
    from .trainer import load_weights

    states, config, _ = load_weights(path)
    job = config.get("job", config)  # versions saved by the trainer nest the job's config
    model_cfg = job.get("model", job)
    cfg = DiTConfig(**{k: v for k, v in model_cfg.items() if k in DiTConfig.__dataclass_fields__})
    model = build(cfg)
    model.load_state_dict(states[MODEL_NAME])
    return model.to(device).eval()

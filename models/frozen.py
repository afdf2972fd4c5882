"""The frozen encoders the model stack conditions on: the workspace's open_clip model.

The DiT reads the text tower's token states (the report conditions on a frozen
vision-language model; ours is the embedding issue's CLIP, MiniLM text side), the VAE's
alignment and perceptual losses read the image trunk's feature maps, and the reward
heads read both towers' joint-space embeddings. One loaded CLIP serves all of them, and
it never trains here.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from .clip import DEFAULT_ARCH, ClipBundle, load_clip

__all__ = ["Frozen", "workspace_clip_spec"]


def workspace_clip_spec(workspace_root: str | Path | None) -> str:
    """The workspace's promoted CLIP folder when it has one, else the packaged default
    architecture (pretrained trunks, no download)."""
    if workspace_root is None:
        return DEFAULT_ARCH
    from dataengine.embed import resolve_model
    from dataengine.workspace import Workspace

    try:
        return resolve_model(Workspace.at(workspace_root), "default")
    except FileNotFoundError:
        return DEFAULT_ARCH


class Frozen:
    """No-grad views of one CLIP: text tokens, joint-space embeddings, trunk features."""

    def __init__(self, bundle: ClipBundle, spec: str):
        self.bundle, self.spec = bundle, spec
        self.model = bundle.model.eval().requires_grad_(False)
        self.device = torch.device(bundle.device)
        text = getattr(self.model, "text", None)
        if not hasattr(text, "transformer"):
            raise ValueError(f"CLIP {spec!r}: text tokens need an HF text tower (the default has one); "
                             f"{type(text).__name__} has none")
        self.text_dim = int(text.config.hidden_size)
        self.embed_dim = int(bundle.embed_dim)
        trunk = self.model.visual.trunk
        if not hasattr(trunk, "forward_intermediates"):
            raise ValueError(f"CLIP {spec!r}: image features need a timm trunk with forward_intermediates")
        with torch.no_grad():
            probe = trunk.forward_intermediates(torch.zeros(1, 3, 64, 64, device=self.device), intermediates_only=True)
        self._strides = [64 // f.shape[-1] for f in probe]
        self._channels = [f.shape[1] for f in probe]
        self.feature_dim = self._channels[self._stage_for(16)]

    @classmethod
    def load(cls, spec: str = DEFAULT_ARCH, device: str = "cpu") -> "Frozen":
        """Load by any `load_clip` spec (cached per process: several models share it)."""
        return _load(str(spec), str(device))

    def _stage_for(self, stride: int) -> int:
        if stride not in self._strides:
            raise ValueError(f"no trunk stage at stride {stride}; strides are {self._strides}")
        return self._strides.index(stride)

    # Text -----------------------------------------------------------------------------

    @torch.no_grad()
    def text_tokens(self, texts: list[str], max_len: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, text_dim) last hidden states and the (B, L) mask of real tokens, L <= max_len."""
        tokens = self.bundle.tokenizer(list(texts))[:, :max_len].to(self.device)  # (B, L) padded ids
        pad = self.model.text.config.pad_token_id
        mask = tokens != pad  # (B, L)
        width = int(mask.sum(1).max().clamp(min=1))
        tokens, mask = tokens[:, :width], mask[:, :width]
        hidden = self.model.text.transformer(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        return hidden.float(), mask

    @torch.no_grad()
    def text_embed(self, texts: list[str]) -> torch.Tensor:
        """(B, embed_dim) L2-normalised joint-space text embeddings."""
        return torch.from_numpy(self.bundle.encode_texts(list(texts))).to(self.device)

    # Images ---------------------------------------------------------------------------

    def _normalise(self, images: torch.Tensor, size: int | None) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected float images (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        if size is not None and x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.bundle.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.bundle.std, device=self.device).view(1, 3, 1, 1)
        return ((x + 1) / 2 - mean) / std  # [-1, 1] -> the model's own normalisation

    @torch.no_grad()
    def image_embed(self, images: torch.Tensor) -> torch.Tensor:
        """Float images (B, 3, H, W) in [-1, 1] -> (B, embed_dim) L2-normalised, at the model's size."""
        x = self._normalise(images, self.bundle.image_size)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, stride: int = 16) -> torch.Tensor:
        """(B, feature_dim, H/stride, W/stride) trunk features at `stride` (input at its own size)."""
        stage = self._stage_for(stride)
        feats = self.model.visual.trunk.forward_intermediates(
            self._normalise(images, None), indices=[stage], intermediates_only=True)
        return feats[0].float()

    def patch_dim(self, strides: tuple[int, ...] = (8, 16)) -> int:
        """Channels of `patch_tokens` built from the trunk stages at `strides`, plus mean RGB."""
        return sum(self._channels[self._stage_for(s)] for s in strides) + 3

    @torch.no_grad()
    def patch_tokens(self, images: torch.Tensor, size: int = 128, strides: tuple[int, ...] = (8, 16),
                     grid: int = 8) -> torch.Tensor:
        """(B, (size/grid)^2, patch_dim(strides)) spatial tokens of images resized to `size`:
        the trunk's maps at `strides` on one grid of stride `grid` (finer maps average-pooled
        to it, coarser ones repeated), and each cell's mean colour, row-major.

        Pooled embeddings average an object's colour and shape into the whole scene; these
        keep where each thing is, so a head can match a prompt's words to image regions.
        The mean colour is there because ImageNet trunks are partly colour-invariant; the
        coarser maps are there because a small object's shape shows only at a depth whose
        receptive field covers it."""
        if size % grid or grid not in self._strides:
            raise ValueError(f"patch grid stride must be a trunk stride {self._strides} dividing size {size}, got {grid}")
        x = images.to(self.device, torch.float32)
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        maps = self.model.visual.trunk.forward_intermediates(
            self._normalise(x, None), indices=[self._stage_for(s) for s in strides], intermediates_only=True)
        cells = (size // grid, size // grid)
        on_grid = [F.adaptive_avg_pool2d(m.float(), cells) if s < grid else
                   F.interpolate(m.float(), size=cells, mode="nearest") if s > grid else m.float()
                   for s, m in zip(strides, maps)]
        maps = torch.cat([*on_grid, F.adaptive_avg_pool2d(x, cells)], 1)
        return maps.flatten(2).transpose(1, 2)  # (B, N, C)

    def perceptual_features(self, images: torch.Tensor, strides: tuple[int, ...] = (2, 4, 8)) -> list[torch.Tensor]:
        """The trunk's feature maps at `strides`, differentiable in `images` (the weights stay
        frozen): the layers of an LPIPS-style perceptual distance."""
        stages = [self._stage_for(s) for s in strides]
        return self.model.visual.trunk.forward_intermediates(
            self._normalise(images, None), indices=stages, intermediates_only=True)


@lru_cache(maxsize=4)
def _load(spec: str, device: str) -> Frozen:
    return Frozen(load_clip(spec, device=device), spec)

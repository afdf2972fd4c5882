"""Reward models: one interface, and the embedded default of five small heads.

    heads = load("ws/models/reward/v0001")                   # EmbeddedRewards, heads + frozen CLIP
    scores = heads.score(RewardBatch(images, captions))      # {"aesthetics", "fidelity", "portrait"}: (B,)
    scores = heads.score(RewardBatch(images, captions, sources, instructions))  # + "instruction", "consistency"

Anything with `score(batch: RewardBatch) -> dict[str, Tensor (B,)]` is a `RewardModel`,
so a real reward model plugs in where the embedded one is used. Wrap it in a class
whose `score` returns the keys it knows, and combine it with the embedded heads so that
its keys win:

    class LaionAesthetics:                                  # e.g. an MLP on a big CLIP
        def score(self, batch):
            return {"aesthetics": my_predictor(batch.images)}   # (B,) tensor
    reward = Combined(load(path), LaionAesthetics())       # its "aesthetics" replaces the head's

The embedded heads are MLPs on FROZEN joint-space embeddings of the workspace's CLIP
(`models.frozen.Frozen`: `image_embed`, `text_embed`); only the heads train
(models/train_reward.py). Generation heads (aesthetics, prompt fidelity, portrait
quality) score every batch; editing heads (instruction following, consistency with
the source) only batches that carry sources and instructions. Scores are
Bradley-Terry logits: only differences mean something, and a difference of 1 is odds
of e:1 that the higher one is preferred.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GEN_HEADS", "EDIT_HEADS", "HEADS", "HEAD_INPUTS", "RewardBatch", "RewardModel", "RewardConfig",
    "EmbeddedRewards", "Combined", "load", "bradley_terry", "head_inputs", "MODEL_NAME",
]

MODEL_NAME = "reward"  # models/<name>/vNNNN, as the trainer saves it
GEN_HEADS = ("aesthetics", "fidelity", "portrait")
EDIT_HEADS = ("instruction", "consistency")
HEADS = GEN_HEADS + EDIT_HEADS
# The embeddings each head reads. "image" is the scored image (an edit's result), "text"
# its caption, "source" the edit's input image, "instruction" the edit's text.
HEAD_INPUTS: dict[str, tuple[str, ...]] = {
    "aesthetics": ("image",),
    "fidelity": ("image", "text"),
    "portrait": ("image",),
    "instruction": ("source", "image", "instruction"),
    "consistency": ("source", "image", "instruction"),
}


# ---------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------


@dataclass
class RewardBatch:
    """What a reward model scores: generated images and their prompts, plus, for edits, the
    source images and the instructions."""

    images: torch.Tensor  # (B, 3, H, W) float in [-1, 1]
    captions: list[str]  # the prompt of each image
    sources: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1]: the images that were edited
    instructions: list[str] | None = None  # the edit instructions

    def __post_init__(self) -> None:
        b = self.images.shape[0]
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(self.images.shape)}")
        if len(self.captions) != b:
            raise ValueError(f"{b} images but {len(self.captions)} captions")
        if (self.sources is None) != (self.instructions is None):
            raise ValueError("an editing batch needs both sources and instructions")
        if self.sources is not None and (self.sources.shape[0] != b or len(self.instructions) != b):
            raise ValueError(f"{b} images but {self.sources.shape[0]} sources / {len(self.instructions)} instructions")

    @property
    def prompts(self) -> list[str]:
        return self.captions

    @property
    def is_edit(self) -> bool:
        return self.sources is not None


@runtime_checkable
class RewardModel(Protocol):
    """Anything that scores a batch: per-sample scores (B,) by name, higher is better."""

    def score(self, batch: RewardBatch) -> dict[str, torch.Tensor]: ...


class Combined:
    """Several reward models as one: their score dicts merged, later models' keys winning."""

    def __init__(self, *models: RewardModel):
        self.models = models

    def score(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for m in self.models:
            out |= m.score(batch)
        return out


# ---------------------------------------------------------------------------------------
# The embedded default: five MLP heads on frozen CLIP embeddings
# ---------------------------------------------------------------------------------------


@dataclass
class RewardConfig:
    """The heads' architecture and the frozen CLIP they read (a `Frozen.load` spec)."""

    clip: str = "dataengine-clip-lite0"
    embed_dim: int = 512  # the CLIP's joint-space width
    hidden: int = 256
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.embed_dim < 1 or self.hidden < 1:
            raise ValueError(f"embed_dim and hidden must be >= 1, got {self.embed_dim}, {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def head_inputs(name: str, emb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What head `name` reads from the embeddings by role: the vector it judges and the text
    that conditions it (None for the unconditioned heads). Edits are judged by their change
    in embedding space, image - source."""
    if name in ("aesthetics", "portrait"):
        return emb["image"], None
    if name == "fidelity":
        return emb["image"], emb["text"]
    if name in ("instruction", "consistency"):
        return emb["image"] - emb["source"], emb["instruction"]
    raise KeyError(f"unknown reward head {name!r}; expected one of {HEADS}")


class _Head(nn.Module):
    """score(u, c) = MLP([A u * B c, A u, B c]), or MLP(A u) without a condition.

    The product is a learned low-rank bilinear match between the two towers: a fresh
    CLIP's projections are not aligned yet, and an MLP over the bare concatenation learns
    products slowly.
    """

    def __init__(self, d: int, hidden: int, dropout: float, conditioned: bool):
        super().__init__()
        self.scale = d ** 0.5  # unit-norm inputs -> entries of order 1
        self.a = nn.Linear(d, hidden)
        self.b = nn.Linear(d, hidden) if conditioned else None
        width = 3 * hidden if conditioned else hidden
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, 1))

    def forward(self, u: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        a = self.a(u * self.scale)  # (B, h)
        if self.b is None:
            return self.mlp(a).squeeze(-1)  # (B,)
        b = self.b(c * self.scale)  # (B, h)
        return self.mlp(torch.cat([a * b, a, b], dim=-1)).squeeze(-1)  # (B,)


class EmbeddedRewards(nn.Module):
    """Five reward heads on a frozen CLIP; only the heads hold state (and train)."""

    def __init__(self, cfg: RewardConfig | None = None, frozen=None):
        super().__init__()
        self.cfg = cfg or RewardConfig()
        self._frozen = frozen  # models.frozen.Frozen; loaded on first use when None
        c = self.cfg
        self.heads = nn.ModuleDict({k: _Head(c.embed_dim, c.hidden, c.dropout, conditioned=k not in ("aesthetics", "portrait"))
                                    for k in HEADS})

    @property
    def frozen(self):
        if self._frozen is None:
            from .frozen import Frozen

            self._frozen = Frozen.load(self.cfg.clip)
        return self._frozen

    @torch.no_grad()
    def embed(self, batch: RewardBatch, batch_size: int = 64) -> dict[str, torch.Tensor]:
        """The frozen embeddings (B, D) a batch gives, by role (no source roles for generations)."""
        f = self.frozen

        def images(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([f.image_embed(x[i: i + batch_size].float()) for i in range(0, len(x), batch_size)])

        emb = {"image": images(batch.images), "text": f.text_embed(list(batch.captions))}
        if batch.is_edit:
            emb |= {"source": images(batch.sources), "instruction": f.text_embed(list(batch.instructions))}
        if emb["image"].shape[-1] != self.cfg.embed_dim:
            raise ValueError(f"CLIP {self.cfg.clip!r} gives {emb['image'].shape[-1]}-d embeddings; "
                             f"the heads read {self.cfg.embed_dim}")
        return emb

    def forward(self, emb: dict[str, torch.Tensor], heads: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """Scores (B,) of `heads` (default: every head whose inputs `emb` holds)."""
        dev = next(self.parameters()).device
        emb = {k: v.to(dev) for k, v in emb.items()}
        names = heads or tuple(k for k in HEADS if all(r in emb for r in HEAD_INPUTS[k]))
        return {k: self.heads[k](*head_inputs(k, emb)) for k in names}

    @torch.no_grad()
    def score(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
        """The three generation scores, plus the two editing scores when the batch has sources."""
        was = self.training
        self.eval()
        try:
            return self(self.embed(batch))
        finally:
            self.train(was)

    def save(self, models_root: str | Path, metrics: dict | None = None) -> Path:
        """Save as the next `reward` version under `models_root` (the trainer's layout)."""
        from .trainer import _save_version

        return _save_version(Path(models_root), MODEL_NAME, {"rewards": self},
                             {"job": {"model": asdict(self.cfg)}}, metrics or {})


def load(path: str | Path, frozen=None, device: str = "cpu") -> EmbeddedRewards:
    """The heads of a saved `reward` version (trainer layout), in eval mode, with the frozen
    CLIP its config names (or `frozen`, already loaded)."""
    from .trainer import load_weights

    states, config, _ = load_weights(path)
    model_cfg: dict[str, Any] = config.get("job", {}).get("model")
    if model_cfg is None or "rewards" not in states:
        raise ValueError(f"{path} is not a reward version: no job.model config or no `rewards` weights")
    cfg = RewardConfig(**model_cfg)
    if frozen is None:
        from .frozen import Frozen

        frozen = Frozen.load(cfg.clip, device=device)
    model = EmbeddedRewards(cfg, frozen)
    model.load_state_dict(states["rewards"])
    return model.to(device).eval()


def bradley_terry(r_win: torch.Tensor, r_lose: torch.Tensor) -> torch.Tensor:
    """Mean -log sigmoid(r_win - r_lose): the preference-pair loss."""
    return -F.logsigmoid(r_win - r_lose).mean()

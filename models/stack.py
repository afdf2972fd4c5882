"""One entry point per model of the stack: `train_model("vae", ws, {"factor": "8"}, loop)`.

Each model's training module exposes a config dataclass and a
`fn(workspace_root, cfg, loop, progress) -> record` function; this table names them so
the CLI (`dataengine train vae|dit|reward|distill|rl|enhancer-rl`), the demo flow and
retraining jobs all start a run the same way, with `key=value` overrides checked
against the config's fields.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import typing
from pathlib import Path
from typing import Any, Mapping

from .trainer import LoopConfig

__all__ = ["TRAINERS", "ConfigError", "config_for", "default_loop", "train_model", "parse_overrides"]

# name -> (module, config class, train function, what it trains)
TRAINERS: dict[str, tuple[str, str, str, str]] = {
    "vae": ("models.train_vae", "VAETrainConfig", "train_vae", "the f16 VAE (f8 with factor=8)"),
    "dit": ("models.train_dit", "DiTTrainConfig", "train_dit", "the single-stream DiT on the VAE's latents"),
    "reward": ("models.train_reward", "RewardTrainConfig", "train_reward", "the five reward heads"),
    "distill": ("models.distill", "DistillConfig", "distill", "a 4-step student of the DiT (DMD)"),
    "rl": ("models.rl", "RLConfig", "rl", "the DiT with Flow-GRPO on the reward heads"),
    "enhancer-rl": ("models.enhancer_rl", "EnhancerRLConfig", "train_enhancer_rl",
                    "enhancer phase two: renders of its prompts scored by the reward heads"),
}

# Each model's own loop defaults (steps, lr) for a short run on 2 CPU cores.
LOOP_DEFAULTS: dict[str, dict[str, Any]] = {
    "vae": {"steps": 300, "lr": 2e-3},
    "dit": {"steps": 300, "lr": 1e-3},
    "reward": {"steps": 3000, "lr": 1e-3},  # the spatial fidelity head: swaps 0.788 at 1500 steps, 0.813 at 3000 (benchmarks/rewards.py)
    "distill": {"steps": 100, "lr": 1e-4},
    "rl": {"steps": 40, "lr": 1e-4},  # benchmarks/rl.py: 1e-4 moves a tiny DiT (KL 0.006 after 40), 1e-5 barely
    "enhancer-rl": {"steps": 20, "lr": 1e-5},
}


def default_loop(name: str, **changes) -> LoopConfig:
    """The loop config for model `name`: its defaults, then `changes`."""
    return LoopConfig(**(LOOP_DEFAULTS.get(name, {}) | changes))


class ConfigError(ValueError):
    """An override names no field of the model's config, or its value does not parse."""


def _entry(name: str):
    if name not in TRAINERS:
        raise ConfigError(f"unknown model {name!r}; expected one of {sorted(TRAINERS)}")
    module, cls, fn, _ = TRAINERS[name]
    mod = importlib.import_module(module)
    return getattr(mod, cls), getattr(mod, fn)


def _coerce(cls, field: dataclasses.Field, text: str) -> Any:
    """Parse `text` as the type of `field` (annotations are strings under __future__)."""
    hint = typing.get_type_hints(cls).get(field.name, str)
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional and text.lower() in ("none", "null", ""):
        return None
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if base is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {text!r}")
    if base in (int, float, str):
        return base(text)
    value = json.loads(text)  # tuples, lists, dicts
    return tuple(value) if typing.get_origin(base) is tuple else value


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """["factor=8", "align=false"] -> {"factor": "8", "align": "false"}."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def config_for(name: str, overrides: Mapping[str, Any] | None = None):
    """The model's config dataclass with `overrides` (strings are parsed per field type)."""
    cls, _ = _entry(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise ConfigError(f"{name}: no config field {key!r}; fields are {sorted(fields)}")
        try:
            kwargs[key] = _coerce(cls, fields[key], value) if isinstance(value, str) else value
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{name}: {key}={value!r}: {e}") from e
    return cls(**kwargs)


def train_model(name: str, workspace_root: str | Path, overrides: Mapping[str, Any] | None = None,
                loop: LoopConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Train model `name` on the workspace and return its saved, registered version's record."""
    cfg = config_for(name, overrides)
    _, fn = _entry(name)
    return fn(workspace_root, cfg, loop or default_loop(name, progress=progress), progress=progress)

"""Typed configuration, built once at the edge from a TOML file plus command-line flags.

    [engine]            ray_address = "auto"      num_cpus = 2
    [ingest]            key_prefix = ""           use_ray = true
    [sceneworld]        seed = 0   n_train = 600  n_pool = 200   n_eval = 100

Unknown sections or keys are errors that name the key, so a typo never goes unnoticed.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataengine.ingest import IngestConfig


@dataclass(frozen=True)
class EngineSettings:
    ray_address: str | None = None  # None: a local Ray on loopback
    num_cpus: int | None = None  # for the local Ray; None: all cores
    lock_timeout_s: float = 120.0  # how long a catalog open waits out other writers


@dataclass(frozen=True)
class EngineConfig:
    engine: EngineSettings = field(default_factory=EngineSettings)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    # Keyword arguments for dataengine.sceneworld.SceneWorldConfig (kept as a dict so
    # that reading a config never imports the renderer).
    sceneworld: dict[str, Any] = field(default_factory=dict)


class ConfigError(ValueError):
    pass


def _build(cls, values: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    return cls(**values)


def load_config(path: str | Path | None = None, optional: bool = False,
                **overrides: dict[str, Any]) -> EngineConfig:
    """Read `path` and apply per-section overrides (None values ignored). A missing `path`
    is an error unless `optional` (the workspace's own dataengine.toml need not exist)."""
    data: dict[str, dict[str, Any]] = {}
    if path is not None and not Path(path).is_file() and not optional:
        raise ConfigError(f"{path}: no such config file")
    if path is not None and Path(path).is_file():
        try:
            data = tomllib.loads(Path(path).read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from e
    sections = {"engine", "ingest", "sceneworld"}
    unknown = sorted(set(data) - sections)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; known: {sorted(sections)}")
    for section, values in overrides.items():
        if section not in sections:
            raise ConfigError(f"unknown section {section!r}")
        data.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    where = str(path or "config")
    return EngineConfig(
        engine=_build(EngineSettings, data.get("engine", {}), f"{where} [engine]"),
        ingest=_build(IngestConfig, data.get("ingest", {}), f"{where} [ingest]"),
        sceneworld=dict(data.get("sceneworld", {})),
    )

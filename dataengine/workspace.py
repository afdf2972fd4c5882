"""A workspace is one folder: shards/, lake/, indexes/, models/ and catalog.duckdb."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "pool", "eval", "patches")


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, root: str | Path) -> "Workspace":
        return cls(Path(root).expanduser().resolve())

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def lake(self) -> Path:
        return self.root / "lake"

    @property
    def indexes(self) -> Path:
        return self.root / "indexes"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    @property
    def config_path(self) -> Path:
        return self.root / "dataengine.toml"

    def exists(self) -> bool:
        return self.catalog_path.exists()

    def create_dirs(self) -> None:
        """Make the folder layout (idempotent); the catalog is created by `Catalog.migrate`."""
        for d in (self.lake, self.indexes, self.models, *(self.shards / s for s in SPLITS)):
            d.mkdir(parents=True, exist_ok=True)

    def split_of(self, shard_url: str) -> str | None:
        """The split of a shard inside this workspace's shards/ folder (`shards/<split>/...`);
        None for a shard anywhere else, whatever its folders are called (a dataset's own
        `/data/shards/cc12m/0.tar` says nothing about splits)."""
        if "://" in shard_url and not shard_url.startswith("file://"):
            return None
        try:
            rel = Path(shard_url.removeprefix("file://")).resolve().relative_to(self.shards)
        except ValueError:
            return None
        return rel.parts[0] if len(rel.parts) > 1 else None

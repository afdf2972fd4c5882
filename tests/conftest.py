"""Shared fixtures: an offline environment, a fresh workspace, small hand-made samples."""

from __future__ import annotations

import atexit
import io
import os
import shutil
import tempfile

# Before anything imports Ray, Prefect or a hub client. The Prefect home is this run's
# own and goes when the run ends (each left ~6 MB of database behind before).
if "PREFECT_HOME" not in os.environ:
    _prefect_home = tempfile.mkdtemp(prefix="dataengine-prefect-")
    os.environ["PREFECT_HOME"] = _prefect_home
    atexit.register(shutil.rmtree, _prefect_home, ignore_errors=True)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from dataengine.runtime import apply_offline_defaults  # noqa: E402

apply_offline_defaults()

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from dataengine.catalog import Catalog  # noqa: E402
from dataengine.workspace import Workspace  # noqa: E402


def image_bytes(size=(32, 24), colour=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


def good_sample(key: str, caption: str | None = None, **meta) -> dict:
    w, h = 32, 24
    return {
        "__key__": key,
        "png": image_bytes((w, h)),
        "txt": caption or f"a red rectangle, sample {key}",
        "json": {"width": w, "height": h, "source": "test", **meta},
    }


@pytest.fixture
def ws(tmp_path) -> Workspace:
    w = Workspace.at(tmp_path / "ws")
    Catalog(w).migrate()
    return w


@pytest.fixture
def catalog(ws) -> Catalog:
    return Catalog(ws)


def make_scene_workspace(root, n_train: int = 48, n_eval: int = 16, resolution: int = 64,
                         edit_fraction: float = 0.25, seed: int = 0) -> Workspace:
    """A small ingested scene-world workspace (train and eval, no pool) for model tests."""
    from dataengine.ingest import IngestConfig, ingest
    from dataengine.sceneworld import SceneWorldConfig, write_scene_world

    w = Workspace.at(root)
    cat = Catalog(w)
    cat.migrate()
    cfg = SceneWorldConfig(seed=seed, n_train=n_train, n_pool=0, n_eval=n_eval, resolution=resolution,
                           edit_fraction=edit_fraction, samples_per_shard=max(n_train, n_eval))
    write_scene_world(w.shards, cfg, splits=("train", "eval"), progress=False)
    ingest(w, [str(w.shards)], IngestConfig(use_ray=False), cat)
    return w


@pytest.fixture(scope="session")
def scene_ws(tmp_path_factory) -> Workspace:
    """One small scene-world workspace shared by the model-stack tests: read it, don't
    write models into it (copy it, or pass a tmp models root)."""
    return make_scene_workspace(tmp_path_factory.mktemp("scene") / "ws")

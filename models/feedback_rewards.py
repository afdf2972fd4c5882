"""The workspace's reward heads as a scorer of feedback records, with the reference they are
ranked against: the heads' own scores of the evaluation set (real outputs with their own
captions), cached beside the version so each version is calibrated once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dataengine.catalog import Catalog
from dataengine.workspace import Workspace

from .rewards import MODEL_NAME, RewardBatch, load

CALIBRATION_FILE = "calibration.npz"


class NoRewardModel(LookupError):
    pass


def _tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class WorkspaceRewards:
    """The newest promoted reward version of a workspace, loaded once."""

    def __init__(self, ws: Workspace, catalog: Catalog | None = None, reference_size: int = 200):
        self.ws, self.catalog = ws, catalog or Catalog(ws)
        rows = self.catalog.query("SELECT version, path, metrics FROM model_versions WHERE model = ? AND "
                                  "status = 'promoted' ORDER BY created_at DESC, version DESC LIMIT 1",
                                  [MODEL_NAME]).to_pylist()
        if not rows:
            raise NoRewardModel("no promoted reward version in this workspace (dataengine train reward)")
        self.version = f"{MODEL_NAME}/{rows[0]['version']}"
        self.path = Path(rows[0]["path"])
        self.model = load(self.path)
        cfg = json.loads((self.path / "config.json").read_text())
        self.size = int(cfg.get("job", {}).get("train", {}).get("resolution", 64))  # what it was trained on
        self.reference_size = reference_size

    def score(self, images: list[np.ndarray], prompts: Sequence[str], sources: list[np.ndarray] | None = None,
              instructions: Sequence[str] | None = None, batch_size: int = 64) -> dict[str, np.ndarray]:
        """Every head's score of each output (uint8 HxWx3 arrays at `self.size`)."""
        out: dict[str, list[np.ndarray]] = {}
        for i in range(0, len(images), batch_size):
            sl = slice(i, i + batch_size)
            batch = RewardBatch(_tensor(images[sl]), list(prompts[sl]),
                                _tensor(sources[sl]) if sources else None,
                                list(instructions[sl]) if instructions else None)
            for h, v in self.model.score(batch).items():
                out.setdefault(h, []).append(v.float().numpy())
        return {h: np.concatenate(v) for h, v in out.items()}

    def score_rows(self, rows: Sequence[dict]) -> dict[str, np.ndarray]:
        """Generation heads' scores of feedback rows (output image vs the user's prompt).
        An unreadable output scores NaN on every head."""
        from dataengine.images import to_square

        arrays, ok = [], []
        for i, r in enumerate(rows):
            try:
                arrays.append(to_square(Path(r["image_ref"].removeprefix("file://")).read_bytes(), self.size))
                ok.append(i)
            except (OSError, ValueError):
                continue
        got = self.score(arrays, [rows[i]["prompt"] for i in ok]) if arrays else {}
        out = {}
        for h, v in got.items():
            full = np.full(len(rows), np.nan)
            full[ok] = v
            out[h] = full
        return out

    def reference(self) -> dict[str, np.ndarray]:
        """The heads' scores of up to `reference_size` evaluation samples with their captions."""
        cache = self.path / CALIBRATION_FILE
        if cache.exists():
            with np.load(cache) as z:
                return {k: z[k] for k in z.files}
        from dataengine.images import iter_images

        rows = self.catalog.query(
            "SELECT key, shard, image_offset, image_size, caption FROM samples WHERE split = 'eval' AND task = 'gen' "
            f"AND caption IS NOT NULL ORDER BY key LIMIT {int(self.reference_size)}").to_pylist()
        captions = {r["key"]: r["caption"] for r in rows}
        arrays, prompts = [], []
        for key, arr, err in iter_images(rows, self.size):
            if arr is not None:
                arrays.append(arr)
                prompts.append(captions[key])
        if not arrays:
            raise NoRewardModel("the workspace has no readable evaluation images to calibrate the reward against")
        ref = {h: np.sort(v) for h, v in self.score(arrays, prompts).items()}
        tmp = cache.with_name(f".{cache.name}.tmp.npz")
        np.savez(tmp, **ref)
        tmp.replace(cache)
        return ref

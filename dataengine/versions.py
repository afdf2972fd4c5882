"""Versions on disk: `models/<name>/vNNNN/`, listed and saved by one helper (the model
stack's models and the engine's own, such as the learned triager).

Every model of the stack (the trainer's jobs, the CLIP, the enhancer) saves through
`save_version`: the files are written into a hidden temporary folder that is renamed
into place, so a version folder either holds everything or does not exist, and two
trainers saving at once take different numbers. What goes into the folder is the
model's own business (safetensors, an open_clip folder, a transformers folder); the
helper adds `config.json` and `metrics.json`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["versions", "latest", "save_version", "CONFIG_FILE", "METRICS_FILE"]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
_VERSION = re.compile(r"^v(\d{4,})$")


def versions(models_root: str | Path, name: str) -> list[str]:
    """The saved versions of `name`, oldest first (by number: v10000 sorts after v9999)."""
    root = Path(models_root) / name
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d.name) for d in root.iterdir() if d.is_dir() and (m := _VERSION.match(d.name))]
    return [v for _, v in sorted(found)]


def latest(models_root: str | Path, name: str) -> Path | None:
    """The newest version folder of `name`, or None."""
    found = versions(models_root, name)
    return Path(models_root) / name / found[-1] if found else None


def save_version(models_root: str | Path, name: str, write: Callable[[Path], None],
                 config: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> tuple[str, Path]:
    """Save the next version of `name`: `write(folder)` writes the model's files, then the
    config and metrics go beside them as JSON. Returns (version, path)."""
    root = Path(models_root) / name
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        write(tmp)
        for file, data in ((CONFIG_FILE, config), (METRICS_FILE, metrics)):
            if data is not None:
                (tmp / file).write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
        tmp.chmod(0o755)  # mkdtemp makes it private
        done = versions(models_root, name)
        number = int(done[-1][1:]) + 1 if done else 1
        for _ in range(1000):
            version, number = f"v{number:04d}", number + 1
            if (root / version).exists():
                continue
            try:
                os.rename(tmp, root / version)  # fails when a concurrent trainer took the number
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                continue
            return version, root / version
        raise RuntimeError(f"no free version number under {root}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def promoted(catalog, name: str) -> dict | None:
    """The newest promoted `model_versions` row of model `name` in a workspace's catalog."""
    rows = catalog.query("SELECT * FROM model_versions WHERE model = ? AND status = 'promoted' "
                         "ORDER BY created_at DESC, version DESC LIMIT 1", [name]).to_pylist()
    return rows[0] if rows else None

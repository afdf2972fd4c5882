"""One helper saves and lists every model's versions (models/versions.py)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from models import clip, enhancer, trainer
from dataengine.versions import latest, save_version, versions


def test_versions_are_numbered_in_order_and_a_failed_save_leaves_nothing(tmp_path):
    assert versions(tmp_path, "m") == [] and latest(tmp_path, "m") is None
    for i in range(3):
        save_version(tmp_path, "m", lambda d: (d / "w.bin").write_bytes(b"x"), {"i": i}, {"ok": True})
    (tmp_path / "m" / "v10000").mkdir()  # numeric order, not string order
    assert versions(tmp_path, "m") == ["v0001", "v0002", "v0003", "v10000"]

    def broken(folder):
        (folder / "half").write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_version(tmp_path, "m", broken)
    assert versions(tmp_path, "m")[-1] == "v10000"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["v0001", "v0002", "v0003", "v10000"]
    assert json.loads((tmp_path / "m" / "v0002" / "config.json").read_text()) == {"i": 1}


def test_concurrent_saves_take_different_numbers(tmp_path):
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: save_version(tmp_path, "m", lambda d: None, {"i": i})[0], range(16)))
    assert sorted(got) == versions(tmp_path, "m") and len(set(got)) == 16


def test_every_model_lists_its_versions_through_the_helper(tmp_path):
    for name in ("clip", "enhancer", "reward"):
        save_version(tmp_path, name, lambda d: None)
        save_version(tmp_path, name, lambda d: None)
    assert clip.versions(tmp_path) == enhancer.versions(tmp_path) == trainer.versions(tmp_path, "reward") \
        == ["v0001", "v0002"]

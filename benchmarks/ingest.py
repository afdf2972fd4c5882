"""Ingest throughput on the scene world's shards at 256 px.

Prints samples/s for (a) a plain webdataset loop that only decodes the images (the
baseline), (b) `dataengine` ingest in one process (read, decode, validate, write
Parquet, commit), (c) the same ingest as Ray tasks on all cores; each as a ratio to (a),
all measured in this one run on warm page cache.

    python benchmarks/ingest.py [--samples 2000] [--per-shard 100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from dataengine.runtime import apply_offline_defaults

apply_offline_defaults()

import webdataset as wds  # noqa: E402

from dataengine.catalog import Catalog  # noqa: E402
from dataengine.cluster import ensure_ray  # noqa: E402
from dataengine.ingest import IngestConfig, expand_shards, ingest  # noqa: E402
from dataengine.sceneworld import SceneWorldConfig, write_scene_world  # noqa: E402
from dataengine.workspace import Workspace  # noqa: E402


def baseline(urls: list[str]) -> tuple[int, float]:
    """webdataset's own reader, decoding every image to PIL; nothing validated or written."""
    t0 = time.perf_counter()
    n = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"):
        for k, v in sample.items():
            if hasattr(v, "load"):
                v.load()
        n += 1
    return n, time.perf_counter() - t0


def run_ingest(root: Path, urls: list[str], use_ray: bool, expected: int) -> tuple[int, float]:
    """Ingest into a fresh workspace; the accounting must match what the baseline read."""
    ws = Workspace.at(root)
    shutil.rmtree(root, ignore_errors=True)
    Catalog(ws).migrate()
    t0 = time.perf_counter()
    rep = ingest(ws, urls, IngestConfig(use_ray=use_ray))
    dt = time.perf_counter() - t0
    assert rep.read == rep.accepted + rep.quarantined == expected, rep
    return rep.read, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--per-shard", type=int, default=100)
    ap.add_argument("--keep", help="folder to keep the shards and workspaces in")
    args = ap.parse_args()

    base = Path(args.keep or tempfile.mkdtemp(prefix="bench-ingest-"))
    shards = base / "shards"
    if not list(shards.glob("train/*.tar")):
        t0 = time.perf_counter()
        write_scene_world(shards, SceneWorldConfig(n_train=args.samples, n_pool=0, n_eval=0, resolution=256,
                                                   samples_per_shard=args.per_shard), splits=("train",))
        print(f"wrote {args.samples} scene-world samples at 256 px in {time.perf_counter() - t0:.1f}s")
    urls = expand_shards([str(shards / "train")])
    for u in urls:  # warm the page cache so every contender reads from memory
        Path(u).read_bytes()

    n_base, t_base = baseline(urls)
    n_one, t_one = run_ingest(base / "ws-one", urls, use_ray=False, expected=n_base)
    t_ray0 = time.perf_counter()
    resources = ensure_ray()
    ray_start = time.perf_counter() - t_ray0
    n_ray, t_ray = run_ingest(base / "ws-ray", urls, use_ray=True, expected=n_base)

    cores = int(resources.get("CPU", os.cpu_count() or 1))
    rate = lambda n, t: n / t  # noqa: E731
    rows = [
        ("webdataset loop, decode only (baseline)", n_base, t_base),
        ("dataengine ingest, 1 process", n_one, t_one),
        (f"dataengine ingest, Ray on {cores} cores", n_ray, t_ray),
    ]
    print(f"\n{len(urls)} shards, {n_base} samples, 256 px; Ray start-up {ray_start:.1f}s (not counted)")
    print(f"{'pipeline':44s} {'samples':>8s} {'seconds':>8s} {'samples/s':>10s} {'vs baseline':>12s}")
    for name, n, t in rows:
        print(f"{name:44s} {n:8d} {t:8.2f} {rate(n, t):10.1f} {rate(n, t) / rate(n_base, t_base):11.2f}x")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

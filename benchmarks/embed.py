"""Images/s of the Ray Data embedding pipeline against a plain single-process loop.

Both run the same model at the same batch size over the same scene-world shards in
this process's run:
- baseline: `webdataset` reads the shards, PIL decodes and squares each image, the model
  embeds batches, one process;
- dataengine: `dataengine.embed.embed` (Ray Data: decode tasks + a model actor pool),
  images only, into a fresh lake, start-up included.
The stage split (decode vs model per image, measured in the baseline) says what
limits the pipeline. On a GPU, pass `--arch ViT-B-32` or `--arch ViT-L-14` (224 px, random
weights: fine for speed) to compare with the figures clip-retrieval published for one A100.

    python benchmarks/embed.py                      # default model, 1,000 images at 256 px
    python benchmarks/embed.py --arch ViT-B-32 --n 5000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from dataengine.runtime import apply_offline_defaults

apply_offline_defaults()

import numpy as np  # noqa: E402

from dataengine.catalog import Catalog  # noqa: E402
from dataengine.cluster import ensure_ray  # noqa: E402
from dataengine.embed import EmbedConfig, embed  # noqa: E402
from dataengine.images import to_square  # noqa: E402
from dataengine.ingest import IngestConfig, ingest  # noqa: E402
from dataengine.sceneworld import SceneWorldConfig, write_scene_world  # noqa: E402
from dataengine.workspace import Workspace  # noqa: E402


def baseline(shards: list[str], spec: str, batch_size: int, device: str) -> dict:
    """webdataset + the same model, one process; times decode and model separately."""
    import torch
    import webdataset as wds

    from models.clip import load_clip

    torch.set_num_threads(os.cpu_count())  # a plain loop gets every core (the runtime defaults say 1)
    t_load = time.perf_counter()
    bundle = load_clip(spec, device=device)
    autocast = torch.bfloat16 if device == "cuda" else None
    load_s = time.perf_counter() - t_load
    t0 = time.perf_counter()
    decode_s = model_s = 0.0
    n = 0
    batch: list[np.ndarray] = []

    def flush():
        nonlocal model_s, n
        t = time.perf_counter()
        bundle.encode_images(np.stack(batch), autocast_dtype=autocast)
        model_s += time.perf_counter() - t
        n += len(batch)
        batch.clear()

    for sample in wds.WebDataset(shards, shardshuffle=False):
        data = sample.get("png") or sample.get("jpg") or sample.get("webp")
        t = time.perf_counter()
        batch.append(to_square(data, bundle.image_size))
        decode_s += time.perf_counter() - t
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    wall = time.perf_counter() - t0
    return {"images": n, "wall_s": wall, "load_s": load_s, "decode_ms": 1e3 * decode_s / n,
            "model_ms": 1e3 * model_s / n, "images_per_s": n / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="dataengine-clip-lite0", help="open_clip spec (default: the embedded default arch)")
    ap.add_argument("--n", type=int, default=1000, help="scene-world images")
    ap.add_argument("--resolution", type=int, default=256, help="px of the stored images")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--actors", type=int, default=None, help="model actors (default: GPUs, else CPUs - 1)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-embed-"))
    ws = Workspace.at(root / "ws")
    cat = Catalog(ws)
    cat.migrate()
    cfg = SceneWorldConfig(n_train=args.n, n_pool=0, n_eval=0, resolution=args.resolution, samples_per_shard=250)
    ensure_ray()
    shards = write_scene_world(ws.shards, cfg, splits=("train",), progress=False, use_ray=True)["train"]
    ingest(ws, [str(ws.shards)], IngestConfig(use_ray=True), cat)

    base = baseline(shards, args.arch, args.batch_size, device)
    t0 = time.perf_counter()
    report = embed(ws.root, EmbedConfig(model=args.arch, kinds=("image",), batch_size=args.batch_size,
                                        actors=args.actors, ray_min_rows=0), progress=False)
    ray_wall = time.perf_counter() - t0
    ray_ips = report.embedded["image"] / ray_wall

    print(f"\nembedding throughput: {args.arch}, {args.n} images of {args.resolution} px, batch {args.batch_size}, "
          f"device {device}; baseline torch threads {os.cpu_count()}; Ray actors {report.actors} x 1 thread")
    print(f"{'pipeline':<34}{'images':>8}{'wall s':>9}{'img/s':>9}{'ratio':>8}")
    print(f"{'baseline: webdataset loop, 1 proc':<34}{base['images']:>8}{base['wall_s']:>9.1f}"
          f"{base['images_per_s']:>9.1f}{1.0:>8.2f}")
    print(f"{'dataengine: Ray Data actor pool':<34}{report.embedded['image']:>8}{ray_wall:>9.1f}"
          f"{ray_ips:>9.1f}{ray_ips / base['images_per_s']:>8.2f}")
    print(f"\nper image in the baseline: decode+resize {base['decode_ms']:.2f} ms, model {base['model_ms']:.2f} ms "
          f"(model load {base['load_s']:.1f} s, not counted)")
    limit = "the model" if base["model_ms"] > base["decode_ms"] else "decoding and resizing"
    print(f"limited by {limit}: the pipeline overlaps decode with the model, so its ceiling is "
          f"{1e3 / max(base['model_ms'], base['decode_ms']):.0f} img/s per model replica here")


if __name__ == "__main__":
    main()

"""Images/s of the Ray Data embedding pipeline against a plain single-process loop.

Both run the same model at the same batch size over the same scene-world shards in
this process's run:
- baseline: `webdataset` reads the shards, PIL decodes and squares each image, the model
  embeds batches, one process;
- dataengine: `dataengine.embed.embed` (Ray Data: decode tasks + a model actor pool),
  images only, into a fresh lake. Ray itself is started before either run (the scene
  world and ingest use it) and is not counted; everything after is: the driver's model
  load (for the model id), the actors' start-up, decoding, the model, the lake writes.
  The baseline's model load is not counted.
Peak memory (`PeakMemory`, sampled every second) is resident memory with shared pages
counted once: the baseline's is this process; the Ray run's adds every process under it
(Ray's raylet, its workers, the actors) and Ray's object store in /dev/shm.
The stage split (decode vs model per image, measured in the baseline) says what
limits the pipeline. On a GPU, pass `--arch ViT-B-32` or `--arch ViT-L-14` (224 px, random
weights: fine for speed) to compare with the figures clip-retrieval published for one A100.

    python benchmarks/embed.py                      # default model, 1,000 images at 256 px
    python benchmarks/embed.py --arch ViT-B-32 --n 5000
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import threading
import time
from pathlib import Path

from dataengine.runtime import apply_offline_defaults

apply_offline_defaults()

import numpy as np  # noqa: E402

from dataengine.catalog import Catalog  # noqa: E402
from dataengine.cluster import ensure_ray  # noqa: E402
from dataengine.embed import EmbedConfig, _pool_size, embed  # noqa: E402
from dataengine.images import to_square  # noqa: E402
from dataengine.ingest import IngestConfig, ingest  # noqa: E402
from dataengine.sceneworld import SceneWorldConfig, write_scene_world  # noqa: E402
from dataengine.workspace import Workspace  # noqa: E402
from models.clip import load_clip  # noqa: E402


def _process_tree(root: int) -> list[int]:
    """`root` and every process under it, from /proc."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parent[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # it exited while we looked
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += [c for c, pp in parent.items() if pp == pid]
    return tree


class PeakMemory:
    """Peak memory (MiB) of this process, and with `tree` of every process under it, sampled
    in a thread while the block runs (Linux /proc).

    Each process counts its PSS (resident, shared pages split between the processes that
    map them, so torch's libraries count once) outside shared-memory files; the files in
    /dev/shm they map (Ray's object store) count once, at their resident size, which
    includes pages no process maps any more (blocks written by a worker since gone).
    """

    def __init__(self, tree: bool, every_s: float = 1.0):
        self.tree, self.every_s = tree, every_s
        self.peak_mb = self.peak_shm_mb = self.start_shm_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[float, float]:
        """(all, of which shared-memory files) MiB now."""
        private, shm_files = 0, {}
        for pid in _process_tree(os.getpid()) if self.tree else [os.getpid()]:
            try:
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
                maps = [m.split(None, 5) for m in Path(f"/proc/{pid}/maps").read_text().splitlines()
                        if "/dev/shm/" in m]
                # The file's own size through the mapping: Ray unlinks its object store file.
                files = {(m[3], m[4]): os.stat(f"/proc/{pid}/map_files/{m[0]}").st_blocks * 512 for m in maps}
            except OSError:
                continue  # it exited between the listing and the read
            kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in rollup)}
            private += kb["Pss"] - kb.get("Pss_Shmem", 0)
            if self.tree:  # the baseline maps Ray's object store (started earlier) but uses none of it
                shm_files.update(files)
        shm = sum(shm_files.values())
        return (private * 1024 + shm) / 2**20, shm / 2**20

    def _take(self) -> None:
        total, shm = self.sample()
        if total > self.peak_mb:
            self.peak_mb, self.peak_shm_mb = total, shm

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take()
            self._stop.wait(self.every_s)

    def __enter__(self) -> "PeakMemory":
        self.start_shm_mb = self.sample()[1]
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._take()


def baseline(shards: list[str], spec: str, batch_size: int, device: str) -> dict:
    """webdataset + the same model, one process; times decode and model separately."""
    import torch
    import webdataset as wds


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
    ap.add_argument("--actors", type=int, default=None, help="model actors (default: one per GPU, else one per CPU)")
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

    with PeakMemory(tree=False) as base_mem:
        base = baseline(shards, args.arch, args.batch_size, device)
    gc.collect()  # the baseline's model goes before the Ray run is measured
    ray_cfg = EmbedConfig(model=args.arch, kinds=("image",), batch_size=args.batch_size, actors=args.actors,
                          ray_min_rows=0)
    with PeakMemory(tree=True) as ray_mem:
        t0 = time.perf_counter()
        report = embed(ws.root, ray_cfg, progress=False, load_encoder=load_clip)
        ray_wall = time.perf_counter() - t0
    ray_ips = report.embedded["image"] / ray_wall
    _, threads, _ = _pool_size(ray_cfg, args.n)

    print(f"\nembedding throughput: {args.arch}, {args.n} images of {args.resolution} px, batch {args.batch_size}, "
          f"device {device}; baseline torch threads {os.cpu_count()}; Ray actors {report.actors} x {threads} thread(s)")
    print(f"{'pipeline':<34}{'images':>8}{'wall s':>9}{'img/s':>9}{'ratio':>8}{'peak MiB':>10}")
    print(f"{'baseline: webdataset loop, 1 proc':<34}{base['images']:>8}{base['wall_s']:>9.1f}"
          f"{base['images_per_s']:>9.1f}{1.0:>8.2f}{base_mem.peak_mb:>10.0f}")
    print(f"{'dataengine: Ray Data actor pool':<34}{report.embedded['image']:>8}{ray_wall:>9.1f}"
          f"{ray_ips:>9.1f}{ray_ips / base['images_per_s']:>8.2f}{ray_mem.peak_mb:>10.0f}")
    print(f"peak MiB: baseline: this process; Ray: this process, every Ray process under it (actors, workers, "
          f"raylet) and Ray's object store ({ray_mem.peak_shm_mb:.0f} MiB of the peak; "
          f"{ray_mem.start_shm_mb:.0f} MiB before the run, left by the scene world and ingest)")
    print(f"\nper image in the baseline: decode+resize {base['decode_ms']:.2f} ms, model {base['model_ms']:.2f} ms "
          f"(model load {base['load_s']:.1f} s, not counted)")
    limit = "the model" if base["model_ms"] > base["decode_ms"] else "decoding and resizing"
    print(f"limited by {limit}: the pipeline overlaps decode with the model, so its ceiling is "
          f"{1e3 / max(base['model_ms'], base['decode_ms']):.0f} img/s per model replica here")


if __name__ == "__main__":
    main()

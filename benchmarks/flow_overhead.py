"""The flow layer's overhead: a stage's time through its Prefect flow over the same stage
called directly, on the scene world's shards.

The stage is ingest (`flows.stages.ingest_flow` vs `dataengine.ingest.ingest`), in this
process (no Ray: the same work both ways), each run into a fresh workspace holding hard
links to the same shards. Runs alternate direct / flow so drift on a shared machine hits
both alike. Prefect runs without a server, as the embedded default does: its temporary
server starts with the first flow of the process, reported apart ("cold") from the flows
after it ("warm"), which are what a deployed stage pays.

    python benchmarks/flow_overhead.py                 # 15,000 samples at 64 px, 3 pairs of runs
    python benchmarks/flow_overhead.py --n 30000 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from dataengine.runtime import apply_offline_defaults

apply_offline_defaults()

from dataengine.catalog import Catalog  # noqa: E402
from dataengine.config import load_config  # noqa: E402
from dataengine.ingest import IngestConfig, ingest  # noqa: E402
from dataengine.sceneworld import SceneWorldConfig, write_scene_world  # noqa: E402
from dataengine.workspace import Workspace  # noqa: E402


def linked_workspace(root: Path, shards: Path) -> Workspace:
    """A new workspace whose shards/ hard-links every shard under `shards`."""
    ws = Workspace.at(root)
    for src in shards.rglob("*.tar"):
        dst = ws.shards / src.relative_to(shards)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)
    return ws


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=15000, help="scene-world samples (train split)")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="pairs of runs (direct, flow)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    from flows.stages import ingest_flow

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-flows-"))
    shards = work / "shards"
    if not any(shards.rglob("*.tar")):
        t0 = time.perf_counter()
        write_scene_world(shards, SceneWorldConfig(n_train=args.n, n_pool=0, n_eval=0, resolution=args.resolution,
                                                   samples_per_shard=500), splits=("train",), progress=False)
        print(f"wrote {args.n} samples in {time.perf_counter() - t0:.0f} s")
    cfg = load_config(None, ingest=dict(use_ray=False))

    def direct(ws: Workspace) -> int:
        cat = Catalog(ws)
        cat.migrate()
        return ingest(ws, [str(ws.shards)], IngestConfig(use_ray=False), cat).accepted

    def through_flow(ws: Workspace) -> int:
        return ingest_flow(str(ws.root), cfg).accepted

    times: dict[str, list[float]] = {"direct": [], "flow": []}
    cold = None
    for i in range(args.repeats + 1):  # round 0 starts Prefect's temporary server: "cold"
        for name, fn in (("direct", direct), ("flow", through_flow)):
            ws = linked_workspace(work / f"ws-{name}-{i}", shards)
            t0 = time.perf_counter()
            accepted = fn(ws)
            dt = time.perf_counter() - t0
            assert accepted == args.n, (name, accepted)
            if i == 0:
                cold = dt if name == "flow" else cold
                continue
            times[name].append(dt)
            print(f"round {i} {name:6s} {dt:6.2f} s ({args.n / dt:,.0f} samples/s)")
    d, f = statistics.median(times["direct"]), statistics.median(times["flow"])
    print(f"\ningest of {args.n} samples, median of {args.repeats}: direct {d:.2f} s, through its flow {f:.2f} s "
          f"-> {f / d:.3f}x (target < 1.2x for a stage of 10 s or more)")
    print(f"first flow of the process (Prefect's temporary server starting): {cold:.2f} s -> {cold / d:.3f}x")


if __name__ == "__main__":
    main()

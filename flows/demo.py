"""The main job on the embedded default: workspace -> scene world shards -> ingest -> summary.

Later stages (embed, index, gaps, degrade, triage, retrain) join this flow as they land.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE

from dataengine.catalog import Catalog, LockRetry
from dataengine.config import EngineConfig
from dataengine.ingest import IngestReport, ingest
from dataengine.status import Summary, summarize
from dataengine.workspace import Workspace

# Stage outputs are Arrow tables and reports, not values worth hashing for a cache.
stage = task(cache_policy=NONE)


@stage
def prepare_workspace(root: str) -> int:
    """Create the folders and the catalog (or migrate an existing one)."""
    return Catalog(Workspace.at(root)).migrate()


@stage
def write_scene_world(root: str, sceneworld: dict) -> dict[str, list[str]]:
    """Render the scene world's shards, unless the same config already wrote them."""
    from dataengine.sceneworld import SceneWorldConfig, write_scene_world as write

    ws = Workspace.at(root)
    cfg = SceneWorldConfig(**sceneworld)
    manifest = ws.shards / "sceneworld.json"
    wanted = json.loads(json.dumps(dataclasses.asdict(cfg)))
    if manifest.exists():
        old = json.loads(manifest.read_text())
        if old["config"] == wanted and all(
            (ws.shards / p).exists() for paths in old["shards"].values() for p in paths
        ):
            return old["shards"]
    written = write(ws.shards, cfg)
    rel = {split: [str(Path(p).relative_to(ws.shards)) for p in paths] for split, paths in written.items()}
    manifest.write_text(json.dumps({"config": wanted, "shards": rel}, indent=1))
    return rel


@stage
def ingest_shards(root: str, cfg: EngineConfig) -> IngestReport:
    """Validate every shard of the workspace into the catalog (Ray tasks, one per shard)."""
    ws = Workspace.at(root)
    catalog = Catalog(ws, LockRetry(timeout_s=cfg.engine.lock_timeout_s))
    return ingest(ws, [str(ws.shards)], cfg.ingest, catalog,
                  ray_address=cfg.engine.ray_address, num_cpus=cfg.engine.num_cpus)


@stage
def holdout_coverage(root: str, sceneworld: dict) -> dict[str, dict[str, int]]:
    """Per held-out concept and split, how many ingested samples show it (train must be 0)."""
    from dataengine.sceneworld import SceneWorldConfig, concept_present

    cfg = SceneWorldConfig(**sceneworld)
    rows = Catalog(Workspace.at(root)).query(
        "SELECT split, meta FROM samples WHERE source = 'sceneworld'").to_pylist()
    out: dict[str, dict[str, int]] = {}
    for colour, shape in cfg.holdout:
        counts = out.setdefault(f"{colour} {shape}", {})
        for row in rows:
            meta = json.loads(row["meta"])
            scenes = [meta["scene"]] + ([meta["source_scene"]] if "source_scene" in meta else [])
            hit = any(concept_present(sc, colour, shape) for sc in scenes)
            counts[row["split"]] = counts.get(row["split"], 0) + hit
    return out


@stage
def summarize_workspace(root: str) -> Summary:
    return summarize(Catalog(Workspace.at(root)))


@flow(name="dataengine-demo", log_prints=True)
def demo_flow(workspace: str, cfg: EngineConfig = EngineConfig()) -> Summary:
    """Make a workspace from nothing, fill it with the scene world, and account for it."""
    prepare_workspace(workspace)
    shards = write_scene_world(workspace, cfg.sceneworld)
    print(f"scene world: " + ", ".join(f"{s} {len(p)} shard(s)" for s, p in shards.items()))
    report = ingest_shards(workspace, cfg)
    print(
        f"ingest: {report.shards} shard(s) scanned, {report.skipped_unchanged} unchanged; "
        f"read {report.read} = accepted {report.accepted} + quarantined {report.quarantined} "
        f"in {report.seconds:.1f}s"
    )
    for concept, per_split in holdout_coverage(workspace, cfg.sceneworld).items():
        print(f"held-out concept '{concept}': " + ", ".join(f"{k} {v}" for k, v in sorted(per_split.items())))
    return summarize_workspace(workspace)

"""The main job on the embedded default, composed of the stage flows (flows/stages.py):
workspace -> scene world shards (+ the real captioned images that install offline) ->
ingest_flow -> enhancer_flow (caption degradation into enhancer pairs, a brief enhancer
training) -> embed_index_flow (the default embedding model, trained once; embeddings;
FAISS indexes) -> gap search for the scene world's held-out concepts (checked against its
ground truth) -> one turn of the self-correcting loop on injected failures (flows/loop.py)
-> with --stack, a brief run of each model of the stack (STACK_DEMO) -> summary.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE

from dataengine.catalog import Catalog
from dataengine.config import EngineConfig
from dataengine.status import Summary, summarize
from dataengine.workspace import Workspace

from flows.stages import ENHANCER_STEPS, embed_index_flow, enhancer_flow, ingest_flow, prepare_workspace, train_model

# Stage outputs are Arrow tables and reports, not values worth hashing for a cache.
stage = task(cache_policy=NONE)


@stage
def write_scene_world(root: str, engine_cfg: EngineConfig) -> dict[str, list[str]]:
    """Render the scene world's shards (one Ray task per shard), unless the same config
    already wrote them."""
    from dataengine.sceneworld import SceneWorldConfig, write_scene_world as write

    ws = Workspace.at(root)
    cfg = SceneWorldConfig(**engine_cfg.sceneworld)
    manifest = ws.shards / "sceneworld.json"
    wanted = json.loads(json.dumps(dataclasses.asdict(cfg)))
    if manifest.exists():
        old = json.loads(manifest.read_text())
        if old["config"] == wanted and all(
            (ws.shards / p).exists() for paths in old["shards"].values() for p in paths
        ):
            return old["shards"]
    use_ray = engine_cfg.ingest.use_ray
    if use_ray:
        from dataengine.cluster import ensure_ray

        ensure_ray(engine_cfg.engine.ray_address, engine_cfg.engine.num_cpus)
    written = write(ws.shards, cfg, use_ray=use_ray)
    rel = {split: [str(Path(p).relative_to(ws.shards)) for p in paths] for split, paths in written.items()}
    manifest.write_text(json.dumps({"config": wanted, "shards": rel}, indent=1))
    return rel


@stage
def import_real_images(root: str) -> dict[str, int]:
    """Tux Paint's captioned photographs (when unpacked, see scripts/fetch_tuxpaint.sh) and
    scikit-image's samples into shards/train, once."""
    from connectors import skimage_samples, tuxpaint

    out = Workspace.at(root).shards / "train"
    written = {}
    stamps = tuxpaint.find_stamps_root(None)
    if stamps is not None and not list(out.glob("tuxpaint-*.tar")):
        written["tuxpaint"] = tuxpaint.write_shards(stamps, out).written
    if not list(out.glob("skimage-*.tar")):
        written["skimage"] = skimage_samples.write_shards(out).written
    return written



@stage
def holdout_coverage(root: str, sceneworld: dict) -> dict[str, dict[str, int]]:
    """Per held-out concept and split, how many ingested samples show it (train must be 0)."""
    from dataengine.sceneworld import SceneWorldConfig, concept_present
    from models.clip import load_clip

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
def show_examples(root: str, enhancer_path: str, n: int = 2) -> None:
    """Print a few degradation chains and what the enhancer makes of terse prompts."""
    from dataengine.enhance_eval import heldout_terse_prompts
    from models.enhancer import enhance, load_version

    catalog = Catalog(Workspace.at(root))
    chains = catalog.query(
        "SELECT source_id, step, category, less, removed FROM pairs WHERE source_id IN "
        "(SELECT source_id FROM pairs GROUP BY source_id HAVING count(*) >= 3 ORDER BY source_id LIMIT ?) "
        "ORDER BY source_id, step", [n]).to_pylist()
    for row in chains:
        print(f"chain {row['source_id']} step {row['step']} (-{row['category']}: {row['removed']!r}): {row['less']}")
    model, tok = load_version(enhancer_path)
    prompts = [p for p, _ in heldout_terse_prompts(3)]
    for prompt, rich in zip(prompts, enhance(model, tok, prompts, max_new_tokens=120)):
        print(f"enhance {prompt!r} -> {rich!r}")





@stage
def find_and_patch_gaps(root: str, sceneworld: dict, patch: bool = True) -> list[dict]:
    """Gap search for the scene world's held-out concepts and a few covered ones; with
    `patch`, a patch shard for each gap, checked against the pool's ground truth (without,
    the loop's knowledge remedy patches what its failures miss)."""
    from dataengine.gaps import GapSearcher
    from dataengine.patch import PatchConfig, patch_found_gap
    from dataengine.sceneworld import SceneWorldConfig, concept_present
    from models.clip import load_clip

    ws = Workspace.at(root)
    cfg = SceneWorldConfig(**sceneworld)
    held = [f"a {c} {s}" for c, s in cfg.holdout]
    covered = ["a red circle", "a blue square"]
    searcher = GapSearcher(ws, load_encoder=load_clip)
    reports, vecs = searcher.prompts(held + covered)
    out = []
    for r, v in zip(reports, vecs):
        is_held = r.concept in held
        verdict = "GAP" if r.is_gap else "covered"
        if is_held != r.is_gap:  # the scene world's ground truth says otherwise: a failure, not a finding
            verdict = (f"FAILED: held out of train but reported covered" if is_held
                       else "FAILED: shown in train but reported as a gap")
        line = (f"gap search {r.concept!r}: {verdict} (gap score {r.gap_score:.2f}, gap above "
                f"{1 - r.threshold:.2f}; {r.explain()})")
        row = {"concept": r.concept, "held_out": is_held, "is_gap": r.is_gap, "score": r.gap_score}
        if r.is_gap and patch:
            p = patch_found_gap(searcher, r, v, PatchConfig(size=32))
            colour, shape = r.concept.split()[1:3]
            metas = Catalog(ws).query(
                f"SELECT meta FROM samples WHERE key IN ({', '.join('?' for _ in p.samples)})",
                [s["pool_key"] for s in p.samples]).to_pylist() if p.samples else []
            hits = sum(_shows(json.loads(m["meta"]), colour, shape, concept_present) for m in metas)
            share = f"{hits / len(metas):.0%}" if metas else "n/a"
            line += (f"\n  patch: {p.written} pool samples from the {p.side} side -> {p.shard}; "
                     f"{hits}/{len(metas)} show {colour} {shape} in the pool's ground truth ({share} on target)")
            row |= {"patched": p.written, "hits": hits}
        print(line)
        out.append(row)
    return out


def _shows(meta: dict, colour: str, shape: str, present) -> bool:
    scenes = [meta["scene"]] + ([meta["source_scene"]] if "source_scene" in meta else []) if "scene" in meta else []
    return any(present(sc, colour, shape) for sc in scenes)


# The model stack's brief demo runs: (model, config overrides, loop steps), in dependency
# order. Each is a real run of `dataengine train <model>`, just short; the figures they
# print are those of a few dozen steps on 2 cores, not of a trained stack. Sized so the
# whole demo stays under 5 minutes on 2 cores (the stack takes about 2 of them).
STACK_DEMO: tuple[tuple[str, dict, int], ...] = (
    ("vae", {"eval_images": 16, "batch_size": 8}, 30),
    ("dit", {"eval_prompts": 6, "sample_steps": 20, "batch_size": 8}, 50),
    # The edit heads' patch tokens on an 8x8 grid, not 16x16: 63 s against 142 s here.
    ("reward", {"n_train": 16, "n_eval": 16, "patch_grid": 32}, 80),
    ("distill", {"eval_prompts": 4, "fake_updates": 2}, 4),
    ("rl", {"eval_prompts": 4, "prompts_per_step": 2}, 4),
    ("enhancer-rl", {"eval_prompts": 4, "prompts_per_step": 2}, 4),
)


# The loop turn's brief reward: the generation heads only, pooled (a few seconds on 2 cores).
LOOP_REWARD = ("reward", {"heads": ("fidelity", "aesthetics"), "spatial": (), "n_train": 48, "n_eval": 24}, 80)


def train_stack_model(root: str, name: str, overrides: dict, steps: int) -> dict:
    """One brief run of a model of the stack; reuses the newest version if one exists."""
    return train_model(root, name, overrides, steps, reuse=True)


# The held-out figures each brief run prints (fnmatch patterns over the flattened eval
# metrics); every figure is in models/<name>/vNNNN/metrics.json.
HEADLINES: dict[str, tuple[str, ...]] = {
    "vae": ("sceneworld.psnr", "sceneworld.ssim", "real.psnr", "real.ssim"),
    "dit": ("eval_loss", "fidelity.samples.accuracy", "fidelity.reconstructions.accuracy"),
    "reward": ("heldout.*.accuracy",),
    "distill": ("samplers.*.accuracy", "samplers.*.ms_per_image", "speedup"),
    "rl": ("samplers.*.reward", "samplers.*.accuracy", "verdict.reward_hacking", "verdict.helped"),
    "enhancer-rl": ("contenders.*.reward", "contenders.*.accuracy"),
}


def _stack_line(record: dict) -> str:
    """Three lines per model: steps and time with the main loss from first to last; its
    headline held-out figures; where all its figures are."""
    from fnmatch import fnmatchcase

    m = record["metrics"]
    loss = f"loss {m['first']['loss']:.3f} -> {m['last']['loss']:.3f}" if m.get("first") else ""
    patterns = HEADLINES.get(record["model"], ("*",))
    evals = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in _flat(m.get("eval", {})).items()
                      if isinstance(v, (int, float)) and any(fnmatchcase(k, p) for p in patterns))
    state = "reused" if record.get("reused") else f"{m['steps']} steps in {m['train_seconds']:.0f}s"
    return (f"{record['model']} {record['version']} ({state}): {loss}\n  held-out: {evals}\n"
            f"  (all figures: {record['path']}/metrics.json)")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


@stage
def inject_failures(root: str, sceneworld: dict, n_per_cause: int, n_good: int) -> dict[str, int]:
    """Failures of known cause in the demo's scene world (its held-out concept drawn wrong,
    an enhanced prompt that changed the user's words, a blurred output), with well-rated
    outputs, through the feedback contract; the same ids every run, so a rerun adds none."""
    import random

    from connectors.feedback import ingest_files
    from dataengine.sceneworld import SceneWorldConfig
    from dataengine.sceneworld.failures import CAUSES, draw, write_feedback

    ws = Workspace.at(root)
    world = SceneWorldConfig(**sceneworld)
    rng = random.Random(f"demo-loop/{world.seed}")
    items = [draw(c, world.holdout, rng, 128, rl_kind="blur") for c in CAUSES for _ in range(n_per_cause)]
    items += [draw("good", world.holdout, rng, 128) for _ in range(n_good)]
    folder = ws.root / "feedback" / "demo-injected"
    write_feedback(folder, items, rng, tag="demo")
    rep = ingest_files(ws, [folder / "feedback.jsonl"])
    return {"stored": rep.accepted, "duplicates": rep.duplicates, "quarantined": rep.quarantined}


def demo_loop_turn(root: str, sceneworld: dict) -> None:
    """One turn of the self-correcting loop on injected failures, every remedy auto-approved
    and every trigger firing on one: triage, remedies, the three retrain jobs, their gates."""
    from dataengine.triage import CAUSES
    from dataengine.triggers import TriggerConfig, TriggerPolicy
    from flows.loop import loop_turn
    from models.enhancer_fix import EnhancerFixConfig
    from models.jobs import JobConfig
    from models.recalibrate import RecalibrationConfig

    reward = train_stack_model(root, *LOOP_REWARD)  # the heads triage scores the feedback with
    print(f"loop: reward {reward['version']} scores the feedback")
    got = inject_failures(root, sceneworld, n_per_cause=10, n_good=20)
    print(f"loop: injected feedback {got}")
    one = TriggerPolicy(min_approved=1, cooldown_h=0)
    jobs = JobConfig(dit_steps=0, recalibration=RecalibrationConfig(steps=40),
                     enhancer=EnhancerFixConfig(steps=40, batch_size=16, heldout_prompts=10))
    r = loop_turn(root, auto_approve=True, triggers=TriggerConfig(one, one, one), jobs=jobs)
    if r.confusion:
        print("loop: injected cause -> triaged (rl / knowledge / prompt): "
              + "; ".join(f"{t} " + "/".join(str(r.confusion[t][c]) for c in CAUSES) for t in CAUSES))
    for j in r.jobs:
        res = j["result"] or {}
        made = res["dit"] if isinstance(res.get("dit"), dict) else res
        print(f"loop: job {j['kind']} {j['status']}" + (f" ({j['note']})" if j["note"] else "")
              + (f": fixed {res['fixed_share']:.0%} of its measured failures" if "fixed_share" in res else "")
              + (f"; {made.get('version')} {'promoted' if made.get('promoted') else 'kept a candidate'}: {made['gate']}"
                 if made.get("gate") else ""))
    print("loop: failures per cause, before -> after the turn: "
          + ", ".join(f"{c} {r.before[c]} -> {r.after[c]}" for c in CAUSES))


@stage
def summarize_workspace(root: str) -> Summary:
    return summarize(Catalog(Workspace.at(root)))


@flow(name="dataengine-demo", log_prints=True)
def demo_flow(workspace: str, cfg: EngineConfig = EngineConfig(), enhancer_steps: int = ENHANCER_STEPS,
              real_images: bool = True, train_stack: bool = True, loop: bool = True) -> Summary:
    """Make a workspace from nothing, fill it with the scene world and real images, account
    for it, turn its captions into enhancer pairs and a first enhancer, embed, index, find
    and patch gaps, (loop) run one turn of the self-correcting loop on injected failures,
    and (train_stack) train each model of the stack briefly."""
    prepare_workspace(workspace)
    shards = write_scene_world(workspace, cfg)
    print("scene world: " + ", ".join(f"{s} {len(p)} shard(s)" for s, p in shards.items()))
    real = import_real_images(workspace) if real_images else {}
    if real:
        print("real images: " + ", ".join(f"{k} {v}" for k, v in real.items()))
    report = ingest_flow(workspace, cfg)
    print(
        f"ingest: {report.shards} shard(s) scanned, {report.skipped_unchanged} unchanged; "
        f"read {report.read} = accepted {report.accepted} + quarantined {report.quarantined} "
        f"in {report.seconds:.1f}s"
    )
    for concept, per_split in holdout_coverage(workspace, cfg.sceneworld).items():
        print(f"held-out concept '{concept}': " + ", ".join(f"{k} {v}" for k, v in sorted(per_split.items())))
    pairs, enhancer = enhancer_flow(workspace, cfg, enhancer_steps)
    print(f"degrade: {pairs.captions} captions -> {pairs.pairs_made} pairs "
          f"({pairs.pairs_per_caption:.1f} per caption), {pairs.pairs_written} new")
    print(f"enhancer {enhancer['version']} ({'reused' if enhancer.get('reused') else 'trained'})")
    show_examples(workspace, enhancer["path"])
    clip, emb, indexes = embed_index_flow(workspace, cfg)
    print(f"embedding model clip {clip['version']} ({'reused' if clip.get('reused') else 'trained'})")
    _print_recall(clip.get("metrics", {}))
    print(f"embed: {emb.summary()}")
    for split, meta in indexes.items():
        print(f"index {split}: {meta['count']} vectors, {meta['factory']}, recall@10 {meta['recall_at_k']:.3f}")
    find_and_patch_gaps(workspace, cfg.sceneworld, patch=not loop)
    if loop:
        demo_loop_turn(workspace, cfg.sceneworld)
    if train_stack:
        from models.rl import UntrustedReward

        for name, overrides, steps in STACK_DEMO:
            try:
                print(_stack_line(train_stack_model(workspace, name, overrides, steps)))
            except UntrustedReward as e:  # the gate working: RL does not optimise a head at chance
                print(f"{name}: not run: {e}")
    return summarize_workspace(workspace)


def _print_recall(metrics: dict) -> None:
    from models.train_clip import format_table

    if metrics.get("heldout"):
        print("text -> image recall on held-out images\n" + format_table(metrics))

"""Enhancer phase two against phase one and the raw prompt, judged on renders of held-out prompts.

Held-out terse prompts (chain ends of the workspace's degradation pairs whose source
captions phase two never trained on) go to the frozen generator three ways: as typed
(terse), as the phase-one enhancer writes them, and as the phase-two enhancer writes them
(both greedy). Every prompt's three renders share one initial noise. Each render is
scored by the reward heads against the TERSE prompt (the intent) and, for scene-world
sources, by the scene-world checker against the source's ground truth (attribute
accuracy: a judge phase two never optimised). Text columns: words per prompt, the share
of prompts longer than the DiT's text window, and intent preservation (the terse
prompt's true attributes still named, from dataengine.enhance_eval).

With -w, the workspace's newest enhancer, generator (distill student, else dit), VAE
and reward versions are used (phase two is saved there as the next enhancer-rl version).
Without it a scene-world workspace is built, each model trained briefly (a temporary one,
removed at the end, or the one --build names, kept and completed when run again).

    flock /tmp/plan/heavy.lock .venv/bin/python benchmarks/enhancer_rl.py -w ws      # phase two + eval
    flock /tmp/plan/heavy.lock .venv/bin/python benchmarks/enhancer_rl.py --build /tmp/erl-ws --build-only
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from dataengine.runtime import apply_offline_defaults

apply_offline_defaults()

import torch  # noqa: E402

from dataengine.catalog import Catalog  # noqa: E402
from dataengine.workspace import Workspace  # noqa: E402
from models.enhancer_rl import EnhancerRLConfig, train_enhancer_rl  # noqa: E402
from models.trainer import LoopConfig, latest  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_workspace(root: Path, args) -> Workspace:
    """A scene-world workspace with pairs, a phase-one enhancer, a VAE, a DiT, reward heads
    and the checker, each trained briefly (the budgets are this script's flags). Parts
    already there are kept, so an interrupted build picks up where it stopped."""
    from dataengine.degrade import DegradeConfig
    from dataengine.degrade.run import captions_from_samples, degrade_to_lake
    from dataengine.ingest import IngestConfig, ingest
    from dataengine.sceneworld import SceneWorldConfig, write_scene_world
    from dataengine.sceneworld.checker import Checker
    from models.stack import default_loop, train_model
    from models.train_enhancer import EnhancerTrainConfig, train as train_phase_one

    ws = Workspace.at(root)
    catalog = Catalog(ws)
    catalog.migrate()
    count = lambda table: catalog.query(f"SELECT count(*) n FROM {table}")["n"][0].as_py()  # noqa: E731
    t0 = time.perf_counter()
    if count("samples") == 0:
        world = SceneWorldConfig(seed=args.seed, n_train=args.scenes, n_pool=0, n_eval=64, resolution=64,
                                 edit_fraction=0.1, samples_per_shard=500)
        write_scene_world(ws.shards, world, splits=("train", "eval"), progress=False)
        ingest(ws, [str(ws.shards)], IngestConfig(use_ray=False), catalog)
    if count("pairs") == 0:
        degrade_to_lake(catalog, captions_from_samples(catalog, "train"), DegradeConfig(seed=args.seed))
    log(f"[build] {count('samples')} samples, {count('pairs')} pairs in {time.perf_counter() - t0:.0f}s")

    if latest(ws.models, "enhancer") is None:
        t0 = time.perf_counter()
        pairs = catalog.query("SELECT * FROM pairs ORDER BY pair_id")
        train_phase_one(pairs, ws.models, EnhancerTrainConfig(size="nano", steps=args.enhancer_steps, batch_size=16,
                                                              seed=args.seed, num_threads=args.threads,
                                                              progress=False))
        log(f"[build] phase-one enhancer ({args.enhancer_steps} steps) in {time.perf_counter() - t0:.0f}s")
    for name, steps, overrides in (("vae", args.vae_steps, {}), ("dit", args.dit_steps, {"fidelity": False}),
                                   ("reward", args.reward_steps, {})):
        if latest(ws.models, name) is None:
            t0 = time.perf_counter()
            loop = default_loop(name, steps=steps, seed=args.seed, num_threads=args.threads, progress=False)
            train_model(name, ws.root, overrides, loop, progress=False)
            log(f"[build] {name} ({steps} steps) in {time.perf_counter() - t0:.0f}s")
    t0 = time.perf_counter()
    Checker.load_or_train(ws.models / "checker")  # where train_enhancer_rl looks for it
    log(f"[build] scene-world checker in {time.perf_counter() - t0:.0f}s")
    return ws


def table(ev: dict, record: dict, cfg: EnhancerRLConfig, loop: LoopConfig) -> str:
    """The one table: a row per contender."""
    figs = ev["contenders"]
    heads = sorted(cfg.reward_weights)
    cols = (["reward"] + [f"reward_{h}" for h in heads] + ["accuracy", "acc_bound", "intent_preservation",
                                                           "words", "text_overflow"])
    names = {"reward": "reward", "accuracy": "checker acc", "acc_bound": "acc bound",
             "intent_preservation": "intent kept", "words": "words", "text_overflow": "> text window"}
    names |= {f"reward_{h}": h for h in heads}
    rows = [("terse", "terse (as typed)"), ("phase1", "phase 1 (SFT)"), ("phase2", "phase 2 (RL)")]
    width = max(len(label) for _, label in rows)
    out = [f"{'prompt':<{width}}  " + "  ".join(f"{names[c]:>13}" for c in cols)]
    for key, label in rows:
        cells = []
        for c in cols:
            v = figs[key].get(c)
            cells.append(f"{v:>13.4f}" if isinstance(v, (int, float)) else f"{'-':>13}")
        out.append(f"{label:<{width}}  " + "  ".join(cells))
    weights = " + ".join(f"{w:g} {k}" for k, w in cfg.reward_weights.items())
    m = record["metrics"]
    rl = json.loads(Path(record["path"], "config.json").read_text())["job"]
    curve = [v for _, v in m["curves"].get("reward", [])]  # ~20 windows of the run
    q = max(1, len(curve) // 4)
    trend = f"{sum(curve[:q]) / q:.4f} -> {sum(curve[-q:]) / q:.4f}" if curve else "-"
    out.append(f"{ev['n_prompts']} held-out prompts ({ev['n_with_scene']} with scene ground truth, "
               f"{rl.get('heldout_unseen_by_phase1', 0)} also unseen by phase 1); reward = {weights}, "
               f"scored against the terse prompt; generator {rl['renderer']['sampler']} at {cfg.resolution}px.")
    pairs = ev.get("paired_reward", {})
    out.append("paired reward differences (mean +- s.e., share of prompts won): " + "; ".join(
        f"{k} {v['mean']:+.3f} +- {v['se']:.3f} ({v['wins']:.0%})" for k, v in pairs.items()))
    out.append(f"phase 2: {loop.steps} steps x {cfg.prompts_per_step} prompts x G={cfg.group_size}, lr {loop.lr:g}, "
               f"beta {cfg.kl_beta:g}, T {cfg.temperature:g}; train {m['train_seconds']:.0f}s, eval "
               f"{m['eval_seconds']:.0f}s; training reward (first -> last quarter of steps) {trend}, "
               f"KL/token at the end {m['last'].get('kl', float('nan')):.4f}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-w", "--workspace", type=Path,
                    help="a workspace with enhancer, dit or distill, vae and reward versions")
    ap.add_argument("--steps", type=int, default=30, help="phase-two steps")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--beta", type=float, default=0.05)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--eval-prompts", type=int, default=48)
    ap.add_argument("--generator", default="auto", choices=("auto", "distill", "dit"))
    ap.add_argument("--sample-steps", type=int, default=10, help="Euler steps of the DiT's renders (not the student's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    # Budgets of the temporary workspace's models (ignored with -w).
    ap.add_argument("--scenes", type=int, default=400)
    ap.add_argument("--enhancer-steps", type=int, default=400)
    ap.add_argument("--vae-steps", type=int, default=150)
    ap.add_argument("--dit-steps", type=int, default=250)
    ap.add_argument("--reward-steps", type=int, default=150)
    ap.add_argument("--build", type=Path, help="build (or finish building) the workspace here and keep it")
    ap.add_argument("--build-only", action="store_true", help="with --build: stop after building")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    started = time.perf_counter()
    temporary = None
    if args.workspace:
        ws = Workspace.at(args.workspace)
    else:
        if args.build is None:
            temporary = Path(tempfile.mkdtemp(prefix="bench-enhancer-rl-"))
        root = args.build or temporary / "ws"
        log(f"[build] workspace {root}")
        ws = build_workspace(root, args)
        if args.build_only:
            log(f"[build] done ({time.perf_counter() - started:.0f}s)")
            return 0
    missing = [n for n in ("enhancer", "vae", "reward") if latest(ws.models, n) is None]
    if latest(ws.models, "dit") is None and latest(ws.models, "distill") is None:
        missing.append("dit or distill")
    if missing:
        log(f"{ws.root}: no {', '.join(missing)} version; train them first or omit -w")
        return 2

    from models.rl import UntrustedReward, default_weights

    try:
        weights = default_weights(ws.root)  # what train_enhancer_rl optimises by default
    except UntrustedReward as e:
        log(f"phase two not run: {e}")
        return 3
    cfg = EnhancerRLConfig(group_size=args.group_size, prompts_per_step=args.prompts_per_step, kl_beta=args.beta,
                           temperature=args.temperature, eval_prompts=args.eval_prompts, generator=args.generator,
                           dit_steps=args.sample_steps, reward_weights=weights)
    loop = LoopConfig(steps=args.steps, lr=args.lr, warmup_steps=min(5, args.steps), seed=args.seed,
                      ckpt_every=max(args.steps, 1), num_threads=args.threads, progress=False)
    t0 = time.perf_counter()
    record = train_enhancer_rl(ws.root, cfg, loop, progress=False)
    log(f"[phase 2] {record['version']} at {record['path']} in {time.perf_counter() - t0:.0f}s "
        f"(total {time.perf_counter() - started:.0f}s)")
    for ex in record["metrics"]["eval"].get("examples", [])[:3]:
        log(f"  terse:   {ex['terse']}\n  phase 1: {ex['phase1']}\n  phase 2: {ex['phase2']}")
    print(table(record["metrics"]["eval"], record, cfg, loop))
    if temporary is not None:
        import shutil

        shutil.rmtree(temporary, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Flow-GRPO on the reward heads: optimised reward and held-out checker accuracy, before and after.

The workspace's newest DiT (or distilled student, --start distill) is tuned by
models/rl.py: groups of SDE samples per training caption, group-normalised advantages of
the reward heads' weighted score, PPO-clipped updates on the high-noise half of the
steps, KL to the start model. Then, on held-out scene-world captions with one fixed noise
per caption, the start model ("before") and the tuned one ("after") generate with the
deployed sampler (Euler ODE, CFG) and are scored on the optimised reward and on the
scene-world checker's attribute accuracy against each caption's ground truth, which RL
never sees. Reward hacking shows as the first going up while the second goes down: the
run's verdict line says so, from paired changes beyond two standard errors.

With -w the workspace's own versions are used (the tuned model is saved there as the next
`rl` version). Without it a temporary scene-world workspace is built and a tiny VAE, DiT
and reward heads are trained briefly through the stack's train entry first.

    .venv/bin/python benchmarks/rl.py                # ~25 min on 2 cores (the reward heads take ~10)
    .venv/bin/python benchmarks/rl.py --reward-from /tmp/bench-rewards-*/spatial/reward/v0001
    .venv/bin/python benchmarks/rl.py -w ws --steps 60
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from dataengine.runtime import apply_offline_defaults

apply_offline_defaults()

import torch  # noqa: E402

from dataengine.catalog import Catalog  # noqa: E402
from dataengine.workspace import Workspace  # noqa: E402
from models.rl import RLConfig, rl  # noqa: E402
from models.trainer import LoopConfig, latest  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_workspace(root: Path, args) -> Workspace:
    """A scene-world workspace with a VAE, a DiT and reward heads, each trained briefly
    through `models.stack.train_model` (budgets are this script's flags)."""
    from dataengine.ingest import IngestConfig, ingest
    from dataengine.sceneworld import SceneWorldConfig, write_scene_world
    from models.stack import default_loop, train_model

    ws = Workspace.at(root)
    catalog = Catalog(ws)
    catalog.migrate()
    t0 = time.perf_counter()
    world = SceneWorldConfig(seed=args.seed, n_train=args.scenes, n_pool=0, n_eval=args.eval_prompts,
                             resolution=args.resolution, edit_fraction=0.0, samples_per_shard=500)
    write_scene_world(ws.shards, world, splits=("train", "eval"), progress=False)
    ingest(ws, [str(ws.shards)], IngestConfig(use_ray=False), catalog)
    log(f"[build] {args.scenes} scenes at {args.resolution}px in {time.perf_counter() - t0:.0f}s")
    for name, steps, overrides in (("vae", args.vae_steps, {"resolution": args.resolution}),
                                   ("dit", args.dit_steps, {"resolution": args.resolution, "fidelity": False}),
                                   ("reward", args.reward_steps, {})):
        if name == "reward" and args.reward_from:  # heads trained elsewhere (benchmarks/rewards.py)
            shutil.copytree(args.reward_from, ws.models / "reward" / "v0001")
            log(f"[build] reward copied from {args.reward_from}")
            continue
        t0 = time.perf_counter()
        loop = default_loop(name, steps=steps, seed=args.seed, num_threads=args.threads, progress=False)
        train_model(name, ws.root, overrides, loop, progress=False)
        log(f"[build] {name} ({steps} steps) in {time.perf_counter() - t0:.0f}s")
    return ws


def seed_checker(ws: Workspace, checker_dir: str) -> None:
    """Train the scene-world checker once per machine (checker_dir) and copy it into the
    workspace, where the judge looks for it."""
    from dataengine.sceneworld.checker import Checker

    target = ws.models / "checker"
    if not target.exists():
        t0 = time.perf_counter()
        Checker.load_or_train(checker_dir)
        shutil.copytree(checker_dir, target)
        log(f"[build] checker ready in {time.perf_counter() - t0:.0f}s")


def table(ev: dict, cfg: RLConfig, record: dict, loop: LoopConfig) -> str:
    """The one table: before and after, optimised reward then the held-out checker."""
    figs = ev["samplers"]
    heads = sorted({k[len("reward_"):] for k in figs["before"] if k.startswith("reward_")})
    cols = ([("reward", "reward (opt)")] + [(f"reward_{h}", h) for h in heads]
            + [("accuracy", "checker acc"), ("acc_colour", "colour"), ("acc_shape", "shape"),
               ("acc_bound", "bound"), ("acc_position", "position"), ("acc_background", "background")])
    width = 13
    out = [f"{'model':<8}" + "".join(f"{n:>{width}}" for _, n in cols)]
    for name in ("before", "after"):
        f = figs[name]
        out.append(f"{name:<8}" + "".join(f"{f[k]:>{width}.4f}" if k in f else f"{'-':>{width}}" for k, _ in cols))
    delta = {k: figs["after"][k] - figs["before"][k] for k, _ in cols if k in figs["after"] and k in figs["before"]}
    out.append(f"{'change':<8}" + "".join(f"{delta[k]:>+{width}.4f}" if k in delta else f"{'-':>{width}}"
                                          for k, _ in cols))
    m = record["metrics"]
    run = RLConfig(**json.loads(Path(record["path"], "config.json").read_text())["job"]["rl"])  # resolved
    weights = " + ".join(f"{w:g} {k}" for k, w in run.reward_weights.items())
    first, last, nan = m["first"], m["last"], float("nan")
    out.append(f"{ev['n_prompts']} held-out scene-world captions, one noise each; sampler: Euler ODE "
               f"{run.sample_steps} steps, CFG {run.cfg_scale:g}. Optimised: {weights}; held out: checker accuracy "
               f"(never optimised). Training: {loop.steps} steps x {run.prompts_per_step} prompts x "
               f"G={run.group_size}, SDE a={run.noise_level:g}, loss on the first {run.k} of {run.sample_steps} steps, "
               f"lr {run.lr or loop.lr:g}, clip {run.clip_range:g}, beta {run.kl_beta:g}, {run.updates_per_step} "
               f"update(s)/step; train {m['train_seconds']:.0f}s, eval {m['eval_seconds']:.0f}s; train reward "
               f"{first.get('reward', nan):.4f} -> {last.get('reward', nan):.4f} (first step -> mean of last 10%), "
               f"KL {last.get('kl', nan):.4g}, clip frac {last.get('clip_frac', nan):.3f}")
    v = ev["verdict"]
    moved = ", ".join(f"{k} {m['change']:+.4f} (se {m['se']:.4f}, {m['moved']})" for k, m in v["heldout"].items())
    out.append(f"verdict: optimised reward {v['optimised']['change']:+.4f} (se {v['optimised']['se']:.4f}, "
               f"{v['optimised']['moved']}); held out: {moved}; "
               + ("REWARD HACKING: the optimised reward rose while " + ", ".join(v["heldout_fell"]) + " fell"
                  if v["reward_hacking"] else "helped" if v["helped"]
                  else "the optimised reward did not rise on held-out prompts" if v["optimised"]["moved"] != "rose"
                  else "no held-out measure moved with it"))
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-w", "--workspace", type=Path, help="a workspace with dit (or distill), vae and reward versions")
    ap.add_argument("--start", default="dit", choices=("dit", "distill"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--sample-steps", type=int, default=None, help="default: 10 (dit), the student's (distill)")
    ap.add_argument("--updates", type=int, default=2, help="optimiser updates per sampled batch")
    ap.add_argument("--clip-range", type=float, default=RLConfig.clip_range)
    ap.add_argument("--beta", type=float, default=RLConfig.kl_beta)
    ap.add_argument("--noise-level", type=float, default=RLConfig.noise_level)
    ap.add_argument("--weights", default=None, help='reward weights as JSON, e.g. \'{"fidelity": 1}\'')
    ap.add_argument("--advantages", default=RLConfig.advantages, choices=("sum", "per_head"),
                    help="per_head: normalise each head within its group before weighting (models.rl.RLConfig)")
    ap.add_argument("--eval-prompts", type=int, default=48)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checker-dir", default=str(Path(tempfile.gettempdir()) / "dataengine-bench-checker"),
                    help="where the scene-world checker is trained once and reused")
    # Budgets of the temporary workspace's models (ignored with -w).
    ap.add_argument("--scenes", type=int, default=400)
    ap.add_argument("--vae-steps", type=int, default=150)
    ap.add_argument("--dit-steps", type=int, default=300)
    ap.add_argument("--reward-steps", type=int, default=1500)
    ap.add_argument("--reward-from", type=Path, default=None,
                    help="a saved reward version folder to use instead of training one (e.g. from benchmarks/rewards.py)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary workspace (its path goes to stderr)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    started = time.perf_counter()
    if args.workspace:
        ws = Workspace.at(args.workspace)
    else:
        if args.start == "distill":
            log("--start distill needs a workspace with a distill version (-w)")
            return 2
        root = Path(tempfile.mkdtemp(prefix="bench-rl-"))
        log(f"[build] temporary workspace {root}")
        ws = build_workspace(root / "ws", args)
    missing = [n for n in (args.start, "vae", "reward") if latest(ws.models, n) is None]
    if missing:
        log(f"{ws.root}: no {', '.join(missing)} version; train them first or omit -w")
        return 2
    seed_checker(ws, args.checker_dir)

    extra = {"reward_weights": json.loads(args.weights)} if args.weights else {}
    cfg = RLConfig(group_size=args.group_size, prompts_per_step=args.prompts_per_step, sample_steps=args.sample_steps,
                   updates_per_step=args.updates, clip_range=args.clip_range, kl_beta=args.beta,
                   noise_level=args.noise_level, resolution=args.resolution, eval_prompts=args.eval_prompts,
                   start=args.start, advantages=args.advantages, **extra)
    loop = LoopConfig(steps=args.steps, lr=args.lr, warmup_steps=min(3, args.steps), seed=args.seed,
                      ckpt_every=max(args.steps, 1), num_threads=args.threads, progress=False)
    t0 = time.perf_counter()
    record = rl(ws.root, cfg, loop, progress=False)
    log(f"[rl] {record['version']} at {record['path']} in {time.perf_counter() - t0:.0f}s "
        f"(total {time.perf_counter() - started:.0f}s)")
    print(table(record["metrics"]["eval"], cfg, record, loop))
    if not args.workspace and not args.keep:
        shutil.rmtree(ws.root.parent, ignore_errors=True)
    elif not args.workspace:
        log(f"[keep] {ws.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

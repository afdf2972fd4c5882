"""4-step DMD student against the 40-step teacher with CFG: fidelity, reward, wall time.

The workspace's newest DiT is distilled (models/distill.py) into a student that samples in
4 Euler steps without guidance. On held-out scene-world captions, with one fixed noise per
prompt shared by every sampler, three samplers generate latents that the VAE decodes:
the student, the teacher at 40 steps with CFG (the quality target), and the teacher at 4
steps with CFG (what the student must beat: few steps without distillation). Figures:
the scene-world checker's attribute accuracy against each caption's ground truth (colour,
shape, colour-on-shape, position, background), the reward heads' weighted score when the
workspace has a `reward` version, network forwards and wall time per image (sampling
only; decoding is the same for all), and the speed-up over the 40-step teacher.

With -w the workspace's own versions are used (the student is saved there as the next
`distill` version). Without it a temporary scene-world workspace is built and a tiny
VAE, DiT (and reward heads, when models/train_reward.py exists) are trained briefly
through the stack's train entry first.

    flock /tmp/plan/heavy.lock .venv/bin/python benchmarks/distill.py        # ~7 min, 2 cores
    flock /tmp/plan/heavy.lock .venv/bin/python benchmarks/distill.py -w ws --steps 300
    flock /tmp/plan/heavy.lock .venv/bin/python benchmarks/distill.py --build-only --dit-steps 1200  # for -w
"""

from __future__ import annotations

import argparse
import importlib.util
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
from models.distill import DistillConfig, distill  # noqa: E402
from models.trainer import LoopConfig, latest  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def has_rewards() -> bool:
    return importlib.util.find_spec("models.train_reward") is not None


def build_workspace(root: Path, args, need_reward: bool = False) -> Workspace:
    """A scene-world workspace with a VAE, a DiT and (when available) reward heads, each
    trained briefly through `models.stack.train_model` (budgets are this script's flags)."""
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
    plan = [("vae", args.vae_steps, {"resolution": args.resolution}),
            ("dit", args.dit_steps, {"resolution": args.resolution, "fidelity": False})]
    if has_rewards():
        # A side figure here: a few hundred scenes (the default 2000 take ~10 min to embed).
        plan.append(("reward", args.reward_steps, {"n_train": 400, "n_eval": 64}))
    elif need_reward:
        raise SystemExit("models/train_reward.py is missing: no reward heads to train")
    for name, steps, overrides in plan:
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


def table(ev: dict, cfg: DistillConfig, record: dict, loop: LoopConfig) -> str:
    """The one table: a row per sampler."""
    figs = ev["samplers"]
    student = f"student {cfg.student_steps}-step"
    teacher = f"teacher {cfg.teacher_steps}-step cfg"
    naive = f"teacher {cfg.student_steps}-step cfg"
    nfe = {student: cfg.student_steps, teacher: 2 * cfg.teacher_steps, naive: 2 * cfg.student_steps}
    heads = sorted(k[len("reward_"):] for k in figs[student] if k.startswith("reward_"))
    cols = ([("accuracy", "checker acc"), ("acc_colour", "colour"), ("acc_shape", "shape"), ("acc_bound", "bound"),
             ("acc_position", "position"), ("acc_background", "background"), ("reward", "reward (mean)")]
            + [(f"reward_{h}", h) for h in heads])
    head = f"{'sampler':<24}{'NFE':>5}{'ms/img':>9}{'speed-up':>10}" + "".join(f"{n:>13}" for _, n in cols)
    out = [head]
    base = figs[teacher]["ms_per_image"]
    for name in (student, teacher, naive):
        f = figs[name]
        cells = "".join(f"{f[k]:>13.4f}" if k in f else f"{'-':>13}" for k, _ in cols)
        out.append(f"{name:<24}{nfe[name]:>5}{f['ms_per_image']:>9.2f}{base / f['ms_per_image']:>9.1f}x" + cells)
    m = record["metrics"]
    first, last, nan = m["first"], m["last"], float("nan")
    out.append(f"{ev['n_prompts']} held-out scene-world captions, one noise per caption shared by all samplers; "
               f"real-score CFG {cfg.cfg_scale:g}; {loop.steps} student steps x batch {cfg.batch_size}, "
               f"{cfg.fake_updates} fake-score steps each, lr {cfg.lr_student or loop.lr:g}, backprop {cfg.backprop}; "
               f"train {m['train_seconds']:.0f}s, eval {m['eval_seconds']:.0f}s; generator loss "
               f"{first.get('loss', nan):.4f} -> {last.get('loss', nan):.4f}, "
               f"fake loss {first.get('fake_loss', nan):.4f} -> {last.get('fake_loss', nan):.4f}")
    if "reward" not in figs[student]:
        out.append("reward: - (the workspace has no `reward` version)")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-w", "--workspace", type=Path, help="a workspace with dit and vae versions")
    ap.add_argument("--steps", type=int, default=200, help="student (generator) steps")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--fake-updates", type=int, default=DistillConfig.fake_updates)
    ap.add_argument("--cfg-scale", type=float, default=DistillConfig.cfg_scale)
    ap.add_argument("--backprop", default="all", choices=("all", "last"))
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
    ap.add_argument("--reward-steps", type=int, default=150)
    ap.add_argument("--keep", action="store_true", help="keep the temporary workspace (its path goes to stderr)")
    ap.add_argument("--build-only", action="store_true",
                    help="build and keep the temporary workspace, then stop (reuse it with -w, here and in rl.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    started = time.perf_counter()
    if args.workspace:
        ws = Workspace.at(args.workspace)
    else:
        root = Path(tempfile.mkdtemp(prefix="bench-distill-"))
        log(f"[build] temporary workspace {root}")
        ws = build_workspace(root / "ws", args)
        if args.build_only:
            seed_checker(ws, args.checker_dir)
            log(f"[build] done in {time.perf_counter() - started:.0f}s: {ws.root}")
            return 0
    missing = [n for n in ("dit", "vae") if latest(ws.models, n) is None]
    if missing:
        log(f"{ws.root}: no {', '.join(missing)} version; train them first or omit -w")
        return 2
    seed_checker(ws, args.checker_dir)

    cfg = DistillConfig(cfg_scale=args.cfg_scale, fake_updates=args.fake_updates, backprop=args.backprop,
                        batch_size=args.batch_size, resolution=args.resolution, eval_prompts=args.eval_prompts)
    loop = LoopConfig(steps=args.steps, lr=args.lr, warmup_steps=min(10, args.steps), seed=args.seed,
                      ckpt_every=max(args.steps, 1), num_threads=args.threads, progress=False)
    t0 = time.perf_counter()
    record = distill(ws.root, cfg, loop, progress=False)
    log(f"[distill] {record['version']} at {record['path']} in {time.perf_counter() - t0:.0f}s "
        f"(total {time.perf_counter() - started:.0f}s)")
    print(table(record["metrics"]["eval"], cfg, record, loop))
    if not args.workspace and not args.keep:
        shutil.rmtree(ws.root.parent, ignore_errors=True)
    elif not args.workspace:
        log(f"[keep] {ws.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

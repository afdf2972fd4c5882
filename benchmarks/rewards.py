"""Reward heads: held-out pair accuracy of each head against its bar, spatial vs pooled.

Two runs from the same seed, scenes and step budget, held-out pairs drawn from scenes
neither run trained on:

    spatial   the default: prompt fidelity over patch tokens and prompt tokens
    pooled    every head an MLP on pooled CLIP embeddings (the earlier design)
    spatial-edits   (not in the default runs) also the edit heads over both images' patch
              tokens and the instruction's tokens (models/rewards.py, _EditMatch)

Reported per head: held-out accuracy, its bar (`models.rewards.HELDOUT_BARS`) and whether
it passes, accuracy per kind of pair, and for fidelity the CLIP-cosine baseline and the
blurred ("generated-looking") evaluation. Chance is 0.5 everywhere.

    python benchmarks/rewards.py                         # defaults: 2000 train scenes, 3000 steps (~35 min, 2 cores)
    python benchmarks/rewards.py --n-train 600 --steps 600 --runs spatial
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/vae.py

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from dataengine.runtime import apply_offline_defaults  # noqa: E402

apply_offline_defaults()

from models.rewards import HELDOUT_BARS, HEADS, bar_accuracy  # noqa: E402
from models.train_reward import RewardTrainConfig, make_job  # noqa: E402
from models.trainer import LoopConfig, train  # noqa: E402

RUNS = {"spatial": ("fidelity",), "pooled": (), "spatial-edits": ("fidelity", "instruction", "consistency")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = RewardTrainConfig()
    ap.add_argument("--n-train", type=int, default=defaults.n_train)
    ap.add_argument("--n-eval", type=int, default=defaults.n_eval)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--heads", default=",".join(HEADS))
    ap.add_argument("--runs", default="spatial,pooled", help=f"comma-separated of {list(RUNS)}")
    ap.add_argument("--patch-grid", type=int, default=defaults.patch_grid,
                    help="px per patch token at the token size (32: an 8x8 grid, a quarter of the cells)")
    ap.add_argument("--token-size", type=int, default=defaults.token_size,
                    help="px the images are read at for patch tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    heads = tuple(h for h in args.heads.split(",") if h)
    root = Path(tempfile.mkdtemp(prefix="bench-rewards-"))
    results = {}
    for name in args.runs.split(","):
        cfg = RewardTrainConfig(heads=heads, n_train=args.n_train, n_eval=args.n_eval, spatial=RUNS[name],
                                patch_grid=args.patch_grid, token_size=args.token_size)
        loop = LoopConfig(steps=args.steps, lr=args.lr, seed=args.seed, num_threads=args.threads, progress=True,
                          ckpt_every=10**9)
        t0 = time.perf_counter()
        record = train(make_job(None, cfg, loop), root / name, loop)
        ev = record["metrics"]["eval"]
        results[name] = ev
        print(f"[{name}] {time.perf_counter() - t0:.0f}s (pairs {ev['pairs_seconds']}, "
              f"train {record['metrics']['train_seconds']}s)", flush=True)

    print(f"\n{args.n_train} train scenes, {args.n_eval} held-out scenes, {args.steps} steps, seed {args.seed}")
    print(f"{'run':8} {'head':12} {'pairs':>6} {'held-out':>9} {'read on':>8} {'bar':>5} {'pass':>5}  by kind")
    for name, ev in results.items():
        for h, v in ev["heldout"].items():
            kinds = " ".join(f"{k} {a:.2f}" for k, a in v["by_kind"].items())
            on = bar_accuracy(h, v)  # the figure the bar is read on (fidelity: its colour and shape swaps)
            ok = "yes" if on is not None and on >= HELDOUT_BARS[h] else "no"
            print(f"{name:8} {h:12} {v['pairs']:>6} {v['accuracy']:>9.3f} {'-' if on is None else f'{on:.3f}':>8} "
                  f"{HELDOUT_BARS[h]:>5.2f} {ok:>5}  {kinds}")
        if "fidelity_blurred" in ev:
            print(f"{name:8} {'fidelity':12} blurred (sigma {ev['fidelity_blurred']['sigma_px']} px) "
                  f"{ev['fidelity_blurred']['accuracy']:.3f}; CLIP cosine {ev['fidelity_clip_cosine']:.3f}")
    for name, ev in results.items():
        fid = ev["heldout"].get("fidelity")
        if fid:
            print(f"rewards[{name}]: fidelity held-out {fid['accuracy']:.3f}, attribute swaps (mean of the colour and "
                  f"shape kinds) {bar_accuracy('fidelity', fid) or float('nan'):.3f}, trusted {ev['trusted']}")


if __name__ == "__main__":
    main()

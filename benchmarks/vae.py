"""VAE: f16 vs the f8 baseline at equal parameters and steps, with and without alignment.

Four runs from the same seed, data and step budget on a scene-world workspace (plus the
real images the connectors find: scikit-image's samples, Tux Paint's stamps):

    f16 + align   f16 c16, VA-VAE alignment to the frozen CLIP trunk
    f16           the same without alignment
    f8 + align    f8 c4 (same numbers per image as f16 c16), widened to the f16 budget
    f8            the same without alignment

Reported per run: parameters; PSNR, SSIM and perceptual distance (LPIPS-style on the
frozen trunk, lower is better) on held-out scene-world images and on real images kept out
of training; a linear probe of scene attributes on the latent (a ridge classifier on the
flattened latent mean of train-split images, accuracy on eval-split images: background,
lighting and style, and the colour and shape of the group that covers the most pixels);
training images per second. A `pixels` row probes average-pooled pixels with about as
many numbers as the latent: the probe's baseline without any model.

    python benchmarks/vae.py                                   # 300 steps x 16, tiny, 64 px (~35 min, 2 cores)
    python benchmarks/vae.py --steps 110 --batch-size 8       # ~8 min on 2 cores
    python benchmarks/vae.py --steps 60 --runs f16-align,f8-align
"""

from __future__ import annotations

import os

# Spinning OpenMP threads make torch many times slower whenever another process shares
# the cores; waiting passively costs little when it does not. Before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

from dataengine.runtime import apply_offline_defaults  # noqa: E402

apply_offline_defaults()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dataengine.catalog import Catalog  # noqa: E402
from dataengine.ingest import IngestConfig, ingest  # noqa: E402
from dataengine.sceneworld import SceneWorldConfig, write_scene_world  # noqa: E402
from dataengine.workspace import Workspace  # noqa: E402
from models.train_vae import SCENEWORLD, VAETrainConfig, make_job  # noqa: E402
from models.trainer import LoopConfig, train  # noqa: E402
from models.vae import load_vae  # noqa: E402

RUNS = {"f16-align": (16, True), "f16": (16, False), "f8-align": (8, True), "f8": (8, False)}


def make_workspace(root: Path, args) -> dict[str, int]:
    """Scene world (train, eval) at one resolution, the real images, ingested; returns counts."""
    ws = Workspace.at(root)
    cat = Catalog(ws)
    cat.migrate()
    # No held-out concepts: train and eval share one distribution, so the probe's test set
    # is not skewed toward the held-out concept's colour and shape.
    world = SceneWorldConfig(seed=args.seed, n_train=args.n_train, n_pool=0, n_eval=args.n_eval,
                             resolution=args.resolution, samples_per_shard=250, holdout=())
    write_scene_world(ws.shards, world, splits=("train", "eval"), progress=False)
    counts = {"sceneworld": args.n_train + args.n_eval}
    if args.real:
        from connectors import skimage_samples, tuxpaint

        counts["skimage"] = skimage_samples.write_shards(ws.shards / "train").written
        stamps = tuxpaint.find_stamps_root(None)
        if stamps is not None:
            counts["tuxpaint"] = tuxpaint.write_shards(stamps, ws.shards / "train").written
    ingest(ws, [str(ws.shards)], IngestConfig(use_ray=False), cat)
    return counts


# ---------------------------------------------------------------------------------------
# The linear probe
# ---------------------------------------------------------------------------------------


PROBED = ("background", "lighting", "style", "colour", "shape")  # the last two: of the largest group


def attributes(meta: dict) -> dict[str, str]:
    """The probed ground truth: three global attributes, and the colour and shape of the
    group that covers the most pixels."""
    scene = meta["scene"]
    area = lambda g: sum((b[2] - b[0]) * (b[3] - b[1]) for b in g["boxes"])  # noqa: E731
    largest = max(scene["groups"], key=area)
    return {"background": scene["background"], "lighting": scene["lighting"], "style": scene["style"],
            "colour": largest["colour"], "shape": largest["shape"]}


def probe(train_x: np.ndarray, train_y: list[str], test_x: np.ndarray, test_y: list[str]) -> float:
    """Held-out accuracy of a ridge classifier on standardised features, its penalty chosen
    by leave-one-out on the train set (closed form: seconds, no tuning by hand)."""
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=np.logspace(-1, 4, 11)))
    clf.fit(train_x, train_y)
    return float(np.mean(clf.predict(test_x) == np.array(test_y)))


def probe_sets(sampler, args):
    """Scene-world train and eval images with their attributes (gen samples, fixed order)."""
    tr = sampler.images(args.probe_train, split="train", resolution=args.resolution, source=SCENEWORLD)
    te = sampler.images(args.n_eval, split="eval", resolution=args.resolution, source=SCENEWORLD)
    return (tr.images, [attributes(m) for m in tr.meta]), (te.images, [attributes(m) for m in te.meta])


@torch.no_grad()
def features(encode, images: torch.Tensor, batch: int = 64) -> np.ndarray:
    return torch.cat([encode(images[i: i + batch]).flatten(1) for i in range(0, len(images), batch)]).numpy()


def probe_scores(encode, sets) -> dict[str, float]:
    (tr_x, tr_a), (te_x, te_a) = sets
    ftr, fte = features(encode, tr_x), features(encode, te_x)
    return {k: probe(ftr, [a[k] for a in tr_a], fte, [a[k] for a in te_a]) for k in PROBED}


# ---------------------------------------------------------------------------------------
# Runs and the table
# ---------------------------------------------------------------------------------------


def images_seen(metrics: dict) -> float:
    """Images trained on (edit batches add their sources), from the per-step "images" curve."""
    ends = [end for end, _ in metrics["curves"]["images"]]
    sizes = [b - a for a, b in zip([0] + ends, ends)]
    return sum(n * mean for n, (_, mean) in zip(sizes, metrics["curves"]["images"]))


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {list(RUNS)}")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--eval-images", type=int, default=64, help="held-out images per set for PSNR/SSIM")
    ap.add_argument("--probe-train", type=int, default=900, help="train images the probe fits on")
    ap.add_argument("--real", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        ap.error(f"unknown runs {unknown}; expected some of {list(RUNS)}")
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-vae-")) / "ws"
    counts = make_workspace(root, args)
    setup_s = time.perf_counter() - t0

    loop = LoopConfig(steps=args.steps, lr=args.lr, seed=args.seed, num_threads=args.threads, progress=False,
                      ckpt_every=max(args.steps, 1), device=args.device)
    rows, sets = [], None
    for name in runs:
        factor, align = RUNS[name]
        cfg = VAETrainConfig(size=args.size, factor=factor, align=align, resolution=args.resolution,
                             batch_size=args.batch_size, eval_images=args.eval_images)
        t1 = time.perf_counter()
        job = make_job(root, cfg, loop)
        if sets is None:
            sets = probe_sets(job.sampler, args)
            px = round(np.sqrt(args.resolution ** 2 / 16 / 3))  # pooled RGB with ~ as many numbers as a latent
            pix = probe_scores(lambda x: F.adaptive_avg_pool2d(x, px), sets)
            rows.append({"run": f"pixels {px}x{px}", "probe": pix})
        record = train(job, root / "models", loop)
        ev = record["metrics"]["eval"]
        vae = load_vae(record["path"])
        side = args.resolution // factor
        rows.append({"run": name, "params": ev["params"], "latent": f"{ev['latent_channels']}x{side}x{side}",
                     "scene": ev["sceneworld"], "real": ev["real"],
                     "probe": probe_scores(vae.encode, sets),
                     "img_s": images_seen(record["metrics"]) / record["metrics"]["train_seconds"],
                     "seconds": time.perf_counter() - t1})

    (_, tr_a), (_, te_a) = sets
    chance = {k: Counter(a[k] for a in te_a).most_common(1)[0][1] / len(te_a) for k in PROBED}
    real = next((r["real"] for r in rows if r.get("real")), None)
    print(f"\nVAE benchmark: size {args.size}, {args.steps} steps x {args.batch_size} at {args.resolution} px, "
          f"lr {args.lr}, seed {args.seed}, {args.threads} threads, device {loop.device}; data {counts}, "
          f"set-up {setup_s:.0f} s")
    print(f"held out: {rows[-1]['scene']['n'] if 'scene' in rows[-1] else '-'} scene-world eval images, "
          f"{real['n'] if real else 0} real images; probe fits {len(tr_a)} train images, tests {len(te_a)} "
          "eval images (majority-class accuracy: " + ", ".join(f"{k} {v:.2f}" for k, v in chance.items()) + ")")
    head = (f"{'run':<13}{'params':>9}{'latent':>9} | {'scene PSNR':>10}{'SSIM':>6}{'perc':>6} | "
            f"{'real PSNR':>9}{'SSIM':>6}{'perc':>6} | "
            f"probe {'bg':>4}{'light':>6}{'style':>6}{'colour':>7}{'shape':>6} | {'img/s':>6}{'run s':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        s, rl = r.get("scene") or {}, r.get("real") or {}
        print(f"{r['run']:<13}{fmt(r.get('params'), ',d'):>9}{r.get('latent', '-'):>9} | "
              f"{fmt(s.get('psnr'), '.2f'):>10}{fmt(s.get('ssim'), '.3f'):>6}{fmt(s.get('perceptual'), '.3f'):>6} | "
              f"{fmt(rl.get('psnr'), '.2f'):>9}{fmt(rl.get('ssim'), '.3f'):>6}{fmt(rl.get('perceptual'), '.3f'):>6} | "
              f"      {r['probe']['background']:>4.2f}{r['probe']['lighting']:>6.2f}{r['probe']['style']:>6.2f}"
              f"{r['probe']['colour']:>7.2f}{r['probe']['shape']:>6.2f} | "
              f"{fmt(r.get('img_s'), '.1f'):>6}{fmt(r.get('seconds'), '.0f'):>6}")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

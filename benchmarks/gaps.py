"""Gap detection precision/recall on the scene world, and how much of each patch is on target.

A scene world whose train split never shows a few (colour, shape) concepts, while its
pool does. The full engine runs on it: default embedding model -> embeddings -> indexes
-> gap search over a list of concepts (the held-out ones and covered ones drawn from
train) -> a patch for every detected gap. Ground truth comes from each sample's json.

    python benchmarks/gaps.py                 # 10 held-out + 20 covered concepts
    python benchmarks/gaps.py --seed 1        # another draw of held-out concepts
    python benchmarks/gaps.py --workdir /tmp/g        # keep the workspace; reused next time

Held-out concepts are drawn by --seed from the scene world's vocabulary (the engine's
code never names it); the search was tuned on seed 0, so other seeds are data it was
not tuned on.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

from dataengine.runtime import apply_offline_defaults

apply_offline_defaults()

from dataengine.catalog import Catalog  # noqa: E402
from dataengine.cluster import ensure_ray  # noqa: E402
from dataengine.embed import EmbedConfig, embed  # noqa: E402
from dataengine.gaps import GapConfig, GapSearcher, build_workspace_indexes  # noqa: E402
from dataengine.ingest import IngestConfig, ingest  # noqa: E402
from dataengine.patch import PatchConfig, patch_found_gap  # noqa: E402
from dataengine.sceneworld import SceneWorldConfig, write_scene_world  # noqa: E402
from dataengine.workspace import Workspace  # noqa: E402
from models.clip import load_clip  # noqa: E402


def draw_held_out(n: int, seed: int) -> tuple[tuple[str, str], ...]:
    """n (colour, shape) concepts, at most two per colour and per shape, so the rest of
    each colour and shape stays in train."""
    from dataengine.sceneworld.scene import COLOURS, SHAPES

    rng = random.Random(1000 + seed)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    rng.shuffle(pairs)
    out: list[tuple[str, str]] = []
    for c, s in pairs:
        if sum(c == x for x, _ in out) < 2 and sum(s == y for _, y in out) < 2:
            out.append((c, s))
        if len(out) == n:
            break
    return tuple(out)


def concepts_of(meta: dict) -> set[tuple[str, str]]:
    scenes = [meta["scene"]] + ([meta["source_scene"]] if "source_scene" in meta else [])
    return {(g["colour"], g["shape"]) for sc in scenes for g in sc["groups"]}


def write_tuxpaint_split(ws: Workspace, n_held: int, seed: int) -> dict[str, dict] | None:
    """Tux Paint's captioned photographs by class (their folder): `n_held` classes only in
    the pool, the rest three quarters in train and a quarter in the pool. Returns
    {class: {"held_out", "train", "pool", "query"}}, or None without Tux Paint."""
    import hashlib

    from connectors import tuxpaint
    from dataengine.shards import write_shards

    root = tuxpaint.find_stamps_root(None)
    if root is None:
        return None
    samples = list(tuxpaint.iter_samples(root))
    by_class: dict[str, list[dict]] = {}
    for smp in samples:
        by_class.setdefault(smp["json"]["path"].rsplit("/", 1)[0], []).append(smp)
    names = Counter(c.rsplit("/", 1)[-1] for c in by_class)
    # A class is queried by its folder's own name; names two folders share say nothing.
    usable = sorted(c for c, v in by_class.items() if len(v) >= 8 and names[c.rsplit("/", 1)[-1]] == 1)
    held = set(random.Random(2000 + seed).sample(usable, min(n_held, len(usable) // 3)))
    out, train, pool = {}, [], []
    for c in usable:
        info = {"held_out": c in held, "train": 0, "pool": 0, "query": c.rsplit("/", 1)[-1].replace("_", " ")}
        for smp in by_class[c]:
            to_pool = c in held or hashlib.sha1(smp["__key__"].encode()).digest()[0] < 64
            (pool if to_pool else train).append(smp)
            info["pool" if to_pool else "train"] += 1
        out[c] = info
    write_shards(train, ws.shards / "train", prefix="tuxpaint")
    write_shards(pool, ws.shards / "pool", prefix="tuxpaint")
    return out


def detection(reports, truth: list[bool]) -> tuple[float, float, int, int, int]:
    tp = sum(r.is_gap and t for r, t in zip(reports, truth))
    fp = sum(r.is_gap and not t for r, t in zip(reports, truth))
    fn = sum(t and not r.is_gap for r, t in zip(reports, truth))
    return (tp / (tp + fp) if tp + fp else float("nan"), tp / (tp + fn) if tp + fn else float("nan"), tp, fp, fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-pool", type=int, default=600)
    ap.add_argument("--held-out", type=int, default=10, help="concepts never shown in train")
    ap.add_argument("--covered", type=int, default=20, help="covered concepts drawn from train")
    ap.add_argument("--alpha", type=float, default=GapConfig.alpha)
    ap.add_argument("--patch-size", type=int, default=32)
    ap.add_argument("--workdir", default=None, help="a workspace made here before is reused")
    ap.add_argument("--real-held-out", type=int, default=4, help="Tux Paint classes kept out of train")
    ap.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                    help="also train today's embedding recipe (train + pool captions, no negatives) for recall")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    HELD_OUT = draw_held_out(args.held_out, args.seed)
    t0 = time.perf_counter()
    ws = Workspace.at(Path(args.workdir or tempfile.mkdtemp(prefix="bench-gaps-")) / "ws")
    cat = Catalog(ws)
    fresh = not ws.catalog_path.exists()
    cat.migrate()
    from models.train_clip import ClipTrainConfig, train_default_clip

    if fresh:
        world = SceneWorldConfig(seed=args.seed, n_train=args.n_train, n_pool=args.n_pool, n_eval=100,
                                 resolution=128, holdout=HELD_OUT, holdout_pool_fraction=0.4)
        ensure_ray()
        write_scene_world(ws.shards, world, progress=False, use_ray=True)
        real = write_tuxpaint_split(ws, args.real_held_out, args.seed)
        (ws.root / "tuxpaint-classes.json").write_text(json.dumps(real))
        ingest(ws, [str(ws.shards)], IngestConfig(use_ray=True), cat)
    real = json.loads((ws.root / "tuxpaint-classes.json").read_text())
    clip = train_default_clip(ws.root, ClipTrainConfig(seed=args.seed), progress=False, reuse=True)
    embed(ws.root, EmbedConfig(use_ray=fresh), progress=False, load_encoder=load_clip)
    build_workspace_indexes(ws, "default", ("train", "pool"), gap_cfg=GapConfig(alpha=args.alpha, seed=args.seed),
                            progress=False, load_encoder=load_clip)
    setup_s = time.perf_counter() - t0

    train_counts, pool_meta = Counter(), {}
    for row in cat.query("SELECT key, split, meta FROM samples WHERE split IN ('train', 'pool') "
                         "AND source = 'sceneworld'").to_pylist():
        cs = concepts_of(json.loads(row["meta"]))
        if row["split"] == "train":
            train_counts.update(cs)
        else:
            pool_meta[row["key"]] = cs
    rng = random.Random(args.seed)
    covered = rng.sample(sorted(c for c in train_counts if c not in HELD_OUT), args.covered)
    concepts = list(HELD_OUT) + covered
    truth = {c: c in HELD_OUT for c in concepts}

    searcher = GapSearcher(ws, load_encoder=load_clip)
    t1 = time.perf_counter()
    reports, vecs = searcher.prompts([f"a {c} {s}" for c, s in concepts])
    search_ms = 1e3 * (time.perf_counter() - t1) / len(concepts)

    print(f"\ngap search on the scene world: {args.n_train} train / {args.n_pool} pool images, "
          f"model {searcher.encoder.model_id}, alpha {args.alpha}, set-up {setup_s:.0f} s")
    print(f"{'concept':<22}{'train n':>8}{'truth':>6}{'image':>8}{'caption':>9}{'pct':>7}{'thresh':>7}{'found':>6}"
          f"{'patch':>7}{'on target':>10}")
    tp = fp = fn = 0
    patched = hits = 0
    base_rates = []
    for (c, s), r, v in zip(concepts, reports, vecs):
        held = truth[(c, s)]
        tp += held and r.is_gap
        fp += (not held) and r.is_gap
        fn += held and not r.is_gap
        cell_patch, cell_hit = "", ""
        if r.is_gap:
            p = patch_found_gap(searcher, r, v, PatchConfig(size=args.patch_size))
            on = sum((c, s) in pool_meta.get(x["pool_key"], ()) for x in p.samples)
            patched += p.written
            hits += on
            base_rates.append(sum((c, s) in cs for cs in pool_meta.values()) / max(1, len(pool_meta)))
            cell_patch, cell_hit = str(p.written), (f"{on / p.written:.2f}" if p.written else "-")
        cap = f"{r.caption_coverage:+.3f}" if r.caption_coverage is not None else "-"
        print(f"{c + ' ' + s:<22}{train_counts[(c, s)]:>8}{'gap' if held else 'cov':>6}{r.coverage:>+8.3f}{cap:>9}"
              f"{r.percentile:>7.3f}{r.threshold:>7.3f}{'GAP' if r.is_gap else '-':>6}{cell_patch:>7}{cell_hit:>10}")
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    print(f"\ngap detection: precision {precision:.2f}, recall {recall:.2f} "
          f"({tp} true, {fp} false, {fn} missed of {len(HELD_OUT)} held-out among {len(concepts)} concepts); "
          f"{search_ms:.1f} ms per query")
    if patched:
        print(f"patches: {hits}/{patched} samples hold their missing concept ({hits / patched:.2f}); "
              f"the pool's own share of those concepts: {sum(base_rates) / len(base_rates):.3f}")
    # Each side's ranking power whatever the threshold, and the trade-off alpha sets.
    import numpy as np

    cov = searcher.coverage
    sides = {"image margin": [r.coverage for r in reports], "combined percentile": [r.percentile for r in reports]}
    if reports[0].caption_coverage is not None:
        sides["caption margin"] = [r.caption_coverage for r in reports]
    print("ranking, AUROC held-out vs covered: " + ", ".join(
        f"{k} {auroc_of(v, [truth[c] for c in concepts]):.2f}" for k, v in sides.items()))
    combined = np.array(sides["combined percentile"])
    ref = cov.ref_combined if cov.has_captions else cov.ref_text
    for alpha in (0.01, 0.02, 0.05, 0.1):
        thr = float(np.quantile(ref, alpha))
        found = combined < thr if cov.has_captions else np.array([r.coverage for r in reports]) < thr
        tp_a = int(sum(f and truth[c] for f, c in zip(found, concepts)))
        fp_a = int(sum(f and not truth[c] for f, c in zip(found, concepts)))
        print(f"  alpha {alpha:<5} threshold {thr:+.3f}: precision "
              f"{(tp_a / (tp_a + fp_a)) if tp_a + fp_a else float('nan'):.2f}, recall {tp_a / len(HELD_OUT):.2f}")
    for r in reports[:3]:
        print(f"  evidence {r.concept!r}: {r.explain()}")

    if real:
        classes = sorted(real)
        real_reports, real_vecs = searcher.prompts([real[c]["query"] for c in classes])
        truth_real = [real[c]["held_out"] for c in classes]
        print(f"\ngap search on real images (Tux Paint, queried by class name): "
              f"{sum(truth_real)} classes only in the pool, {len(classes) - sum(truth_real)} in train")
        print(f"{'class':<28}{'train':>6}{'pool':>6}{'truth':>6}{'image':>8}{'caption':>9}{'pct':>7}{'found':>6}"
              f"{'patch':>7}{'on target':>10}")
        class_of = {}
        for row in cat.query("SELECT key, meta FROM samples WHERE split = 'pool' AND source = 'tuxpaint'").to_pylist():
            class_of[row["key"]] = json.loads(row["meta"])["path"].rsplit("/", 1)[0]
        r_patched = r_hits = 0
        for c, r, v in zip(classes, real_reports, real_vecs):
            cell_patch = cell_hit = ""
            if r.is_gap:
                p = patch_found_gap(searcher, r, v, PatchConfig(size=args.patch_size))
                on = sum(class_of.get(x["pool_key"]) == c for x in p.samples)
                r_patched += p.written
                r_hits += on
                cell_patch, cell_hit = str(p.written), (f"{on / p.written:.2f}" if p.written else "-")
            cap = f"{r.caption_coverage:+.3f}" if r.caption_coverage is not None else "-"
            print(f"{c:<28}{real[c]['train']:>6}{real[c]['pool']:>6}{'gap' if real[c]['held_out'] else 'cov':>6}"
                  f"{r.coverage:>+8.3f}{cap:>9}{r.percentile:>7.3f}{'GAP' if r.is_gap else '-':>6}{cell_patch:>7}"
                  f"{cell_hit:>10}")
        p_, r_, tp_, fp_, fn_ = detection(real_reports, truth_real)
        print(f"real-image gap detection: precision {p_:.2f}, recall {r_:.2f} ({tp_} true, {fp_} false, {fn_} missed)")
        if r_patched:
            print(f"real-image patches: {r_hits}/{r_patched} samples from the missing class ({r_hits / r_patched:.2f})")
        print("  ranking, AUROC held-out vs covered: " + ", ".join(
            f"{k} {auroc_of([getattr(r, a) for r in real_reports], truth_real):.2f}"
            for k, a in (("image margin", "coverage"), ("combined percentile", "percentile"))))
    else:
        print("\nno Tux Paint stamps (run scripts/fetch_tuxpaint.sh): real-image check skipped")

    print("\nembedding model, held-out text->image recall (captions and images never trained on)")
    rows = {"default (this run)": clip.get("metrics", {}).get("heldout", {})}
    if args.compare:
        from models.train_clip import evaluate_config

        today = ClipTrainConfig(seed=args.seed, train_splits=("train", "pool"), hard_negatives=False, baseline=False)
        rows["today's recipe"] = evaluate_config(ws.root, today, progress=False)["heldout"]
    print("(swap: share of held-out images closer to their caption than to it with one attribute changed)")
    print(f"{'model':<20}{'set':<12}{'N':>5}{'r@1':>7}{'r@10':>7}{'swap':>7}{'swap N':>8}")
    for name, held in rows.items():
        for s_, m in held.items():
            d = m["default"]
            print(f"{name:<20}{s_:<12}{m['candidates']:>5}{d['r@1']:>7.3f}{d['r@10']:>7.3f}"
                  f"{d.get('swap_acc', float('nan')):>7.3f}{d.get('swap_n', 0):>8}")
    for s_, m in rows["default (this run)"].items():
        if "composite" in m:
            print(f"{'composite baseline':<20}{s_:<12}{m['candidates']:>5}{m['composite']['r@1']:>7.3f}"
                  f"{m['composite']['r@10']:>7.3f}")


def auroc_of(values, truth: list[bool]) -> float:
    """Chance that a held-out query scores lower (less covered) than a covered one."""
    import numpy as np

    v = np.asarray(values, float)
    t = np.asarray(truth, bool)
    pos, neg = v[t], v[~t]
    return float(np.mean([(p < n) + 0.5 * (p == n) for p in pos for n in neg])) if len(pos) and len(neg) else float("nan")


if __name__ == "__main__":
    main()

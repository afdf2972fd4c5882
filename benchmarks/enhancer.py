"""The prompt enhancer against its baselines on 500 held-out terse prompts of the scene world.

Degrades the rich captions of N train scenes into pairs, trains an enhancer on them,
then scores three contenders on terse prompts of scenes it never saw: the identity
baseline (the terse prompt unchanged), the pairs' own targets (the scene's rich caption:
what a perfect enhancer trained on such pairs would write) and the trained enhancer.
Intent preservation: share of the attributes the terse prompt names (true of the scene)
still named and not contradicted. Richness gain: detail categories added.

    python benchmarks/enhancer.py [--scenes 3000] [--size nano] [--steps 800] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from dataengine.runtime import apply_offline_defaults

apply_offline_defaults()

import torch  # noqa: E402

from dataengine.degrade import DegradeConfig, pairs_table  # noqa: E402
from dataengine.enhance_eval import compare, heldout_terse_prompts, reference_enhancements  # noqa: E402
from dataengine.sceneworld import caption_for, sample_scene, scene_rngs  # noqa: E402
from models.train_enhancer import EnhancerTrainConfig, enhance, load_version, train  # noqa: E402


def train_captions(n: int) -> list[tuple[str, str]]:
    """Rich captions of the scene world's train split (text only, nothing rendered)."""
    out = []
    for i in range(n):
        scene_rng, words = scene_rngs(0, "train", i)
        out.append((f"train-{i:07d}", caption_for(sample_scene(scene_rng, 256, 256), words, detail="rich")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=3000)
    ap.add_argument("--size", default="nano")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=500)
    ap.add_argument("--out", help="keep the trained version under this models folder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    counters: dict[str, int] = {}
    pairs = pairs_table(train_captions(args.scenes), DegradeConfig(seed=0), counters=counters)
    print(f"degraded {counters.get('captions')} captions -> {pairs.num_rows} pairs")
    cfg = EnhancerTrainConfig(size=args.size, steps=args.steps, batch_size=args.batch_size,
                              num_threads=args.threads, progress=False)
    record = train(pairs, args.out or tempfile.mkdtemp(prefix="bench-enh-"), cfg)
    metrics = json.loads(record["metrics"])
    model, tok = load_version(record["path"])

    items = heldout_terse_prompts(args.prompts)
    terse = [p for p, _ in items]
    t0 = time.perf_counter()
    enhanced = enhance(model, tok, terse, max_new_tokens=160)
    gen_s = time.perf_counter() - t0
    results = compare(items, {"identity (terse unchanged)": terse,
                              "pairs' targets (rich caption)": reference_enhancements(items),
                              f"enhancer {args.size}, {args.steps} steps": enhanced})
    print(f"\n{args.size}: {metrics['params']:,} params, {metrics['steps']} steps in "
          f"{metrics['train_seconds']:.0f}s ({metrics['tokens_per_s']:.0f} tokens/s), eval loss "
          f"{metrics['eval_loss_initial']:.2f} -> {metrics['eval_loss']:.2f}; {args.prompts} prompts "
          f"enhanced in {gen_s:.1f}s")
    cols = ("intent_preservation", "fully_preserved", "intent_contradicted", "richness_gain", "faithful_share")
    print(f"{'contender':34s}" + "".join(f"{c:>21s}" for c in cols))
    for name, r in results.items():
        print(f"{name:34s}" + "".join(f"{'-' if r[c] is None else format(r[c], '.3f'):>21s}" for c in cols))
    for p, e in list(zip(terse, enhanced))[:3]:
        print(f"\n  {p}\n  -> {e}")


if __name__ == "__main__":
    main()

"""The prompt enhancer against its baselines on 500 held-out terse prompts of the scene world.

Degrades the rich captions of N train scenes into pairs, trains an enhancer on them,
then scores on terse prompts of scenes it never saw: the identity baseline (the terse
prompt unchanged), the pairs' own targets (the scene's rich caption: what a perfect
enhancer trained on such pairs would write), today's enhancer (the insertion format:
targets mark the words they copy, decoding writes them, models/keep_words.py; whole-chain
pairs marked <|all|>, which generation asks for; whole-chain rows whose prompts carry
casual tags, dataengine/degrade/tags.py; decoding's insertion guard,
models/insertion_guard.py) and the same decoded without the guard's repeat rule and
without the guard, the recipe before tag
rows (stop 30's default) with and without the guard, and the earlier recipe (plain
targets, free decoding), all trained on the same pairs in the same run, the plain one
also decoded with the word-keeping constraint alone. Intent preservation: share of the attributes the
terse prompt names (true of the scene) still named and not contradicted. Richness gain:
detail categories added. Stutters: share of outputs where a run of 1-4 words comes twice
back to back. Then the same on real human captions (../shared/data, IIW), degraded to
their tersest prompts: words kept in order, richness gain, stutters (the human captions'
own stutter rate beside them).

    python benchmarks/enhancer.py [--scenes 3000] [--size nano] [--steps 800] [--threads 2]

The last line reads `enhancer: intent preserved X, contradicted Y, richness gain Z`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dataengine.runtime import apply_offline_defaults

apply_offline_defaults()

import torch  # noqa: E402

from dataengine.degrade import DegradeConfig, degrade_chain, detect, pairs_table  # noqa: E402
from dataengine.enhance_eval import compare, heldout_terse_prompts, reference_enhancements  # noqa: E402
from dataengine.sceneworld import caption_for, sample_scene, scene_rngs  # noqa: E402
from models.insertion_guard import RULES  # noqa: E402
from models.keep_words import kept_in_order, prompt_words  # noqa: E402
from models.train_enhancer import EnhancerTrainConfig, enhance, load_version, train  # noqa: E402

IIW = Path(__file__).resolve().parents[2] / "shared/data/iiw400_captions.jsonl"
DEFAULT = "insertion + tag rows + guard (default)"  # the contender the last line reports


def real_terse_prompts(n: int) -> list[tuple[str, str]]:
    """(the tersest prompt of its degradation chain, the caption) for each of the first `n`
    IIW human captions."""
    if not IIW.exists():
        return []
    out = []
    for r in map(json.loads, IIW.read_text().splitlines()[:n]):
        chain = degrade_chain(r["caption"], DegradeConfig(seed=0), r["id"])
        if chain:
            out.append((chain[-1].less, r["caption"]))
    return out


def words_and_richness(prompts: list[str], outputs: list[str]) -> tuple[float, float]:
    """(share of outputs that keep their prompt's words in order, mean categories added)."""
    kept = sum(kept_in_order(p, o) for p, o in zip(prompts, outputs)) / len(prompts)
    cats = lambda t: len({s.category for s in detect(t)})  # noqa: E731
    gain = sum(cats(o) - cats(p) for p, o in zip(prompts, outputs)) / len(prompts)
    return kept, gain


def stutter_share(outputs: list[str], longest: int = 4) -> float:
    """Share of outputs in which a run of 1 to `longest` words (case and punctuation aside)
    comes twice back to back: a loop ("in sunset, in sunset") or a stutter ("a few ... a few").
    Human captions do it too, across sentences ("... on the tapestry. The tapestry is ...")."""
    def stutters(text: str) -> bool:
        w = prompt_words(text)
        return any(w[i:i + n] == w[i + n:i + 2 * n] for n in range(1, longest + 1) for i in range(len(w) - 2 * n + 1))
    return sum(map(stutters, outputs)) / max(len(outputs), 1)


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
    ap.add_argument("--real", type=int, default=400, help="IIW human captions to degrade and enhance")
    ap.add_argument("--out", help="keep the trained version under this models folder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    counters: dict[str, int] = {}
    pairs = pairs_table(train_captions(args.scenes), DegradeConfig(seed=0), counters=counters)
    print(f"degraded {counters.get('captions')} captions -> {pairs.num_rows} pairs")
    items = heldout_terse_prompts(args.prompts)
    terse = [p for p, _ in items]
    real_items = real_terse_prompts(args.real)
    real = [p for p, _ in real_items]

    # Three recipes, the same pairs, steps and seed: today's (insertion format, <|all|>
    # marker, casual-tag rows), the same without tag rows (the default before them), and the
    # earlier plain targets. Each model is decoded several ways from one training.
    # Per recipe: (copy_markers, whole_marker, tag_rows, {label: (keep_words, guard)}).
    no_repeat = tuple(r for r in RULES if r != "repeat")  # the guard before its repeat rule (stop 33)
    runs = [(True, True, True, {DEFAULT: (True, True), "guard without its repeat rule": (True, no_repeat),
                                "tag rows, no guard": (True, False)}),
            (True, True, False, {"before tags (stop 30's default)": (True, False),
                                 "before tags + guard": (True, True)}),
            (False, False, False, {"earlier: plain, free decoding": (False, False),
                                   "plain + keep-words decoding": (True, False)})]
    outputs: dict[str, list[str]] = {}
    real_out: dict[str, list[str]] = {}
    for copy, marker, tags, modes in runs:
        cfg = EnhancerTrainConfig(size=args.size, steps=args.steps, batch_size=args.batch_size,
                                  num_threads=args.threads, progress=False, copy_markers=copy,
                                  whole_marker=marker, tag_rows=tags)
        keep_it = args.out and DEFAULT in modes
        record = train(pairs, args.out if keep_it else tempfile.mkdtemp(prefix="bench-enh-"), cfg)
        m = json.loads(record["metrics"])
        model, tok = load_version(record["path"])
        for label, (keep, guard) in modes.items():
            t0 = time.perf_counter()
            outputs[label] = enhance(model, tok, terse, max_new_tokens=160, keep_words=keep, guard=guard)
            spent = time.perf_counter() - t0
            if real:
                real_out[label] = enhance(model, tok, real, max_new_tokens=160, keep_words=keep, guard=guard)
            print(f"{label}: {m['params']:,} params, {m['steps']} steps in {m['train_seconds']:.0f}s, eval loss "
                  f"{m['eval_loss_initial']:.2f} -> {m['eval_loss']:.2f}; {len(terse)} prompts in {spent:.1f}s")

    contenders = {"identity (terse unchanged)": terse, "pairs' targets (rich caption)": reference_enhancements(items)}
    contenders |= outputs
    results = compare(items, contenders)
    cols = ("intent_preservation", "fully_preserved", "intent_contradicted", "richness_gain", "faithful_share")
    print(f"\n{'scene world, held-out terse prompts':34s}"
          + "".join(f"{c:>21s}" for c in cols + ("words_kept", "stutters")))
    for name, r in results.items():
        words = words_and_richness(terse, contenders[name])[0]
        print(f"{name:34s}" + "".join(f"{'-' if r[c] is None else format(r[c], '.3f'):>21s}" for c in cols)
              + f"{words:>21.3f}{stutter_share(contenders[name]):>21.3f}")
    for i in range(3):
        print(f"\n  {terse[i]}")
        for label, outs in outputs.items():
            print(f"  {label} -> {outs[i]}")

    if real:
        print(f"\nreal human captions (IIW), degraded to their tersest prompts: {len(real)}")
        print(f"{'contender':34s}{'words_kept':>12s}{'richness_gain':>15s}{'stutters':>16s}")
        baselines = {"identity (terse unchanged)": real, "the human captions": [c for _, c in real_items]}
        for label, outs in (baselines | real_out).items():
            k, g = words_and_richness(real, outs)
            print(f"{label:34s}{k:>12.3f}{g:>15.3f}{stutter_share(outs):>16.3f}")
        for i in range(2):
            print(f"\n  {real[i]}")
            for label, outs in real_out.items():
                print(f"  {label} -> {outs[i]}")
    else:
        print(f"\n(no real captions at {IIW})")
    r = results[DEFAULT]
    print(f"\nenhancer: intent preserved {r['intent_preservation']:.3f}, contradicted "
          f"{r['intent_contradicted']:.3f}, richness gain {r['richness_gain']:.2f}")

if __name__ == "__main__":
    main()

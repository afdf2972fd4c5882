"""Caption degradation throughput: chains built per second on one core.

Builds `--n` captions: half the 400 human-written IIW descriptions cycled (long, ~1,100
characters; each copy gets its own source_id, so the random policy orders its chain
afresh, but the detectors see the same text again), half scene-world captions from
`sample_scene` + `caption_for` over distinct seeds (~250 characters, all different).
Then, in this one process, times only the chain building (`degrade_chain`) and, for
scale, a baseline over the same captions: lower-case and split into `\\w+` words.
Rates are captions per CPU-second of this process, i.e. per core.

    python benchmarks/degrade.py [--n 100000] [--seed 0] [--policy random] [--granularity category]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import re
import time
from pathlib import Path

from dataengine.degrade import DegradeConfig, degrade_chain
from dataengine.sceneworld import caption_for, sample_scene

IIW = Path(__file__).resolve().parents[2] / "shared/data/iiw400_captions.jsonl"
_WORD = re.compile(r"\w+")


def build(n: int, seed: int) -> list[tuple[str, str, str]]:
    """(part, source_id, caption) records: IIW and scene-world captions alternating."""
    iiw = [(r["id"], r["caption"]) for r in map(json.loads, IIW.read_text().splitlines())] if IIW.exists() else []
    out = []
    for i in range(n):
        if iiw and i % 2 == 0:
            key, caption = iiw[(i // 2) % len(iiw)]
            out.append(("iiw", f"{key}#{i}", caption))
        else:
            scene = sample_scene(random.Random(seed * 1_000_003 + i), 256, 256)
            detail = "short" if i % 5 == 1 else "rich"
            out.append(("sceneworld", f"sw-{i}", caption_for(scene, random.Random(~i & 0xFFFFFFFF), detail=detail)))
    return out


def baseline(records: list[tuple[str, str, str]]) -> dict[str, float]:
    """CPU seconds per part to lower-case the captions and split them into words."""
    spent: dict[str, float] = {}
    for part in sorted({p for p, _, _ in records}):
        texts = [c for p, _, c in records if p == part]
        t0 = time.process_time()
        for caption in texts:
            _WORD.findall(caption.lower())
        spent[part] = time.process_time() - t0
    return spent


def chains(records: list[tuple[str, str, str]], cfg: DegradeConfig) -> tuple[dict[str, list[float]], float]:
    """Per part: [CPU seconds, captions, pairs made, captions with an empty chain]; and the
    wall time of the whole pass."""
    stats: dict[str, list[float]] = {}
    clock = time.process_time
    w0 = time.perf_counter()
    for part, key, caption in records:
        t0 = clock()
        chain = degrade_chain(caption, cfg, key)
        dt = clock() - t0
        s = stats.setdefault(part, [0.0, 0, 0, 0])
        s[0] += dt
        s[1] += 1
        s[2] += len(chain)
        s[3] += not chain
    return stats, time.perf_counter() - w0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", default="random", choices=("random", "fixed"))
    ap.add_argument("--granularity", default="category", choices=("category", "span"))
    args = ap.parse_args()
    cfg = DegradeConfig(policy=args.policy, seed=args.seed, granularity=args.granularity)

    t0 = time.perf_counter()
    records = build(args.n, args.seed)
    print(f"built {len(records)} captions in {time.perf_counter() - t0:.1f} s (not timed below); "
          f"policy {cfg.name}" + ("" if IIW.exists() else f"; {IIW} missing: scene-world only"))

    # The records stay in memory for the whole run, which a streaming pipeline never does;
    # freeze them so the cyclic GC does not rescan 100k tuples at every full collection.
    gc.collect()
    gc.freeze()
    base = baseline(records)
    stats, wall = chains(records, cfg)
    stats["all"] = [sum(v[k] for v in stats.values()) for k in range(4)]
    base["all"] = sum(base.values())
    chars: dict[str, int] = {}
    for part, _, caption in records:
        chars[part] = chars.get(part, 0) + len(caption)
    chars["all"] = sum(chars.values())
    rows = []
    for part in sorted(stats, key=lambda p: p == "all"):
        cpu, n, pairs, empty = stats[part]
        rows.append((part, n, chars[part] / n, cpu, n / cpu, pairs / n, empty / n, cpu / base[part]))
    head = ("captions", "n", "chars/caption", "seconds (cpu)", "captions/s/core", "pairs/caption",
            "no detail", "x baseline")
    print(" | ".join(f"{h:>15}" for h in head))
    for part, n, ch, cpu, rate, ppc, nod, ratio in rows:
        print(" | ".join((f"{part:>15}", f"{n:>15,}", f"{ch:>15.0f}", f"{cpu:>15.1f}", f"{rate:>15,.0f}",
                          f"{ppc:>15.2f}", f"{nod:>15.2%}", f"{ratio:>15.0f}")))
    print(f"chains took {wall:.1f} s of wall time in all. Baseline: the same captions lower-cased and "
          f"split into \\w+ words in this run; 'x baseline' = chain CPU time / baseline CPU time.")


if __name__ == "__main__":
    main()

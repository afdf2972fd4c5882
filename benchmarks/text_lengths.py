"""Token lengths of prompts as the DiT's frozen text encoder reads them, per kind.

The DiT conditions on at most `max_text_len` tokens (models/dit.py, models/train_dit.py);
a longer prompt loses its tail. This prints the 50th/95th percentiles and the maximum for
scene-world captions at each detail level (terse prompts, short captions, rich captions:
what the enhancer is trained to write), for the 400 human IIW descriptions in
../shared/data, and the share of each that the current default cuts.

    python benchmarks/text_lengths.py [--n 2000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dataengine.runtime import apply_offline_defaults

apply_offline_defaults()

import numpy as np  # noqa: E402

from dataengine.sceneworld import caption_for, sample_scene, scene_rngs  # noqa: E402
from models.clip import DEFAULT_ARCH, load_clip  # noqa: E402
from models.train_dit import DiTTrainConfig  # noqa: E402

IIW = Path(__file__).resolve().parents[2] / "shared/data/iiw400_captions.jsonl"


def token_lengths(bundle, texts: list[str]) -> np.ndarray:
    """Tokens per text, special tokens included, up to the tokenizer's context length."""
    ids = bundle.tokenizer(texts)
    return (ids != bundle.model.text.config.pad_token_id).sum(1).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="scene-world captions per detail level")
    args = ap.parse_args()
    bundle = load_clip(DEFAULT_ARCH)
    limit = DiTTrainConfig().max_text_len
    context = getattr(bundle.tokenizer, "context_length", None)
    sets = {}
    for detail in ("terse", "short", "rich"):
        caps = []
        for i in range(args.n):
            scene_rng, words = scene_rngs(0, "train", i)
            caps.append(caption_for(sample_scene(scene_rng, 256, 256), words, detail=detail))
        sets[f"scene world, {detail}"] = caps
    if IIW.exists():
        sets["IIW human descriptions"] = [json.loads(line)["caption"] for line in IIW.read_text().splitlines()]
    print(f"tokenizer context {context}; DiT max_text_len default {limit}")
    print(f"{'texts':28s}{'n':>6s}{'p50':>6s}{'p95':>6s}{'max':>6s}{'cut':>8s}")
    for name, texts in sets.items():
        n = token_lengths(bundle, texts)
        at_context = " (at context)" if context and n.max() >= context else ""
        print(f"{name:28s}{len(n):>6d}{np.percentile(n, 50):>6.0f}{np.percentile(n, 95):>6.0f}{n.max():>6d}"
              f"{(n > limit).mean():>8.3f}{at_context}")


if __name__ == "__main__":
    main()

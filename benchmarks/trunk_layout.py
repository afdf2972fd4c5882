"""Images/s of the default CLIP's image trunk (EfficientNet-Lite0) in the contiguous
(NCHW) and channels-last memory layouts, per batch size, in one process.

    python benchmarks/trunk_layout.py [--size 160] [--threads 2] [--repeats 4]

Why models/clip.py keeps the trunk channels-last, and why feature extraction batches 32.
"""

from __future__ import annotations

import argparse
import time

import torch


def images_per_s(trunk: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        trunk(x)  # warm-up: allocator and kernel selection
        t = time.perf_counter()
        for _ in range(repeats):
            trunk(x)
        return repeats * len(x) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--batches", default="8,16,32,64")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from models.clip import build_default

    trunk = build_default().visual.trunk.eval()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for bs in batches:
        x = torch.randn(bs, 3, args.size, args.size)
        contiguous = images_per_s(trunk.to(memory_format=torch.contiguous_format), x, args.repeats)
        last = images_per_s(trunk.to(memory_format=torch.channels_last),
                            x.contiguous(memory_format=torch.channels_last), args.repeats)
        rows.append((bs, contiguous, last))
    print(f"EfficientNet-Lite0 trunk, {args.size} px, {args.threads} threads (images/s)")
    print(f"{'batch':>6} {'NCHW':>8} {'NHWC':>8} {'ratio':>6}")
    for bs, a, b in rows:
        print(f"{bs:>6} {a:>8.1f} {b:>8.1f} {b / a:>6.2f}")


if __name__ == "__main__":
    main()

"""The DiT's measures: massive activations, sample fidelity, training speed (and MFU on a GPU).

(a) Massive activations. Two DiTs of one size train on the same latents, batches and noise:
    SwiGLU + scale-only modulation (the design) and GELU MLP + shift/scale (classic adaLN,
    the baseline). Every --every steps a fixed probe batch (held-out latents, t spread over
    (0, 1), fixed noise) goes through each model and `activation_peaks` records, per block,
    the max |x| of the residual stream and its median |x|; the table prints the peak and
    the peak / median ratio per layer and checkpoint, and the FFN's inner peak at the end.
(b) Fidelity: each model generates (Euler, --sample-steps, CFG --cfg-scale and 1) images
    for held-out scene-world captions; the VAE decodes them; the scene-world checker scores
    their attributes against the scenes' ground truth. The real images and their VAE
    reconstructions are scored too: the ceiling.
(c) Speed: training samples/s measured in (a), and model FLOPs per training sample
    computed analytically (3 x forward: every matmul weight 2 FLOPs per token it touches,
    plus attention's QK^T and AV, 4 S^2 D per layer), so that achieved FLOP/s / peak = MFU.

Latents come from a frozen VAE version (--vae PATH), or from a tiny f16 VAE trained here
first for --vae-steps (L1 + a small KL), so both DiTs see the same fixed latent space.
Scenes are rendered directly (no workspace), captions are the scene world's rich ones.

    flock /tmp/plan/heavy.lock .venv/bin/python benchmarks/dit.py              # 2-core CPU, ~7.5 min
    python benchmarks/dit.py --only speed --device cuda --size S --resolution 256 \\
        --batch-size 64 --peak-tflops 989                                      # MFU on an H100 (bf16)
    python benchmarks/dit.py --only speed --size tiny --timed-steps 5 --profile 3    # where a step's time goes
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dataengine.runtime import apply_offline_defaults

apply_offline_defaults()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dataengine.sceneworld import caption_for, render, sample_scene, scene_rngs  # noqa: E402
from models.dit import DiT, DiTConfig, activation_peaks, build, flow_matching_loss, n_params, sample  # noqa: E402
from models import profiling  # noqa: E402

# (ffn, modulation). The first two are the measurement; the mixed two separate the FFN's
# share of a difference from the modulation's (--variants).
VARIANTS = {"swiglu+scale": ("swiglu", "scale"), "gelu+shift": ("gelu", "shift_scale"),
            "swiglu+shift": ("swiglu", "shift_scale"), "gelu+scale": ("gelu", "scale")}


# ---------------------------------------------------------------------------------------
# Data: rendered scenes, a VAE, latents and text tokens (computed once, shared by both models)
# ---------------------------------------------------------------------------------------


def scenes(split: str, n: int, res: int, seed: int = 0):
    """n rendered scenes of the scene world's `split` stream: images (n,3,res,res) in [-1,1],
    rich captions and the scenes."""
    imgs, caps, truth = [], [], []
    for i in range(n):
        scene_rng, words = scene_rngs(seed, split, i)
        sc = sample_scene(scene_rng, res, res)
        imgs.append(np.asarray(render(sc)))
        caps.append(caption_for(sc, words, detail="rich"))
        truth.append(sc)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, caps, truth


def quick_vae(images: torch.Tensor, steps: int, batch: int, seed: int, device=torch.device("cpu")):
    """A tiny f16 VAE trained for `steps` on `images` (L1 + 1e-4 KL), latents scaled to unit
    std; trained on `device`, returned on the CPU."""
    from models.vae import VAEConfig, build as build_vae, kl_loss

    torch.manual_seed(seed)
    vae = build_vae(VAEConfig(size="tiny")).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=gen)].to(device)
        recon, mean, logvar = vae(x)
        loss = F.l1_loss(recon, x) + 1e-4 * kl_loss(mean, logvar)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae = vae.cpu().eval()
    with torch.no_grad():
        vae.set_scale(torch.cat([vae.posterior(images[i: i + 64])[0] for i in range(0, len(images), 64)]))
    return vae, float(loss.detach())


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(images[i: i + 64]) for i in range(0, len(images), 64)])


def text_tokens(frozen, captions: list[str], max_len: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All captions' token states, padded to one common length (B, L, d), (B, L)."""
    parts = [frozen.text_tokens(captions[i: i + 64], max_len) for i in range(0, len(captions), 64)]
    L = max(h.shape[1] for h, _ in parts)
    text = torch.cat([F.pad(h, (0, 0, 0, L - h.shape[1])) for h, _ in parts])
    mask = torch.cat([F.pad(m, (0, L - m.shape[1])) for _, m in parts])
    return text, mask


def caption_tokens(cache: str | None, captions: list[str], ev_captions: list[str]):
    """Text token states of the train and held-out captions, from the frozen text encoder or
    from a --text-cache file written by an earlier run. The cache lets a machine without the
    packaged text encoder (a bare GPU box) run the benchmark: build it here with
    --only text-cache and the same --seed/--n-train/--n-eval, carry it there."""
    if cache and Path(cache).exists():
        blob = torch.load(cache)
        if blob["captions"] != captions or blob["ev_captions"] != ev_captions:
            raise SystemExit(f"{cache}: its captions are not this run's (another --seed, --n-train or --n-eval?)")
        return blob["text"].float(), blob["mask"], blob["ev_text"].float(), blob["ev_mask"], blob["spec"] + " (cached)"
    from models.frozen import Frozen

    frozen = Frozen.load()
    (text, mask), (ev_text, ev_mask) = text_tokens(frozen, captions), text_tokens(frozen, ev_captions)
    if cache:  # fp16 halves the file; the states are normalised activations, well inside its range
        torch.save({"captions": captions, "ev_captions": ev_captions, "text": text.half(), "mask": mask,
                    "ev_text": ev_text.half(), "ev_mask": ev_mask, "spec": frozen.spec}, cache)
    return text, mask, ev_text, ev_mask, frozen.spec


# ---------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------


def train_flops_per_sample(model: DiT, text_len: int, image_tokens: int, source: bool = False) -> float:
    """Model FLOPs of one training sample (forward + backward = 3 x forward): 2 per weight
    per token through each linear, attention's 4 S^2 D per layer, the timestep MLPs once."""
    cfg = model.cfg
    S = text_len + image_tokens * (2 if source else 1)
    block_w = sum(m.weight.numel() for b in model.blocks for m in b.modules() if isinstance(m, torch.nn.Linear))
    fwd = 2 * block_w * S + 4 * S * S * cfg.dim * cfg.depth
    fwd += 2 * model.text_proj.weight.numel() * text_len
    fwd += 2 * model.patch_embed.weight.numel() * image_tokens * (2 if source else 1)
    fwd += 2 * model.final.linear.weight.numel() * image_tokens
    fwd += 2 * sum(m.weight.numel() for m in (*model.t_embed, *model.t_mod) if isinstance(m, torch.nn.Linear))
    return 3.0 * fwd


# ---------------------------------------------------------------------------------------
# (a) training with activation checkpoints
# ---------------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    model: DiT
    peaks: dict[int, object]  # step -> ActivationPeaks
    losses: list[float]
    step_s: list[float]  # wall time of each training step
    batch: int

    @property
    def samples_per_s(self) -> float:
        """From the median step: robust to bursts of other work on a shared machine."""
        return self.batch / statistics.median(self.step_s)


@torch.no_grad()
def probe(model: DiT, x0, text, mask, seed: int):
    """Peaks of one fixed forward: t spread over (0, 1), fixed noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0.05, 0.95, len(x0))
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    tt = t.view(-1, 1, 1, 1).to(x0.device)
    model.eval()
    with activation_peaks(model) as peaks:
        model((1 - tt) * x0 + tt * noise, t.to(x0.device), text, mask)
    model.train()
    return peaks


def train_variant(name: str, args, data, probe_batch, device) -> Run:
    ffn, modulation = VARIANTS[name]
    torch.manual_seed(args.seed)
    model = build(DiTConfig(size=args.size, ffn=ffn, modulation=modulation, text_dim=data["text"].shape[-1],
                            latent_channels=data["z"].shape[1])).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    torch.manual_seed(args.seed + 1)  # the same noise and t stream for every variant
    order = torch.Generator().manual_seed(args.seed + 2)  # the same batches
    peaks = {0: probe(model, *probe_batch, seed=args.seed)}
    losses, step_s = [], []
    for step in range(args.steps):
        idx = torch.randint(len(data["z"]), (args.batch_size,), generator=order)
        x0, text, mask = data["z"][idx].to(device), data["text"][idx].to(device), data["mask"][idx].to(device)
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        loss = flow_matching_loss(model, x0, text, mask, cond_drop=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step_s.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            peaks[step + 1] = probe(model, *probe_batch, seed=args.seed)
    return Run(name, model.eval(), peaks, losses, step_s, args.batch_size)


def print_peaks(runs: list[Run]) -> None:
    print("\n(a) massive activations: per block, max |x| of the residual stream (peak / median in brackets)")
    for run in runs:
        steps = sorted(run.peaks)
        depth = len(run.peaks[0].residual_max)
        print(f"\n  {run.name}  ({n_params(run.model):,} params)")
        print("  " + f"{'layer':>6s}" + "".join(f"{'step ' + str(s):>18s}" for s in steps)
              + f"{'ffn max (last)':>16s}{'channel':>9s}")
        for i in range(depth):
            cells = "".join(f"{run.peaks[s].residual_max[i]:>9.1f} ({run.peaks[s].ratios()[i]:>5.0f}x)" for s in steps)
            last = run.peaks[steps[-1]]
            print("  " + f"{i:>6d}" + cells + f"{last.ffn_max[i]:>16.1f}{last.residual_channel[i]:>9d}")
        print("  " + f"{'max':>6s}" + "".join(
            f"{max(run.peaks[s].residual_max):>9.1f} ({max(run.peaks[s].ratios()):>5.0f}x)" for s in steps))


# ---------------------------------------------------------------------------------------
# (b) fidelity
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def fidelity(runs: list[Run], vae, checker, ev: dict, args, device) -> None:
    from dataengine.sceneworld.checker import ATTRIBUTES

    g = torch.Generator().manual_seed(args.seed + 3)
    noise = torch.randn(ev["z"].shape, generator=g)
    rows: list[tuple[str, dict, float | None]] = []

    def score(name: str, images: torch.Tensor, loss: float | None = None) -> None:
        res = checker.check(images.float().clamp(-1, 1).cpu(), ev["scenes"])
        rows.append((name, {k: float(res[k].mean()) for k in (*ATTRIBUTES, "accuracy", "extra")}, loss))

    score("real images (ceiling)", ev["images"])
    score("VAE reconstructions", vae.decode(ev["z"]))
    for run in runs:
        model = run.model.to(device)
        for scale in (args.cfg_scale, 1.0):
            z = sample(model, ev["text"].to(device), ev["mask"].to(device), tuple(ev["z"].shape),
                       args.sample_steps, scale, noise=noise.to(device)).cpu()
            score(f"{run.name} cfg {scale:g}", vae.decode(z), eval_loss(model, ev, args.seed, device))
    own = checker.metrics.get("clean", {})
    print(f"\n(b) fidelity: scene-world checker on {len(ev['scenes'])} held-out captions "
          f"({args.sample_steps} Euler steps; 'extra' = hallucinated (colour, shape) pairs per image); "
          f"the checker's own accuracy on clean renders: {own.get('accuracy', '?')}")
    cols = (*ATTRIBUTES, "accuracy", "extra")
    print(f"  {'images':24s}{'eval loss':>10s}" + "".join(f"{c:>11s}" for c in cols))
    for name, r, loss in rows:
        print(f"  {name:24s}{'-' if loss is None else format(loss, '.4f'):>10s}"
              + "".join(f"{r[c]:>11.3f}" for c in cols))


@torch.no_grad()
def eval_loss(model: DiT, ev: dict, seed: int, device, repeats: int = 4) -> float:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return statistics.mean(float(flow_matching_loss(model, ev["z"].to(device), ev["text"].to(device),
                                                        ev["mask"].to(device), cond_drop=0.0))
                               for _ in range(repeats))


# ---------------------------------------------------------------------------------------
# (c) speed
# ---------------------------------------------------------------------------------------


def print_speed(runs: list[Run], text_len: int, image_tokens: int, device, peak_tflops: float | None) -> None:
    print(f"\n(c) training speed on {device_name(device)} ({text_len} text + {image_tokens} image tokens per sample; "
          "samples/s from the median step)")
    print(f"  {'model':16s}{'params':>12s}{'GFLOP/sample':>14s}{'samples/s':>11s}{'TFLOP/s':>10s}{'MFU':>8s}")
    for run in runs:
        flops = train_flops_per_sample(run.model, text_len, image_tokens)
        rate = run.samples_per_s
        achieved = flops * rate / 1e12
        mfu = f"{achieved / peak_tflops:.1%}" if peak_tflops else "-"
        print(f"  {run.name:16s}{n_params(run.model):>12,d}{flops / 1e9:>14.3f}{rate:>11.1f}{achieved:>10.4f}{mfu:>8s}")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def matmul_ceiling(device, n: int = 8192, repeats: int = 10) -> float:
    """TFLOP/s of one large bf16 matrix product on `device` (median of `repeats` after warm-up,
    random data): the ceiling this card reaches, beside its datasheet peak."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def speed_only(args, device) -> None:
    """Synthetic inputs of the real shapes (no VAE, no text encoder): warm up, then time
    training steps. Throughput does not depend on what the tensors hold."""
    side = args.resolution // 16
    text_len = 32
    print(f"speed: size {args.size}, {args.resolution} px -> {side}x{side} latent tokens, batch {args.batch_size}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}{', compiled' if args.compile else ''}")
    runs = []
    for name in args.variants:
        ffn, modulation = VARIANTS[name]
        torch.manual_seed(args.seed)
        model = build(DiTConfig(size=args.size, ffn=ffn, modulation=modulation)).to(device).train()
        step_model = torch.compile(model) if args.compile else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
        x0 = torch.randn(args.batch_size, 16, side, side, device=device)
        text = torch.randn(args.batch_size, text_len, 384, device=device)
        mask = torch.ones(args.batch_size, text_len, dtype=torch.bool, device=device)

        def one_step():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = flow_matching_loss(step_model, x0, text, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(args.warmup_steps):
            one_step()
        step_s = []
        for _ in range(args.timed_steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            one_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_s.append(time.perf_counter() - t0)
        runs.append(Run(name, model, {}, [], step_s, args.batch_size))
        if args.profile:
            started = profiling.start(device)
            for _ in range(args.profile):
                one_step()
            print(profiling.render(profiling.stop(started, args.profile, device), name))
        del model, step_model, opt
    print_speed(runs, text_len, side * side, device, args.peak_tflops)
    if device.type == "cuda":
        ceiling = matmul_ceiling(device)
        print(f"  measured bf16 8192^3 matmul on this card: {ceiling:.0f} TFLOP/s; MFU against it: "
              + ", ".join(f"{r.name} {train_flops_per_sample(r.model, text_len, side * side) * r.samples_per_s / 1e12 / ceiling:.1%}"
                          for r in runs))


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=150, help="steps between activation checkpoints")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-eval", type=int, default=32, help="held-out captions for fidelity (and the probe)")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--cfg-scale", type=float, default=4.0)
    ap.add_argument("--vae", help="a saved VAE version folder; default: train a tiny one here")
    ap.add_argument("--vae-steps", type=int, default=100)
    ap.add_argument("--checker-dir", default=str(Path(tempfile.gettempdir()) / "dataengine-bench-checker"),
                    help="where the scene-world checker is cached (trained once, ~1 min)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak (H100 SXM bf16 dense: 989) -> MFU")
    ap.add_argument("--only", choices=("all", "speed", "text-cache"), default="all")
    ap.add_argument("--text-cache", help="file of the captions' text token states: read if it exists, else written")
    ap.add_argument("--warmup-steps", type=int, default=5, help="--only speed: untimed steps")
    ap.add_argument("--timed-steps", type=int, default=20, help="--only speed: timed steps")
    ap.add_argument("--compile", action="store_true", help="--only speed: torch.compile the model")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="--only speed: after timing, profile this many steps and print the top ops by group")
    ap.add_argument("--variants", default="swiglu+scale,gelu+shift", help=f"comma-separated, of {sorted(VARIANTS)}")
    args = ap.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    if args.only == "text-cache" and not args.text_cache:
        ap.error("--only text-cache needs --text-cache FILE")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.only == "speed":
        speed_only(args, device)
        return

    t_start = time.perf_counter()
    from dataengine.sceneworld.checker import Checker

    images, captions, _ = scenes("train", args.n_train, args.resolution, args.seed)
    ev_images, ev_captions, ev_scenes = scenes("eval", args.n_eval, args.resolution, args.seed)
    text, mask, ev_text, ev_mask, text_spec = caption_tokens(args.text_cache, captions, ev_captions)
    if args.only == "text-cache":
        print(f"text tokens of {len(captions)} + {len(ev_captions)} captions ({text_spec}) -> {args.text_cache}")
        return
    t0 = time.perf_counter()
    if args.vae:
        from models.vae import load_vae

        vae, vae_note = load_vae(args.vae), f"VAE {args.vae}"
    else:
        vae, last = quick_vae(images, args.vae_steps, 16, args.seed, device)
        vae_note = f"tiny f16 VAE trained here for {args.vae_steps} steps (L1 {last:.3f})"
    vae_s = time.perf_counter() - t0
    z, ev_z = encode(vae, images), encode(vae, ev_images)
    data = {"z": z, "text": text, "mask": mask}
    ev = {"z": ev_z, "text": ev_text, "mask": ev_mask, "images": ev_images, "scenes": ev_scenes}
    probe_batch = (ev_z[:16].to(device), ev_text[:16].to(device), ev_mask[:16].to(device))
    print(f"data: {args.n_train} train / {args.n_eval} held-out scenes at {args.resolution} px -> latents "
          f"{tuple(z.shape[1:])}; {vae_note} ({vae_s:.0f}s); text {text_spec} ({text.shape[1]} tokens max); "
          f"prep {time.perf_counter() - t_start:.0f}s")
    print(f"DiT {args.size}: {args.steps} steps x batch {args.batch_size}, lr {args.lr}, seed {args.seed}, "
          f"same batches and noise for both variants")

    runs = [train_variant(name, args, data, probe_batch, device) for name in args.variants]
    for run in runs:
        k = max(1, len(run.losses) // 10)
        print(f"  {run.name}: loss {statistics.mean(run.losses[:k]):.4f} -> {statistics.mean(run.losses[-k:]):.4f} "
              f"in {sum(run.step_s):.0f}s")
    print_peaks(runs)
    checker = Checker.load_or_train(args.checker_dir)
    fidelity(runs, vae, checker, ev, args, device)
    print_speed(runs, text.shape[1], z.shape[-1] * z.shape[-2], device, args.peak_tflops)  # padded length: computed
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()

"""The VAE: the 16x (and 8x) factor, equal budgets, parameter-free shortcuts, the losses,
SSIM against skimage, the latent scale, and a save/load round trip through the trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models.train_vae import (
    VAEJob, VAETrainConfig, align_weight, perceptual_distance, psnr, ssim, vf_loss,
)
from models.vae import (
    VAE_SIZES, DownShortcut, UpShortcut, VAEConfig, build, channel_average, channel_duplicate, load_vae,
    n_params,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Nano models are too small to gain from threads, and spinning OpenMP threads on a
    busy 2-core machine make each step many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def nano(factor: int = 16, **kw):
    torch.manual_seed(0)
    return build(VAEConfig(size="nano", factor=factor, **kw))


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Scene-world renders as (n, 3, size, size) floats in [-1, 1]."""
    import random

    from dataengine.sceneworld import render, sample_scene

    arrs = [np.asarray(render(sample_scene(random.Random(seed + i), size, size))) for i in range(n)]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


class TinyFrozen:
    """A stand-in for models.frozen.Frozen: fixed random convs with maps at strides 2-16."""

    feature_dim = 8

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        widths = (3, 4, 6, 8, 8)
        self.convs = [nn.Conv2d(a, b, 3, stride=2, padding=1).requires_grad_(False) for a, b in zip(widths, widths[1:])]
        for c in self.convs:
            c.weight.copy_(torch.randn(c.weight.shape, generator=g) * 0.3)
            c.bias.copy_(torch.randn(c.bias.shape, generator=g) * 0.1)

    def perceptual_features(self, images, strides=(2, 4, 8)):
        out, h = {}, images
        for i, conv in enumerate(self.convs):
            h = torch.relu(conv(h))
            out[2 ** (i + 1)] = h
        return [out[s] for s in strides]

    def image_features(self, images, stride=16):
        return self.perceptual_features(images, (stride,))[0]


class FixedSampler:
    """Every step the same batch (for loss-decrease tests); no real images."""

    def __init__(self, x):
        self.x, self.rows, self.gen = x, [], []

    def batch(self, step):
        from types import SimpleNamespace

        return SimpleNamespace(images=self.x, sources=None, task="gen")

    def images(self, n, split="eval", resolution=32, source=None):
        from types import SimpleNamespace

        from dataengine.curriculum import NoTrainingData

        if source and source.startswith("!"):
            raise NoTrainingData("no real images")
        return SimpleNamespace(images=self.x[:n])


# ---------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor,channels", [(16, 16), (8, 4)])
def test_encode_downsamples_by_the_factor_and_decode_restores_the_size(factor, channels):
    vae = nano(factor).eval()
    x = images(2, 32)
    z = vae.encode(x)
    assert z.shape == (2, channels, 32 // factor, 32 // factor)
    assert vae.decode(z).shape == x.shape
    assert vae.encode(torch.zeros(1, 3, 64, 48)).shape == (1, channels, 64 // factor, 48 // factor)
    with pytest.raises(ValueError, match="multiple of the factor"):
        vae.encode(torch.zeros(1, 3, 36, 36))


def test_f16_c16_and_f8_c4_hold_the_same_numbers_per_image():
    x = torch.zeros(1, 3, 64, 64)
    assert nano(16).encode(x).numel() == nano(8).encode(x).numel()


@pytest.mark.parametrize("size", sorted(VAE_SIZES))
def test_f8_has_the_parameter_budget_of_f16(size):
    with torch.device("meta"):  # shapes only: the B model builds in milliseconds
        p16 = n_params(build(VAEConfig(size=size, factor=16)))
        p8 = n_params(build(VAEConfig(size=size, factor=8)))
    assert abs(p8 / p16 - 1) < 0.05, (size, p16, p8)


def test_decoder_is_heavier_than_encoder():
    vae = nano()
    assert n_params(vae.decoder) > 1.5 * n_params(vae.encoder)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in vae.modules())


def test_shortcuts_have_no_parameters():
    vae = nano()
    shortcuts = [m for m in vae.modules() if isinstance(m, (DownShortcut, UpShortcut))]
    assert len(shortcuts) == 2 * (vae.cfg.levels - 1)  # one per down and per up stage
    assert all(n_params(m) == 0 for m in shortcuts)
    # A down or up stage costs exactly its conv: the shortcut adds nothing.
    for stage in [m for m in vae.modules() if type(m).__name__ in ("Down", "Up")]:
        assert n_params(stage) == n_params(stage.conv)


def test_shortcuts_move_pixels_into_channels_and_back():
    x = torch.randn(2, 4, 8, 8)
    # Down to 4x the channels is exactly pixel_unshuffle; up mirrors it exactly.
    assert torch.equal(UpShortcut(4)(DownShortcut(16)(x)), x)
    # Down to fewer channels averages groups: a constant image stays that constant.
    assert torch.allclose(DownShortcut(8)(torch.full((1, 4, 8, 8), 0.7)), torch.full((1, 8, 4, 4), 0.7))
    # Uneven groups (widths that do not divide) still average / duplicate.
    assert channel_average(torch.ones(1, 12, 2, 2), 5).shape == (1, 5, 2, 2)
    dup = channel_duplicate(torch.arange(3.0).view(1, 3, 1, 1), 6).flatten()
    assert torch.equal(dup, torch.tensor([0, 0, 1, 1, 2, 2.0]))


def test_global_skip_carries_the_encoder_features_into_the_latent():
    vae = nano()
    with torch.no_grad():
        vae.encoder.conv_out.weight.zero_()
        vae.encoder.conv_out.bias.zero_()
    x = images(1)
    mean, _ = vae.posterior(x)
    assert mean.abs().sum() > 0  # the head is zero, the skip is not


def test_scale_sets_unit_std_and_decode_undoes_it():
    vae = nano().eval()
    x = images(4)
    with torch.no_grad():
        before = vae.decode(vae.encode(x))
        scale = vae.set_scale(vae.posterior(x)[0])
        z = vae.encode(x)
        after = vae.decode(z)
    assert scale != 1.0
    assert abs(float(z.std()) - 1.0) < 1e-4
    assert torch.allclose(before, after, atol=1e-5)
    assert "scale" in vae.state_dict()


# ---------------------------------------------------------------------------------------
# Losses and metrics
# ---------------------------------------------------------------------------------------


def test_ssim_matches_skimage():
    from skimage.metrics import structural_similarity

    x = images(2, 32)
    g = torch.Generator().manual_seed(1)
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    ours = ssim(y, x)
    for i in range(2):
        ref = structural_similarity(x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy(), channel_axis=2,
                                    data_range=2.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert abs(float(ours[i]) - ref) < 1e-4, (float(ours[i]), ref)
    assert torch.allclose(ssim(x, x), torch.ones(2))


def test_psnr_and_perceptual_distance_are_zero_distance_on_identical_images():
    x = images(2)
    assert torch.all(psnr(x, x) > 90)
    f = TinyFrozen().perceptual_features(x)
    assert torch.allclose(perceptual_distance(f, f), torch.zeros(2))
    assert torch.all(perceptual_distance(f, TinyFrozen().perceptual_features(-x)) > 0)


def test_vf_loss_margins():
    f = torch.randn(2, 8, 4, 4)
    mcos, mdms = vf_loss(f * 3.0, f, m1=0.5, m2=0.25)  # same directions: both inside the margins
    assert float(mcos) == 0.0 and float(mdms) == 0.0
    mcos, mdms = vf_loss(-f, f, m1=0.5, m2=0.25)  # opposite: cos -1 -> relu(1 - 0.5 + 1)
    assert abs(float(mcos) - 1.5) < 1e-5
    assert float(mdms) == 0.0  # the pairwise structure of -f is that of f
    _, mdms = vf_loss(torch.randn(2, 8, 4, 4), f, m1=0.5, m2=0.25)
    assert float(mdms) > 0


def test_align_weight_decays_from_start_to_end():
    ws = [align_weight(s, 100, 1.0, 0.1) for s in range(100)]
    assert ws[0] == pytest.approx(1.0) and ws[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(ws, ws[1:]))


def _job(cfg: VAETrainConfig, x, steps: int = 8):
    from models.trainer import LoopConfig

    job = VAEJob(FixedSampler(x), TinyFrozen(), cfg)
    job.loop, job.device = LoopConfig(steps=steps, lr=3e-3), torch.device("cpu")
    torch.manual_seed(0)
    job.setup()
    return job


@pytest.mark.parametrize("factor,align", [(16, True), (8, False)])
def test_loss_decreases_on_a_fixed_batch(factor, align):
    x = images(4, 32)
    job = _job(VAETrainConfig(size="nano", factor=factor, resolution=32, align=align), x, steps=8)
    losses = [job.step(s) for s in range(8)]
    assert losses[-1]["loss"] < 0.8 * losses[0]["loss"], [round(s["loss"], 4) for s in losses]
    assert ("mcos" in losses[0]) == align


def test_hold_out_real_images_leave_the_training_pool():
    from models.train_vae import _hold_out_real

    class RealSampler(FixedSampler):
        pass

    s = RealSampler(images(1))
    s.rows = [{"key": k, "split": "train", "source": src, "task": "gen"}
              for k, src in [("a-real", "skimage"), ("b-real", "tuxpaint"), ("c-real", "skimage"),
                             ("train-0001", "sceneworld"), ("z-real", "skimage")]]
    s.gen = list(range(len(s.rows)))
    assert _hold_out_real(s, n=2) == ("train", 2)
    assert [s.rows[i]["key"] for i in s.gen] == ["c-real", "train-0001", "z-real"]


# ---------------------------------------------------------------------------------------
# Through the trainer: a saved version loads back to the same model
# ---------------------------------------------------------------------------------------


def test_saved_version_loads_back_with_identical_outputs(tmp_path):
    from models.trainer import LoopConfig, train

    x = images(4, 32)
    job = VAEJob(FixedSampler(x), TinyFrozen(), VAETrainConfig(size="nano", resolution=32, eval_images=4,
                                                                scale_images=4))
    record = train(job, tmp_path / "models", LoopConfig(steps=3, progress=False, num_threads=1))
    ev = record["metrics"]["eval"]
    assert ev["sceneworld"]["n"] == 4 and ev["real"] is None and ev["scale"] != 1.0
    loaded = load_vae(record["path"])
    job.vae.eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), job.vae.encode(x))
        assert torch.equal(loaded.decode(loaded.encode(x)), job.vae.decode(job.vae.encode(x)))
    assert float(loaded.scale) == ev["scale"] or abs(float(loaded.scale) - ev["scale"]) < 1e-4
    assert loaded.cfg == job.vae.cfg


def test_train_vae_on_a_scene_workspace(scene_ws, tmp_path):
    """End to end: the real sampler and frozen model, two steps, a registered version."""
    import shutil

    from dataengine.workspace import Workspace
    from models.train_vae import train_vae
    from models.trainer import LoopConfig

    ws = Workspace.at(tmp_path / "ws")
    shutil.copytree(scene_ws.root, ws.root)
    cfg = VAETrainConfig(size="nano", resolution=32, batch_size=4, eval_images=4, scale_images=8)
    record = train_vae(ws.root, cfg, LoopConfig(steps=2, num_threads=1), progress=False)
    assert record["model"] == "vae" and record["metrics"]["eval"]["sceneworld"]["n"] == 4
    vae = load_vae(record["path"])
    assert vae.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 2, 2)


def test_a_crashed_run_resumes_to_the_weights_of_an_unbroken_one(tmp_path):
    from models.trainer import LoopConfig, TrainingInterrupted, train

    x = images(4, 32)
    cfg = VAETrainConfig(size="nano", resolution=32, eval_images=4, scale_images=4)
    loop = LoopConfig(steps=4, ckpt_every=2, progress=False, num_threads=1)
    whole = train(VAEJob(FixedSampler(x), TinyFrozen(), cfg), tmp_path / "a", loop)
    with pytest.raises(TrainingInterrupted):
        train(VAEJob(FixedSampler(x), TinyFrozen(), cfg), tmp_path / "b", loop, stop_after=2)
    resumed = train(VAEJob(FixedSampler(x), TinyFrozen(), cfg), tmp_path / "b", loop)
    assert resumed["resumed_from"] == 2
    a, b = load_vae(whole["path"]), load_vae(resumed["path"])
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))

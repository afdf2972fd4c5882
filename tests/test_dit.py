"""The single-stream DiT: shapes, scale-only modulation, RoPE, the flow loss, sampling, CFG."""

from __future__ import annotations

import pytest
import torch

from models.dit import (
    DiTConfig, activation_peaks, apply_rope, build, flow_matching_loss, rope_angles, rope_cos_sin,
    sample, timestep_embedding, timesteps, velocity,
)

TEXT_DIM = 384


def nano(**kw) -> "torch.nn.Module":
    torch.manual_seed(0)
    return build(DiTConfig(size="nano", **kw))


def inputs(B=2, C=16, h=3, w=4, L=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, h, w, generator=g)
    text = torch.randn(B, L, TEXT_DIM, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 3:] = False  # one caption shorter than the other
    return x, torch.rand(B, generator=g), text, mask


def randomise_modulation(model) -> None:
    """Give the (zero-initialised) modulation non-zero weights, as after training."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("t_mod") or "mod_offset" in name or name.startswith("final.linear"):
                p.normal_(0, 0.5)


# ---------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ffn,modulation", [("swiglu", "scale"), ("gelu", "shift_scale")])
@pytest.mark.parametrize("hw", [(2, 2), (3, 4), (4, 4)])
def test_forward_shapes_with_and_without_source(ffn, modulation, hw):
    model = nano(ffn=ffn, modulation=modulation)
    x, t, text, mask = inputs(h=hw[0], w=hw[1])
    assert model(x, t, text, mask).shape == x.shape
    assert model(x, t, text, mask, source=torch.randn_like(x)).shape == x.shape


def test_patch_2_round_trips_and_checks_divisibility():
    model = nano(patch=2)
    z = torch.randn(2, 16, 4, 6)
    assert torch.equal(model.unpatchify(model.patchify(z), 4, 6), z)
    x, t, text, mask = inputs(h=4, w=4)
    assert model(x, t, text, mask).shape == x.shape
    with pytest.raises(ValueError, match="multiple of the patch"):
        model(torch.randn(2, 16, 3, 4), t, text, mask)


def test_initial_prediction_is_zero_adaln_zero():
    model = nano()
    x, t, text, mask = inputs()
    assert torch.count_nonzero(model(x, t, text, mask)) == 0


def test_padding_text_tokens_do_not_change_the_output():
    model = nano()
    randomise_modulation(model)
    x, t, text, mask = inputs()
    ref = model(x, t, text, mask)
    text2 = text.clone()
    text2[0, 3:] = 1e3 * torch.randn_like(text2[0, 3:])  # garbage under the mask
    assert torch.allclose(model(x, t, text2, mask), ref, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Scale-only modulation: no shift anywhere
# ---------------------------------------------------------------------------------------


def test_scale_only_has_four_vectors_per_block_and_no_shift_or_bias_in_blocks():
    scale, shift = nano(modulation="scale"), nano(modulation="shift_scale")
    D = scale.cfg.dim
    for block in scale.blocks:
        assert block.mod_offset.shape == (4, D)  # scale_a, gate_a, scale_f, gate_f
        assert not any(n.endswith("bias") for n, _ in block.named_parameters())
    assert scale.final.mod_offset.shape == (1, D)  # scale only
    assert scale.t_mod[1].out_features == (4 + 1) * D  # one global MLP for every block
    for block in shift.blocks:
        assert block.mod_offset.shape == (6, D)  # + shift_a, shift_f
        assert any(n.endswith("bias") for n, _ in block.named_parameters())
    assert shift.final.mod_offset.shape == (2, D)
    assert shift.t_mod[1].out_features == (6 + 2) * D
    assert not any("shift" in n for n, _ in scale.named_parameters())


def test_zero_scales_leave_the_normalised_input_unshifted():
    model = nano(modulation="scale")
    block = model.blocks[0]
    x = torch.randn(2, 5, model.cfg.dim) + 3.0  # a stream with a non-zero mean
    zero = torch.zeros(2, model.cfg.block_vectors, model.cfg.dim)
    m = block.modulation(zero)
    assert set(m) == {"scale_a", "gate_a", "scale_f", "gate_f"}
    assert torch.equal(block.modulate(block.norm1(x), m, "a"), block.norm1(x))
    # With any modulation at all, a zero stream stays zero through the whole block: no
    # parameter in the scale-only token path can add a constant.
    randomise_modulation(model)
    t = torch.rand(2)
    mod = model.t_mod(model.t_embed(timestep_embedding(t)))
    mod = mod.view(2, -1, model.cfg.dim)[:, : model.cfg.block_vectors]
    cos, sin = rope_cos_sin(torch.zeros(5, model.cfg.head_dim // 2))
    out = block(torch.zeros(2, 5, model.cfg.dim), mod, cos, sin, None)
    assert torch.count_nonzero(out) == 0


def test_shift_scale_baseline_does_shift():
    model = nano(modulation="shift_scale")
    randomise_modulation(model)
    block = model.blocks[0]
    mod = torch.randn(2, model.cfg.block_vectors, model.cfg.dim)
    m = block.modulation(mod)
    assert {"shift_a", "shift_f"} <= set(m)
    zero_norm = torch.zeros(2, 5, model.cfg.dim)
    assert torch.count_nonzero(block.modulate(zero_norm, m, "a")) > 0  # zero in, shift out
    cos, sin = rope_cos_sin(torch.zeros(5, model.cfg.head_dim // 2))
    assert torch.count_nonzero(block(zero_norm, mod, cos, sin, None)) > 0


# ---------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------


def test_rope_scores_depend_only_on_relative_position():
    hd = 16
    q, k = torch.randn(hd), torch.randn(hd)

    def score(pq, pk, theta=100.0):
        a = torch.stack([torch.tensor(pq, dtype=torch.float32), torch.tensor(pk, dtype=torch.float32)])
        d = hd // 4
        freqs = theta ** (-torch.arange(0, hd // 2, 2, dtype=torch.float32) / (hd // 2))
        angles = torch.cat([a[:, :1] * freqs[:d], a[:, 1:] * freqs[:d]], dim=-1)  # (2, hd/2)
        cos, sin = rope_cos_sin(angles)
        rq = apply_rope(q[None], cos[:1], sin[:1])[0]
        rk = apply_rope(k[None], cos[1:], sin[1:])[0]
        return float(rq @ rk)

    base = score((1.0, 2.0), (3.0, -1.0))
    assert score((1.0 + 5, 2.0 - 4), (3.0 + 5, -1.0 - 4)) == pytest.approx(base, abs=1e-4)
    assert score((1.0, 2.0), (3.0, 0.0)) != pytest.approx(base, abs=1e-3)  # x offset matters
    assert score((0.0, 2.0), (3.0, -1.0)) != pytest.approx(base, abs=1e-3)  # y offset matters
    # rotation preserves norms, and zero angles are the identity (text tokens)
    cos, sin = rope_cos_sin(torch.zeros(1, hd // 2))
    assert torch.equal(apply_rope(q[None], cos, sin)[0], q)


def test_attention_is_permutation_equivariant_only_with_its_positions():
    model = nano()
    attn = model.blocks[0].attn
    S = 12
    x = torch.randn(1, S, model.cfg.dim)
    cos, sin = rope_cos_sin(rope_angles(3, 4, model.cfg.head_dim, 10.0))  # (12, hd)
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(0))
    out = attn(x, cos, sin, None)
    moved = attn(x[:, perm], cos[perm], sin[perm], None)  # tokens move with their positions
    assert torch.allclose(moved, out[:, perm], atol=1e-5)
    shuffled = attn(x[:, perm], cos, sin, None)  # same tokens, positions not moved
    assert not torch.allclose(shuffled, out[:, perm], atol=1e-3)


def test_rope_grid_is_centred():
    angles = rope_angles(3, 3, 16, 100.0)  # (9, 8)
    assert torch.allclose(angles[4], torch.zeros(8))  # the centre token has no rotation
    assert torch.allclose(angles[0], -angles[8])


# ---------------------------------------------------------------------------------------
# Training and sampling
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ffn,modulation", [("swiglu", "scale"), ("gelu", "shift_scale")])
def test_loss_decreases_on_a_fixed_batch(ffn, modulation):
    model = nano(ffn=ffn, modulation=modulation)
    x0, _, text, mask = inputs(B=4, h=2, w=2)
    source = torch.randn_like(x0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss_at(seed):
        torch.manual_seed(seed)  # the same t and noise each time: compare like with like
        return flow_matching_loss(model, x0, text, mask, source=source, cond_drop=0.0)

    with torch.no_grad():
        before = float(loss_at(123))
    for i in range(30):
        loss = loss_at(i)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(loss_at(123))
    assert after < 0.7 * before


def test_sample_shape_and_determinism_given_noise():
    model = nano()
    randomise_modulation(model)
    _, _, text, mask = inputs()
    shape = (2, 16, 2, 3)
    noise = torch.randn(shape)
    a = sample(model, text, mask, shape, steps=4, cfg_scale=3.0, noise=noise)
    b = sample(model, text, mask, shape, steps=4, cfg_scale=3.0, noise=noise)
    assert a.shape == shape and torch.equal(a, b)
    assert not torch.equal(a, noise)
    src = torch.randn(shape)
    assert sample(model, text, mask, shape, steps=2, source=src, noise=noise).shape == shape


def test_timesteps_run_from_one_to_zero():
    for shift in (1.0, 3.0):
        ts = timesteps(5, shift)
        assert ts.shape == (6,) and ts[0] == 1.0 and ts[-1] == 0.0
        assert torch.all(ts[1:] < ts[:-1])
    assert timesteps(4, 3.0)[2] > timesteps(4)[2]  # shift spends more steps at high noise


class Spy:
    """Wraps model.forward; records the batch size and text of every call."""

    def __init__(self, model):
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.forward = model.forward
        model.forward = self

    def __call__(self, x, t, text, text_mask, source=None):
        self.calls.append((x.shape[0], text.detach().clone(), text_mask.clone()))
        return self.forward(x, t, text, text_mask, source)


def test_cfg_scale_one_makes_one_conditional_forward():
    model = nano()
    spy = Spy(model)
    x, t, text, mask = inputs()
    velocity(model, x, t, text, mask, cfg_scale=1.0)
    assert [c[0] for c in spy.calls] == [2]
    assert torch.equal(spy.calls[0][1], text)
    spy.calls.clear()
    sample(model, text, mask, x.shape, steps=3, cfg_scale=1.0)
    assert [c[0] for c in spy.calls] == [2, 2, 2]


def test_cfg_mixes_conditional_and_null_predictions():
    model = nano()
    randomise_modulation(model)
    x, t, text, mask = inputs()
    spy = Spy(model)
    guided = velocity(model, x, t, text, mask, cfg_scale=4.0)
    assert [c[0] for c in spy.calls] == [4]  # cond and null stacked in one forward
    null, null_mask = model.null_text(2, text.shape[1])
    cond = model(x, t, text, mask)
    uncond = model(x, t, null, null_mask)
    assert torch.allclose(guided, uncond + 4.0 * (cond - uncond), rtol=1e-4, atol=1e-4)


def test_caption_dropout_feeds_the_null_text():
    model = nano()
    spy = Spy(model)
    x0, _, text, mask = inputs()
    null, null_mask = model.null_text(2, text.shape[1])
    flow_matching_loss(model, x0, text, mask, cond_drop=0.999999)
    assert torch.equal(spy.calls[-1][1], null) and torch.equal(spy.calls[-1][2], null_mask)
    flow_matching_loss(model, x0, text, mask, cond_drop=0.0)
    assert torch.equal(spy.calls[-1][1], text)
    # the null caption is one learned token, the same whatever the length
    (n3, m3), (n7, m7) = model.null_text(1, 3), model.null_text(1, 7)
    assert torch.equal(n3[:, 0], n7[:, 0]) and m3.sum() == m7.sum() == 1
    assert model.null_token.requires_grad


def test_activation_peaks_one_value_per_block():
    model = build(DiTConfig(size="nano", depth=3))
    randomise_modulation(model)
    x, t, text, mask = inputs()
    with activation_peaks(model) as peaks:
        model(x, t, text, mask)
    assert len(peaks.residual_max) == len(peaks.ffn_max) == len(peaks.residual_median) == 3
    assert all(m > 0 for m in peaks.residual_max) and all(m > 0 for m in peaks.ffn_max)
    assert all(r >= 1.0 for r in peaks.ratios())
    assert all(0 <= c < model.cfg.dim for c in peaks.residual_channel)
    assert all(b.probe is None for b in model.blocks)  # the probe is gone afterwards


# ---------------------------------------------------------------------------------------
# Training on the workspace (models/train_dit.py)
# ---------------------------------------------------------------------------------------


def test_dit_job_trains_resumes_saves_and_scores_fidelity(scene_ws, tmp_path):
    from dataengine.curriculum import CurriculumSampler
    from dataengine.sceneworld.checker import Checker, CheckerConfig
    from models.dit import load_dit
    from models.frozen import Frozen
    from models.train_dit import DiTJob, DiTTrainConfig
    from models.trainer import LoopConfig, TrainingInterrupted, train
    from models.vae import VAEConfig
    from models.vae import build as build_vae

    torch.manual_seed(0)
    vae, frozen = build_vae(VAEConfig(size="nano")), Frozen.load()
    checker = Checker.train(CheckerConfig(resolution=32, n_train=16, n_eval=4, epochs=1, batch_size=16, width=8))
    cfg = DiTTrainConfig(size="nano", resolution=32, batch_size=4, eval_images=4, eval_prompts=3, sample_steps=2)
    loop = LoopConfig(steps=4, ckpt_every=2, warmup_steps=1, num_threads=2, progress=False)

    def job():
        sampler = CurriculumSampler(scene_ws.root, cfg.batch_size, loop.steps, seed=loop.seed,
                                    resolution=cfg.resolution)
        return DiTJob(sampler, vae, frozen, cfg, info={"vae": "test", "text_encoder": frozen.spec},
                      checker=checker)

    models_root = tmp_path / "models"
    with pytest.raises(TrainingInterrupted):
        train(job(), models_root, loop, stop_after=2)
    record = train(job(), models_root, loop)
    assert record["resumed_from"] == 2
    m = record["metrics"]
    assert m["steps"] == 4 and m["eval"]["eval_loss"] > 0
    fid = m["eval"]["fidelity"]
    assert fid["n_prompts"] == 3
    # The headline is the samples' checker accuracy, the mean of its attributes' (each
    # image's accuracy averages them), beside the real images and their reconstructions.
    from dataengine.sceneworld.checker import ATTRIBUTES

    assert set(fid) >= {"samples", "reconstructions", "real"} and fid["accuracy"] == fid["samples"]["accuracy"]
    for figures in (fid["samples"], fid["reconstructions"], fid["real"]):
        assert figures["accuracy"] == pytest.approx(sum(figures[a] for a in ATTRIBUTES) / len(ATTRIBUTES), abs=2e-4)
    assert fid["ms_per_image"] > 0 and fid["sample_steps"] == cfg.sample_steps
    assert {"samples", "reconstructions", "real"} <= set(fid)

    model = load_dit(record["path"])
    assert model.cfg.size == "nano" and model.cfg.text_dim == frozen.text_dim
    x, t, text, mask = inputs(B=1, h=2, w=2)
    assert model(x, t, text, mask).shape == x.shape


def test_missing_vae_says_how_to_get_one(ws):
    from models.train_dit import resolve_vae

    with pytest.raises(FileNotFoundError, match="dataengine train vae"):
        resolve_vae(ws.root, None)
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_vae(ws.root, "vae/v0042")


def test_the_default_text_limit_covers_95_percent_of_rich_captions():
    """Enhanced prompts are as long as rich captions: the DiT must read at least 95% of
    them whole (token counts of the frozen text encoder, special tokens included)."""
    import random

    import numpy as np

    from dataengine.sceneworld import caption_for, sample_scene
    from models.dit import DiTConfig
    from models.frozen import Frozen
    from models.train_dit import DiTTrainConfig

    frozen = Frozen.load()
    rng = random.Random(3)
    rich = [caption_for(sample_scene(rng, 256, 256), rng, detail="rich") for _ in range(400)]
    _, mask = frozen.text_tokens(rich, max_len=10_000)
    p95 = float(np.percentile(mask.sum(1).numpy(), 95))
    assert DiTTrainConfig().max_text_len >= p95 and DiTConfig().max_text_len >= p95, p95
    assert mask.shape[1] > DiTTrainConfig().max_text_len  # some are longer: the limit is not vacuous

"""Enhancer phase two (models/enhancer_rl.py): sampling, GRPO terms, training direction, saved versions.

A tiny phase-one enhancer is trained for a few steps on scene-world pairs; the generator
is an untrained nano DiT + nano VAE over the packaged frozen text encoder, rendering 32 px.
"""

from __future__ import annotations

import random
import shutil

import pyarrow as pa
import pytest
import torch

from dataengine.sceneworld import caption_for, sample_scene
from models.dit import DiTConfig, build as build_dit
from models.enhancer import enhance, load, load_version
from models.enhancer_rl import (
    Candidates, EnhancerRLConfig, EnhancerRLJob, Renderer, TersePrompt, group_advantages, grpo_token_loss,
    intent_kept, k3_kl, load_enhancer_rl, sample_rollouts, split_prompts, terse_prompts, token_log_probs, train_enhancer_rl,
    train_job,
    workspace_reward,
)
from models.frozen import Frozen
from models.train_enhancer import EnhancerTrainConfig, train as train_phase_one
from models.trainer import LoopConfig, train
from models.vae import VAEConfig, build as build_vae


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scene_prompts(n: int, seed: int = 0) -> list[tuple[str, str, str, dict]]:
    """(terse, short, rich, scene json) of `n` scene-world scenes."""
    out = []
    for i in range(n):
        rng = random.Random(seed * 10_000 + i)
        scene = sample_scene(rng, 256, 256)
        out.append((caption_for(scene, rng, "terse"), caption_for(scene, rng, "short"),
                    caption_for(scene, rng, "rich"), scene.to_json()))
    return out


@pytest.fixture(scope="module")
def phase_one(tmp_path_factory):
    """A nano enhancer trained briefly on (terse -> short) pairs: it writes caption-like text
    of varied length, which is all these tests need."""
    rows = scene_prompts(32)  # 20 to train on, 12 held out (4 held out left "most" at one tie)
    pairs = pa.table({"source_id": [f"s{i}" for i in range(len(rows))], "step": [1] * len(rows),
                      "less": [r[0] for r in rows], "more": [r[1] for r in rows]})
    root = tmp_path_factory.mktemp("phase1") / "models"
    torch.manual_seed(0)
    cfg = EnhancerTrainConfig(size="nano", steps=30, batch_size=8, lr=3e-3, warmup_steps=5, vocab_size=512,
                              eval_fraction=0, progress=False, num_threads=1)
    record = train_phase_one(pairs, root, cfg)
    prompts = [TersePrompt(f"s{i}", r[0], r[3]) for i, r in enumerate(rows)]
    return record["path"], prompts


@pytest.fixture(scope="module")
def renderer():
    torch.manual_seed(0)
    frozen = Frozen.load("dataengine-clip-lite0")
    dit = build_dit(DiTConfig(size="nano", text_dim=frozen.text_dim, max_text_len=32))
    vae = build_vae(VAEConfig(size="nano", factor=16))
    return Renderer(dit, vae, frozen, resolution=32, steps=2, cfg_scale=2.0)


def words_reward(sign: float = 1.0):
    """Scores an enhanced prompt by its length in characters: a reward on the prompt alone."""
    def score(c: Candidates) -> dict[str, torch.Tensor]:
        return {"length": sign * torch.tensor([float(len(t)) for t in c.enhanced])}
    return score


def brightness(c: Candidates) -> dict[str, torch.Tensor]:
    """A plain function of the render: its mean brightness."""
    return {"brightness": c.images.mean(dim=(1, 2, 3))}


# ---------------------------------------------------------------------------------------
# Sampling and the GRPO terms
# ---------------------------------------------------------------------------------------


def test_sampled_log_probs_equal_a_recomputation(phase_one):
    path, prompts = phase_one
    model, tok = load_version(path)
    torch.manual_seed(1)
    roll = sample_rollouts(model, tok, [p.text for p in prompts[:3]], group_size=4, temperature=0.8,
                           max_new_tokens=20)
    assert len(roll) == 12 and roll.candidates.terse[:4] == [prompts[0].text] * 4
    with torch.no_grad():
        again = token_log_probs(model, roll.input_ids, roll.attention_mask, temperature=0.8)
    m = roll.action_mask
    assert torch.allclose(again[m], roll.log_probs[m], atol=1e-4)
    assert (roll.log_probs[~m] == 0).all()
    # Every action is a completion token: the counts agree, and rows without eos ran to the cap.
    assert m.sum(1).tolist() == roll.lengths.tolist()
    assert all(n == 20 for n, f in zip(roll.lengths.tolist(), roll.finished.tolist()) if not f)
    # The completions decode to the recorded texts (eos stripped).
    r = 5
    start = int(m[r].nonzero()[0]) + 1
    ids = roll.input_ids[r, start: start + int(roll.lengths[r])].tolist()
    assert tok.decode([i for i in ids if i != tok.eos_token_id], skip_special_tokens=True).strip() \
        == roll.candidates.enhanced[r]


def test_group_advantages_have_zero_mean_per_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0, -1.0, 0.0, 0.5, 4.0])
    for scale in (True, False):
        adv = group_advantages(rewards, group_size=4, scale=scale).view(3, 4)
        assert torch.allclose(adv.mean(1), torch.zeros(3), atol=1e-6)
        assert (adv[1] == 0).all()  # a group that all scored the same teaches nothing
    scaled = group_advantages(rewards, group_size=4).view(3, 4)
    assert torch.allclose(scaled[[0, 2]].std(1, unbiased=False), torch.ones(2), atol=1e-3)
    # Ranks survive within a group.
    assert scaled[0].argsort().tolist() == [0, 1, 2, 3]


def test_kl_term_is_zero_when_the_policy_is_the_reference(phase_one):
    path, prompts = phase_one
    model, tok = load_version(path)
    torch.manual_seed(2)
    roll = sample_rollouts(model, tok, [p.text for p in prompts[:2]], 4, 1.0, 16)
    reference = load_version(path)[0]
    logp = token_log_probs(model, roll.input_ids, roll.attention_mask, 1.0)
    with torch.no_grad():
        ref = token_log_probs(reference, roll.input_ids, roll.attention_mask, 1.0)
    adv = torch.zeros(len(roll))
    loss, stats = grpo_token_loss(logp, roll.log_probs, ref, adv, roll.action_mask, 0.2, kl_beta=1.0, norm=16.0)
    assert stats["kl"] == 0.0 and float(loss.detach()) == 0.0
    # ... and positive once the policy moves away from it.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved = token_log_probs(model, roll.input_ids, roll.attention_mask, 1.0)
    _, stats = grpo_token_loss(moved, roll.log_probs, ref, adv, roll.action_mask, 0.2, kl_beta=1.0, norm=16.0)
    assert stats["kl"] > 0
    assert (k3_kl(moved, ref)[roll.action_mask] >= 0).all()


def test_the_clipped_loss_is_reinforce_at_ratio_one_and_pushes_good_sequences_up():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([1.0, -1.0])
    loss, stats = grpo_token_loss(logp, logp.detach(), None, adv, mask, clip_range=0.2, kl_beta=0.0, norm=4.0)
    # The gradient of -mean(A * sum of the sequence's token log-probs) / norm: -A / (norm * B)
    # on every sampled token, so descent raises the log-probs of A > 0 and lowers A < 0.
    loss.backward()
    want = torch.tensor([[-0.125, -0.125, 0.0], [0.125, 0.125, 0.125]])
    assert torch.allclose(logp.grad, want)
    assert stats["ratio"] == pytest.approx(1.0) and stats["clip_frac"] == 0.0


# ---------------------------------------------------------------------------------------
# Training through the frozen generator
# ---------------------------------------------------------------------------------------


def mean_length(model, tok, prompts, seed: int = 123) -> float:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        roll = sample_rollouts(model, tok, [p.text for p in prompts], 8, 1.0, 24)
    return float(roll.lengths.float().mean())


@pytest.fixture(scope="module")
def trained(phase_one, renderer, tmp_path_factory):
    """Eight GRPO steps with a reward that prefers SHORT prompts, rendered by the nano stack."""
    path, prompts = phase_one
    policy, tok = load_version(path)
    cfg = EnhancerRLConfig(group_size=4, prompts_per_step=4, max_new_tokens=24, kl_beta=0.01,
                           reward_weights={"length": 1.0})
    job = EnhancerRLJob(policy, tok, prompts[:20], cfg, words_reward(-1.0), renderer, heldout=prompts[20:],
                        info={"enhancer": str(path)})
    before = mean_length(load_version(path)[0], tok, prompts[:8])
    root = tmp_path_factory.mktemp("rl") / "models"
    loop = LoopConfig(steps=8, lr=2e-3, warmup_steps=1, ckpt_every=100, progress=False, num_threads=1)
    record = train_job(job, root, loop)
    return job, record, before, tok, prompts


def test_a_reward_on_length_moves_the_policy_its_way(trained):
    job, record, before, tok, prompts = trained
    after = mean_length(job.policy, tok, prompts[:8])
    assert after < 0.8 * before, (before, after)
    curve = record["metrics"]["curves"]["reward"]
    assert curve[-1][1] > curve[0][1]  # less negative: shorter prompts


def test_evaluate_scores_terse_phase_one_and_phase_two_prompts_on_renders(trained):
    job, record, *_ = trained
    ev = record["metrics"]["eval"]
    assert ev["n_prompts"] == 12 and ev["n_with_scene"] == 12
    assert set(ev["contenders"]) == {"terse", "phase1", "phase2"}
    for fig in ev["contenders"].values():
        assert {"reward", "reward_length", "words", "text_overflow", "intent_preservation"} <= set(fig)
    # The reward was optimised toward short prompts; the held-out prompts show it too.
    assert ev["contenders"]["phase2"]["reward"] > ev["contenders"]["phase1"]["reward"]
    diff = ev["paired_reward"]["phase2-phase1"]
    assert diff["mean"] == pytest.approx(ev["contenders"]["phase2"]["reward"] - ev["contenders"]["phase1"]["reward"],
                                         abs=1e-3)
    # Phase two writes the shorter prompt for most held-out prompts, and the paired mean
    # is more than one standard error from zero.
    assert diff["wins"] > 0.5 and diff["mean"] > diff["se"] > 0


def test_the_saved_version_loads_and_enhances_like_a_phase_one_version(trained):
    job, record, _, tok, prompts = trained
    terse = [p.text for p in prompts[20:]]
    want = enhance(job.policy, tok, terse, max_new_tokens=24)
    for loader in (load_version, lambda p: load(p), load_enhancer_rl):
        model, tokenizer = loader(record["path"])
        assert enhance(model, tokenizer, terse, max_new_tokens=24) == want
    # Without model/ (a crash between save and export) it is rebuilt from the trainer's weights.
    shutil.rmtree(f"{record['path']}/model")
    model, tokenizer = load_enhancer_rl(record["path"])
    assert enhance(model, tokenizer, terse, max_new_tokens=24) == want


def test_renders_depend_on_the_prompt_and_the_reward_reads_them(phase_one, renderer, tmp_path):
    _, prompts = phase_one
    noise = torch.randn(1, *renderer.latent_shape).repeat(2, 1, 1, 1)
    a, b = renderer([prompts[0].text, prompts[1].text], noise)
    assert a.shape == (3, 32, 32) and a.abs().max() <= 1
    # An untrained DiT predicts 0 everywhere (adaLN-Zero): give it a text-dependent output.
    with torch.no_grad():
        renderer.model.final.linear.bias.normal_()
        for p in renderer.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    a, b = renderer([prompts[0].text, prompts[1].text], noise)
    assert not torch.allclose(a, b)
    # A reward of the image runs through the same job path.
    path, _ = phase_one
    policy, tok = load_version(path)
    cfg = EnhancerRLConfig(group_size=2, prompts_per_step=2, max_new_tokens=8, reward_weights={"brightness": 1.0})
    job = EnhancerRLJob(policy, tok, prompts[:4], cfg, brightness, renderer)
    record = train(job, tmp_path, LoopConfig(steps=1, warmup_steps=1, progress=False, num_threads=1))
    assert record["metrics"]["first"]["reward_brightness"] == pytest.approx(record["metrics"]["first"]["reward"])


def test_a_distilled_student_renders_in_its_own_steps_without_guidance(renderer, tmp_path):
    from models.distill import Stack

    stack = Stack(renderer.model, tmp_path, {"distill": {"student_steps": 4, "shift": 1.0}}, renderer.vae,
                  renderer.text_encoder, 32)
    cfg = EnhancerRLConfig(resolution=32, dit_steps=7, cfg_scale=3.0)
    student = Renderer.from_stack(stack, cfg, student=True)
    teacher = Renderer.from_stack(stack, cfg)
    assert (student.steps, student.cfg_scale, student.student) == (4, 1.0, True)
    assert (teacher.steps, teacher.cfg_scale, teacher.student) == (7, 3.0, False)
    noise = torch.randn(2, *student.latent_shape)
    assert student(["a red star", "two blue rings"], noise).shape == (2, 3, 32, 32)


def test_the_reward_heads_score_renders_against_the_terse_prompt(phase_one, renderer, tmp_path):
    """Untrained EmbeddedRewards saved as a workspace's `reward` version drive one step."""
    from models.rewards import EmbeddedRewards, RewardConfig

    frozen = renderer.text_encoder
    torch.manual_seed(0)
    EmbeddedRewards(RewardConfig(embed_dim=frozen.embed_dim), frozen).save(tmp_path / "models")
    reward = workspace_reward(tmp_path)
    path, prompts = phase_one
    policy, tok = load_version(path)
    cfg = EnhancerRLConfig(group_size=2, prompts_per_step=2, max_new_tokens=8,
                           reward_weights={"fidelity": 1.0, "aesthetics": 0.5})
    job = EnhancerRLJob(policy, tok, prompts[:4], cfg, reward, renderer)
    record = train(job, tmp_path / "runs", LoopConfig(steps=1, warmup_steps=1, progress=False, num_threads=1))
    first = record["metrics"]["first"]
    assert first["reward"] == pytest.approx(first["reward_fidelity"] + 0.5 * first["reward_aesthetics"], abs=1e-4)
    assert {"reward_portrait", "reward_intent"} <= set(first)  # reported, not optimised
    # Fidelity reads the TERSE prompt: the same image scores differently against another intent.
    img = torch.zeros(1, 3, 32, 32)
    a = reward(Candidates(["a red star"], ["x"], img))["fidelity"]
    b = reward(Candidates(["two blue rings"], ["x"], img))["fidelity"]
    c = reward(Candidates(["a red star"], ["two blue rings"], img))["fidelity"]
    assert a != b and a == c


def test_intent_kept_counts_the_terse_attributes_still_named():
    kept = intent_kept(["a red star", "a red star", "a red star", "something"],
                       ["a large red star on grass", "a blue star", "a red ring", "anything"])
    assert kept[0] == 1.0 and kept[1] < 1.0 and kept[2] < 1.0 and kept[3] == 1.0


# ---------------------------------------------------------------------------------------
# Prompts from the pairs table
# ---------------------------------------------------------------------------------------


def test_terse_prompts_are_chain_ends_and_the_split_keeps_sources_apart():
    pairs = pa.table({
        "source_id": ["a", "a", "a", "b", "b", "c", None],
        "step": [1, 2, 3, 1, 2, 1, 1],
        "less": ["red star on grass at dusk", "red star on grass", "a red star", "two blue rings in fog",
                 "two blue rings", "a cube", "orphan"],
        "more": ["x"] * 7,
    })
    got = terse_prompts(pairs, {"a": {"scene": 1}})
    assert [(p.source_id, p.text) for p in got] == [("a", "a red star"), ("b", "two blue rings"), ("c", "a cube")]
    assert got[0].scene == {"scene": 1} and got[1].scene is None
    train_p, held = split_prompts(got, n_eval=1, seed=0, prefer={"b"})
    assert [p.source_id for p in held] == ["b"] and {p.source_id for p in train_p} == {"a", "c"}
    train_p, held = split_prompts(got, n_eval=10, seed=0)
    assert len(train_p) == 1 and len(held) == 2  # one prompt always stays to train on


def test_config_rejects_a_group_of_one():
    with pytest.raises(ValueError, match="group_size"):
        EnhancerRLConfig(group_size=1)
    with pytest.raises(ValueError, match="generator"):
        EnhancerRLConfig(generator="gan")


def test_the_workspace_serves_its_newest_promoted_enhancer_phase_two_included(trained, phase_one, tmp_path):
    from datetime import datetime, timedelta, timezone

    from dataengine.catalog import Catalog
    from dataengine.schema import MODEL_VERSIONS
    from dataengine.workspace import Workspace
    from models.enhancer_rl import load_enhancer, resolve_enhancer

    ws = Workspace.at(tmp_path / "ws")
    Catalog(ws).migrate()
    with pytest.raises(FileNotFoundError, match="no enhancer version"):
        resolve_enhancer(ws.root)
    job, record, _, tok, prompts = trained
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def register(model: str, path: str, status: str, at: datetime) -> None:
        row = {"model": model, "version": "v0001", "path": path, "status": status, "metrics": "{}",
               "job_id": None, "created_at": at}
        Catalog(ws).upsert("model_versions", pa.Table.from_pylist([row], schema=MODEL_VERSIONS))

    register("enhancer", phase_one[0], "promoted", t0)
    register("enhancer-rl", record["path"], "candidate", t0 + timedelta(hours=1))
    assert resolve_enhancer(ws.root)[1:] == ("enhancer", "promoted")  # a newer candidate does not serve
    register("enhancer-rl", record["path"], "promoted", t0 + timedelta(hours=1))
    path, name, status = resolve_enhancer(ws.root)
    assert (str(path), name, status) == (record["path"], "enhancer-rl", "promoted")
    terse = [p.text for p in prompts[20:]]
    model, tokenizer = load_enhancer(path)
    assert enhance(model, tokenizer, terse, max_new_tokens=24) == enhance(job.policy, tok, terse, max_new_tokens=24)


def test_phase_two_optimises_only_heads_that_pass_their_held_out_bars(tmp_path):
    """No weights named: the workspace reward's trusted generation heads, as RL's default;
    none trusted -> refused before anything trains; a custom reward must name its weights."""
    from models.rewards import EmbeddedRewards, RewardConfig
    from models.rl import UntrustedReward

    held = {"aesthetics": {"accuracy": 0.6}, "fidelity": {"accuracy": 0.55}, "portrait": {"accuracy": 0.7}}
    EmbeddedRewards(RewardConfig(hidden=8, spatial=())).save(tmp_path / "models", {"eval": {"heldout": held}})
    with pytest.raises(UntrustedReward, match="fidelity"):
        train_enhancer_rl(tmp_path, EnhancerRLConfig(), LoopConfig(steps=1, progress=False))
    with pytest.raises(ValueError, match="reward_weights"):
        train_enhancer_rl(tmp_path, EnhancerRLConfig(), LoopConfig(steps=1, progress=False),
                          reward=lambda cand: {"x": torch.zeros(len(cand))})

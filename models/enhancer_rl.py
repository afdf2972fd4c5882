"""Enhancer phase two: GRPO on the prompts themselves, scored by what a frozen generator makes of them.

    record = train_enhancer_rl("ws", EnhancerRLConfig(), LoopConfig(steps=20, lr=1e-4))
    model, tok = load_enhancer_rl(record["path"])        # or models.enhancer.load_version(path)
    enhance(model, tok, ["a red star"])

Phase one (models/train_enhancer.py) taught a small causal LM to undo caption degradation.
Phase two optimises the same LM for what its prompts produce. One step:

1. P terse prompts (the tersest `less` of a degradation chain: what a user types) are
   drawn from the training side of a split by `source_id`;
2. the policy writes G enhanced prompts for each, sampled token by token at
   `temperature` (token ids and log-probs kept);
3. the frozen generator renders every enhanced prompt (text tokens from the DiT's frozen
   text encoder, the 4-step distilled student when the workspace has one, else the DiT
   with CFG, then the VAE's decoder). The G renders of one prompt share their initial
   noise, so the comparison inside a group is between prompts, not noise draws;
4. the reward heads score each render against the ORIGINAL terse prompt (the user's
   intent: an enhancer that drifts from it loses fidelity) plus aesthetics, and, when
   weighted, "intent" (the terse prompt's attributes still named: text only); the
   weighted sum is normalised within each group, A = (r - mean_g) / (std_g + eps);
5. loss per sequence = sum over its sampled tokens of
       max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)) + beta * k3(policy, reference),
   with rho = exp(log pi - log pi_old) per token and k3 = exp(d) - d - 1, d = log pi_ref - log pi,
   Schulman's non-negative, unbiased per-sample estimator of KL(pi || pi_ref) on tokens
   drawn from pi (zero when the policy is the reference). The per-sequence sum is divided
   by the constant `max_new_tokens`, not the sequence's own length: dividing by its own
   length favours short sequences when A > 0 and penalises long ones less when A < 0
   (the length bias Dr. GRPO points out); a constant only rescales the learning rate. With one
   update per sampled batch rho == 1 and this is REINFORCE with a group baseline.

Token log-probs are those of the sampling distribution, softmax(logits / temperature), for
the policy, the old policy and the reference alike, so the ratio and the KL compare the
distributions that actually produced the tokens.

A saved version (models/enhancer-rl/vNNNN) holds the trainer's files and, in `model/`,
the policy and tokenizer saved the way models/enhancer.py saves a phase-one version, so
`models.enhancer.load` / `load_version` and `dataengine enhance --model PATH` read it as
they read phase one. The trainer's weights keep the backbone (and an untied output
layer, if any) apart because safetensors refuses tied tensors; `load_enhancer_rl` can
rebuild the model from them and the phase-one version when `model/` is missing.

Sections: config, sampling and log-probs, GRPO, rendering, prompts, the job, the workspace entry.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .enhancer import enhance, load_version, prompt_ids, uses_special_format
from .rewards import weighted_reward
from .trainer import LoopConfig, TrainJob, latest, load_weights, train

__all__ = [
    "EnhancerRLConfig", "Candidates", "Rollouts", "TersePrompt", "Renderer", "EnhancerRLJob", "train_enhancer_rl",
    "train_job", "load_enhancer_rl", "sample_rollouts", "token_log_probs", "group_advantages", "k3_kl",
    "grpo_token_loss", "terse_prompts", "split_prompts", "weighted_reward", "intent_kept", "MODEL_NAME",
    "resolve_enhancer", "load_enhancer",
]

MODEL_NAME = "enhancer-rl"
PHASE_ONE = "enhancer"


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


@dataclass
class EnhancerRLConfig:
    """The knobs of one phase-two run (the loop's steps, lr and schedule come from LoopConfig)."""

    group_size: int = 4  # G enhanced prompts per terse prompt
    prompts_per_step: int = 4  # P terse prompts per step: P * G rollouts
    temperature: float = 1.0  # of the policy's sampling distribution (and of its log-probs)
    max_new_tokens: int = 64  # tokens per enhanced prompt; also the loss's normaliser
    kl_beta: float = 0.05  # weight of KL(policy || phase-one reference) on the sampled tokens
    clip_range: float = 0.2  # PPO clip of the per-token ratio
    updates_per_step: int = 1  # optimiser updates per sampled batch (PPO epochs)
    scale_advantages: bool = True  # divide by the group's std (GRPO); False: mean-centred only
    adv_eps: float = 1e-4
    weight_decay: float = 0.0
    # The optimised reward: a weighted sum of the reward heads' scores of each render
    # against the TERSE prompt (the intent); "intent" (the terse prompt's attributes the
    # enhanced one still names, text only) may join it. Held-out figures add the checker.
    # None: equal weights on the workspace reward's generation heads that pass their
    # held-out bars (as RL's default; a head at chance is never optimised).
    reward_weights: dict[str, float] | None = None
    generator: str = "auto"  # auto (the newest distill student, else the newest dit) | distill | dit
    dit_steps: int = 20  # Euler steps when the generator is the DiT (the student uses its own)
    cfg_scale: float = 4.0  # guidance of the DiT (the student samples without)
    resolution: int = 64  # rendered image side in px
    eval_prompts: int = 32  # held-out terse prompts (their source captions never train phase two)
    enhancer: str | None = None  # a phase-one version folder; None: the workspace's newest

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are relative within a group), got {self.group_size}")
        for name in ("prompts_per_step", "max_new_tokens", "updates_per_step", "dit_steps", "eval_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (the policy is a sampling distribution), got {self.temperature}")
        if self.kl_beta < 0 or self.clip_range <= 0:
            raise ValueError(f"kl_beta must be >= 0 and clip_range > 0, got {self.kl_beta}, {self.clip_range}")
        if self.generator not in ("auto", "distill", "dit"):
            raise ValueError(f"generator must be auto, distill or dit, got {self.generator!r}")
        if self.reward_weights is not None and not self.reward_weights:
            raise ValueError("reward_weights is empty: nothing to optimise")


# ---------------------------------------------------------------------------------------
# Sampling and log-probs
# ---------------------------------------------------------------------------------------


@dataclass
class Candidates:
    """What a reward reads: enhanced prompts, the terse prompts they came from (the intent),
    their renders and their sources' ground truth."""

    terse: list[str]  # (B,) the intent
    enhanced: list[str]  # (B,) the prompts the generator was given
    images: torch.Tensor | None = None  # (B, 3, H, W) renders in [-1, 1], once rendered
    scenes: list[dict | None] | None = None  # (B,) scene-world ground truth where known

    def __len__(self) -> int:
        return len(self.enhanced)


# A reward: per-candidate scores by name (the job weighs them with cfg.reward_weights).
RewardFn = Callable[[Candidates], dict[str, torch.Tensor]]


@dataclass
class Rollouts:
    """P * G sampled enhanced prompts, group-major (rows g*G .. g*G+G-1 share a terse prompt).

    Sequences are right-padded `prompt part | completion | pad`; position j of the (B, T-1)
    tensors is the prediction of token j+1 from tokens <= j."""

    candidates: Candidates  # terse (each repeated G times), enhanced (the decoded completions), ...
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    action_mask: torch.Tensor  # (B, T-1) bool: the target token is a sampled completion token
    log_probs: torch.Tensor  # (B, T-1) the sampling distribution's log-prob of each action (0 elsewhere)
    lengths: torch.Tensor  # (B,) completion tokens (eos included when produced)
    finished: torch.Tensor  # (B,) bool: ended with eos within max_new_tokens
    group_size: int

    def __len__(self) -> int:
        return len(self.candidates)


def _decode(tokenizer, ids: list[int]) -> str:
    """A completion's text, as `models.enhancer.enhance` decodes it."""
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if not uses_special_format(tokenizer):
        text = text.split("\n", 1)[0]
    return text.strip()


@torch.no_grad()
def _sample(model, prompts: list[list[int]], temperature: float, max_new_tokens: int, eos: int | None,
            pad: int, device) -> tuple[list[list[int]], list[list[float]], list[bool]]:
    """One completion per prompt, all rows in step: token ids, their log-probs and whether
    each ended with eos. Prompts are left-padded and positions counted over real tokens
    only, so every row sees what an unpadded run of its own would (the KV cache grows by
    one column per step)."""
    B, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((B, width), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, device=device)
        mask[r, width - len(p):] = 1
    position = (mask.cumsum(1) - 1).clamp(min=0)  # (B, width)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True)
    cache, logits = out.cache, out.logits[:, -1]  # (B, V)
    nxt = mask.sum(1, keepdim=True)  # (B, 1) the position of the next token
    tokens: list[list[int]] = [[] for _ in range(B)]
    lps: list[list[float]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logp = F.log_softmax(logits.float() / temperature, dim=-1)  # (B, V)
        tok = torch.multinomial(logp.exp(), 1).squeeze(1)  # (B,) torch's global RNG
        chosen = logp.gather(1, tok[:, None]).squeeze(1)  # (B,)
        for r in (~done).nonzero().flatten().tolist():
            tokens[r].append(int(tok[r]))
            lps[r].append(float(chosen[r]))
        if eos is not None:
            done |= tok == eos
        if bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # (B, width + t + 1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=nxt, cache=cache, use_cache=True)
        cache, logits, nxt = out.cache, out.logits[:, -1], nxt + 1
    return tokens, lps, [bool(d) for d in done.tolist()]


@torch.no_grad()
def sample_rollouts(model, tokenizer, terse: Sequence[str], group_size: int, temperature: float,
                    max_new_tokens: int) -> Rollouts:
    """G sampled completions of each terse prompt, with the sampling distribution's log-probs."""
    from .enhancer import pad_id

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    prompts = [prompt_ids(tokenizer, text) for text in terse for _ in range(group_size)]  # group-major
    try:
        toks, lps, fin = _sample(model, prompts, temperature, max_new_tokens, eos, pad_id(tokenizer), device)
    finally:
        model.train(was_training)
    rows = list(zip(prompts, toks, lps, fin))
    width = max(len(p) + len(t) for p, t, _, _ in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id(tokenizer), dtype=torch.long)
    attn = torch.zeros((B, width), dtype=torch.long)
    action = torch.zeros((B, width - 1), dtype=torch.bool)
    logp = torch.zeros((B, width - 1))
    for r, (p, t, lp, _) in enumerate(rows):
        n_p, n_t = len(p), len(t)
        ids[r, : n_p + n_t] = torch.tensor(p + t)
        attn[r, : n_p + n_t] = 1
        action[r, n_p - 1: n_p - 1 + n_t] = True  # position j predicts token j+1
        logp[r, n_p - 1: n_p - 1 + n_t] = torch.tensor(lp)
    eos_set = {eos} if eos is not None else set()
    enhanced = [_decode(tokenizer, [i for i in t if i not in eos_set]) for _, t, _, _ in rows]
    return Rollouts(
        Candidates([t for t in terse for _ in range(group_size)], enhanced), input_ids=ids.to(device),
        attention_mask=attn.to(device), action_mask=action.to(device), log_probs=logp.to(device),
        lengths=torch.tensor([len(t) for _, t, _, _ in rows], device=device),
        finished=torch.tensor([f for _, _, _, f in rows], device=device), group_size=group_size,
    )


def token_log_probs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """(B, T-1) log-prob of token j+1 given tokens <= j under softmax(logits / temperature)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T-1, V)
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(2, input_ids[:, 1:, None]).squeeze(2)  # (B, T-1)


# ---------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of its group) [/ (std of its group + eps)]; rewards (P*G,), group-major."""
    r = rewards.float().view(-1, group_size)  # (P, G)
    adv = r - r.mean(1, keepdim=True)
    if scale:
        adv = adv / (r.std(1, unbiased=False, keepdim=True) + eps)
    return adv.view(-1)


def k3_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) on tokens drawn from pi: exp(d) - d - 1, d = ref - pi.
    Non-negative, zero exactly where the two log-probs agree."""
    d = ref_log_probs - log_probs
    return torch.exp(d) - d - 1


def grpo_token_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, ref_log_probs: torch.Tensor | None,
                    advantages: torch.Tensor, action_mask: torch.Tensor, clip_range: float, kl_beta: float,
                    norm: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over sequences of (sum over their tokens of the PPO-clipped surrogate + beta * k3) / norm.
    log_probs (B, T-1) carry the gradient; advantages (B,) are broadcast to every token."""
    m = action_mask.float()  # (B, T-1)
    ratio = torch.exp(log_probs - old_log_probs)  # (B, T-1)
    a = advantages[:, None]  # (B, 1)
    surrogate = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_range, 1 + clip_range))  # (B, T-1)
    per_token = surrogate
    kl = torch.zeros_like(log_probs)
    if ref_log_probs is not None and kl_beta > 0:
        kl = k3_kl(log_probs, ref_log_probs)
        per_token = per_token + kl_beta * kl
    loss = ((per_token * m).sum(1) / norm).mean()
    n = m.sum().clamp(min=1)
    surrogate, kl, ratio = surrogate.detach(), kl.detach(), ratio.detach()
    stats = {
        "policy": float((surrogate * m).sum(1).div(norm).mean()),
        "kl": float((kl * m).sum() / n),  # per token
        "ratio": float((ratio * m).sum() / n),
        "clip_frac": float((((ratio - 1).abs() > clip_range).float() * m).sum() / n),
    }
    return loss, stats


def intent_kept(terse: Sequence[str], enhanced: Sequence[str]) -> torch.Tensor:
    """(B,) share of the attributes each terse prompt names (scene-world vocabulary) that its
    enhanced prompt still names; 1 where the terse prompt names none. Text only: a cheap
    check on drift from the intent that no render can blur."""
    from dataengine.enhance_eval import extract_attributes

    out = []
    for t, e in zip(terse, enhanced):
        facts = extract_attributes(t)
        out.append(len(facts & extract_attributes(e)) / len(facts) if facts else 1.0)
    return torch.tensor(out)


# ---------------------------------------------------------------------------------------
# Rendering with the frozen generator
# ---------------------------------------------------------------------------------------


class Renderer:
    """Prompts -> images with a frozen text encoder, DiT (or 4-step student) and VAE decoder."""

    def __init__(self, model, vae, text_encoder, resolution: int = 64, steps: int = 20, cfg_scale: float = 4.0,
                 student: bool = False, shift: float = 1.0, max_text_len: int | None = None):
        factor = getattr(vae, "factor", None) or getattr(vae.cfg, "factor")
        if resolution % factor:
            raise ValueError(f"resolution {resolution} is not a multiple of the VAE's factor {factor}")
        self.model = model.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.resolution, self.steps, self.cfg_scale = resolution, steps, cfg_scale
        self.student, self.shift = student, shift
        self.max_text_len = max_text_len or model.cfg.max_text_len
        self.latent_shape = (model.cfg.latent_channels, resolution // factor, resolution // factor)

    @classmethod
    def from_stack(cls, stack, cfg: EnhancerRLConfig, student: bool = False) -> "Renderer":
        """From a `models.distill.Stack`: a distilled student (its own steps and shift, no
        CFG) or a DiT (cfg.dit_steps with cfg.cfg_scale)."""
        if stack.vae is None:
            raise FileNotFoundError(f"{stack.path}: the generator names no VAE and the workspace has none")
        if student:
            distilled = stack.config.get("distill", {})
            return cls(stack.model, stack.vae, stack.frozen, cfg.resolution,
                       steps=int(distilled.get("student_steps", 4)), cfg_scale=1.0, student=True,
                       shift=float(distilled.get("shift", 1.0)), max_text_len=stack.max_text_len)
        return cls(stack.model, stack.vae, stack.frozen, cfg.resolution, steps=cfg.dit_steps, cfg_scale=cfg.cfg_scale,
                   max_text_len=stack.max_text_len)

    def to(self, device) -> "Renderer":
        self.model.to(device)
        self.vae.to(device)
        return self

    def describe(self) -> dict:
        sampler = f"student {self.steps}-step" if self.student else f"dit {self.steps}-step cfg {self.cfg_scale:g}"
        return {"sampler": sampler, "resolution": self.resolution, "max_text_len": self.max_text_len}

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], noise: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] of `prompts` from `noise` (B, C, h, w)."""
        from .distill import student_sample
        from .dit import sample

        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(prompts), batch_size):
            text, mask = self.text_encoder.text_tokens(list(prompts[i: i + batch_size]), self.max_text_len)
            text, mask = text.to(device), mask.to(device)
            z0 = noise[i: i + batch_size].to(device)
            if self.student:
                z = student_sample(self.model, z0, text, mask, self.steps, shift=self.shift)
            else:
                z = sample(self.model, text, mask, tuple(z0.shape), steps=self.steps, cfg_scale=self.cfg_scale,
                           noise=z0, shift=self.shift)
            out.append(self.vae.decode(z).float().clamp(-1, 1).cpu())
        return torch.cat(out)

    def overflow(self, prompts: Sequence[str]) -> float:
        """Share of prompts longer than the generator's text window (their tail is cut off)."""
        _, mask = self.text_encoder.text_tokens(list(prompts), self.max_text_len + 1)
        return float((mask.sum(1) > self.max_text_len).float().mean())


# ---------------------------------------------------------------------------------------
# Terse prompts from the pairs table
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TersePrompt:
    """The tersest prompt of one degradation chain and its source's ground truth, if any."""

    source_id: str
    text: str
    scene: dict | None = None


def terse_prompts(pairs, scenes: dict[str, dict] | None = None) -> list[TersePrompt]:
    """The chain end (the `less` of the highest step) of every source_id in a PAIRS table,
    sorted by source_id; `scenes` maps source_id -> scene ground truth where known."""
    for col in ("source_id", "less"):
        if col not in pairs.column_names:
            raise ValueError(f"pairs table lacks column {col!r}; it must follow schema.PAIRS")
    steps = pairs.column("step").to_pylist() if "step" in pairs.column_names else [0] * pairs.num_rows
    best: dict[str, tuple[int, str]] = {}
    for sid, step, less in zip(pairs.column("source_id").to_pylist(), steps, pairs.column("less").to_pylist()):
        if sid is None or not less or not less.strip():
            continue
        step = step if step is not None else 0
        if sid not in best or step > best[sid][0]:
            best[sid] = (step, less.strip())
    scenes = scenes or {}
    return [TersePrompt(s, best[s][1], scenes.get(s)) for s in sorted(best)]


def split_prompts(prompts: Sequence[TersePrompt], n_eval: int, seed: int = 0,
                  prefer: set[str] | None = None) -> tuple[list[TersePrompt], list[TersePrompt]]:
    """(train, held-out) by source_id: `n_eval` held out, taken first from `prefer` (sources
    phase one also held out) and then at random; at least one prompt stays for training."""
    ids = [p.source_id for p in prompts]
    rng = random.Random(seed)
    first = sorted(set(ids) & (prefer or set()))
    rest = sorted(set(ids) - set(first))
    rng.shuffle(first)
    rng.shuffle(rest)
    n = min(n_eval, len(ids) - 1)
    held = set((first + rest)[: max(n, 0)])
    return [p for p in prompts if p.source_id not in held], [p for p in prompts if p.source_id in held]


def _phase_one_heldout(pairs, version: Path) -> set[str]:
    """The source_ids phase one held out of its training, by its own split rule and config."""
    from .train_enhancer import _rows, _split  # the same rule, so the two sides agree

    cfg = json.loads((version / "config.json").read_text()) if (version / "config.json").is_file() else {}
    cfg = cfg.get("job", cfg)  # the trainer's layout: {"job": the run's config, "loop": ...}
    if "eval_fraction" not in cfg or "seed" not in cfg:
        return set()
    rows, _ = _rows(pairs)
    _, held = _split(rows, cfg["eval_fraction"], cfg["seed"])
    return {r[0] for r in held}


def _scenes_of(catalog, keys: Sequence[str]) -> dict[str, dict]:
    """key -> meta["scene"] for the samples among `keys` that carry scene-world ground truth."""
    out: dict[str, dict] = {}
    keys = list(keys)
    for i in range(0, len(keys), 500):
        chunk = keys[i: i + 500]
        marks = ", ".join("?" for _ in chunk)
        table = catalog.query(f"SELECT key, meta FROM samples WHERE key IN ({marks})", chunk)
        for key, meta in zip(table.column("key").to_pylist(), table.column("meta").to_pylist()):
            scene = json.loads(meta).get("scene") if meta else None
            if scene:
                out[key] = json.loads(scene) if isinstance(scene, str) else scene
    return out


# ---------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------


class EnhancerRLJob(TrainJob):
    """GRPO of a phase-one enhancer through a frozen generator and reward.

    Modules: the policy (trained, checkpointed). The reference is a frozen copy of the
    policy as given (phase one); it is rebuilt by `setup`, never saved. `render` may be
    None for a reward that reads only the text (then `Candidates.images` stays None)."""

    name = MODEL_NAME

    def __init__(self, policy, tokenizer, train_prompts: Sequence[TersePrompt], cfg: EnhancerRLConfig,
                 reward: RewardFn, render: Renderer | None = None, heldout: Sequence[TersePrompt] = (),
                 checker=None, info: dict | None = None):
        if not train_prompts:
            raise ValueError("no training prompts: the pairs table gave no chain ends to train on")
        self.policy, self.tokenizer = policy, tokenizer
        self.train_prompts, self.heldout = list(train_prompts), list(heldout)
        if cfg.reward_weights is None:
            raise ValueError("EnhancerRLJob needs cfg.reward_weights (train_enhancer_rl fills the default)")
        self.cfg, self.reward, self.render, self.checker = cfg, reward, render, checker
        self.info = info or {}

    # -- TrainJob ------------------------------------------------------------------

    def setup(self) -> None:
        self.policy.to(self.device).eval().requires_grad_(True)  # eval: no dropout while sampling or scoring
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        if self.render is not None:
            self.render.to(self.device)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=self.loop.lr, betas=(0.9, 0.95), weight_decay=self.cfg.weight_decay)

    def config(self) -> dict:
        return {"rl": asdict(self.cfg), "train_prompts": len(self.train_prompts), "heldout_prompts": len(self.heldout),
                "vocab": len(self.tokenizer), "renderer": self.render.describe() if self.render else None} | self.info

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"policy": self.policy}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"policy": self.opt}

    def exported(self) -> dict[str, torch.nn.Module]:
        # Tied input/output embeddings share storage, which safetensors refuses: keep the
        # backbone, and the output layer only when it is a tensor of its own.
        out = {"backbone": self.policy.base_model}
        head, emb = self.policy.get_output_embeddings(), self.policy.get_input_embeddings()
        if head is not None and head.weight.data_ptr() != emb.weight.data_ptr():
            out["lm_head"] = head
        return out

    # -- one step ------------------------------------------------------------------

    def prompts_at(self, step: int) -> list[TersePrompt]:
        """The step's terse prompts: deterministic in (seed, step)."""
        rng = np.random.default_rng([self.loop.seed, step])
        n = len(self.train_prompts)
        idx = rng.choice(n, size=self.cfg.prompts_per_step, replace=n < self.cfg.prompts_per_step)
        return [self.train_prompts[i] for i in idx]

    def rollouts(self, prompts: Sequence[TersePrompt]) -> Rollouts:
        """Sample G enhanced prompts per terse prompt and render them (group-shared noise)."""
        c = self.cfg
        roll = sample_rollouts(self.policy, self.tokenizer, [p.text for p in prompts], c.group_size,
                               c.temperature, c.max_new_tokens)
        cand = roll.candidates
        cand.scenes = [p.scene for p in prompts for _ in range(c.group_size)]
        if self.render is not None:
            noise = torch.randn(len(prompts), *self.render.latent_shape).repeat_interleave(c.group_size, 0)
            cand.images = self.render(cand.enhanced, noise)
        return roll

    def scores(self, cand: Candidates) -> dict[str, torch.Tensor]:
        """The reward's scores plus "intent" (`intent_kept`), which is reported always and
        optimised only when cfg.reward_weights names it."""
        scores = {k: torch.as_tensor(v).float().cpu() for k, v in self.reward(cand).items()}
        if "intent" not in scores:
            scores["intent"] = intent_kept(cand.terse, cand.enhanced)
        return scores

    def step(self, step: int) -> dict[str, float]:
        c = self.cfg
        roll = self.rollouts(self.prompts_at(step))
        with torch.no_grad():
            scores = self.scores(roll.candidates)
            rewards = weighted_reward(scores, c.reward_weights)  # (B,)
            adv = group_advantages(rewards, c.group_size, c.scale_advantages, c.adv_eps).to(self.device)
            ref = (token_log_probs(self.reference, roll.input_ids, roll.attention_mask, c.temperature)
                   if c.kl_beta > 0 else None)
        stats: dict[str, float] = {}
        for _ in range(c.updates_per_step):
            logp = token_log_probs(self.policy, roll.input_ids, roll.attention_mask, c.temperature)
            loss, stats = grpo_token_loss(logp, roll.log_probs, ref, adv, roll.action_mask, c.clip_range,
                                          c.kl_beta, norm=float(c.max_new_tokens))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            stats["grad_norm"] = self.clip(self.policy.parameters())
            self.opt.step()
            stats["loss"] = float(loss.detach())
        n_tok = roll.action_mask.sum().clamp(min=1)
        group_std = rewards.view(-1, c.group_size).std(1, unbiased=False).mean()
        return {"loss": stats.pop("loss"), "reward": float(rewards.mean()), "reward_group_std": float(group_std),
                **{f"reward_{k}": float(v.mean()) for k, v in scores.items()}, **stats,
                "tokens": float(roll.lengths.float().mean()), "finished": float(roll.finished.float().mean()),
                "nll": float(-(roll.log_probs.sum() / n_tok))}

    # -- held-out figures ------------------------------------------------------------

    @torch.no_grad()
    def contenders(self, prompts: Sequence[str]) -> dict[str, list[str]]:
        """The prompts each contender gives the generator: the terse prompt itself, phase
        one's greedy enhancement and phase two's."""
        n = self.cfg.max_new_tokens
        return {"terse": list(prompts),
                "phase1": enhance(self.reference, self.tokenizer, list(prompts), max_new_tokens=n),
                "phase2": enhance(self.policy, self.tokenizer, list(prompts), max_new_tokens=n)}

    @torch.no_grad()
    def judge(self, held: Sequence[TersePrompt], contenders: dict[str, list[str]], seed: int
              ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Each contender's mean reward (per head and weighted) and checker accuracy on renders
        from the same noise per prompt, scored against the terse prompt; and the weighted
        reward per prompt of each contender (for paired comparisons)."""
        from dataengine.enhance_eval import evaluate as text_measures

        terse = [p.text for p in held]
        scenes = [p.scene for p in held]
        with_scene = [i for i, s in enumerate(scenes) if s]
        noise = None
        if self.render is not None:
            gen = torch.Generator().manual_seed(seed)
            noise = torch.randn(len(held), *self.render.latent_shape, generator=gen)
        out: dict[str, Any] = {}
        per_prompt: dict[str, torch.Tensor] = {}
        for name, texts in contenders.items():
            cand = Candidates(terse, list(texts), scenes=scenes)
            fig: dict[str, Any] = {"words": round(float(np.mean([len(t.split()) for t in texts])), 2)}
            if self.render is not None:
                cand.images = self.render(texts, noise)
                fig["text_overflow"] = round(self.render.overflow(texts), 4)
            scores = self.scores(cand)
            per_prompt[name] = weighted_reward(scores, self.cfg.reward_weights)
            fig["reward"] = round(float(per_prompt[name].mean()), 5)
            fig |= {f"reward_{k}": round(float(v.mean()), 5) for k, v in scores.items()}
            if with_scene:
                sub = [scenes[i] for i in with_scene]
                if self.checker is not None and cand.images is not None:
                    res = self.checker.check(cand.images[with_scene], sub)
                    fig["accuracy"] = round(float(res["accuracy"].mean()), 4)
                    fig |= {f"acc_{k}": round(float(v.mean()), 4) for k, v in res.items() if k != "accuracy"}
                text = text_measures([terse[i] for i in with_scene], [texts[i] for i in with_scene], sub)
                fig |= {k: text[k] for k in ("intent_preservation", "richness_gain", "faithful_share")}
            out[name] = fig
        return out, per_prompt

    def evaluate(self) -> dict[str, Any]:
        if not self.heldout:
            return {}
        terse = [p.text for p in self.heldout]
        contenders = self.contenders(terse)
        figures, per_prompt = self.judge(self.heldout, contenders, seed=self.loop.seed)
        paired = {}
        for a, b in (("phase2", "phase1"), ("phase1", "terse"), ("phase2", "terse")):
            d = per_prompt[a] - per_prompt[b]  # same prompt, same noise: a paired difference
            se = float(d.std(unbiased=True) / len(d) ** 0.5) if len(d) > 1 else float("nan")
            paired[f"{a}-{b}"] = {"mean": round(float(d.mean()), 5), "se": round(se, 5),
                                  "wins": round(float((d > 0).float().mean()), 4)}
        return {"n_prompts": len(self.heldout), "n_with_scene": sum(p.scene is not None for p in self.heldout),
                "contenders": figures, "paired_reward": paired,
                "examples": [{"terse": t, "phase1": a, "phase2": b}
                             for t, a, b in list(zip(terse, contenders["phase1"], contenders["phase2"]))[:4]]}


# ---------------------------------------------------------------------------------------
# Saved versions
# ---------------------------------------------------------------------------------------


def export_hf(version: str | Path, model, tokenizer) -> Path:
    """Write `model/` into a saved version, as models/enhancer.py saves phase one (atomic:
    a temporary folder renamed into place)."""
    version = Path(version)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-model-", dir=version))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)
        os.rename(tmp, version / "model")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return version / "model"


def load_enhancer_rl(path: str | Path):
    """(model, tokenizer) of a phase-two version: its `model/` folder, else the phase-one
    version it started from with the saved weights loaded over it."""
    path = Path(path)
    if (path / "model").is_dir():
        return load_version(path)
    states, config, _ = load_weights(path)
    base = config.get("job", {}).get("enhancer")
    if not base or not Path(base).is_dir():
        raise FileNotFoundError(f"{path}: no model/ folder and its phase-one version {base!r} is gone")
    model, tokenizer = load_version(base)
    model.base_model.load_state_dict(states["backbone"])
    if "lm_head" in states:
        model.get_output_embeddings().load_state_dict(states["lm_head"])
    else:
        model.tie_weights()
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------
# The workspace entry
# ---------------------------------------------------------------------------------------


def newest_phase_one(models_root: str | Path) -> Path | None:
    """The newest phase-one enhancer version folder, or None."""
    from .enhancer import versions

    found = versions(models_root)
    return Path(models_root) / PHASE_ONE / found[-1] if found else None


def resolve_enhancer(workspace_root: str | Path) -> tuple[Path, str, str]:
    """(version folder, model name, status) of the enhancer a workspace serves: the newest
    promoted version of phase one or phase two (the catalog's model_versions), else the
    newest registered version of either, else the newest phase-one folder on disk."""
    from dataengine.catalog import Catalog
    from dataengine.workspace import Workspace

    ws = Workspace.at(workspace_root)
    rows = []
    if ws.exists():
        rows = Catalog(ws).query(
            "SELECT model, path, status FROM model_versions WHERE model IN (?, ?) "
            "ORDER BY status = 'promoted' DESC, created_at DESC, version DESC", [PHASE_ONE, MODEL_NAME]).to_pylist()
    for r in rows:
        if Path(r["path"]).is_dir():
            return Path(r["path"]), r["model"], r["status"]
    found = newest_phase_one(ws.models)
    if found is None:
        raise FileNotFoundError(f"{workspace_root}: no enhancer version; run `dataengine train-enhancer` first")
    return found, PHASE_ONE, "unregistered"


def load_enhancer(path: str | Path):
    """(model, tokenizer) of any enhancer version folder, phase one or two, or a causal LM."""
    path = Path(path)
    if (path / "model").is_dir() or not (path / "weights.safetensors").is_file():
        from .enhancer import load

        return load(path)
    return load_enhancer_rl(path)


def workspace_reward(workspace_root: str | Path) -> RewardFn:
    """The newest `reward` version's heads, scoring each render against its TERSE prompt."""
    from dataengine.workspace import Workspace

    from . import rewards

    path = latest(Workspace.at(workspace_root).models, "reward")
    if path is None:
        raise FileNotFoundError(f"{workspace_root}: no reward version; train one first (`dataengine train reward`)")
    heads = rewards.load(path)

    @torch.no_grad()
    def score(cand: Candidates) -> dict[str, torch.Tensor]:
        if cand.images is None:
            raise ValueError("the reward heads score renders; the job has no renderer")
        got = heads.score(rewards.RewardBatch(images=cand.images, captions=list(cand.terse)))
        return {k: torch.as_tensor(v).float().cpu() for k, v in got.items()}

    return score


def workspace_renderer(workspace_root: str | Path, cfg: EnhancerRLConfig) -> tuple[Renderer, str]:
    """The frozen generator cfg.generator names (auto: the newest distill student, else the
    newest DiT) as a `Renderer`, and the version folder it came from."""
    from dataengine.workspace import Workspace

    from .distill import load_stack

    ws = Workspace.at(workspace_root)
    name = cfg.generator
    if name == "auto":
        name = "distill" if latest(ws.models, "distill") is not None else "dit"
    stack = load_stack(ws.root, name)
    return Renderer.from_stack(stack, cfg, student=name == "distill"), str(stack.path)


def train_enhancer_rl(workspace_root: str | Path, cfg: EnhancerRLConfig | None = None, loop: LoopConfig | None = None,
                      progress: bool = True, reward: RewardFn | None = None) -> dict[str, Any]:
    """Optimise the workspace's newest phase-one enhancer through its frozen generator and
    reward heads; save it as the next `enhancer-rl` version (also loadable by
    `models.enhancer.load_version`) and register it. Returns the version's record."""
    from dataengine.catalog import Catalog
    from dataengine.sceneworld.checker import Checker
    from dataengine.workspace import Workspace

    cfg = cfg or EnhancerRLConfig()
    loop = replace(loop or LoopConfig(), progress=progress)
    ws = Workspace.at(workspace_root)
    if cfg.reward_weights is None:
        if reward is not None:
            raise ValueError("a custom reward needs reward_weights naming what to optimise")
        from .rl import default_weights

        cfg = replace(cfg, reward_weights=default_weights(ws.root))  # UntrustedReward when no head passes
    catalog = Catalog(ws)
    start = Path(cfg.enhancer) if cfg.enhancer else newest_phase_one(ws.models)
    if start is None:
        raise FileNotFoundError(f"{ws.root}: no enhancer version; run `dataengine train-enhancer` first")
    policy, tokenizer = load_version(start)

    pairs = catalog.query("SELECT source_id, step, less, more FROM pairs ORDER BY pair_id")
    if pairs.num_rows == 0:
        raise FileNotFoundError(f"{ws.root}: the pairs table is empty; run `dataengine degrade` first")
    ids = sorted({s for s in pairs.column("source_id").to_pylist() if s})
    prompts = terse_prompts(pairs, _scenes_of(catalog, ids))
    prefer = _phase_one_heldout(pairs, start)
    train_p, held = split_prompts(prompts, cfg.eval_prompts, loop.seed, prefer)

    render, generator = workspace_renderer(ws.root, cfg)
    checker = Checker.load_or_train(ws.models / "checker", progress=progress)
    info = {"enhancer": str(start), "generator": generator,
            "reward": str(latest(ws.models, "reward")) if reward is None else "custom",
            "heldout_unseen_by_phase1": sum(p.source_id in prefer for p in held)}
    job = EnhancerRLJob(policy, tokenizer, train_p, cfg, reward or workspace_reward(ws.root), render, held,
                        checker, info)
    return train_job(job, ws.models, loop, catalog=catalog)


def train_job(job: EnhancerRLJob, models_root: str | Path, loop: LoopConfig, catalog=None, **kwargs) -> dict[str, Any]:
    """`trainer.train(job, ...)`, then the policy and tokenizer exported into the version's
    `model/` so that phase one's loaders read it."""
    record = train(job, models_root, loop, catalog=catalog, **kwargs)
    export_hf(record["path"], job.policy.cpu(), job.tokenizer)
    return record

"""The prompt enhancer: a small causal LM that turns a terse prompt into a rich description.

Trained on (less detailed -> more detailed) pairs made by caption degradation. A training
sequence is

    <|bos|> terse prompt <|sep|> rich prompt <|eos|>

and the loss falls only on the part after <|sep|>. A training pair is one degradation step
(one detail put back) or a whole chain (every detail); <|all|> after <|sep|> marks the
second, and generation asks for it, so a terse prompt is not read as "add one detail". A bigger causal LM that a user brings
(any local folder or cached hub name, loaded with `load`) has none of our special tokens,
so it gets a plain-text template instead: "Prompt: terse\\nDetailed: rich<eos>".

    tok = train_tokenizer(texts)                  # byte-level BPE with our special tokens
    model = build("nano", tok)                    # architecture from a named size
    model, tok = load("workspace/models/enhancer/v0001")   # a saved version, or any causal LM
    enhance(model, tok, ["a red star"])           # -> ["A large red star with ... ."]

Sections: tokenizer, sizes and model, sequence format, generation, saved versions.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel,
    PreTrainedTokenizerBase, PreTrainedTokenizerFast,
)

# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------

BOS, SEP, EOS, PAD = "<|bos|>", "<|sep|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, SEP, EOS, PAD)
# The insertion format: in a target, <|copy|> comes before each word taken from the prompt,
# so the model learns WHERE the user's next word goes, and decoding writes the word itself.
COPY = "<|copy|>"
# Marks a pair whose target is the chain's full caption (every detail back), not one step.
ALL = "<|all|>"

# The template for causal LMs without our special tokens (a user's pretrained model).
PLAIN_PROMPT = "Prompt: {terse}\nDetailed:"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, copy: bool = True,
                    whole: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`, with <|bos|> <|sep|> <|eos|> <|pad|> as ids 0-3,
    then <|copy|> when `copy` (the insertion format) and <|all|> when `whole`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # No prefix space: decode(encode(text)) == text exactly, and a prompt that starts a
    # sequence tokenises the same as it does anywhere else.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    extra = [COPY] * copy + [ALL] * whole
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS) + extra,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, sep_token=SEP, eos_token=EOS, pad_token=PAD,
        clean_up_tokenization_spaces=False, model_max_length=1024,
        **({"extra_special_tokens": extra} if extra else {}),
    )


def uses_special_format(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when `tokenizer` is ours (has <|bos|> <|sep|> <|eos|>), False for a foreign one."""
    return (tokenizer.bos_token, tokenizer.sep_token, tokenizer.eos_token) == (BOS, SEP, EOS)


def _own_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    tid = tokenizer.get_vocab().get(token)
    return int(tid) if tid is not None and uses_special_format(tokenizer) else None


def copy_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The id of <|copy|> when `tokenizer` has the insertion format, else None."""
    return _own_token_id(tokenizer, COPY)


def all_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The id of <|all|> when `tokenizer` has it (versions saved before it do not)."""
    return _own_token_id(tokenizer, ALL)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for padding: <|pad|>, else the tokenizer's pad or eos token, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


# ---------------------------------------------------------------------------------------
# Sizes and the model
# ---------------------------------------------------------------------------------------

# Llama blocks (RMSNorm, RoPE, SwiGLU feed-forward), tied input/output embeddings. The
# parameter counts in the comments are for the default 4096-token vocabulary.
ENHANCER_SIZES: dict[str, dict[str, int]] = {
    # ~1.4M: learns the scene-world caption grammar in a minute or two on one CPU core.
    "nano": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384),
    # ~4.5M
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=768),
    # ~29.4M: for a GPU.
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1536),
}
MAX_POSITIONS = 512


def build(size: str, tokenizer: PreTrainedTokenizerBase, max_positions: int = MAX_POSITIONS) -> LlamaForCausalLM:
    """A freshly initialised enhancer of a named size for `tokenizer`'s vocabulary."""
    if size not in ENHANCER_SIZES:
        raise ValueError(f"unknown enhancer size {size!r}; expected one of {sorted(ENHANCER_SIZES)}")
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id(tokenizer), tie_word_embeddings=True, **ENHANCER_SIZES[size],
    )
    return LlamaForCausalLM(config)


def load(name_or_path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) from a saved enhancer version, any local causal LM folder, or a
    hub name already in the local cache (nothing is downloaded: the project runs offline)."""
    p = Path(name_or_path)
    if (p / "model").is_dir() and (p / "config.json").is_file():
        return load_version(p)
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    return model, tokenizer


def n_params(model: torch.nn.Module) -> int:
    """Trainable parameters, tied weights counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------------------------------
# Sequence format: prompt part (no loss) + target part (loss)
# ---------------------------------------------------------------------------------------

IGNORE = -100  # the label that cross-entropy skips


def prompt_ids(tokenizer: PreTrainedTokenizerBase, terse: str, whole: bool = True) -> list[int]:
    """Token ids of the prompt part: `<|bos|> terse <|sep|>`, then <|all|> when `whole` and
    the tokenizer has it (every detail, not one step); or the plain template."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    if uses_special_format(tokenizer):
        marker = all_id(tokenizer)
        return [tokenizer.bos_token_id] + enc(terse) + [tokenizer.sep_token_id] + (
            [marker] if whole and marker is not None else [])
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + enc(PLAIN_PROMPT.format(terse=terse))


def copy_segments(terse: str, rich: str) -> list[tuple[str, bool]]:
    """The insertion-format target: `rich` cut into (text, copied) segments, each word of
    the terse prompt a copied segment of its own (with the space before it), in order.

    Prompt words are placed on a longest common subsequence of the two word lists (case
    aside). Degradation only deletes, so for its pairs every word is found and the
    segments join back into `rich` exactly. A prompt word the caption lacks is inserted
    after the previous one: the target must hold every word the decoder will write, or a
    <|copy|> would stand for a different word in training than at generation. Segments
    start at word boundaries, so tokenising them one by one gives the tokens of the whole
    (byte-level BPE splits before a space)."""
    from .keep_words import WORD

    surface = WORD.findall(terse)
    need = [w.lower() for w in surface]
    spans = list(WORD.finditer(rich))
    have = [m.group().lower() for m in spans]
    # lcs[i][j]: the longest common subsequence of need[i:] and have[j:]
    lcs = [[0] * (len(have) + 1) for _ in range(len(need) + 1)]
    for i in range(len(need) - 1, -1, -1):
        for j in range(len(have) - 1, -1, -1):
            lcs[i][j] = lcs[i + 1][j + 1] + 1 if need[i] == have[j] else max(lcs[i + 1][j], lcs[i][j + 1])
    found: dict[int, re.Match] = {}
    i = j = 0
    while i < len(need) and j < len(have):
        if need[i] == have[j] and lcs[i][j] == lcs[i + 1][j + 1] + 1:
            found[i] = spans[j]
            i, j = i + 1, j + 1
        elif lcs[i + 1][j] >= lcs[i][j + 1]:
            i += 1
        else:
            j += 1
    out: list[tuple[str, bool]] = []

    def add(text: str, copied: bool) -> None:
        if out and out[-1][0][-1:].isalnum() and text[:1].isalnum():  # two words never fuse
            text = " " + text
        out.append((text, copied))

    at = 0
    for i, word in enumerate(surface):
        m = found.get(i)
        if m is None:  # not in the caption: written where the previous word ended
            add(word, True)
            continue
        start = m.start() - 1 if m.start() > 0 and rich[m.start() - 1] == " " else m.start()
        if start > at:
            add(rich[at:start], False)
        add(rich[start:m.end()], True)
        at = m.end()
    if at < len(rich):
        add(rich[at:], False)
    return out


def insertion_target(terse: str, rich: str) -> str:
    """The text an insertion-format enhancer learns to write for (terse, rich): `rich`
    itself whenever `terse` is a deletion of it."""
    return "".join(text for text, _ in copy_segments(terse, rich))


def target_ids(tokenizer: PreTrainedTokenizerBase, rich: str, terse: str | None = None) -> list[int]:
    """Token ids of the target part: `rich <|eos|>` (a leading space in the plain template);
    in the insertion format, given the `terse` prompt, <|copy|> before each copied word."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    cid = copy_id(tokenizer)
    if cid is not None and terse is not None:
        ids: list[int] = []
        for text, copied in copy_segments(terse, rich):
            ids += ([cid] if copied else []) + enc(text)
        return ids + eos
    return enc(rich if uses_special_format(tokenizer) else " " + rich) + eos


def encode_pair(tokenizer: PreTrainedTokenizerBase, less: str, more: str, max_len: int,
                whole: bool = True) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated): labels are -100 on the prompt part and equal the ids
    on the target part; `whole` False marks a one-step pair. Long prompts keep their start
    (at most half of `max_len`); long targets are cut (and lose their <|eos|>) so the whole
    fits in `max_len`."""
    p, t = prompt_ids(tokenizer, less, whole), target_ids(tokenizer, more, less)
    truncated = False
    if len(p) > max_len // 2:
        p, truncated = p[: max_len // 2], True
    if len(p) + len(t) > max_len:
        t, truncated = t[: max_len - len(p)], True
    return p + t, [IGNORE] * len(p) + t, truncated


def collate(examples: Sequence[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 on padding)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, (ids, lab) in enumerate(examples):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, : len(lab)] = torch.tensor(lab)
        mask[r, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def target_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token cross-entropy over target tokens, number of target tokens)."""
    logits = logits[:, :-1].flatten(0, 1).float()  # (B*(T-1), V): position t predicts t+1
    labels = labels[:, 1:].flatten()  # (B*(T-1),)
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    return loss, (labels != IGNORE).sum()


# ---------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def enhance(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
    max_new_tokens: int = 96, num_beams: int = 1, do_sample: bool = False, batch_size: int = 32,
    keep_words: bool = True, nudge: float = 2.0, whole: bool = True, guard: bool | Sequence[str] = True,
) -> list[str]:
    """The rich prompt generated for each terse prompt (batched, left-padded; the prompt
    part and special tokens stripped). With `keep_words` (the default) decoding keeps the
    prompt's words in order and only inserts around them (models/keep_words.py); `nudge`
    is its pull toward the next owed word. `whole` (the default) asks a model trained with
    <|all|> for every detail; False for one degradation step's worth. With `guard` (the
    default; the insertion format with `keep_words` only) the model's insertions may not
    restate a scene-wide detail the prompt gives (its style, light, background, ...) nor add
    more of a thing it names, nor repeat an earlier chunk (models/insertion_guard.py; a
    sequence of its RULES applies only those); its "repeat" rule also bans, while decoding,
    a run of tokens written twice back to back (models/no_stutter.py)."""
    from transformers import LogitsProcessorList

    from .keep_words import CopyWords, KeepWords
    from .insertion_guard import RULES, copied_spans, guard_insertions
    from .no_stutter import NoStutter

    special = uses_special_format(tokenizer)
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rules = RULES if guard is True else (guard,) if isinstance(guard, str) else tuple(guard or ())
    if set(rules) - set(RULES):
        raise ValueError(f"unknown guard rules {sorted(set(rules) - set(RULES))}; choose from {RULES}")
    guarded = bool(rules) and keep_words and copy_id(tokenizer) is not None
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            ids = [prompt_ids(tokenizer, p, whole) for p in prompts[start: start + batch_size]]
            width = max(len(x) for x in ids)
            # Left padding: every row's last prompt token sits at the same column, so
            # generation continues all rows in step.
            input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for r, x in enumerate(ids):
                input_ids[r, width - len(x):] = torch.tensor(x)
                mask[r, width - len(x):] = 1
            processors = LogitsProcessorList()
            batch = prompts[start: start + batch_size]
            if guarded and "repeat" in rules:  # first, so that the copy constraint's forcing overrides it
                processors.append(NoStutter(width, exempt=(copy_id(tokenizer), tokenizer.eos_token_id)))
            if copy_id(tokenizer) is not None:  # the insertion format: the model says where, we copy
                processors.append(CopyWords(tokenizer, batch, width, max_new_tokens, num_beams=num_beams,
                                            free=not keep_words))
            elif keep_words:
                processors.append(KeepWords(tokenizer, batch, width, max_new_tokens, num_beams=num_beams, nudge=nudge))
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, logits_processor=processors,
            )  # (B, width + new)
            for prompt, row in zip(batch, generated[:, width:].tolist()):
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id)]
                if guarded:
                    text, copied = copied_spans(tokenizer, row, prompt)
                    text = guard_insertions(prompt, text, copied, rules)
                else:
                    text = tokenizer.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                if not special:  # a plain LM runs on into the next "Prompt:"; keep one line
                    text = text.split("\n", 1)[0]
                out.append(text.strip())
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------
# Saved versions: models_root/enhancer/v0001/{model/, config.json, metrics.json}
# ---------------------------------------------------------------------------------------

MODEL_NAME = "enhancer"


def versions(models_root: str | Path) -> list[str]:
    """The saved versions under `models_root/enhancer/`, oldest first."""
    from dataengine.versions import versions as _versions

    return _versions(models_root, MODEL_NAME)


def save_version(
    models_root: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
    config: dict[str, Any], metrics: dict[str, Any],
) -> tuple[str, Path]:
    """Write a new version (the model and tokenizer in `model/`, `config.json`,
    `metrics.json`) through models.versions (atomic); returns (version, path)."""
    from dataengine.versions import save_version as _save

    def write(folder: Path) -> None:
        model.save_pretrained(folder / "model")
        tokenizer.save_pretrained(folder / "model")

    return _save(models_root, MODEL_NAME, write, config, metrics)


def load_version(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of a saved version folder."""
    p = Path(path)
    if not (p / "model").is_dir():
        raise FileNotFoundError(f"{p} is not an enhancer version: no model/ folder in it")
    model = AutoModelForCausalLM.from_pretrained(p / "model")
    tokenizer = AutoTokenizer.from_pretrained(p / "model")
    model.eval()
    return model, tokenizer

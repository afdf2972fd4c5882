"""Optional: a local causal LM paraphrases the terse end of each chain into a user's voice.

Degradation ends at a grammatical but stiff prompt ("A little square."). A language
model given as a local path rewrites it the way a person might type it, and the rewrite
becomes one more pair (rewrite -> terse end). A rewrite that loses the chain's subject
or runs longer than the prompt it paraphrases is rejected and counted, never used. Off
by default; nothing else depends on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from dataengine.degrade.chains import pair_id
from dataengine.degrade.detect import analyse
from dataengine.schema import PAIRS

TEMPLATE = "Rewrite this image description as a short, casual prompt a person would type.\nDescription: {text}\nPrompt:"


def subject_words(text: str) -> set[str]:
    """The subject head noun(s) of a caption, lower-cased."""
    a = analyse(text)
    if a.subject is None:
        return set()
    return {a.tokens.words[i].lower() for i in a.subject.heads}


@dataclass
class RewriteStats:
    asked: int = 0
    accepted: int = 0
    rejected: int = 0


class ChainEndRewriter:
    """Holds one local causal LM (a folder a user passes) and paraphrases prompts with it."""

    def __init__(self, model_path: str, max_new_tokens: int = 32, batch_size: int = 16):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.stats = RewriteStats()

    def paraphrase(self, texts: list[str]) -> list[str]:
        """One greedy line per text (the raw model output, before any check)."""
        import torch

        out: list[str] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = [TEMPLATE.format(text=t) for t in texts[start:start + self.batch_size]]
            enc = self.tokenizer(chunk, return_tensors="pt", padding=True)
            with torch.no_grad():
                gen = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                text = self.tokenizer.decode(row, skip_special_tokens=True)
                out.append(text.strip().split("\n", 1)[0].strip())
        return out

    @staticmethod
    def accept(terse: str, rewrite: str) -> bool:
        """A rewrite is used only if it is no longer than the prompt and keeps its subject."""
        if not rewrite or len(rewrite) > len(terse) or rewrite.strip().lower() == terse.strip().lower():
            return False
        heads = subject_words(terse)
        words = {w.strip(".,!?;:'\"").lower() for w in rewrite.split()}
        return bool(heads) and heads <= words

    def add_pairs(self, pairs: pa.Table, policy: str) -> pa.Table:
        """For each chain in `pairs`, one more pair (rewrite -> the chain's terse end), if accepted."""
        ends: dict[str, tuple[int, str]] = {}
        for sid, step, less in zip(*(pairs.column(c).to_pylist() for c in ("source_id", "step", "less"))):
            if sid not in ends or step > ends[sid][0]:
                ends[sid] = (step, less)
        sids = list(ends)
        rewrites = self.paraphrase([ends[s][1] for s in sids])
        rows = []
        for sid, rewrite in zip(sids, rewrites):
            step, terse = ends[sid]
            self.stats.asked += 1
            if not self.accept(terse, rewrite):
                self.stats.rejected += 1
                continue
            self.stats.accepted += 1
            rows.append(dict(pair_id=pair_id(rewrite, terse), source_id=sid, step=step + 1,
                             category="rewrite", less=rewrite, more=terse, removed="",
                             policy=f"{policy}+rewrite", created_at=pairs.column("created_at")[0].as_py()))
        if not rows:
            return pairs
        return pa.concat_tables([pairs, pa.Table.from_pylist(rows, schema=PAIRS)])

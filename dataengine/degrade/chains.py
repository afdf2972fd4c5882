"""Degradation chains and the enhancer's pairs table.

A chain starts from a rich caption and removes detail one unit at a time: a category's
spans (granularity "category") or one span (granularity "span"), in a random order per
caption or a fixed one; then the structural steps: "sentence" drops every sentence but
the subject's, "clause" trims the subject's sentence to its main clause (the subject's
noun phrase and what follows it up to the first subordinate clause). Every step is a
training pair: `less` (model input) -> `more` (target), and the next step's `more` is this
step's `less`. The chain ends at a terse prompt that still names the subject.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable

import pyarrow as pa

from ..schema import PAIRS, TS
from .detect import Analysis, Cand, analyse
from .fluency import Doc
from .taxonomy import CATEGORIES, STRUCTURAL
from .tokens import tokenize

POLICIES = ("random", "fixed")
GRANULARITIES = ("category", "span")


@dataclass(frozen=True)
class DegradeConfig:
    """How chains are built.

    `order` is the set of detail categories to strip, in order for the "fixed" policy; the
    "random" policy shuffles it per caption with a generator seeded by (seed, source_id,
    or the caption text when there is no id), so a chain never depends on batch order.
    A category left out of `order` is never stripped. `max_steps` keeps only the first
    steps (the most detailed pairs). The structural steps run last unless `structural`
    is False.
    """

    policy: str = "random"
    seed: int = 0
    order: tuple[str, ...] = CATEGORIES
    granularity: str = "category"
    max_steps: int | None = None
    structural: bool = True

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {self.policy!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, not {self.granularity!r}")
        unknown = [c for c in self.order if c not in CATEGORIES]
        if unknown or len(set(self.order)) != len(self.order):
            raise ValueError(f"order must be distinct categories from {CATEGORIES}; bad: {unknown or self.order}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, not {self.max_steps}")

    @property
    def name(self) -> str:
        """The `policy` column of the pairs table: policy, seed, granularity (and limits)."""
        out = f"{self.policy}/seed={self.seed}/{self.granularity}"
        if tuple(self.order) != CATEGORIES:
            out += "/order=" + ",".join(self.order)
        if self.max_steps is not None:
            out += f"/max_steps={self.max_steps}"
        if not self.structural:
            out += "/no-structural"
        return out


@dataclass(frozen=True, slots=True)
class Step:
    """One deletion: `more` minus the `category` text `removed` gives `less`."""

    step: int
    category: str
    less: str
    more: str
    removed: str


# ---------------------------------------------------------------------------------------
# Chains
# ---------------------------------------------------------------------------------------

_SEP = " | "  # joins the texts removed by one step


def _units(a: Analysis, cfg: DegradeConfig, rng: random.Random) -> list[tuple[str, list[Cand]]]:
    wanted = set(cfg.order)
    spans = [c for c in a.spans if c.category in wanted]
    if cfg.granularity == "category":
        cats = list(cfg.order)
        if cfg.policy == "random":
            rng.shuffle(cats)
        return [(c, grp) for c in cats if (grp := [s for s in spans if s.category == c])]
    if cfg.policy == "random":
        rng.shuffle(spans)
    else:
        rank = {c: k for k, c in enumerate(cfg.order)}
        spans.sort(key=lambda s: (rank[s.category], s.i))
    return [(s.category, [s]) for s in spans]


def _sentences(a: Analysis) -> dict[int, tuple[int, int]]:
    return dict(enumerate(a.tokens.bounds))


_BOUNDARY_NEXT = frozenset({"REL", "SUB", "ING", "ED", "PREP", "THERE", "PRON"})
_CLAUSE_VERB = frozenset({"VERB", "COP", "SEEM", "AUX"})


def _main_clause_cuts(doc: Doc, a: Analysis, lo: int, hi: int) -> list[tuple[int, int]]:
    """Ranges of the subject's sentence outside its main clause: what precedes the subject
    phrase, and everything from the first subordinate boundary after the head."""
    subj = a.subject
    assert subj is not None
    feats = a.tokens.feats
    low = doc.low
    cuts = []
    if any(doc.alive[k] for k in range(lo, subj.np_start)):
        cuts.append((lo, subj.np_start))
    end = hi
    while end > lo and low[end - 1] in (".", "!", "?", "…"):
        end -= 1
    k = doc.next(subj.np_end - 1)
    seen_verb = False
    while 0 <= k < end:
        w = low[k]
        f = feats(k)
        cut = False
        seen_verb = seen_verb or bool(f & _CLAUSE_VERB)
        if w in (";", ":", "—", "–", "-", "(") or f & {"REL", "SUB"}:
            cut = True
        elif w == "," and not seen_verb:  # "A lamp, a cat, and a notebook are on a table"
            nx = doc.next(k)
            cut = nx >= 0 and nx < end and bool(feats(nx) & {"REL", "SUB", "ING", "ED", "PREP"})
        elif w == ",":
            nx = doc.next(k)
            if nx < 0 or nx >= end:
                cut = True
            elif feats(nx) & _BOUNDARY_NEXT:
                cut = True
            else:  # ", and a cat sleeps" is a clause; ", a ball, and a cat" is a list
                m = nx
                while 0 <= m < end and low[m] != ",":
                    if feats(m) & _CLAUSE_VERB:
                        cut = True
                        break
                    m = doc.next(m)
        if cut:
            cuts.append((k, end))
            break
        k = doc.next(k)
    return cuts


def normalise(caption: str) -> str:
    """The caption as chains quote it (step 1's `more`): whitespace runs become one space,
    with none before closing punctuation or after an opening bracket."""
    return Doc(tokenize(caption)).render()


def degrade_chain(caption: str, cfg: DegradeConfig = DegradeConfig(), source_id: str = "") -> list[Step]:
    """The chain of deletion steps for one caption, most detailed pair first; empty when
    nothing can be removed."""
    a = analyse(caption)
    if not a.tokens.words or a.subject is None:
        return []
    doc = Doc(a.tokens, frozenset(a.subject.heads))
    rng = random.Random(f"{cfg.seed}\x1f{source_id or caption}")
    steps: list[Step] = []
    more = doc.render()
    src = a.tokens

    def commit(category: str, removed: list[str]) -> None:
        # A removal always shortens the text (a replacement is shorter than what it
        # replaces); should one ever not, its step is left out rather than emitted.
        nonlocal more
        less = doc.render()
        if removed and len(less) < len(more):
            steps.append(Step(len(steps) + 1, category, less, more, _SEP.join(removed)))
        more = less

    for category, group in _units(a, cfg, rng):
        removed = []
        for c in group:
            if doc.remove(c.i, c.j, c.kind, c.repl):
                removed.append(src.text[src.starts[c.i]:src.ends[c.j - 1]])
        commit(category, removed)

    if cfg.structural:
        sents = _sentences(a)
        others = [s for s in sorted(sents) if s != a.subject.sentence
                  and any(doc.alive[k] for k in range(*sents[s]))]
        if cfg.granularity == "category":
            groups = [others] if others else []
        else:
            if cfg.policy == "random":
                rng.shuffle(others)
            else:
                others.reverse()
            groups = [[s] for s in others]
        for group in groups:
            removed = []
            for s in group:
                i, j = sents[s]
                text = doc.live_text(i, j)
                if doc.remove(i, j, "sent"):
                    removed.append(text)
            commit("sentence", removed)
        lo, hi = sents[a.subject.sentence]
        removed = []
        for i, j in reversed(_main_clause_cuts(doc, a, lo, hi)):
            text = doc.live_text(i, j)
            if doc.remove(i, j, "clause"):
                removed.append(text)
        commit("clause", removed[::-1])

    if cfg.max_steps is not None:
        steps = steps[: cfg.max_steps]
    return steps


# ---------------------------------------------------------------------------------------
# Pairs table
# ---------------------------------------------------------------------------------------


def pair_id(less: str, more: str) -> str:
    """A stable id of a (less, more) pair: the same texts give the same id anywhere."""
    return hashlib.blake2b(f"{less}\x00{more}".encode(), digest_size=16).hexdigest()


def pairs_table(
    records: Iterable[tuple[str, str]], cfg: DegradeConfig = DegradeConfig(),
    counters: dict[str, int] | None = None,
) -> pa.Table:
    """Chains of (source_id, caption) records as a `PAIRS` table, one row per step, the
    first row of each pair_id kept. `counters` (if given) gains `captions`, `pairs`,
    `no_detail` (captions whose chain is empty; they make no rows) and `duplicates`."""
    cols: dict[str, list] = {name: [] for name in PAIRS.names if name != "created_at"}
    seen: set[str] = set()
    n_captions = n_empty = n_dup = 0
    policy = cfg.name
    for source_id, caption in records:
        if not isinstance(caption, str):
            raise TypeError(f"record {source_id!r}: caption must be a string, not {type(caption).__name__}")
        n_captions += 1
        chain = degrade_chain(caption, cfg, source_id)
        if not chain:
            n_empty += 1
            continue
        for st in chain:
            pid = pair_id(st.less, st.more)
            if pid in seen:
                n_dup += 1
                continue
            seen.add(pid)
            cols["pair_id"].append(pid)
            cols["source_id"].append(source_id)
            cols["step"].append(st.step)
            cols["category"].append(st.category)
            cols["less"].append(st.less)
            cols["more"].append(st.more)
            cols["removed"].append(st.removed)
            cols["policy"].append(policy)
    now = datetime.now(timezone.utc)
    n = len(cols["pair_id"])
    arrays = [pa.array([now] * n, type=TS) if name == "created_at"
              else pa.array(cols[name], type=PAIRS.field(name).type) for name in PAIRS.names]
    if counters is not None:
        for key, val in (("captions", n_captions), ("pairs", n), ("no_detail", n_empty), ("duplicates", n_dup)):
            counters[key] = counters.get(key, 0) + val
    return pa.Table.from_arrays(arrays, schema=PAIRS)


__all__ = ["DegradeConfig", "Step", "degrade_chain", "normalise", "pair_id", "pairs_table", "STRUCTURAL"]

"""Caption-side coverage: which of a prompt's phrases the training captions already say.

A pooled embedding of a whole caption blurs which attribute goes with which object ("a
pink triangle beside a purple square" sits close to "a purple triangle"), and a pooled
image vector blurs it the same way. Cut into phrases, the binding survives: "purple
triangle" is a phrase of its own, and a training set either has phrases close to it or
has not. So each caption is cut into noun-phrase-like chunks at punctuation and at
function words (the degrade lexicon's generic English list: conjunctions, prepositions,
verbs, relative words), each chunk is embedded with the workspace's text encoder, and a
FAISS index holds the chunks of a split and their head-final suffixes (key
`<sample key>#<n>`; see `caption_units`).

Coverage of one phrase is the same kNN density ratio as on the image side: the mean
similarity of its k nearest training phrases minus that of its k nearest phrases in the
reference corpus. A prompt is as covered as its least-covered phrase.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dataengine.degrade.taxonomy import FUNCTION_FEATURES, LEXICON
from dataengine.index import BuiltIndex, IndexConfig, build_index

TEXTS_FILE = "phrases.parquet"
VECTORS_FILE = "phrase-vectors.npy"

_WORD = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*|[^\w\s]")
# Words that end a phrase; articles and determiners stay (they are stripped at the edges).
_BREAK = FUNCTION_FEATURES - {"ART", "DET", "NEG"}
_EDGE = frozenset({"ART", "DET"})


def _features(word: str) -> set[str]:
    return LEXICON.get(word, set())


def phrases(text: str, max_words: int = 8) -> list[str]:
    """The text's noun-phrase-like chunks, lower-cased, in order, without repeats.

    A chunk ends at punctuation and at a function word that is not a determiner; leading
    and trailing determiners are dropped; chunks longer than `max_words` are cut into
    windows of that size (a run-on list of modifiers still yields phrases).
    """
    out: list[str] = []
    current: list[str] = []

    def flush() -> None:
        while current and _features(current[0]) & _EDGE:
            current.pop(0)
        while current and _features(current[-1]) & _EDGE:
            current.pop()
        for i in range(0, len(current), max_words):
            chunk = " ".join(current[i:i + max_words])
            if chunk and chunk not in out:
                out.append(chunk)
        current.clear()

    for tok in _WORD.findall(text.lower()):
        if not tok[0].isalnum() or _features(tok) & _BREAK:
            flush()
        else:
            current.append(tok)
    flush()
    return out


def query_phrases(text: str) -> list[str]:
    """A query's phrases; a text with none (only function words) is its own phrase."""
    return phrases(text) or [" ".join(text.lower().split())]


def caption_hash(caption: str) -> str:
    return hashlib.blake2b(caption.encode(), digest_size=8).hexdigest()


@dataclass
class PhraseIndex:
    """A split's caption phrases: the FAISS index (ids `<sample key>#<n>`) and their texts."""

    index: BuiltIndex
    texts: list[str]  # row -> phrase
    owners: np.ndarray  # row -> sample key (object array)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def model_id(self) -> str:
        return self.index.meta["model_id"]

    def save(self, directory: Path, vectors: np.ndarray, hashes: Sequence[str]) -> None:
        """The index, its texts and their vectors (the cache a rebuild embeds only new texts against)."""
        self.index.save(directory)
        np.save(directory / VECTORS_FILE, vectors.astype(np.float16))
        pq.write_table(pa.table({"key": self.index.keys.tolist(), "owner": self.owners.tolist(),
                                 "text": self.texts, "caption_hash": list(hashes)}), directory / TEXTS_FILE)

    @classmethod
    def load(cls, directory: Path) -> "PhraseIndex":
        if not (directory / TEXTS_FILE).exists():
            raise FileNotFoundError(f"no caption phrases at {directory}; run `dataengine index` first")
        t = pq.read_table(directory / TEXTS_FILE)
        return cls(BuiltIndex.load(directory), t["text"].to_pylist(), np.array(t["owner"].to_pylist(), object))

    def distinct(self) -> "DistinctPhrases | None":
        """The index's distinct texts with their row counts (built once, on first use), or
        None when the row index is not exact (its vectors cannot be read back)."""
        if not hasattr(self, "_distinct"):
            self._distinct = DistinctPhrases.of(self)
        return self._distinct


@dataclass
class DistinctPhrases:
    """One row per distinct phrase text of a `PhraseIndex`, with how many rows say it.

    Captions repeat their phrases ("a wooden table" in thousands of them), so a split's
    phrase index is mostly copies: the k nearest *rows* of a query are its nearest distinct
    texts, each repeated as often as it occurs. Searching the distinct texts and expanding
    by counts gives the same k similarities from an index several times smaller (27,486
    rows -> 4,762 texts in the triage benchmark's train split). The search stays exact: an
    HNSW graph over the texts (recall@10 0.998 on its own rows) moved 152 of 1,500 prompts
    across the gap threshold, because the prompts that matter, those naming what train
    lacks, are the ones a graph walk misses.
    """

    index: object  # faiss.IndexFlatIP over the distinct texts' unit vectors
    rows: np.ndarray  # distinct -> its first row in the row index
    counts: np.ndarray  # distinct -> rows holding that text

    @classmethod
    def of(cls, phrases: PhraseIndex) -> "DistinctPhrases | None":
        import faiss

        flat = faiss.downcast_index(phrases.index.index)
        if not isinstance(flat, faiss.IndexFlat):
            return None  # an approximate row index: its neighbours are what the caller asked for
        first: dict[str, int] = {}
        of_row = np.array([first.setdefault(t, len(first)) for t in phrases.texts], np.int64)
        rows = np.empty(len(first), np.int64)
        rows[of_row[::-1]] = np.arange(len(of_row))[::-1]  # the first row of each text
        index = faiss.IndexFlatIP(flat.d)
        index.add(flat.reconstruct_batch(rows))  # rows are stored unit-norm
        return cls(index, rows, np.bincount(of_row, minlength=len(first)))

    def top_k_mean(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per query: the mean similarity of its k nearest rows of the row index, and its
        nearest text (as a row of the row index) with that similarity."""
        k = min(k, int(self.counts.sum()))
        q = np.array(queries, np.float32)
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)  # as BuiltIndex.search does
        sims, ids = self.index.search(q, min(k, len(self.rows)))
        n = np.where(ids >= 0, self.counts[np.maximum(ids, 0)], 0)
        before = np.cumsum(n, axis=1) - n  # rows already taken ahead of each text
        take = np.clip(k - before, 0, n)
        return (sims * take).sum(1) / np.maximum(take.sum(1), 1), self.rows[ids[:, 0]], sims[:, 0]


def caption_units(caption: str) -> list[str]:
    """What a caption's phrase index holds: every phrase and each of its word suffixes
    ("three large orange crescents", "large orange crescents", "orange crescents",
    "crescents"). English noun phrases end in their head, so a suffix is the head with its
    nearest modifiers, and a query that names fewer modifiers than the caption does still
    finds its exact phrase."""
    out: dict[str, None] = {}
    for chunk in phrases(caption):
        words = chunk.split()
        for i in range(len(words)):
            out.setdefault(" ".join(words[i:]), None)
    return list(out)


def build_phrase_index(directory: Path, keys: Sequence[str], captions: Sequence[str], encoder,
                       cfg: IndexConfig = IndexConfig(), progress: bool = False) -> PhraseIndex:
    """Cut every caption into phrase units, embed each distinct text once (reusing the
    vectors saved for the same model) and index them; saved in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    cached: dict[str, np.ndarray] = {}
    if (directory / TEXTS_FILE).exists() and (directory / VECTORS_FILE).exists() \
            and _saved_model(directory) == encoder.model_id:
        texts = pq.read_table(directory / TEXTS_FILE, columns=["text"])["text"].to_pylist()
        vecs = np.load(directory / VECTORS_FILE)
        if len(vecs) == len(texts):
            cached = dict(zip(texts, vecs.astype(np.float32)))
    rows_key, rows_owner, rows_text, rows_hash = [], [], [], []
    for key, caption in zip(keys, captions):
        h = caption_hash(caption or "")
        for n, unit in enumerate(caption_units(caption or "")):
            rows_key.append(f"{key}#{n}")
            rows_owner.append(key)
            rows_text.append(unit)
            rows_hash.append(h)
    if not rows_text:
        raise ValueError("no caption phrases to index: every caption is empty")
    distinct = list(dict.fromkeys(rows_text))
    todo = [t for t in distinct if t not in cached]
    if todo:
        cached.update(zip(todo, np.asarray(encoder.encode_texts(todo), np.float32)))
    vectors = np.stack([cached[t] for t in rows_text])
    built = build_index(vectors, rows_key, encoder.model_id, cfg, progress=progress)
    built.meta["kind"] = "phrase"
    built.meta["distinct_texts"], built.meta["encoded_texts"] = len(distinct), len(todo)
    out = PhraseIndex(built, rows_text, np.array(rows_owner, object))
    out.save(directory, vectors, rows_hash)
    return out


def _saved_model(directory: Path) -> str | None:
    import json

    try:
        return json.loads((directory / "meta.json").read_text()).get("model_id")
    except (OSError, ValueError):
        return None


@dataclass
class PhraseMatch:
    """One query phrase against both corpora: its margin and its nearest phrase in each."""

    phrase: str
    margin: float
    train_phrase: str
    train_similarity: float
    reference_phrase: str
    reference_similarity: float


def phrase_margins(train: PhraseIndex, reference: PhraseIndex, queries: Sequence[Sequence[str]],
                   vectors: Sequence[np.ndarray], k: int, own: Sequence[str | None] | None = None,
                   ) -> tuple[np.ndarray, list[list[PhraseMatch]]]:
    """Per query (a list of phrases with their vectors): the smallest phrase margin, and
    every phrase's match. `own[i]` leaves that sample's own phrases out of train (a
    training caption's prompt must not find itself)."""
    flat = np.concatenate([np.asarray(v, np.float32).reshape(-1, train.index.meta["dim"]) for v in vectors])
    # Prompts share phrases ("on a wooden table"): each distinct text is searched once.
    texts = [t for q in queries for t in q]
    first: dict[str, int] = {}
    at = np.array([first.setdefault(t, len(first)) for t in texts], np.int64)
    uniq = np.zeros(len(first), np.int64)
    uniq[at] = np.arange(len(texts))
    views = (train.distinct(), reference.distinct()) if own is None else (None, None)
    if views[0] is not None and views[1] is not None:
        t_mean, t_row, t_top = views[0].top_k_mean(flat[uniq], k)
        r_mean, r_row, r_top = views[1].top_k_mean(flat[uniq], k)
        by_text = [PhraseMatch(text, float(t_mean[j] - r_mean[j]), train.texts[t_row[j]], float(t_top[j]),
                               reference.texts[r_row[j]], float(r_top[j])) for j, text in enumerate(first)]
        matches = [[by_text[first[t]] for t in q] for q in queries]
        return np.array([min(m.margin for m in mine) for mine in matches], np.float32), matches
    extra = 8 if own is not None else 0  # room for the query's own phrases
    ts, tr = train.index.search(flat[uniq], min(k + extra, len(train)))
    rs, rr = reference.index.search(flat[uniq], min(k, len(reference)))
    ts, tr, rs, rr = ts[at], tr[at], rs[at], rr[at]
    out_margin = np.empty(len(queries), np.float32)
    matches: list[list[PhraseMatch]] = []
    row = 0
    for i, texts in enumerate(queries):
        mine: list[PhraseMatch] = []
        for text in texts:
            keep = tr[row] >= 0
            if own is not None and own[i] is not None:
                keep &= train.owners[np.maximum(tr[row], 0)] != own[i]
            t_sims, t_rows = ts[row][keep][:k], tr[row][keep][:k]
            r_ok = rr[row] >= 0
            r_sims, r_rows = rs[row][r_ok], rr[row][r_ok]
            t_mean = float(t_sims.mean()) if len(t_sims) else -1.0
            r_mean = float(r_sims.mean()) if len(r_sims) else -1.0
            mine.append(PhraseMatch(
                text, t_mean - r_mean,
                train.texts[t_rows[0]] if len(t_rows) else "", float(t_sims[0]) if len(t_sims) else -1.0,
                reference.texts[r_rows[0]] if len(r_rows) else "", float(r_sims[0]) if len(r_sims) else -1.0))
            row += 1
        out_margin[i] = min(m.margin for m in mine)
        matches.append(mine)
    return out_margin, matches

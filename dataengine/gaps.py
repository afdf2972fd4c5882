"""Knowledge-gap search: how well does the training set cover a failing prompt or image?

Raw similarity is no measure of coverage: how similar a text is to images depends on the
text itself (on the scene world, a prompt's mean top-10 similarity to train images
correlates 0.13 with how many train images show it). Coverage is therefore relative, a
nearest-neighbour density ratio against a reference corpus (the pool: samples not in
train), measured on two sides:

- image side: mean similarity of the query's k nearest train images minus that of its k
  nearest reference images. A kNN density estimate grows with the neighbours' closeness,
  so this margin is the log density ratio's analogue in similarity units: near 0 or above
  where train holds the concept as densely as the corpus, negative where only the corpus
  has it. Pooled image vectors bind attributes to objects loosely, so alone it ranks a
  held-out colour-shape pair poorly (AUROC 0.36-0.65 over benchmarks/gaps.py's seeds 0-2).
- caption side (dataengine/phrases.py): the same margin for each of the prompt's phrases
  against the phrases of train's and the corpus's captions; the prompt is as covered as
  its least-covered phrase. Phrases keep attributes on their nouns, so "purple triangle"
  is missing from train even when "purple square" and "pink triangle" are not.
- The training set's own queries set the threshold: prompts made from train
  captions (the end of each one's degradation chain, the register of a terse user prompt,
  and a step drawn along it, so every length is represented) and train images, each with
  its own sample left out. A text query's percentile is the smaller of its two sides'
  percentiles among the reference prompts of about its phrase count (the weakest of more
  phrases is lower: against terse references alone, 9-18% of covered 4-20-phrase prompts
  read as gaps at alpha 0.02); a gap is a query under the alpha quantile of those
  prompts' own combined percentiles, so the threshold comes from the data, per model,
  corpus and prompt length. `gap_score = 1 - percentile`. Image queries (failed
  outputs) are judged on the image side alone.
- Evidence: each side's margin, percentile and own threshold; each phrase with its
  nearest phrase in train and in the corpus; the nearest training samples; and a density
  view (k-means over the training images, the query's nearest cluster against the median).

Built once per (model, split) under `indexes/<model>/<split>-image/` (and
`<split>-phrase/`) beside the FAISS index, and loaded for every search.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from dataengine import lake
from dataengine.catalog import Catalog
from dataengine.embed import PATCHED_POOL_KEYS, Loader
from dataengine.index import BuiltIndex, IndexConfig, MemoryBudgetError, build_index, config_of, grow_index
from dataengine.lakevectors import LakeVectors
from dataengine.phrases import (PhraseIndex, PhraseMatch, build_phrase_index, caption_units, phrase_margins,
                               query_phrases)
from dataengine.schema import GAPS
from dataengine.workspace import Workspace

COVERAGE_FILE = "coverage.npz"
COVERAGE_META = "coverage.json"


@dataclass(frozen=True)
class GapConfig:
    """How coverage is measured and what counts as a gap."""

    split: str = "train"  # the set whose coverage is measured
    reference_split: str = "pool"  # the corpus train is compared with (images not in train)
    k: int = 20  # merged neighbours whose train share is the coverage
    alpha: float = 0.02  # a gap is covered less than all but this share of the set's own concepts
    n_reference: int = 2000  # reference queries sampled from the set
    n_clusters: int | None = None  # k-means clusters; None: about sqrt(n), at least 2
    evidence: int = 5  # nearest training samples shown per query
    phrase_k: int = 5  # nearest caption phrases whose mean similarity is a phrase's coverage
    captions: bool = True  # measure caption-side coverage too (needs captions in both splits)
    # What of a prompt is looked up on the caption side: its "phrases", or those and their
    # head-final "suffixes" (as the index holds captions: "a medium-sized orange crescent"
    # also as "orange crescent", so a known modifier cannot hide an unknown pairing).
    query_units: str = "suffixes"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1 or self.phrase_k < 1:
            raise ValueError(f"k and phrase_k must be >= 1, got {self.k}, {self.phrase_k}")
        if not 0.0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha}")
        if self.n_reference < 20:
            raise ValueError(f"n_reference must be >= 20 to estimate a percentile, got {self.n_reference}")
        if self.n_clusters is not None and self.n_clusters < 2:
            raise ValueError(f"n_clusters must be >= 2, got {self.n_clusters}")
        if self.query_units not in QUERY_UNITS:
            raise ValueError(f"query_units must be one of {sorted(QUERY_UNITS)}, got {self.query_units!r}")


QUERY_UNITS = {"phrases": query_phrases,
               "suffixes": lambda text: caption_units(text) or query_phrases(text)}


# The training set is train plus the patches made for it (the curriculum trains on both):
# a patched concept is covered once its patch is ingested and the index rebuilt.
MEMBER_SPLITS = {"train": ("train", "patches")}
# ...and a pool sample patched into train is no longer "not in train": the pool index
# leaves it out, or the concept would stay denser in the pool than in train forever.
REFERENCE_SPLITS = ("pool",)


def member_splits(split: str) -> tuple[str, ...]:
    """The catalog splits whose samples an index named `split` holds."""
    return MEMBER_SPLITS.get(split, (split,))


def model_slug(model_id: str) -> str:
    """A folder-safe name for a model id, unique per id."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_id).strip("_")[:60]
    return f"{safe}-{hashlib.sha1(model_id.encode()).hexdigest()[:8]}"


def index_dir(ws: Workspace, model_id: str, split: str, kind: str = "image") -> Path:
    return ws.indexes / model_slug(model_id) / f"{split}-{kind}"


# ---------------------------------------------------------------------------------------
# Workspace indexes
# ---------------------------------------------------------------------------------------


def build_split_index(ws: Workspace, model_id: str, split: str, kind: str = "image",
                      cfg: IndexConfig = IndexConfig(), use_ray: bool = False, progress: bool = True,
                      rebuild: bool = False) -> BuiltIndex:
    """Bring the saved FAISS index of one split's vectors up to date (the id map holds
    sample keys): grow it by the vectors it lacks when it holds no key the split has lost
    (the cost follows the new vectors), else build it afresh. Vectors are streamed from
    the lake in chunks. meta["update"] says what was done."""
    source = LakeVectors(Catalog(ws), model_id, kind, splits=list(member_splits(split)),
                         without_patched=split in REFERENCE_SPLITS)
    if not len(source):
        raise ValueError(f"no {kind} embeddings of {model_id!r} in split {split!r}; run `dataengine embed` first")
    folder = index_dir(ws, model_id, split, kind)
    saved, why = None, "asked" if rebuild else None
    if why is None and (folder / "meta.json").exists():
        try:
            saved = BuiltIndex.load(folder)
        except ValueError as e:  # a damaged save is rebuilt, not grown
            why = f"saved index unreadable: {e}"
    why = why or _why_rebuild(saved, source, model_id, kind, cfg)
    if why is None:
        new = np.array([k not in saved._row_map() for k in source.keys.tolist()], dtype=bool)
        if not new.any():
            saved.meta["update"] = "up to date"
            return saved
        try:
            grow_index(saved, source.select(new), cfg=cfg, progress=progress)
        except MemoryBudgetError as e:
            # Growth copies the index's store of vectors once; a build streams within the budget.
            why = f"growth over the memory budget: {e}"
        else:
            saved.meta["update"] = f"grew by {int(new.sum())}"
            saved.save(folder)
            return saved
    built = build_index(source, None, model_id, cfg, use_ray=use_ray, progress=progress)
    built.meta["split"], built.meta["kind"] = split, kind
    built.meta["update"] = f"built ({why})"
    built.save(folder)
    return built


def _why_rebuild(saved: BuiltIndex | None, source: LakeVectors, model_id: str, kind: str,
                 cfg: IndexConfig) -> str | None:
    """Why the saved index cannot simply grow to hold `source`; None when it can."""
    if saved is None:
        return "no saved index"
    m, was = saved.meta, config_of(saved.meta)
    if m.get("model_id") != model_id or m.get("kind", kind) != kind or m.get("dim") != source.dim:
        return "saved index is of another model, kind or width"
    if (was.kind, was.target_recall, was.k) != (cfg.kind, cfg.target_recall, cfg.k):
        return "index settings changed"
    have = set(source.keys.tolist())
    lost = sum(1 for k in saved.keys.tolist() if k not in have)
    return f"{lost} indexed keys are no longer in the split" if lost else None


def load_split_index(ws: Workspace, model_id: str, split: str, kind: str = "image") -> BuiltIndex:
    d = index_dir(ws, model_id, split, kind)
    if not (d / "meta.json").exists():
        raise FileNotFoundError(f"no {split} {kind} index for {model_id!r} at {d}; run `dataengine index` first")
    return BuiltIndex.load(d)


# ---------------------------------------------------------------------------------------
# Coverage: the training set against itself
# ---------------------------------------------------------------------------------------


@dataclass
class Coverage:
    model_id: str
    split: str
    reference_split: str
    k: int
    alpha: float
    ref_text: np.ndarray  # sorted image-side coverage margins of the reference prompts
    ref_image: np.ndarray  # the same for reference images
    centroids: np.ndarray  # (c, d) normalised
    sizes: np.ndarray  # members per cluster
    captions: dict[str, str] = field(default_factory=dict)  # key -> caption, for evidence
    meta: dict = field(default_factory=dict)
    # Caption side (absent when the splits have no captions): sorted phrase margins of the
    # reference prompts, and their combined percentiles (the smaller of the two sides').
    ref_caption: np.ndarray | None = None
    ref_combined: np.ndarray | None = None
    phrase_k: int = 5
    # Reference prompts by length: a prompt is as covered as its weakest phrase, and the
    # minimum over more phrases is lower, so a long prompt is judged against reference
    # prompts of about its length. Each: {"max_phrases": n, "text"|"caption"|"combined":
    # sorted array}; empty for coverage built before (every prompt against all).
    buckets: list[dict] = field(default_factory=list)
    # How its reference prompts were cut (GapConfig.query_units); a query is cut the same
    # way. Coverage measured before the choice existed used whole phrases.
    query_units: str = "phrases"
    _thresholds: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def query_texts(self, text: str) -> list[str]:
        """A query's caption-side units, cut as the reference prompts were."""
        return QUERY_UNITS[self.query_units](text)

    @property
    def has_captions(self) -> bool:
        return self.ref_caption is not None and self.ref_combined is not None

    def _ref(self, kind: str, n_phrases: int | None = None) -> np.ndarray:
        if n_phrases is not None and self.buckets and kind in ("text", "caption", "combined"):
            b = next((b for b in self.buckets if n_phrases <= b["max_phrases"]), self.buckets[-1])
            return b[kind]
        return {"text": self.ref_text, "image": self.ref_image, "caption": self.ref_caption,
                "combined": self.ref_combined}[kind]

    def threshold(self, kind: str, n_phrases: int | None = None) -> float:
        """The coverage margin below which a query of `kind` is a gap on that side alone
        (the alpha quantile); for "combined", the percentile below which a text query is.
        With `n_phrases`, among reference prompts of about that many phrases."""
        ref = self._ref(kind, n_phrases)
        key = (kind, id(ref))  # a quantile per reference array, not per query
        if key not in self._thresholds:
            self._thresholds[key] = float(np.quantile(ref, self.alpha))
        return self._thresholds[key]

    def percentile(self, value: float, kind: str, n_phrases: int | None = None) -> float:
        """Share of the reference queries covered less well than `value`."""
        return float(midrank(self._ref(kind, n_phrases), np.array([value]))[0])

    def percentiles(self, values: np.ndarray, kind: str, n_phrases: np.ndarray | None = None) -> np.ndarray:
        """`percentile` of many values at once (each against the bucket of its length)."""
        values = np.asarray(values, np.float64)
        if n_phrases is None:
            return midrank(self._ref(kind), values)
        out = np.empty(len(values))
        for n in np.unique(n_phrases):
            at = n_phrases == n
            out[at] = midrank(self._ref(kind, int(n)), values[at])
        return out

    def thresholds(self, kind: str, n_phrases: np.ndarray) -> np.ndarray:
        """`threshold` per query length."""
        return np.array([self.threshold(kind, int(n)) for n in n_phrases], np.float64)

    def combined(self, image_margin: float, caption_margin: float, n_phrases: int | None = None) -> float:
        """A text query's combined percentile: the less covered of its two sides."""
        return min(self.percentile(image_margin, "text", n_phrases),
                   self.percentile(caption_margin, "caption", n_phrases))

    def save(self, directory: Path) -> None:
        arrays = dict(ref_text=self.ref_text, ref_image=self.ref_image, centroids=self.centroids, sizes=self.sizes)
        if self.has_captions:
            arrays |= dict(ref_caption=self.ref_caption, ref_combined=self.ref_combined)
        for i, b in enumerate(self.buckets):
            arrays |= {f"bucket{i}_{kind}": b[kind] for kind in ("text", "caption", "combined")}
        np.savez(directory / COVERAGE_FILE, **arrays)
        meta = dict(self.meta, model_id=self.model_id, split=self.split, reference_split=self.reference_split,
                    k=self.k, alpha=self.alpha, captions=self.captions, phrase_k=self.phrase_k,
                    query_units=self.query_units,
                    bucket_max_phrases=[b["max_phrases"] for b in self.buckets])
        tmp = directory / f"{COVERAGE_META}.tmp"
        tmp.write_text(json.dumps(meta))
        tmp.replace(directory / COVERAGE_META)

    @classmethod
    def load(cls, directory: Path) -> "Coverage":
        if not (directory / COVERAGE_META).exists():
            raise FileNotFoundError(
                f"no coverage statistics in {directory}; run `dataengine index` first (coverage compares "
                "train with the pool, so both splits must be embedded and indexed)")
        meta = json.loads((directory / COVERAGE_META).read_text())
        arrays = np.load(directory / COVERAGE_FILE)
        fixed = {name: meta.pop(name) for name in
                 ("model_id", "split", "reference_split", "k", "alpha", "captions")}
        phrase_k = int(meta.pop("phrase_k", 5))
        units = meta.pop("query_units", "phrases")
        buckets = [{"max_phrases": n} | {kind: arrays[f"bucket{i}_{kind}"] for kind in ("text", "caption", "combined")}
                   for i, n in enumerate(meta.pop("bucket_max_phrases", []))]
        return cls(fixed["model_id"], fixed["split"], fixed["reference_split"], fixed["k"], fixed["alpha"],
                   arrays["ref_text"], arrays["ref_image"], arrays["centroids"],
                   arrays["sizes"], fixed["captions"], meta,
                   arrays["ref_caption"] if "ref_caption" in arrays else None,
                   arrays["ref_combined"] if "ref_combined" in arrays else None, phrase_k, buckets, units)


def midrank(ref: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Share of sorted `ref` below each value, ties counted half. Common phrases saturate
    (the same phrase in train and pool: margin exactly 0), so many queries tie; counting
    ties as below-or-equal would rank a saturated phrase by how many rare ones happen to sit
    under it (a patch that thins the pool moved such prompts from the 31st percentile to the 9th)."""
    lo = np.searchsorted(ref, values, side="left")
    hi = np.searchsorted(ref, values, side="right")
    return (lo + hi) / (2.0 * len(ref))


def reference_prompts(captions: Sequence[str], seed: int = 0) -> list[str]:
    """Two prompts per caption: the terse end of its degradation chain (the register of a
    short user prompt) and a step drawn at random along the chain, the caption itself
    included (prompts come at every length)."""
    from dataengine.degrade.chains import DegradeConfig, degrade_chain

    cfg = DegradeConfig(policy="fixed")
    rng = random.Random(seed)
    out = []
    for c in captions:
        steps = degrade_chain(c, cfg)
        out.append(steps[-1].less if steps else c)
        out.append(rng.choice([c] + [st.less for st in steps]))
    return out


def length_buckets(lengths: np.ndarray, per_bucket: int = 150,
                   edges: Sequence[int] = (1, 3, 6, 12)) -> list[int]:
    """Upper phrase counts of the reference buckets: doubling widths (the minimum over n
    phrases shifts with log n), a bucket with fewer than `per_bucket` prompts (too few
    for its alpha quantile) merged into the one before."""
    uppers = [e for e in edges if e < lengths.max()] + [int(lengths.max())]
    out: list[int] = []
    lo, held = 0, 0
    for hi in uppers:
        held += int(((lengths > lo) & (lengths <= hi)).sum())
        lo = hi
        if held >= per_bucket:  # enough prompts: close this bucket
            out.append(hi)
            held = 0
    if held or not out:  # a short tail joins the last bucket
        out = out[:-1] + [int(lengths.max())]
    return out


def coverage_margins(train: BuiltIndex, reference: BuiltIndex, queries: np.ndarray, k: int,
                     own_rows: np.ndarray | None = None,
                     searched: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per query: (mean similarity of its k nearest train images minus that of its k nearest
    reference images, the train mean alone). `own_rows` leaves each query's own train image
    out. `searched`: the queries' train search already made (at least k + 1 deep)."""
    ts, tr = searched if searched is not None else train.search(queries, min(k + 1, len(train)))
    rs, rr = reference.search(queries, min(k, len(reference)))
    if own_rows is None and (tr[:, :k] >= 0).all() and (rr >= 0).all():
        near = ts[:, :k].mean(1)
        return near - rs.mean(1), near
    margin = np.empty(len(queries), np.float32)
    near = np.empty(len(queries), np.float32)
    for i in range(len(queries)):
        mine = tr[i] >= 0
        if own_rows is not None:
            mine &= tr[i] != own_rows[i]
        near[i] = ts[i][mine][:k].mean()
        margin[i] = near[i] - rs[i][rr[i] >= 0].mean()
    return margin, near


def build_coverage(ws: Workspace, model_id: str, encoder, index: BuiltIndex, reference: BuiltIndex,
                   cfg: GapConfig = GapConfig(), progress: bool = True,
                   phrase_index: PhraseIndex | None = None,
                   reference_phrases: PhraseIndex | None = None) -> Coverage:
    """Measure how the split covers its own prompts and images against the reference corpus,
    and save it beside the split's index.

    `encoder` is a models.clip.ClipBundle of the same model (for the reference prompts).
    With both phrase indexes, the reference prompts' caption-side margins (each leaving
    its own caption out) and their combined percentiles are measured too.
    """
    import faiss

    t0 = time.perf_counter()
    catalog = Catalog(ws)
    keys = list(index.keys)
    rows = catalog.query("SELECT key, caption FROM samples WHERE list_contains(?, split) ORDER BY key",
                         [list(member_splits(cfg.split))]).to_pylist()
    caption_of = {r["key"]: r["caption"] for r in rows}
    rng = random.Random(cfg.seed)
    sample = sorted(rng.sample(range(len(keys)), min(cfg.n_reference, len(keys))))
    own = np.array(sample, np.int64)
    k = min(cfg.k, len(keys) - 1, len(reference))

    prompts = reference_prompts([caption_of.get(keys[i], "") for i in sample], cfg.seed)
    owners = np.repeat(own, 2)  # two prompts per sampled caption
    image_side = coverage_margins(index, reference, encoder.encode_texts(prompts), k, owners)[0]
    ref_text = np.sort(image_side)
    ref_image = np.sort(coverage_margins(index, reference, index.reconstruct(own), k, own)[0])
    ref_caption = ref_combined = None
    buckets: list[dict] = []

    def combined_of(img: np.ndarray, cap: np.ndarray) -> np.ndarray:
        pct_image = midrank(np.sort(img), img)
        pct_caption = midrank(np.sort(cap), cap)
        return np.sort(np.minimum(pct_image, pct_caption))

    if phrase_index is not None and reference_phrases is not None:
        texts = [QUERY_UNITS[cfg.query_units](p) for p in prompts]
        vecs = _phrase_vectors(encoder, texts)
        caption_side, _ = phrase_margins(phrase_index, reference_phrases, texts, vecs, cfg.phrase_k,
                                         own=[keys[i] for i in owners])
        ref_caption = np.sort(caption_side)
        ref_combined = combined_of(image_side, caption_side)
        lengths = np.array([len(t) for t in texts])
        lo = -1
        for hi in length_buckets(lengths):
            m = (lengths > lo) & (lengths <= hi)
            buckets.append({"max_phrases": hi, "text": np.sort(image_side[m]), "caption": np.sort(caption_side[m]),
                            "combined": combined_of(image_side[m], caption_side[m])})
            lo = hi

    n = len(keys)
    nc = min(n, cfg.n_clusters or max(2, min(1024, int(round(math.sqrt(n))))))
    all_vecs = index.reconstruct(np.arange(n))
    km = faiss.Kmeans(all_vecs.shape[1], nc, niter=20, seed=cfg.seed, spherical=True,
                      min_points_per_centroid=1, verbose=False)  # trains on a sample (faiss: 256 a centroid)
    km.train(all_vecs)
    _, assign = km.index.search(all_vecs, 1)
    sizes = np.bincount(assign[:, 0], minlength=nc)
    cov = Coverage(model_id, cfg.split, cfg.reference_split, k, cfg.alpha,
                   ref_text, ref_image, km.centroids.astype(np.float32), sizes.astype(np.int64),
                   {key: caption_of.get(key, "") for key in keys},
                   {"n": n, "n_reference_corpus": len(reference), "n_reference_queries": len(sample),
                    "n_clusters": nc, "reference_prompt_examples": prompts[:5],
                    "seconds": round(time.perf_counter() - t0, 2)},
                   ref_caption, ref_combined, cfg.phrase_k, buckets, cfg.query_units)
    cov.meta["threshold_text"], cov.meta["threshold_image"] = cov.threshold("text"), cov.threshold("image")
    if cov.has_captions:
        cov.meta["threshold_caption"], cov.meta["threshold_combined"] = (cov.threshold("caption"),
                                                                         cov.threshold("combined"))
    cov.save(index_dir(ws, model_id, cfg.split))
    return cov


def _phrase_vectors(encoder, texts: Sequence[Sequence[str]]) -> list[np.ndarray]:
    """Embed every query's phrases in one batch; one (n_phrases, d) array per query."""
    distinct = list(dict.fromkeys(p for ps in texts for p in ps))  # prompts share phrases: embed each once
    if not distinct:
        return [np.zeros((0, encoder.embed_dim), np.float32) for _ in texts]
    vecs = np.asarray(encoder.encode_texts(distinct), np.float32)
    row = {p: i for i, p in enumerate(distinct)}
    return [vecs[[row[p] for p in ps]] for ps in texts]


# ---------------------------------------------------------------------------------------
# Searching
# ---------------------------------------------------------------------------------------


@dataclass
class Neighbour:
    key: str
    similarity: float
    caption: str


@dataclass
class GapReport:
    gap_id: str
    concept: str  # the prompt, or the image's path for image queries
    kind: str  # text | image
    model_id: str
    coverage: float  # image-side margin: k-nearest similarity in train minus in the reference corpus
    similarity: float  # mean similarity of the k nearest training images (evidence only)
    percentile: float  # share of the set's own reference queries covered less well (both sides: the smaller)
    gap_score: float  # 1 - percentile
    threshold: float  # percentile below which a query is a gap (the alpha quantile of the references')
    is_gap: bool
    neighbours: list[Neighbour]
    cluster: dict  # id, size, median_size, relative_size, similarity
    feedback_id: str | None = None
    caption_coverage: float | None = None  # caption side: the least-covered phrase's margin
    phrases: list[PhraseMatch] = field(default_factory=list)
    sides: dict = field(default_factory=dict)  # per side: margin, percentile, its own alpha threshold

    def evidence(self) -> dict:
        return {"neighbours": [asdict(n) for n in self.neighbours], "cluster": self.cluster,
                "coverage": self.coverage, "caption_coverage": self.caption_coverage,
                "similarity": self.similarity, "percentile": self.percentile, "threshold": self.threshold,
                "sides": self.sides, "phrases": [asdict(m) for m in self.phrases]}

    def explain(self) -> str:
        """One line a curator can read: which side decided, and the weakest phrase."""
        parts = [f"{side} {v['margin']:+.3f} (gap below {v['threshold']:+.3f}, {v['percentile']:.1%})"
                 for side, v in self.sides.items()]
        if self.phrases:
            weak = min(self.phrases, key=lambda m: m.margin)
            parts.append(f"weakest phrase {weak.phrase!r}: nearest in train {weak.train_phrase!r} "
                         f"{weak.train_similarity:.2f}, in the pool {weak.reference_phrase!r} "
                         f"{weak.reference_similarity:.2f}")
        return "; ".join(parts)


def gap_id_for(model_id: str, split: str, kind: str, concept: str) -> str:
    return hashlib.sha1(f"{model_id}\0{split}\0{kind}\0{concept}".encode()).hexdigest()[:16]


def search_gaps(coverage: Coverage, index: BuiltIndex, reference: BuiltIndex, concepts: Sequence[str],
                vectors: np.ndarray, kind: str = "text", evidence: int = 5,
                feedback_ids: Sequence[str | None] | None = None,
                phrase_indexes: tuple[PhraseIndex, PhraseIndex] | None = None,
                phrase_vectors: Sequence[np.ndarray] | None = None,
                phrase_texts: Sequence[Sequence[str]] | None = None) -> list[GapReport]:
    """One report per query vector (text prompts or image embeddings of failed outputs).

    Text queries with `phrase_indexes` (train's and the reference corpus's) and their
    phrases' vectors are judged on both sides: a gap when the smaller of the two sides'
    percentiles falls below the alpha quantile of the reference prompts' own.
    `phrase_texts`: each concept's `coverage.query_texts` when the caller has them already.
    """
    if kind not in ("text", "image"):
        raise ValueError(f"kind must be text or image, got {kind!r}")
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim != 2 or len(vectors) != len(concepts):
        raise ValueError(f"{len(concepts)} concepts but vectors of shape {vectors.shape}")
    both = kind == "text" and phrase_indexes is not None and coverage.has_captions
    if both and (phrase_vectors is None or len(phrase_vectors) != len(concepts)):
        raise ValueError("caption-side search needs one array of phrase vectors per concept")
    # One search of train serves both the coverage margin and the evidence.
    sims, rows = index.search(vectors, min(max(coverage.k + 1, evidence), len(index)))
    margins, near = coverage_margins(index, reference, vectors, coverage.k, searched=(sims, rows))
    if both and phrase_texts is None:
        phrase_texts = [coverage.query_texts(c) for c in concepts]
    cap_margins, matches = (phrase_margins(*phrase_indexes, phrase_texts, phrase_vectors, coverage.phrase_k)
                            if both else (None, None))
    cent_sims = vectors @ coverage.centroids.T
    median = float(np.median(coverage.sizes))
    # Judged among reference prompts of the query's length (its number of phrases).
    ns = np.array([len(m) for m in matches]) if both else None
    img_pct = coverage.percentiles(margins, kind, ns)
    img_thr = coverage.thresholds(kind, ns) if both else np.full(len(concepts), coverage.threshold(kind))
    if both:
        cap_pct = coverage.percentiles(cap_margins, "caption", ns)
        cap_thr = coverage.thresholds("caption", ns)
        pct = np.minimum(img_pct, cap_pct)  # both sides of a text query: the less covered
        thr = coverage.thresholds("combined", ns)
        is_gap = pct < thr
    else:
        pct, thr = img_pct, np.full(len(concepts), coverage.alpha)
        # A query below every reference has percentile 0; the threshold is never below
        # the smallest step, so it is a gap. Side margins break ties for the image-only case.
        is_gap = margins < img_thr
    cluster = cent_sims.argmax(1)
    keys = index.keys_for(rows[:, :evidence])
    out = []
    for i, concept in enumerate(concepts):
        sides = {"image": {"margin": float(margins[i]), "percentile": float(img_pct[i]), "threshold": float(img_thr[i])}}
        if both:
            sides["caption"] = {"margin": float(cap_margins[i]), "percentile": float(cap_pct[i]),
                                "threshold": float(cap_thr[i]), "phrases": int(ns[i])}
        c = int(cluster[i])
        neighbours = [Neighbour(key, float(s), coverage.captions.get(key, ""))
                      for key, s in zip(keys[i], sims[i, :evidence]) if key]
        out.append(GapReport(
            gap_id=gap_id_for(coverage.model_id, coverage.split, kind, concept), concept=concept, kind=kind,
            model_id=coverage.model_id, coverage=float(margins[i]),
            similarity=float(near[i]),
            percentile=float(pct[i]), gap_score=1.0 - float(pct[i]), threshold=float(thr[i]), is_gap=bool(is_gap[i]),
            neighbours=neighbours,
            cluster={"id": c, "size": int(coverage.sizes[c]), "median_size": median,
                     "relative_size": float(coverage.sizes[c] / median) if median else 0.0,
                     "similarity": float(cent_sims[i, c])},
            feedback_id=(feedback_ids[i] if feedback_ids else None),
            caption_coverage=float(cap_margins[i]) if both else None,
            phrases=matches[i] if both else [], sides=sides))
    return out


def missing_phrases(report: GapReport) -> list[PhraseMatch]:
    """The report's phrases that train lacks: under the caption side's own threshold; when
    the caption side decided the gap but no phrase is under it alone, the weakest one."""
    if not report.phrases or "caption" not in report.sides:
        return []
    thr = report.sides["caption"]["threshold"]
    under = [m for m in report.phrases if m.margin < thr]
    if under:
        return under
    side = report.sides["caption"]
    if report.is_gap and side["percentile"] <= report.sides["image"]["percentile"]:
        return [min(report.phrases, key=lambda m: m.margin)]
    return []


def record_gaps(ws: Workspace, reports: Sequence[GapReport]) -> None:
    """Append the reports to the lake's `gaps` table (the catalog's record of every search)."""
    if not reports:
        return
    now = datetime.now(timezone.utc)
    table = pa.Table.from_pylist([
        dict(gap_id=r.gap_id, feedback_id=r.feedback_id, concept=r.concept, kind=r.kind, model_id=r.model_id,
             coverage=r.coverage, similarity=r.similarity, percentile=r.percentile, gap_score=r.gap_score, threshold=r.threshold,
             is_gap=r.is_gap, evidence=json.dumps(r.evidence()), searched_at=now)
        for r in reports], schema=GAPS)
    lake.write_part(ws.lake, "gaps", table)


# ---------------------------------------------------------------------------------------
# The workspace view: what `dataengine index`, `gaps` and `patch` call
# ---------------------------------------------------------------------------------------


def build_workspace_indexes(ws: Workspace, model: str = "default", splits: Sequence[str] = ("train", "pool"),
                            index_cfg: IndexConfig = IndexConfig(), gap_cfg: GapConfig = GapConfig(),
                            use_ray: bool = False, progress: bool = True,
                            rebuild: bool = False, *, load_encoder: Loader) -> dict[str, BuiltIndex]:
    """Image index of each split, grown by new vectors or built (`rebuild`: always built),
    plus the gap split's coverage statistics (when both it and its reference split are
    among `splits`), with the caption side when both splits have captions. `model` is
    loaded by `load_encoder` (models.clip.load_clip) to embed the caption phrases."""
    from dataengine.embed import resolve_model

    encoder = load_encoder(resolve_model(ws, model))
    built = {split: build_split_index(ws, encoder.model_id, split, "image", index_cfg, use_ray, progress, rebuild)
             for split in splits}
    if gap_cfg.split in built and gap_cfg.reference_split in built:
        phrase = (build_phrase_indexes(ws, encoder, (gap_cfg.split, gap_cfg.reference_split), index_cfg, progress)
                  if gap_cfg.captions else None)
        build_coverage(ws, encoder.model_id, encoder, built[gap_cfg.split], built[gap_cfg.reference_split],
                       gap_cfg, progress, *(phrase or (None, None)))
    return built


def build_phrase_indexes(ws: Workspace, encoder, splits: Sequence[str], index_cfg: IndexConfig = IndexConfig(),
                         progress: bool = False) -> tuple[PhraseIndex, ...] | None:
    """The caption phrase index of each split, or None when a split has no captions."""
    catalog = Catalog(ws)
    out = []
    for split in splits:
        patched = f"AND key NOT IN ({PATCHED_POOL_KEYS})" if split in REFERENCE_SPLITS else ""
        rows = catalog.query("SELECT key, caption FROM samples WHERE list_contains(?, split) "
                             f"AND coalesce(caption, '') <> '' {patched} ORDER BY key",
                             [list(member_splits(split))]).to_pylist()
        if not rows:
            return None
        out.append(build_phrase_index(index_dir(ws, encoder.model_id, split, "phrase"),
                                      [r["key"] for r in rows], [r["caption"] for r in rows], encoder,
                                      index_cfg, progress))
    return tuple(out)


class GapSearcher:
    """The split's index, its coverage and the model that embeds queries (`model`, loaded
    once by `load_encoder`: models.clip.load_clip)."""

    def __init__(self, ws: Workspace, model: str = "default", split: str = "train", evidence: int = 5, *,
                 load_encoder: Loader):
        from dataengine.embed import resolve_model

        self.ws = ws
        self.encoder = load_encoder(resolve_model(ws, model))
        self.index = load_split_index(ws, self.encoder.model_id, split)
        self.coverage = Coverage.load(index_dir(ws, self.encoder.model_id, split))
        self.reference = load_split_index(ws, self.encoder.model_id, self.coverage.reference_split)
        self.phrases: tuple[PhraseIndex, PhraseIndex] | None = None
        if self.coverage.has_captions:
            self.phrases = (PhraseIndex.load(index_dir(ws, self.encoder.model_id, split, "phrase")),
                            PhraseIndex.load(index_dir(ws, self.encoder.model_id, self.coverage.reference_split,
                                                       "phrase")))
        self.evidence = evidence

    def prompts(self, prompts: Sequence[str], feedback_ids: Sequence[str | None] | None = None,
                record: bool = True) -> tuple[list[GapReport], np.ndarray]:
        """Reports for text prompts, and the query vectors (for patching)."""
        if not prompts or any(not str(p).strip() for p in prompts):
            raise ValueError("every prompt must be non-empty text")
        vecs = self.encoder.encode_texts(list(prompts))
        texts = [self.coverage.query_texts(p) for p in prompts]
        phrase_vecs = _phrase_vectors(self.encoder, texts) if self.phrases is not None else None
        reports = search_gaps(self.coverage, self.index, self.reference, list(prompts), vecs, "text", self.evidence,
                              feedback_ids, self.phrases, phrase_vecs, texts)
        if record:
            record_gaps(self.ws, reports)
        return reports, vecs

    def images(self, paths: Sequence[str | Path], feedback_ids: Sequence[str | None] | None = None,
               record: bool = True) -> tuple[list[GapReport], np.ndarray]:
        """Reports for images of failed outputs (files), and their vectors."""
        from dataengine.images import to_square

        arrays = []
        for p in paths:
            try:
                arrays.append(to_square(Path(p).read_bytes(), self.encoder.image_size))
            except (OSError, ValueError) as e:
                raise ValueError(f"{p}: not a readable image ({e})") from e
        vecs = self.encoder.encode_images(np.stack(arrays))
        reports = search_gaps(self.coverage, self.index, self.reference, [str(p) for p in paths], vecs, "image",
                              self.evidence, feedback_ids)
        if record:
            record_gaps(self.ws, reports)
        return reports, vecs

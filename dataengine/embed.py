"""Embedding: catalogued samples -> open_clip image and caption vectors in the lake.

Three small stages, each a plain callable over a batch, so the same code runs in a loop
in this process or as Ray Data `map_batches` over a cluster:

    todo rows (key, shard, offset, size, caption)
      -> DecodeImages   (CPU tasks: read the bytes by offset, decode, resize, crop)
      -> EmbedImages    (an actor pool: one model per actor, one actor per GPU)
      -> lake `embeddings` (key, model_id, kind, float16 vector)

Captions go through EmbedTexts the same way. Only what has no vector yet for this
model id and kind is embedded, so a rerun after a crash or after a new ingest picks up
where the lake stands. An image that can no longer be read (its shard changed or went
away since ingest) is quarantined with stage "embed" and counted, never dropped.

    embed(ws.root, EmbedConfig(), load_encoder=models.clip.load_clip)
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from dataengine import lake
from dataengine.catalog import Catalog
from dataengine.images import iter_images
from dataengine.progress import bar
from dataengine.schema import EMBEDDINGS, QUARANTINE
from dataengine.workspace import Workspace

# A stage that embeds takes its model loader, (spec, device=...) -> bundle with model_id,
# image_size, model, device, encode_texts, encode_images (models.clip.load_clip is one):
# the engine never imports the model stack (DESIGN: the direction of imports).
Loader = Callable[..., Any]

KINDS = ("image", "text")
DEFAULT_MODEL = "default"  # the workspace's own trained model (models/train_clip.py)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedConfig:
    """What to embed with which model, and how to spread the work."""

    model: str = DEFAULT_MODEL  # "default", or any spec the stage's `load_encoder` accepts
    kinds: tuple[str, ...] = KINDS
    splits: tuple[str, ...] | None = None  # None: every split in the catalog
    batch_size: int = 64  # images or captions per model call
    store_dtype: str = "float16"  # float16 | float32 in memory; the lake stores float16
    use_ray: bool = True
    # Fewer rows of a kind than this run in this process, on the model the driver already
    # loaded: an actor pool takes ~20 s to start on 2 cores (each actor imports torch and
    # loads the model), longer than ~1,000 images take here (the demo's 89 edit samples:
    # 45 s on Ray, 6 s in-process).
    ray_min_rows: int = 1000
    ray_address: str | None = None
    actors: int | None = None  # model replicas; None: one per GPU, else one per CPU Ray reports
    threads_per_actor: int | None = None  # torch threads in each CPU actor; None: its CPU share
    device: str = "auto"  # auto | cpu | cuda
    part_rows: int = 8192  # rows per lake part written

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {self.kinds}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.store_dtype not in ("float16", "float32"):
            raise ValueError(f"store_dtype must be float16 or float32, got {self.store_dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.ray_min_rows < 0:
            raise ValueError(f"ray_min_rows must be >= 0, got {self.ray_min_rows}")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"actors must be >= 1, got {self.actors}")


@dataclass
class EmbedReport:
    model_id: str
    embedded: dict[str, int] = field(default_factory=dict)  # kind -> vectors written
    skipped: dict[str, int] = field(default_factory=dict)  # kind -> already in the lake
    failed: dict[str, int] = field(default_factory=dict)  # kind -> quarantined
    seconds: float = 0.0
    actors: int = 0  # Ray actors in the pool (0: no kind ran on Ray)
    ran_on: dict[str, str] = field(default_factory=dict)  # kind -> "ray" | "local" (kinds with work)

    def summary(self) -> str:
        parts = [f"{k}: {self.embedded.get(k, 0)} new, {self.skipped.get(k, 0)} already done"
                 + (f", {self.failed[k]} quarantined" if self.failed.get(k) else "")
                 + (f" ({self.ran_on[k]})" if k in self.ran_on else "")
                 for k in sorted(set(self.embedded) | set(self.skipped))]
        return f"{self.model_id} | " + "; ".join(parts) + f" | {self.seconds:.1f} s"


# ---------------------------------------------------------------------------------------
# The stages (plain callables over dict-of-numpy batches)
# ---------------------------------------------------------------------------------------


class DecodeImages:
    """Rows with key, shard, image_offset, image_size -> key, pixels (N, S, S, 3) uint8, error."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [dict(key=k, shard=s, image_offset=int(o), image_size=int(n)) for k, s, o, n in
                zip(batch["key"], batch["shard"], batch["image_offset"], batch["image_size"])]
        s = self.image_size
        pixels = np.zeros((len(rows), s, s, 3), np.uint8)
        keys = []
        by_key = {r["key"]: i for i, r in enumerate(rows)}
        for key, arr, err in iter_images(rows, s):
            i = by_key[key]
            if arr is not None:
                pixels[i] = arr
            keys.append((i, key, err or ""))
        keys.sort()
        return {"key": np.array([k for _, k, _ in keys], dtype=object), "pixels": pixels,
                "error": np.array([e for _, _, e in keys], dtype=object)}


@functools.lru_cache(maxsize=2)
def _load(load_encoder: Loader, spec: str, device: str):
    """A model per (loader, spec, device) per process: the driver's look at the model's id
    and input size and an in-process run share one load."""
    return load_encoder(spec, device=device)


class _Encoder:
    """Holds one model: the bundle the driver loaded. Ray actors get it by reference (one
    load, shipped once through the object store; it also reaches nodes that cannot read the
    workspace's model folder) and only move it to their device.
    """

    def __init__(self, model, device: str = "auto", threads: int | None = None, store_dtype: str = "float16"):
        import sys

        import torch

        if threads:
            torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        ray = sys.modules.get("ray")  # an actor gets the model by Ray reference; a local run never imports Ray
        if ray is not None and isinstance(model, ray.ObjectRef):
            model = ray.get(model)
        if model.device != device:
            from dataclasses import replace

            self.bundle = replace(model, model=model.model.to(device), device=device)
        else:
            self.bundle = model
        # Mixed precision on GPUs; on CPUs float32 is both faster and exact.
        self.autocast = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if device == "cuda" else None
        self.dtype = np.float16 if store_dtype == "float16" else np.float32

    @property
    def image_size(self) -> int:
        return self.bundle.image_size


class EmbedImages(_Encoder):
    """key, pixels, error -> key, vector (N, D), error; rows with an error get a zero vector."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.array([not e for e in batch["error"]], bool)
        out = np.zeros((len(ok), self.bundle.embed_dim), self.dtype)
        if ok.any():
            out[ok] = self.bundle.encode_images(batch["pixels"][ok], autocast_dtype=self.autocast)
        return {"key": batch["key"], "vector": out, "error": batch["error"]}


class EmbedTexts(_Encoder):
    """key, caption -> key, vector (N, D), error ('' everywhere: every caption validated at ingest)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors = self.bundle.encode_texts([str(c) for c in batch["caption"]], autocast_dtype=self.autocast)
        return {"key": batch["key"], "vector": vectors.astype(self.dtype),
                "error": np.array([""] * len(vectors), dtype=object)}


# ---------------------------------------------------------------------------------------
# What is left to do
# ---------------------------------------------------------------------------------------


def resolve_model(ws: Workspace, spec: str) -> str:
    """The load_clip spec for `spec`: "default" is the workspace's promoted clip version."""
    if spec != DEFAULT_MODEL:
        return spec
    rows = Catalog(ws).query(
        "SELECT path FROM model_versions WHERE model = 'clip' AND status = 'promoted' "
        "ORDER BY created_at DESC LIMIT 1").to_pylist()
    if not rows or not Path(rows[0]["path"]).exists():
        raise FileNotFoundError(
            f"{ws.root}: no trained default embedding model; run `dataengine train clip` "
            "(or `dataengine embed`, which trains it first) or pass --model")
    return rows[0]["path"]


def model_id_of(ws: Workspace, spec: str, load_encoder: Loader) -> str:
    """The id under which `spec` (as `EmbedConfig.model` takes it) stores its vectors."""
    return _load(load_encoder, resolve_model(ws, spec), "cpu").model_id


def todo(catalog: Catalog, model_id: str, kind: str, splits: Sequence[str] | None,
         keys: Sequence[str] | None = None) -> tuple[pa.Table, int]:
    """Samples with no `kind` vector for `model_id` yet, and how many already have one.

    Samples this model already failed on (quarantined at embed) are left out: a failure
    is recorded once, not again on every run; `dataengine requeue --stage embed` retries
    them. `keys` narrows the work to those samples (what requeue passes).
    """
    where, params = [], [model_id, kind, model_id, f"embed {kind}:%"]
    if splits:
        where.append(f"s.split IN ({', '.join('?' for _ in splits)})")
        params += list(splits)
    if keys is not None:
        where.append(f"s.key IN (SELECT unnest(?::VARCHAR[]))")
        params.append(list(keys))
    cond = f"WHERE {' AND '.join(where)}" if where else ""
    missing = catalog.query(
        "SELECT s.key, s.shard, s.image_offset, s.image_size, s.image_field, s.caption, s.shard_uid FROM samples s "
        "ANTI JOIN (SELECT DISTINCT key FROM embeddings WHERE model_id = ? AND kind = ?) e USING (key) "
        "ANTI JOIN (SELECT DISTINCT key FROM quarantine WHERE stage = 'embed' AND model_id = ? "
        "AND reason LIKE ?) q USING (key) "
        f"{cond} ORDER BY s.shard, s.image_offset", params)
    total = catalog.query(f"SELECT count(*) AS n FROM samples s {cond}", params[4:]).column("n")[0].as_py()
    return missing, total - missing.num_rows


# ---------------------------------------------------------------------------------------
# Running the stages
# ---------------------------------------------------------------------------------------


def _local_batches(rows: pa.Table, kind: str, cfg: EmbedConfig, bundle) -> Iterator[dict]:
    cls = EmbedImages if kind == "image" else EmbedTexts
    # In this process: every core (the offline defaults set OMP_NUM_THREADS=1 for Ray's workers).
    import os

    enc = cls(bundle, cfg.device, cfg.threads_per_actor or os.cpu_count(), cfg.store_dtype)
    decode = DecodeImages(enc.image_size)
    for start in range(0, rows.num_rows, cfg.batch_size):
        batch = {c: rows[c].slice(start, cfg.batch_size).to_numpy(zero_copy_only=False) for c in rows.column_names}
        yield enc(decode(batch) if kind == "image" else batch)


def _block_rows(cfg: EmbedConfig) -> int:
    return cfg.batch_size * 4  # a few batches per Ray block, so decode tasks spread over the cluster


def _pool_size(cfg: EmbedConfig, rows: int) -> tuple[int, int, dict[str, float]]:
    """Actors, torch threads in each, and each one's Ray resources: one actor per GPU;
    without GPUs, one single-threaded actor per CPU with half a CPU held back in all for
    the decode tasks; never more actors than blocks of `rows` (an actor with nothing to do
    still pays its ~7 s start: imports and the model), the CPUs left over going to threads.

    (A pool that takes every CPU starves the decode tasks and the pipeline stalls; one
    actor fewer than the CPUs leaves a core nearly idle, since decoding costs ~2 ms an
    image against ~25 ms in the model. One single-threaded replica per core embedded
    1.2-1.3x the images/s of one replica on both cores of a 2-core machine, which more
    than pays for the second actor's start from a few thousand images on.)"""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 1))
    blocks = max(1, -(-rows // _block_rows(cfg)))
    if gpus and cfg.device != "cpu":
        return min(cfg.actors or gpus, blocks), cfg.threads_per_actor or 1, {"num_gpus": 1, "num_cpus": 1}
    actors = min(cfg.actors or max(1, int(cpus)), blocks)
    node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=cpus)
    threads = cfg.threads_per_actor or max(1, int(min(cpus / actors, node_cpus)))
    return actors, threads, {"num_cpus": max(0.25, min(1.0, (cpus - 0.5) / actors))}


def _ray_batches(rows: pa.Table, kind: str, cfg: EmbedConfig, bundle) -> Iterator[dict]:
    """Decode tasks feeding a model actor pool on Ray Data; yields the actors' output blocks."""
    import ray.data

    image_size = bundle.image_size
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows one bar over the whole job
    actors, threads, resources = _pool_size(cfg, rows.num_rows)
    cols = ["key", "shard", "image_offset", "image_size"] if kind == "image" else ["key", "caption"]
    block = _block_rows(cfg)
    ds = ray.data.from_arrow([rows.select(cols).slice(i, block) for i in range(0, rows.num_rows, block)])
    if kind == "image":
        # Half a CPU each: Ray Data fuses consecutive maps with equal resources, which would
        # run decoding inside the model actor, one after the other, instead of beside it.
        ds = ds.map_batches(_decode_fn, fn_kwargs={"image_size": image_size}, batch_size=cfg.batch_size,
                            batch_format="numpy", num_cpus=0.5)
    cls = EmbedImages if kind == "image" else EmbedTexts
    # The actors take the model the driver loaded rather than each loading it again. By
    # reference, as Ray Data asks of large constructor arguments (held in the UDF, 100+ MB
    # slowed the actors' start).
    model = ray.put(bundle)
    out = ds.map_batches(cls, fn_constructor_args=(model, cfg.device, threads, cfg.store_dtype),
                         batch_size=cfg.batch_size, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(size=actors), **resources)
    # Decoding outruns the model ~10x: unbounded, the object store would end up holding the
    # pixels of every row. A few blocks per actor keep each one fed, and memory stays flat
    # however many rows there are.
    row_bytes = 3 * image_size ** 2 if kind == "image" else 1024
    limits = out.context.execution_options.resource_limits
    out.context.execution_options.resource_limits = limits.copy(object_store_memory=4 * actors * block * row_bytes)
    yield from out.iter_batches(batch_size=None, batch_format="numpy")


def _decode_fn(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    return DecodeImages(image_size)(batch)


def _vectors_table(keys: Sequence[str], vectors: np.ndarray, model_id: str, kind: str, now) -> pa.Table:
    n, d = vectors.shape
    flat = pa.array(np.ascontiguousarray(vectors, np.float16).ravel(), pa.float16())
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    return pa.table({
        "key": pa.array(list(keys), pa.string()),
        "model_id": pa.array([model_id] * n, pa.string()),
        "kind": pa.array([kind] * n, pa.string()),
        "vector": pa.ListArray.from_arrays(offsets, flat),
        "created_at": pa.array([now] * n, EMBEDDINGS.field("created_at").type),
    }, schema=EMBEDDINGS)


def embed(
    workspace: str | Path, cfg: EmbedConfig = EmbedConfig(), progress: bool = True,
    keys: Sequence[str] | None = None, *, load_encoder: Loader,
) -> EmbedReport:
    """Embed every catalogued sample (or only `keys`) that has no vector yet for this model
    and has not failed with it before; returns counts. `load_encoder(spec, device=...)`
    loads `cfg.model` (models.clip.load_clip)."""
    t0 = time.perf_counter()
    ws = Workspace.at(workspace)
    catalog = Catalog(ws)
    catalog.migrate()
    spec = resolve_model(ws, cfg.model)
    probe = _load(load_encoder, spec, "cpu")  # the id and input size (an in-process CPU run reuses this load)
    model_id = probe.model_id
    report = EmbedReport(model_id)
    run_id = f"embed-{uuid.uuid4().hex[:12]}"
    for kind in cfg.kinds:
        rows, done = todo(catalog, model_id, kind, cfg.splits, keys)
        report.skipped[kind], report.embedded[kind], report.failed[kind] = done, 0, 0
        if rows.num_rows == 0:
            continue
        on_ray = cfg.use_ray and rows.num_rows >= cfg.ray_min_rows
        report.ran_on[kind] = "ray" if on_ray else "local"
        if on_ray:
            from dataengine.cluster import ensure_ray

            ensure_ray(cfg.ray_address)
            report.actors = max(report.actors, _pool_size(cfg, rows.num_rows)[0])
        batches = (_ray_batches(rows, kind, cfg, probe) if on_ray else _local_batches(rows, kind, cfg, probe))
        with bar(progress, f"embed {kind}s", rows.num_rows) as advance:
            pending_k: list[np.ndarray] = []
            pending_v: list[np.ndarray] = []
            for b in batches:
                bad = np.array([bool(e) for e in b["error"]], bool)
                if bad.any():
                    _quarantine(ws, b["key"][bad], b["error"][bad], rows, kind, model_id, run_id)
                    report.failed[kind] += int(bad.sum())
                pending_k.append(b["key"][~bad])
                pending_v.append(b["vector"][~bad])
                if sum(len(k) for k in pending_k) >= cfg.part_rows:
                    report.embedded[kind] += _flush(ws, pending_k, pending_v, model_id, kind)
                advance(len(bad))
            report.embedded[kind] += _flush(ws, pending_k, pending_v, model_id, kind)
    report.seconds = time.perf_counter() - t0
    return report


def _flush(ws: Workspace, keys: list, vectors: list, model_id: str, kind: str) -> int:
    if not keys or not sum(len(k) for k in keys):
        keys.clear(), vectors.clear()
        return 0
    k, v = np.concatenate(keys), np.concatenate(vectors)
    keys.clear(), vectors.clear()
    return store_vectors(ws, k.tolist(), v, model_id, kind)


def store_vectors(ws: Workspace, keys: Sequence[str], vectors: np.ndarray, model_id: str, kind: str) -> int:
    """Write (N, D) vectors of `kind` for `keys` as one lake part; `embed` then skips those
    keys for `model_id`. Returns N."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if len(keys) != len(vectors):
        raise ValueError(f"{len(keys)} keys but {len(vectors)} vectors")
    if not len(keys):
        return 0
    now = datetime.now(timezone.utc)
    lake.write_part(ws.lake, "embeddings", _vectors_table(list(keys), vectors, model_id, kind, now),
                    part=f"{kind}-{uuid.uuid4().hex}")
    return len(keys)


def _quarantine(ws: Workspace, keys, errors, todo_rows: pa.Table, kind: str, model_id: str, run_id: str) -> None:
    """Record samples this model could not embed, with where the image's bytes lie (looked
    up in the job's rows only when something fails)."""
    import pyarrow.compute as pc

    from dataengine.ingest import quarantine_row

    now = datetime.now(timezone.utc)
    failed = todo_rows.filter(pc.is_in(todo_rows["key"], pa.array(list(keys), pa.string())))
    where = {r["key"]: r for r in failed.select(
        ["key", "shard", "shard_uid", "image_field", "image_offset", "image_size"]).to_pylist()}
    rows = []
    for k, e in zip(keys, errors):
        w = where[k]
        loc = ([w["image_field"]], [w["image_offset"]], [w["image_size"]]) if kind == "image" else None
        rows.append(quarantine_row(w["shard"], w["shard_uid"], k, f"embed {kind}: {e}", loc, run_id, now,
                                   stage="embed", model_id=model_id))
        log.warning("quarantined %s: embed %s: %s", k, kind, e)
    lake.write_part(ws.lake, "quarantine", pa.Table.from_pylist(rows, schema=QUARANTINE),
                    part=f"embed-{uuid.uuid4().hex}")


# ---------------------------------------------------------------------------------------
# Reading vectors back
# ---------------------------------------------------------------------------------------


# Pool samples a patch has copied into the training set (their copies are ingested).
PATCHED_POOL_KEYS = ("SELECT json_extract_string(meta, '$.patch.pool_key') FROM samples WHERE split = 'patches' "
                     "AND json_extract_string(meta, '$.patch.pool_key') IS NOT NULL")


def vector_filter(model_id: str, kind: str, splits: Sequence[str] | None = None,
                  sources: Sequence[str] | None = None, without_patched: bool = False) -> tuple[str, list]:
    """The WHERE clause (over embeddings `e` joined with samples `s`) and its parameters that
    pick one model's vectors of one kind, optionally of some splits or sources, optionally
    leaving out the pool samples whose patched copies are training data now."""
    where, params = ["e.model_id = ?", "e.kind = ?"], [model_id, kind]
    if without_patched:
        where.append(f"s.key NOT IN ({PATCHED_POOL_KEYS})")
    if splits:
        where.append(f"s.split IN ({', '.join('?' for _ in splits)})")
        params += list(splits)
    if sources:
        where.append(f"s.source IN ({', '.join('?' for _ in sources)})")
        params += list(sources)
    return " AND ".join(where), params


def load_vectors(catalog: Catalog, model_id: str, kind: str, splits: Sequence[str] | None = None,
                 sources: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """(keys, float32 (N, D) matrix) of one model and kind, optionally of some splits/sources.

    One vector per key (the newest, should a key have been embedded twice), in key order.
    """
    where, params = vector_filter(model_id, kind, splits, sources)
    t = catalog.query(
        "SELECT e.key, e.vector FROM embeddings e JOIN samples s USING (key) "
        f"WHERE {where} "
        "QUALIFY row_number() OVER (PARTITION BY e.key ORDER BY e.created_at DESC) = 1 ORDER BY e.key", params)
    keys = t["key"].to_pylist()
    if not keys:
        return [], np.zeros((0, 0), np.float32)
    vec = t["vector"].combine_chunks()
    d = len(vec[0])
    flat = vec.flatten().to_numpy(zero_copy_only=False)
    if len(flat) != d * len(keys):
        raise ValueError(f"embeddings of {model_id!r} ({kind}) have mixed widths; expected {d}")
    return keys, flat.reshape(len(keys), d).astype(np.float32, copy=False)

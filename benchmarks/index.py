"""Index build, growth and search at scale, under a memory budget, against exact search.

The vectors are `dataengine.index.synthetic_vectors` (rank 64, singular values falling as
i**-0.5, plus isotropic noise: a power-law spectrum like real embeddings'), written to a
raw float32 file a chunk at a time: n base rows, n * grow growth rows, then `queries`
rows that are never indexed. Each phase runs in a fresh process, so its peak RSS
(ru_maxrss: everything resident, libraries included) is its own:

- exact search (faiss brute force, what IndexFlatIP does) over the n and the n + growth
  rows, all in memory: the ground truth and the baseline queries/s;
- the auto-chosen index built over the n rows, streamed from the file in chunks under
  `--budget-mb` (less than the file holds), then saved;
- that index loaded and grown by the growth rows (no retraining), recall re-measured;
- the same index rebuilt from scratch over all n + growth rows, under the same budget.

Prints one table: build seconds (train/add/tune), queries/s for one batch of `queries`
at k (best of 3) and against exact search, recall@k against exact search, peak RSS and the
RSS the process held before the phase's work (interpreter, libraries, the keys).

    python benchmarks/index.py [--n 1000000] [--d 512] [--grow 0.1] [--budget-mb 1800] [--ray]

autofaiss (the comparison, off unless importable) pins numpy<2 and pandas<3, so it is no
project dependency and must not go into .venv; to include it, lay a throwaway venv over
the project's:

    /root/.pyenv/versions/3.11.7/bin/python -m venv /tmp/afvenv   # the interpreter .venv uses
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \\
        > /tmp/afvenv/lib/python3.11/site-packages/project-venv.pth
    /tmp/afvenv/bin/pip install --no-deps autofaiss==2.18.0 embedding-reader==1.8.1 fire==0.6.0 termcolor==3.3.0
    /tmp/afvenv/bin/python benchmarks/index.py
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from dataengine.index import (
    BuiltIndex,
    IndexConfig,
    build_index,
    grow_index,
    recall_at_k,
    synthetic_chunks,
)

SEED_NOTE = "rank 64, power-law spectrum, noise 0.2"


class FileVectors:
    """Rows [start, stop) of a raw float32 file as a VectorSource. Plain reads, not a
    memory map: a map's pages would count as resident and hide what the build holds."""

    def __init__(self, path: str, d: int, start: int, stop: int):
        self.path, self.dim, self.start, self.stop = path, d, start, stop
        self.keys = [f"v{i:08d}" for i in range(start, stop)]

    def chunks(self, rows: int):
        with open(self.path, "rb") as f:
            f.seek(self.start * self.dim * 4)
            for s in range(self.start, self.stop, rows):
                m = min(rows, self.stop - s)
                yield np.fromfile(f, dtype=np.float32, count=m * self.dim).reshape(m, self.dim)


def read_rows(path: str, d: int, start: int, stop: int) -> np.ndarray:
    with open(path, "rb") as f:
        f.seek(start * d * 4)
        return np.fromfile(f, dtype=np.float32, count=(stop - start) * d).reshape(stop - start, d)


def rss_mb() -> float:
    """Resident set size now."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def settled_rss_mb() -> float:
    """RSS once the libraries a phase uses are loaded and BLAS has set up its threads'
    buffers: what the process holds before the work, not because of it."""
    import faiss
    import pyarrow.parquet  # noqa: F401
    import rich.console  # noqa: F401

    x = np.random.default_rng(0).standard_normal((2048, 64), dtype=np.float32)
    faiss.knn(x, x, 4, metric=faiss.METRIC_INNER_PRODUCT)
    return rss_mb()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed_search(search, q: np.ndarray, k: int, repeats: int = 3) -> tuple[np.ndarray, float]:
    """Rows found and the best wall time of `repeats` searches of the whole batch."""
    best, rows = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, rows = search(q, k)
        best = min(best, time.perf_counter() - t0)
    return rows, best


# ---------------------------------------------------------------------------------------
# Phases, each in its own process
# ---------------------------------------------------------------------------------------


def phase_exact(path: str, d: int, n: int, m: int, q: np.ndarray, k: int) -> dict:
    """Ground truth and exact search's queries/s over the n and the n + m rows."""
    import faiss

    before = settled_rss_mb()
    x = read_rows(path, d, 0, n + m)
    out = {"rss_before": before}
    for name, rows in (("base", n), ("all", n + m)):
        # Best of 2, like the indexes' best of 3: one slow run on a shared machine would
        # flatter every "vs exact" figure.
        truth, dt = timed_search(lambda qq, kk: faiss.knn(qq, x[:rows], kk, metric=faiss.METRIC_INNER_PRODUCT),
                                 q, k, repeats=2)
        out[name] = {"truth": truth, "qps": len(q) / dt}
    out["peak"] = peak_rss_mb()
    return out


def phase_build(path: str, d: int, rows: int, q: np.ndarray, k: int, cfg: IndexConfig, use_ray: bool,
                save_to: str | None) -> dict:
    """Build over rows [0, rows) streamed from the file; search; save."""
    source = FileVectors(path, d, 0, rows)
    if use_ray:
        from dataengine.cluster import ensure_ray
        from dataengine.runtime import apply_offline_defaults

        apply_offline_defaults()
        ensure_ray()
    before = settled_rss_mb()
    built = build_index(source, None, "synthetic-lowrank", cfg, use_ray=use_ray, progress=False)
    found, dt = timed_search(built.search, q, k)
    if save_to:
        built.save(save_to)
    return {"meta": built.meta, "found": found, "qps": len(q) / dt, "rss_before": before, "peak": peak_rss_mb()}


def phase_grow(path: str, d: int, start: int, stop: int, q: np.ndarray, k: int, cfg: IndexConfig,
               saved: str) -> dict:
    """Load the saved index and grow it by rows [start, stop)."""
    source = FileVectors(path, d, start, stop)
    before = settled_rss_mb()
    t0 = time.perf_counter()
    built = BuiltIndex.load(saved)
    load_s = time.perf_counter() - t0
    grow_index(built, source, None, cfg, progress=False)
    found, dt = timed_search(built.search, q, k)
    return {"meta": built.meta, "found": found, "qps": len(q) / dt, "load_s": load_s, "rss_before": before,
            "peak": peak_rss_mb()}


def phase_autofaiss(path: str, d: int, n: int, q: np.ndarray, k: int) -> dict:
    """autofaiss's own choice and tuning on the same vectors, in memory."""
    import autofaiss
    import faiss

    x = read_rows(path, d, 0, n)
    threads = faiss.omp_get_max_threads()
    t0 = time.perf_counter()
    index, infos = autofaiss.build_index(embeddings=x, save_on_disk=False, metric_type="ip",
                                         current_memory_available="20G", nb_cores=threads,
                                         verbose=logging.WARNING)
    build = time.perf_counter() - t0
    faiss.omp_set_num_threads(threads)
    found, dt = timed_search(index.search, q, k)
    info = f"{infos.get('index_key')} {infos.get('index_param')}" if infos else "?"
    return {"info": info, "build": build, "found": found, "qps": len(q) / dt, "peak": peak_rss_mb(),
            "version": getattr(autofaiss, "__version__", "")}


def build_parts(meta: dict) -> str:
    """'total (train/add/tune)' seconds of a build."""
    return (f"{meta['build_seconds']:.0f} ({meta['train_seconds']:.0f}/{meta['add_seconds']:.0f}/"
            f"{meta['tune_seconds']:.0f})")


def in_process(fn, *args) -> dict:
    """Run one phase in a fresh (spawned, not forked) process: its peak RSS is its own."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--grow", type=float, default=0.1, help="growth as a share of n")
    ap.add_argument("--budget-mb", type=int, default=1800,
                    help="memory budget of the builds (0: none); 1800 is under the 1M x 512 input's 1953 MB")
    ap.add_argument("--ray", action="store_true", help="add the vectors as Ray tasks")
    ap.add_argument("--no-autofaiss", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n, d, nq, k = args.n, args.d, args.queries, args.k
    m = int(round(n * args.grow))
    cfg = IndexConfig(k=k, memory_budget_mb=args.budget_mb or None)
    load0 = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        path = str(Path(tmp) / "vectors.f32")
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            for z in synthetic_chunks(n + m + nq, d, seed=args.seed):
                f.write(z.tobytes())
        q = read_rows(path, d, n + m, n + m + nq)
        input_mb = n * d * 4 / 2**20
        print(f"{n} + {m} x {d} vectors + {nq} queries ({SEED_NOTE}) written in {time.perf_counter() - t0:.1f}s "
              f"({input_mb:.0f} MB + {m * d * 4 / 2**20:.0f} MB as float32); {os.cpu_count()} cores, "
              f"load average {load0:.2f}", flush=True)

        exact = in_process(phase_exact, path, d, n, m, q, k)
        print(f"exact search done (peak RSS {exact['peak']:.0f} MB)", flush=True)
        saved = str(Path(tmp) / "ix")
        build = in_process(phase_build, path, d, n, q, k, cfg, args.ray, saved)
        print(f"build of {n} done in {build['meta']['build_seconds']:.0f}s", flush=True)
        grow_cfg = cfg
        grow_note = f"budget {args.budget_mb} MB" if args.budget_mb else "no budget"
        try:
            grown = in_process(phase_grow, path, d, n, n + m, q, k, grow_cfg, saved)
        except ValueError as e:  # MemoryBudgetError: growth copies the store of vectors once
            print(f"growth under the budget refused: {e}; growing without one", flush=True)
            grow_cfg, grow_note = IndexConfig(k=k), "no budget (see above)"
            grown = in_process(phase_grow, path, d, n, n + m, q, k, grow_cfg, saved)
        print(f"growth by {m} done in {grown['meta']['history'][-1]['seconds']:.1f}s", flush=True)
        rebuilt = in_process(phase_build, path, d, n + m, q, k, cfg, args.ray, None)
        print(f"rebuild of {n + m} done in {rebuilt['meta']['build_seconds']:.0f}s", flush=True)
        af = None
        if not args.no_autofaiss and importlib.util.find_spec("autofaiss") is not None:
            af = in_process(phase_autofaiss, path, d, n, q, k)

    rows = [("exact search (faiss brute force)", n, "-", exact["base"]["qps"], exact["base"]["qps"], 1.0,
             exact["peak"], exact["rss_before"], "Flat, all vectors in memory"),
            ("exact search (faiss brute force)", n + m, "-", exact["all"]["qps"], exact["all"]["qps"], 1.0,
             exact["peak"], exact["rss_before"], "Flat, all vectors in memory")]
    bm = build["meta"]
    budget = f"budget {args.budget_mb} MB" if args.budget_mb else "no budget"
    how = f"Ray x{bm['ray_workers']}" if bm["ray"] else "1 process"
    rows.append((f"dataengine auto ({how}, {budget})", n,
                 build_parts(bm),
                 build["qps"], exact["base"]["qps"], recall_at_k(build["found"], exact["base"]["truth"]),
                 build["peak"], build["rss_before"], f"{bm['factory']} {bm['params']}"))
    gh = grown["meta"]["history"][-1]
    rows.append((f"  grown by {args.grow:.0%} ({grow_note})", n + m,
                 f"{gh['seconds']:.1f} (add {gh['add_seconds']:.1f}/measure {gh['measure_seconds']:.1f})",
                 grown["qps"], exact["all"]["qps"], recall_at_k(grown["found"], exact["all"]["truth"]),
                 grown["peak"], grown["rss_before"], f"same, {grown['meta']['params']}"))
    rm = rebuilt["meta"]
    rows.append((f"  rebuilt ({budget})", n + m,
                 build_parts(rm),
                 rebuilt["qps"], exact["all"]["qps"], recall_at_k(rebuilt["found"], exact["all"]["truth"]),
                 rebuilt["peak"], rebuilt["rss_before"], f"{rm['factory']} {rm['params']}"))
    if af is not None:
        rows.append((f"autofaiss {af['version']}".strip(), n, f"{af['build']:.0f}", af["qps"], exact["base"]["qps"],
                     recall_at_k(af["found"], exact["base"]["truth"]), af["peak"], float("nan"), af["info"]))

    print(f"\nrecall@{k} and queries/s on {nq} new queries (one batch, best of 3; exact search best of 2) against "
          f"exact search over the same vectors; build s = total (train/add/tune); peak RSS = the phase's whole process (ru_maxrss), "
          f"'before' = its RSS before the work (interpreter, libraries, keys)")
    print(f"{'index':42s} {'vectors':>8s} {'build s':>24s} {'queries/s':>10s} {'vs exact':>9s} "
          f"{f'recall@{k}':>10s} {'peak RSS MB':>12s} {'before':>7s}  factory and search parameters")
    for name, count, secs, qps, base_qps, recall, peak, before, factory in rows:
        print(f"{name:42s} {count:8d} {secs:>24s} {qps:10.0f} {qps / base_qps:8.1f}x {recall:10.3f} "
              f"{peak:12.0f} {before:7.0f}  {factory}")
    plan = bm["memory"]
    print(f"build plan ({budget}): {plan['chunk_rows']} rows a chunk, {plan['train_rows']} training rows, "
          f"index ~{plan['index_mb']:.0f} MB, estimated peak {plan['peak_mb']:.0f} MB; input {input_mb:.0f} MB; "
          f"build's own peak (peak - before) {build['peak'] - build['rss_before']:.0f} MB, "
          f"rebuild's {rebuilt['peak'] - rebuilt['rss_before']:.0f} MB")
    print(f"growth by {m} rows: {gh['seconds']:.1f}s (plus {grown['load_s']:.1f}s to load the saved index) against "
          f"{rm['build_seconds']:.0f}s to rebuild all {n + m}: {rm['build_seconds'] / gh['seconds']:.0f}x faster; "
          f"recall on probes after growth {gh['recall']} (new rows {gh['recall_new_rows']}), "
          f"rebuild proposed: {grown['meta']['rebuild_proposed']}")
    print(f"load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()

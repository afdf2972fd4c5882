"""Index build and search at scale: the auto-chosen index against exact search and autofaiss.

The vectors are `dataengine.index.synthetic_vectors` (rank 64, singular values falling as
i**-0.5, plus isotropic noise: a power-law spectrum like real embeddings'). n + queries rows
are drawn together; the last `queries` rows are the queries and are not indexed. Exact
search (faiss brute force, what IndexFlatIP does) gives the ground truth and the baseline
queries/s in the same run. Prints one table: build seconds (train/add/tune), queries/s for
one batch of `queries` at k (best of 3), recall@k against exact search, index size.

    python benchmarks/index.py [--n 1000000] [--d 512] [--queries 1000] [--k 10] [--ray]

autofaiss (the comparison) pins numpy<2 and pandas<3, so it is no project dependency and
must not go into .venv; to include it, lay a throwaway venv over the project's:

    /root/.pyenv/versions/3.11.7/bin/python -m venv /tmp/afvenv   # the interpreter .venv uses
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \\
        > /tmp/afvenv/lib/python3.11/site-packages/project-venv.pth
    /tmp/afvenv/bin/pip install --no-deps autofaiss==2.18.0 embedding-reader==1.8.1 fire==0.6.0 termcolor==3.3.0
    /tmp/afvenv/bin/python benchmarks/index.py
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from dataengine.index import IndexConfig, build_index, recall_at_k, synthetic_vectors


def timed_search(search, q: np.ndarray, k: int, repeats: int = 3) -> tuple[np.ndarray, float]:
    """Rows found and the best wall time of `repeats` searches of the whole batch."""
    best, rows = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, rows = search(q, k)
        best = min(best, time.perf_counter() - t0)
    return rows, best


def file_mb(write) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        path = Path(tmp) / "index.faiss"
        write(str(path))
        return path.stat().st_size / 1e6


def run_autofaiss(x: np.ndarray, q: np.ndarray, k: int):
    """autofaiss's own choice and tuning on the same vectors, in memory; None if absent."""
    try:
        import autofaiss
    except ImportError:
        return None
    threads = faiss.omp_get_max_threads()
    t0 = time.perf_counter()
    index, infos = autofaiss.build_index(embeddings=x, save_on_disk=False, metric_type="ip",
                                         current_memory_available="20G", nb_cores=threads,
                                         verbose=logging.WARNING)
    build = time.perf_counter() - t0
    faiss.omp_set_num_threads(threads)
    rows, dt = timed_search(index.search, q, k)
    info = f"{infos.get('index_key')} {infos.get('index_param')}" if infos else "?"
    return index, info, build, rows, dt, file_mb(lambda p: faiss.write_index(index, p)), autofaiss


def at_recall(index, q: np.ndarray, truth: np.ndarray, k: int, target: float):
    """autofaiss tunes for latency (10 ms a query), not recall: the least efSearch (HNSW) or
    nprobe (IVF) that reaches `target` on these very queries (which flatters it)."""
    inner = faiss.downcast_index(index)
    knob = "efSearch" if isinstance(inner, faiss.IndexHNSW) else "nprobe"
    ps = faiss.ParameterSpace()
    for value in (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048):
        ps.set_index_parameter(index, knob, value)
        rows, dt = timed_search(index.search, q, k)
        if recall_at_k(rows, truth) >= target:
            return f"{knob}={value}", rows, dt
    return f"{knob}={value}", rows, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--ray", action="store_true", help="add the vectors as Ray tasks")
    ap.add_argument("--no-autofaiss", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n, d, nq, k = args.n, args.d, args.queries, args.k
    load0 = os.getloadavg()[0]

    t0 = time.perf_counter()
    both = synthetic_vectors(n + nq, d, seed=args.seed)
    x, q = both[:n], both[n:]
    print(f"{n} x {d} vectors + {nq} queries (rank 64, power-law spectrum, noise 0.2) "
          f"in {time.perf_counter() - t0:.1f}s; {os.cpu_count()} cores, load average {load0:.2f}", flush=True)

    t0 = time.perf_counter()
    _, truth = faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)
    exact_s = time.perf_counter() - t0
    rows_table = [("exact search (faiss brute force)", "Flat", "-", nq / exact_s, 1.0, n * d * 4 / 1e6)]

    if args.ray:
        from dataengine.cluster import ensure_ray
        from dataengine.runtime import apply_offline_defaults

        apply_offline_defaults()
        ensure_ray()
    keys = [f"v{i:08d}" for i in range(n)]
    built = build_index(x, keys, "synthetic-lowrank", IndexConfig(k=k), use_ray=args.ray, progress=True)
    m = built.meta
    rows, dt = timed_search(built.search, q, k)
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        t_save = time.perf_counter()
        saved = built.save(Path(tmp) / "ix")
        save_s = time.perf_counter() - t_save
        mb = (saved / "index.faiss").stat().st_size / 1e6
    how = f"Ray x{m['ray_workers']}" if m["ray"] else "1 process"
    rows_table.append((
        f"dataengine auto ({how})",
        f"{m['factory']} {m['params']}",
        f"{m['build_seconds']:.0f} ({m['train_seconds']:.0f}/{m['add_seconds']:.0f}/{m['tune_seconds']:.0f})",
        nq / dt, recall_at_k(rows, truth), mb))
    del built

    af_note = "autofaiss: skipped (--no-autofaiss)"
    if not args.no_autofaiss:
        got = run_autofaiss(x, q, k)
        if got is None:
            af_note = "autofaiss: not importable here (see the docstring for the throwaway venv)"
        else:
            index, info, build, af_rows, af_dt, af_mb, mod = got
            version = getattr(mod, "__version__", "")
            rows_table.append((f"autofaiss {version} best".strip(), info, f"{build:.0f}", nq / af_dt,
                               recall_at_k(af_rows, truth), af_mb))
            setting, af_rows, af_dt = at_recall(index, q, truth, k, IndexConfig().target_recall)
            rows_table.append((f"  same, set to recall {IndexConfig().target_recall}", f"{setting} (on these queries)",
                               "-", nq / af_dt, recall_at_k(af_rows, truth), af_mb))
            del index
            af_note = "autofaiss: build_index(embeddings=array, metric_type='ip'), its defaults otherwise"

    base_qps = rows_table[0][3]
    print(f"\nrecall@{k} and queries/s on {nq} new queries (one batch, best of 3), against exact search; "
          f"build s = total (train/add/tune); recall at build (held-out rows): {m['recall_at_k']}; "
          f"saved in {save_s:.1f}s")
    print(f"{'index':36s} {'build s':>16s} {'queries/s':>10s} {'vs exact':>9s} {f'recall@{k}':>10s} "
          f"{'index MB':>9s}  factory and search parameters")
    for name, factory, build, qps, recall, size in rows_table:
        print(f"{name:36s} {build:>16s} {qps:10.0f} {qps / base_qps:8.1f}x {recall:10.3f} {size:9.0f}  {factory}")
    print(f"{af_note}; load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()

"""The dashboard's queries at scale: N triaged failures (default 10M) written to a
workspace's lake as intake and triage write them, then each query the Queue page runs,
timed (median of 3 after a warm-up) beside a full scan of the triage table in the same
process (the ratio is what to compare across machines).

    .venv/bin/python benchmarks/dashboard.py --n 10000000 --workdir /tmp/dash
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataengine.runtime import apply_offline_defaults  # noqa: E402

apply_offline_defaults()

import duckdb  # noqa: E402

from dataengine.accounts import add_user  # noqa: E402
from dataengine.catalog import Catalog  # noqa: E402
from dataengine.review import QueueFilter, Verdict, claim, item, queue_page, submit  # noqa: E402
from dataengine.review_queue import refresh_queue  # noqa: E402
from dataengine.workspace import Workspace  # noqa: E402


def build(ws: Workspace, n: int, parts: int = 8) -> None:
    """N feedback rows and their triage rows as Parquet parts (DuckDB writes them)."""
    Catalog(ws).migrate()
    con = duckdb.connect()
    step = -(-n // parts)
    for p in range(parts):
        lo, hi = p * step, min(n, (p + 1) * step)
        fb = ws.lake / "feedback" / f"bench{p:02d}.parquet"
        tr = ws.lake / "triage" / f"bench{p:02d}.parquet"
        con.execute(f"""COPY (SELECT printf('fb-%09d', i) AS feedback_id,
                TIMESTAMPTZ '2026-12-06 00:00:00+00' - to_seconds((i * 7919) % (90 * 86400)) AS time,
                'a ' || (['red','blue','green','pale','dark'])[i % 5 + 1] || ' ' ||
                    (['star','cube','heart','ring','moon','tree'])[i % 6 + 1] || ' number ' || i AS prompt,
                NULL::VARCHAR AS enhanced_prompt, 'dit/v0001' AS model_version, '/x.png' AS image_ref,
                'gen' AS task, NULL::VARCHAR AS source_image_ref, NULL::VARCHAR AS instruction,
                '{{"fidelity": 0.4}}' AS scores, (1 + i % 2)::TINYINT AS rating, NULL::VARCHAR AS comment,
                NULL::VARCHAR AS extra, 'bench' AS origin, 'bench' AS ingest_id,
                TIMESTAMPTZ '2026-12-06 00:00:00+00' AS received_at
            FROM range({lo}, {hi}) t(i)) TO '{fb}' (FORMAT parquet, COMPRESSION zstd)""")
        con.execute(f"""COPY (SELECT printf('fb-%09d', i) AS feedback_id,
                (['rl','knowledge','prompt'])[i % 3 + 1] AS cause, ((i * 31) % 1000) / 1000.0 AS confidence,
                '{{"text": "bench"}}' AS evidence, 'rules/v1' AS triager,
                TIMESTAMPTZ '2026-12-06 00:00:00+00' AS triaged_at
            FROM range({lo}, {hi}) t(i)) TO '{tr}' (FORMAT parquet, COMPRESSION zstd)""")


def timed(fn, repeats: int = 3) -> float:
    fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--workdir", default="/tmp/dataengine-dashboard-bench")
    args = ap.parse_args()
    ws = Workspace.at(Path(args.workdir) / f"ws-{args.n}")
    cat = Catalog(ws)
    if not (ws.lake / "triage" / "bench00.parquet").exists():
        t0 = time.perf_counter()
        build(ws, args.n)
        print(f"wrote {args.n:,} failures to the lake in {time.perf_counter() - t0:.0f} s")
        t0 = time.perf_counter()
        refresh_queue(cat)
        print(f"filled the queue table from the lake in {time.perf_counter() - t0:.1f} s (once; triage then "
              "refreshes only what it wrote)")
    cat.migrate()
    if not cat.query("SELECT 1 FROM users WHERE username = 'bench'").num_rows:
        add_user(cat, "bench", "correct horse battery", "curator")

    base = timed(lambda: cat.query("SELECT count(*), avg(confidence) FROM triage"))
    cases = {
        "first page, sorted by confidence": lambda: queue_page(cat, QueueFilter(), "confidence"),
        "one cause, confidence >= 0.8": lambda: queue_page(cat, QueueFilter(("rl",), 0.8), "confidence"),
        "text search 'green moon'": lambda: queue_page(cat, QueueFilter(text="green moon"), "age"),
        "last 7 days, page 1000": lambda: queue_page(cat, QueueFilter(max_age_days=7), "age", offset=50_000),
        "one item": lambda: item(cat, "fb-000123456"),
    }
    print(f"{args.n:,} failures; baseline: full scan of triage {base * 1e3:.0f} ms")
    print(f"{'query':<36} {'ms':>8} {'x scan':>7}")
    for name, fn in cases.items():
        t = timed(fn)
        print(f"{name:<36} {t * 1e3:8.0f} {t / base:7.2f}")
    rows, _ = queue_page(cat, QueueFilter(), "confidence", limit=1)
    fid = rows[0]["feedback_id"]
    t0 = time.perf_counter()
    claim(cat, fid, "bench")
    submit(cat, Verdict(fid, "accept"), "bench")
    print(f"{'claim + verdict':<36} {(time.perf_counter() - t0) * 1e3:8.0f}")


if __name__ == "__main__":
    main()

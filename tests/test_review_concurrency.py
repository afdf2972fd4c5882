"""Several curators, each in their own process, claim and review the same queue while the
triage flow keeps adding to it: every failure is reviewed exactly once and nothing is lost."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest

from conftest import image_bytes

ROUNDS, PER_ROUND, CURATORS = 3, 15, 3


def writer(root: str, folder: str) -> None:
    """Feedback arrives in rounds; the triage flow bins each round into the queue."""
    from connectors.feedback import ingest_files
    from dataengine.workspace import Workspace
    from flows.loop import triage_flow

    ws = Workspace.at(root)
    for r in range(ROUNDS):
        path = Path(folder) / f"round-{r}.jsonl"
        path.write_text("".join(json.dumps({
            "id": f"fb-{r}-{i}", "time": "2026-12-06T10:00:00Z", "prompt": f"a red star number {i} of round {r}",
            "enhanced_prompt": None, "model_version": "dit/v0001", "image": "out.png", "task": "gen",
            "scores": {"fidelity": 0.5}, "rating": 1}) + "\n" for i in range(PER_ROUND)))
        ingest_files(ws, [path])
        triage_flow(root)
        time.sleep(0.5)
    (Path(folder) / "writer-done").touch()


def curator(root: str, folder: str, name: str, out: str) -> None:
    """Take the first open item nobody holds, claim it, decide it (sending the verdict twice,
    as a double click would), until the writer is done and nothing is open."""
    from dataengine.catalog import Catalog
    from dataengine.review import ClaimTaken, QueueFilter, ReviewError, Verdict, claim, queue_page, submit
    from dataengine.workspace import Workspace

    cat = Catalog(Workspace.at(root))
    applied, conflicts = [], 0
    while True:
        rows, total = queue_page(cat, QueueFilter(state="open"), sort="triaged", descending=False, limit=10)
        free = [r for r in rows if r["claimed_by"] is None]
        if not total and (Path(folder) / "writer-done").exists():
            break
        if not free:
            time.sleep(0.05)
            continue
        fid = free[0]["feedback_id"]
        try:
            claim(cat, fid, name)
        except ClaimTaken:
            conflicts += 1
            continue
        except ReviewError:  # reviewed between the page and the claim
            conflicts += 1
            continue
        v = Verdict(fid, "reassign", cause="knowledge", note=f"by {name}")
        row, first = submit(cat, v, name)
        _, second = submit(cat, v, name)
        assert first and not second
        applied.append(fid)
    Path(out).write_text(json.dumps({"applied": applied, "conflicts": conflicts}))


@pytest.mark.slow
def test_curators_in_separate_processes_review_each_failure_once_while_triage_writes(ws, tmp_path):
    from dataengine.accounts import add_user
    from dataengine.catalog import Catalog

    cat = Catalog(ws)
    names = [f"curator{i}" for i in range(CURATORS)]
    for n in names:
        add_user(cat, n, "correct horse battery", "curator")
    (tmp_path / "out.png").write_bytes(image_bytes())
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=writer, args=(str(ws.root), str(tmp_path)))]
    procs += [ctx.Process(target=curator, args=(str(ws.root), str(tmp_path), n, str(tmp_path / f"{n}.json")))
              for n in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]

    results = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in names}
    applied = [f for r in results.values() for f in r["applied"]]
    expected = {f"fb-{r}-{i}" for r in range(ROUNDS) for i in range(PER_ROUND)}
    assert sorted(applied) == sorted(expected)  # each once, none lost
    rows = cat.query("SELECT feedback_id, curator, verdict FROM reviews").to_pylist()
    assert len(rows) == len(expected) and {r["feedback_id"] for r in rows} == expected
    by = {r["feedback_id"]: r["curator"] for r in rows}
    for n, r in results.items():  # the curator who applied it is the one on record
        assert all(by[f] == n for f in r["applied"])
    assert sum(len(r["applied"]) > 0 for r in results.values()) >= 2  # the work was shared
    assert cat.query("SELECT count(*) FROM claims").column(0)[0].as_py() == 0

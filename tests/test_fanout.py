"""Fan-out through one flow: 10,000 captions degraded as Ray tasks while a worker process is
killed mid-chunk; every unit is committed exactly once and nothing is lost."""

from __future__ import annotations

import json
from collections import Counter
import os
import random
import signal
import sys
from pathlib import Path

import pytest

from dataengine.catalog import Catalog
from dataengine.fanout import BadUnit, fan_out, run_chunk
from flows.units import JsonlUnits

pytestmark = pytest.mark.slow


class DegradeAndLog:
    """The unit of work: one caption's degradation chain. Each run appends the unit's id to a
    log (O_APPEND: whole lines from any process), so a test can count how often work ran;
    the unit named `kill_at` SIGKILLs its own worker the first time it runs."""

    def __init__(self, log: Path, kill_at: str | None = None):
        self.log, self.kill_at = str(log), kill_at

    def __call__(self, payload: dict) -> dict:
        from dataengine.degrade.chains import degrade_chain

        uid, caption = payload["id"], payload["caption"]
        if not caption.strip():
            raise ValueError("empty caption")
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{uid}\n".encode())
        finally:
            os.close(fd)
        marker = Path(self.log + ".killed")
        if uid == self.kill_at and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)  # the worker dies mid-chunk
        chain = degrade_chain(caption)
        return {"steps": len(chain), "terse": chain[-1].less if chain else caption}


# Ray workers cannot import this test module: ship the class by value.
ray_pickle = pytest.importorskip("ray.cloudpickle")
ray_pickle.register_pickle_by_value(sys.modules[__name__])


def _captions(n: int) -> list[tuple[str, dict]]:
    from dataengine.sceneworld import caption_for, sample_scene

    rng = random.Random(0)
    base = [caption_for(sample_scene(rng, 64, 64), rng, detail="rich") for _ in range(200)]
    return [(f"c{i:05d}", {"id": f"c{i:05d}", "caption": base[i % len(base)]}) for i in range(n)]


def _jsonl(path: Path, units: list[tuple[str, dict]], extra: str = "") -> JsonlUnits:
    path.write_text("".join(json.dumps(p) + "\n" for _, p in units) + extra)
    return JsonlUnits(str(path))


def test_run_chunk_quarantines_a_bad_unit_and_keeps_the_rest(tmp_path):
    fn = DegradeAndLog(tmp_path / "log")
    out = run_chunk(fn, [("a", {"id": "a", "caption": "A red square on a blue mat."}),
                         ("b", {"id": "b", "caption": "  "}), ("f:3", BadUnit("f:3: not JSON"))])
    assert out[0][0] == "a" and out[0][2] is None and out[0][1]["steps"] >= 1
    assert out[1:] == [("b", None, "ValueError: empty caption"), ("f:3", None, "f:3: not JSON")]
    assert (tmp_path / "log").read_text().split() == ["a"]  # "b" raised first; the unreadable unit never ran


def test_jsonl_units_name_each_unreadable_line(tmp_path):
    src = _jsonl(tmp_path / "u.jsonl", _captions(2), extra='{"id": 7}\nnot json\n\n["x"]\n')
    got = list(src())
    assert [u for u, _ in got[:2]] == ["c00000", "c00001"] and got[0][1]["caption"]
    assert [(u, p.reason.split(": ", 1)[1]) for u, p in got[2:]] == [
        ("u.jsonl:3", "no string 'id' field"), ("u.jsonl:4", "not JSON (Expecting value)"),
        ("u.jsonl:6", "no string 'id' field")]


def test_ten_thousand_units_through_one_flow_survive_a_killed_worker(tmp_path, ws):
    from flows.units import units_flow

    units = _captions(10_000)
    units[123] = ("c00123", {"id": "c00123", "caption": ""})  # a bad input: quarantined, not retried
    src = _jsonl(tmp_path / "captions.jsonl", units)
    log = tmp_path / "runs.log"
    report = units_flow(str(ws.root), "degrade", DegradeAndLog(log, kill_at="c05020"), src, chunk_size=50,
                        max_in_flight=8)
    assert (tmp_path / "runs.log.killed").exists()  # a worker really died mid-run
    ran = Counter(log.read_text().split())
    # The killed chunk (c05000-c05049) ran again, its first 21 units twice; the empty caption
    # raised before logging. Yet each unit is committed once.
    assert set(ran) == {u for u, _ in units} - {"c00123"}
    assert sorted(u for u, n in ran.items() if n > 1) == [f"c{i:05d}" for i in range(5000, 5021)]
    rows = Catalog(ws).query("SELECT unit, status, result FROM stage_units WHERE stage = 'degrade'").to_pylist()
    assert len(rows) == 10_000 and len({r["unit"] for r in rows}) == 10_000
    assert report["committed"] == 10_000 and report["quarantined"] == 1
    bad = next(r for r in rows if r["unit"] == "c00123")
    assert bad["status"] == "quarantined" and "empty caption" in json.loads(bad["result"])["error"]
    good = next(r for r in rows if r["unit"] == "c05000")
    assert good["status"] == "done" and json.loads(good["result"])["steps"] >= 1
    assert next(r for r in rows if r["unit"] == "c05020")["status"] == "done"

    # Run again: everything is done, nothing runs, nothing is written twice.
    before = len(log.read_text().split())
    again = units_flow(str(ws.root), "degrade", DegradeAndLog(log), src, chunk_size=50)
    assert again["skipped"] == 10_000 and again["committed"] == 0
    assert len(log.read_text().split()) == before


def test_a_chunk_that_fails_past_rays_retries_is_redone_by_the_task_retry(tmp_path, ws):
    from flows.units import units_flow

    units = _captions(600)
    log = tmp_path / "runs.log"
    # No Ray retries: the killed chunk fails; the Prefect task's retry redoes only it.
    report = units_flow(str(ws.root), "degrade", DegradeAndLog(log, kill_at="c00300"),
                        _jsonl(tmp_path / "captions.jsonl", units), chunk_size=20, max_retries=0)
    assert report["skipped"] >= 580 - 20 and report["committed"] <= 40  # the retry's own report
    rows = Catalog(ws).query("SELECT unit FROM stage_units WHERE stage = 'degrade'").column("unit").to_pylist()
    assert sorted(rows) == sorted(u for u, _ in units)


def test_fan_out_reports_what_it_could_not_finish(tmp_path):
    from dataengine.cluster import ensure_ray

    ensure_ray(num_cpus=2)
    units = _captions(200)
    got: list = []
    report = fan_out(DegradeAndLog(tmp_path / "log", kill_at="c00050"), units, got.extend, chunk_size=25,
                     max_retries=0)
    lost = {u for u, _ in units[50:75]}  # the killed chunk
    assert set(report.unfinished) == lost and not report.complete and "Error" in report.errors[0]
    assert {r[0] for r in got} == {u for u, _ in units} - lost
    # Run again with what was committed as done: only the lost chunk runs.
    more: list = []
    second = fan_out(DegradeAndLog(tmp_path / "log"), units, more.extend, done={r[0] for r in got}, chunk_size=25)
    assert second.complete and {r[0] for r in more} == lost and second.skipped == 175


RUN_STAGE = r'''
import sys, time
from flows.units import JsonlUnits, units_flow

DELAY = float(sys.argv[3])  # read here: a Ray worker's sys.argv is its own

def degrade(rec):
    from dataengine.degrade.chains import degrade_chain
    time.sleep(DELAY)
    chain = degrade_chain(rec["caption"])
    return {"steps": len(chain), "terse": chain[-1].less if chain else rec["caption"]}

units_flow(sys.argv[1], "degrade", degrade, JsonlUnits(sys.argv[2]), chunk_size=20, max_in_flight=4)
'''


def _run_stage(script: Path, root: Path, units: Path, delay: float, **kw):
    import subprocess

    return subprocess.Popen([sys.executable, str(script), str(root), str(units), str(delay)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def test_a_flow_killed_mid_stage_and_started_again_ends_with_the_rows_of_a_clean_run(tmp_path):
    import time

    from dataengine.workspace import Workspace

    script = tmp_path / "run.py"
    script.write_text(RUN_STAGE)
    units = Path(_jsonl(tmp_path / "captions.jsonl", _captions(1000)).path)
    clean, killed = Workspace.at(tmp_path / "clean"), Workspace.at(tmp_path / "killed")
    for w in (clean, killed):
        Catalog(w).migrate()

    def rows(w) -> list[tuple]:
        return sorted(tuple(r.values()) for r in Catalog(w).query(
            "SELECT unit, status, result FROM stage_units WHERE stage = 'degrade'").to_pylist())

    # The clean run, here (the same unit of work as the script's, logged aside).
    from flows.units import units_flow

    units_flow(str(clean.root), "degrade", DegradeAndLog(tmp_path / "clean.log"), JsonlUnits(str(units)),
               chunk_size=20, max_in_flight=4)
    proc = _run_stage(script, killed.root, units, 0.01)  # 10 ms a unit: about 5 s in all on 2 workers
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if len(rows(killed)) >= 200:
            break
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray and its Prefect server, mid-stage
    proc.wait(timeout=30)
    partial = rows(killed)
    assert 200 <= len(partial) < 1000
    again = _run_stage(script, killed.root, units, 0.0)
    assert again.wait(timeout=300) == 0, again.stderr.read()[-3000:]
    assert rows(killed) == rows(clean) and len(rows(clean)) == 1000

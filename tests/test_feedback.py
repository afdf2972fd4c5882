"""Feedback intake: the record contract, per-record errors, quarantine, one row per id,
and the three ways in (files, a watched folder, HTTP on loopback)."""

from __future__ import annotations

import base64
import json
import random
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from connectors.feedback import (FolderWatcher, NonLoopbackBind, check_bind, ingest_files, make_server,
                                 serve_in_thread)
from dataengine.catalog import Catalog
from cli.app import app
from dataengine.feedback import RawRecord, store

from conftest import image_bytes


def record(i: int, **over) -> dict:
    r = {"id": f"fb-{i}", "time": "2026-12-01T10:00:00Z", "prompt": f"a red star number {i}",
         "enhanced_prompt": None, "model_version": "dit/v0001", "image": "out.png", "task": "gen",
         "source_image": None, "instruction": None, "scores": {"fidelity": 0.5}, "rating": 2, "comment": None}
    return r | over


def write_jsonl(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "drop"
    d.mkdir()
    (d / "out.png").write_bytes(image_bytes())
    return d


def lake_rows(ws, table: str) -> list[dict]:
    return Catalog(ws).query(f"SELECT * FROM {table}").to_pylist()


def test_good_records_are_stored_with_paths_resolved_against_the_files_folder(ws, folder):
    b64 = base64.b64encode(image_bytes(colour=(0, 0, 255))).decode()
    write_jsonl(folder / "a.jsonl", [
        record(1),
        record(2, task="edit", image=None, image_b64=b64, source_image="out.png", instruction="make it blue",
               time="2026-12-01T11:00:00+01:00", scores=None, rating=None, tool="other-writer"),
    ])
    rep = ingest_files(ws, [folder / "a.jsonl"])
    assert (rep.received, rep.accepted, rep.quarantined) == (2, 2, 0)
    rows = {r["feedback_id"]: r for r in lake_rows(ws, "feedback")}
    assert rows["fb-1"]["image_ref"] == str((folder / "out.png").resolve())
    assert json.loads(rows["fb-1"]["scores"]) == {"fidelity": 0.5} and rows["fb-1"]["rating"] == 2
    edit = rows["fb-2"]
    assert edit["task"] == "edit" and edit["instruction"] == "make it blue" and edit["rating"] is None
    assert edit["time"].hour == 10  # +01:00 stored as UTC
    saved = edit["image_ref"]
    assert saved.startswith(str(ws.root)) and open(saved, "rb").read() == base64.b64decode(b64)
    assert json.loads(edit["extra"]) == {"tool": "other-writer"}  # kept, not dropped
    assert edit["origin"].endswith("a.jsonl:2")


BAD = [  # (record or raw line, the field its error must name)
    ("{not json", "not JSON"),
    ('["a list"]', "JSON object"),
    (record(10, id=""), "id"),
    (record(11, id=None), "id"),
    (record(12, time="yesterday"), "time"),
    (record(13, prompt=""), "prompt"),
    (record(14, prompt=7), "prompt"),
    (record(15, model_version=None), "model_version"),
    (record(16, task="video"), "task"),
    (record(17, image="missing.png"), "image"),
    (record(18, image_b64=base64.b64encode(b"nope").decode()), "image"),  # both given
    (record(19, image=None, image_b64="%%%"), "image_b64"),
    (record(20, image=None, image_b64=base64.b64encode(b"not an image").decode()), "image_b64"),
    (record(21, task="edit"), "source_image"),
    (record(22, scores={"fidelity": "high"}), "scores"),
    (record(23, scores={"fidelity": float("nan")}), "scores"),
    (record(24, rating=7), "rating"),
    (record(25, rating=2.5), "rating"),
    (record(26, rating=True), "rating"),
]


def test_each_bad_record_is_quarantined_with_its_line_and_field_and_nothing_is_lost(ws, folder):
    lines = [record(1)] + [b for b, _ in BAD] + [record(2)]
    write_jsonl(folder / "mixed.jsonl", lines)
    rep = ingest_files(ws, [folder / "mixed.jsonl"])
    assert (rep.accepted, rep.quarantined) == (2, len(BAD)) and rep.balanced
    for (bad, field), err, line in zip(BAD, rep.errors, range(2, 2 + len(BAD))):
        assert f"mixed.jsonl:{line}" in err and field in err, err
    q = [r for r in lake_rows(ws, "quarantine") if r["stage"] == "feedback"]
    assert len(q) == len(BAD)
    raw = {r["raw"] for r in q}
    assert "{not json" in raw and all(json.dumps(b) in raw for b, _ in BAD if isinstance(b, dict))


def test_the_same_id_is_stored_once_within_a_file_across_files_and_over_http(ws, folder):
    write_jsonl(folder / "a.jsonl", [record(1), record(1, prompt="changed"), record(2)])
    write_jsonl(folder / "b.jsonl", [record(2), record(3)])
    a = ingest_files(ws, [folder / "a.jsonl"])
    b = ingest_files(ws, [folder / "b.jsonl", folder / "a.jsonl"])
    assert (a.accepted, a.duplicates) == (2, 1)
    assert (b.accepted, b.duplicates) == (1, 4)
    rows = lake_rows(ws, "feedback")
    assert sorted(r["feedback_id"] for r in rows) == ["fb-1", "fb-2", "fb-3"]
    assert next(r for r in rows if r["feedback_id"] == "fb-1")["prompt"] == "a red star number 1"  # the first kept


def test_fuzzed_records_never_raise_and_always_balance(ws, folder):
    rng = random.Random(0)
    junk = [None, "", 0, -1, 3.5, True, [], {}, "x" * 30, {"a": 1}, "2026-13-45", "out.png", "../../etc/passwd"]
    lines = []
    for i in range(300):
        r = record(i % 120)  # ids repeat
        for _ in range(rng.randint(0, 3)):
            k = rng.choice(list(r) + ["new_field"])
            if rng.random() < 0.2:
                r.pop(k, None)
            else:
                r[k] = rng.choice(junk)
        text = json.dumps(r)
        if rng.random() < 0.1:
            text = text[: rng.randrange(len(text))]  # truncated line
        lines.append(text)
    write_jsonl(folder / "fuzz.jsonl", lines)
    rep = ingest_files(ws, [folder / "fuzz.jsonl"])
    assert rep.received == 300 and rep.balanced and rep.quarantined == len(rep.errors)
    stored = lake_rows(ws, "feedback")
    assert len(stored) == rep.accepted == len({r["feedback_id"] for r in stored})
    assert len([r for r in lake_rows(ws, "quarantine") if r["stage"] == "feedback"]) == rep.quarantined


def test_parquet_files_are_read_like_jsonl(ws, folder):
    rows = [record(1), record(2, rating=9)]
    for r in rows:
        r["scores"] = json.dumps(r["scores"])  # a column of mixed dicts is awkward in Parquet
    pq.write_table(pa.Table.from_pylist(rows), folder / "f.parquet")
    rep = ingest_files(ws, [folder / "f.parquet"])
    # A scores column of JSON text is not an object: the contract says object.
    assert rep.accepted == 0 and rep.quarantined == 2 and "f.parquet#2" in rep.errors[1]
    rows = [record(3), record(4, rating=9)]
    pq.write_table(pa.Table.from_pylist(rows), folder / "g.parquet")
    rep = ingest_files(ws, [folder / "g.parquet"])
    assert (rep.accepted, rep.quarantined) == (1, 1) and "rating" in rep.errors[0]


def test_the_endpoint_refuses_non_loopback_binds_unless_asked():
    for host in ("0.0.0.0", "192.168.1.5", "example.com"):
        with pytest.raises(NonLoopbackBind, match="allow-remote"):
            check_bind(host, allow_remote=False)
        check_bind(host, allow_remote=True)
    for host in ("127.0.0.1", "::1", "localhost"):
        check_bind(host, allow_remote=False)


def test_http_endpoint_stores_a_record_an_array_and_json_lines(ws, folder):
    server = make_server(ws, "127.0.0.1", 0, base=folder)
    serve_in_thread(server)
    url = f"http://127.0.0.1:{server.server_address[1]}/feedback"

    def post(body: bytes) -> dict:
        req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    try:
        assert post(json.dumps(record(1)).encode())["accepted"] == 1
        r = post(json.dumps([record(1), record(2), record(3, rating=0)]).encode())
        assert (r["accepted"], r["duplicates"], r["quarantined"]) == (1, 1, 1) and "http#3" in r["errors"][0]
        r = post(("\n".join(json.dumps(x) for x in [record(4), record(5)]) + "\n{bad").encode())
        assert (r["accepted"], r["quarantined"]) == (2, 1)
    finally:
        server.shutdown()
        server.server_close()
    assert len(lake_rows(ws, "feedback")) == 4


def test_a_watched_folder_takes_a_file_once_it_stops_growing_and_only_once(ws, folder):
    w = FolderWatcher(ws, folder)
    write_jsonl(folder / "batch.jsonl", [record(1)])
    assert w.poll().received == 0  # first sight: it may still be growing
    with open(folder / "batch.jsonl", "a") as f:
        f.write(json.dumps(record(2)) + "\n")
    assert w.poll().received == 0  # it grew
    assert w.poll().accepted == 2
    assert w.poll().received == 0
    assert FolderWatcher(ws, folder).poll().received == 0  # a restarted watcher remembers


def test_cli_ingest_prints_counts_and_names_bad_lines(tmp_path, folder):
    write_jsonl(folder / "a.jsonl", [record(1), record(2, rating=0), record(1)])
    r = CliRunner().invoke(app, ["feedback", "ingest", str(folder / "a.jsonl"), "-w", str(tmp_path / "ws")])
    assert r.exit_code == 0, r.output
    assert "stored 1, duplicates 1, quarantined 1" in r.output and "a.jsonl:2" in r.output
    r = CliRunner().invoke(app, ["feedback", "ingest", str(folder / "nope.jsonl"), "-w", str(tmp_path / "ws")])
    assert r.exit_code == 2 and "no such feedback file" in r.output


def test_store_takes_records_from_any_source(ws):
    rep = store(ws, [RawRecord("api#1", "{}", {}), RawRecord("api#2", "x", parse_error="bad")])
    assert rep.quarantined == 2 and rep.balanced


def test_cli_serve_refuses_a_non_loopback_host_without_binding(tmp_path):
    r = CliRunner().invoke(app, ["feedback", "serve", "-w", str(tmp_path / "ws"), "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "not a loopback address" in r.output


def test_cli_triage_remedies_and_triggers_run_on_ingested_feedback(tmp_path, folder):
    ws = str(tmp_path / "ws")
    write_jsonl(folder / "a.jsonl", [record(1, enhanced_prompt="a big blue star number 1", rating=1),
                                     record(2, enhanced_prompt="a red star number 2 at dusk", rating=2)])
    run = CliRunner()
    assert run.invoke(app, ["feedback", "ingest", str(folder / "a.jsonl"), "-w", ws]).exit_code == 0
    r = run.invoke(app, ["triage", "-w", ws, "--no-score"])
    assert r.exit_code == 0 and "triaged 2 failures with rules/v1: rl 1, knowledge 0, prompt 1" in r.output, r.output
    assert "replaces 'red' with 'blue'" in r.output
    r = run.invoke(app, ["remedies", "-w", ws, "--auto-approve"])
    assert r.exit_code == 0 and "prompt 1 (1 failures)" in r.output and "auto-approved 2" in r.output, r.output
    r = run.invoke(app, ["triggers", "-w", ws, "--dry-run"])
    assert r.exit_code == 0 and r.output.count("waits") == 3 and "1/20 approved" in r.output, r.output

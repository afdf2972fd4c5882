"""Where feedback records come from: files (JSONL or Parquet), a watched folder, and an
HTTP endpoint on the loopback interface. All three hand `RawRecord`s to
`dataengine.feedback.store`, so a record means the same whichever way it arrives.
"""

from __future__ import annotations

import json
import math
import threading
from datetime import date, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow.parquet as pq

from dataengine.feedback import IntakeReport, RawRecord, feedback_dir, store
from dataengine.workspace import Workspace

SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
BATCH = 5000  # records per stored part: big files become a few parts, not one per record


def _plain(v: Any) -> Any:
    """A Parquet cell as JSON would have it (timestamps as ISO text, NaN as null)."""
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def read_records(path: str | Path) -> Iterator[RawRecord]:
    """Every record of one file, parsed or not (a line that is not JSON is still a record)."""
    path = Path(path)
    base = path.resolve().parent
    if path.suffix == ".parquet":
        pf = pq.ParquetFile(path)
        row = 0
        for batch in pf.iter_batches(batch_size=BATCH):
            for obj in batch.to_pylist():
                row += 1
                obj = {k: _plain(v) for k, v in obj.items()}
                yield RawRecord(f"{path}#{row}", json.dumps(obj, default=str), obj, base=base)
        return
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: feedback files are {', '.join(SUFFIXES)}")
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            try:
                text = line.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                yield RawRecord(f"{path}:{n}", line.decode("utf-8", "replace"), parse_error=f"not UTF-8: {e}", base=base)
                continue
            if text:  # blank lines separate nothing and carry nothing
                yield _line_record(f"{path}:{n}", text, base)


def _line_record(origin: str, text: str, base: Path | None) -> RawRecord:
    """One JSON line as a record, parsed or with why it would not parse."""
    try:
        return RawRecord(origin, text, json.loads(text), base=base)
    except json.JSONDecodeError as e:
        return RawRecord(origin, text, parse_error=str(e), base=base)


def _batched(records: Iterator[RawRecord]) -> Iterator[list[RawRecord]]:
    batch: list[RawRecord] = []
    for r in records:
        batch.append(r)
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def ingest_files(ws: Workspace, paths: list[str | Path],
                 on_batch: Callable[[IntakeReport], None] | None = None) -> IntakeReport:
    """Store every record of `paths`; a missing or unreadable file raises before anything is stored."""
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"no such feedback file: {p}")
    total = IntakeReport()
    for p in paths:
        for batch in _batched(read_records(p)):
            r = store(ws, batch)
            total.merge(r)
            if on_batch:
                on_batch(r)
    return total


# ---------------------------------------------------------------------------------------
# A watched folder
# ---------------------------------------------------------------------------------------


class FolderWatcher:
    """Ingests each feedback file that appears in a folder, once it has stopped growing.

    A file is taken when its size and mtime are the same on two polls in a row (a writer
    still appending is left alone); what was taken is remembered in the workspace, by
    name, size and mtime, so a restarted watcher does not re-read it (and if it did,
    records are stored once per id anyway).
    """

    def __init__(self, ws: Workspace, folder: str | Path):
        self.ws, self.folder = ws, Path(folder)
        if not self.folder.is_dir():
            raise NotADirectoryError(f"not a folder: {self.folder}")
        self.state_path = feedback_dir(ws) / "watched.json"
        self.done: dict[str, list] = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self._last: dict[str, tuple] = {}

    def poll(self) -> IntakeReport:
        """One look at the folder: ingest the files that are complete and new."""
        total = IntakeReport()
        for p in sorted(self.folder.iterdir()):
            if p.suffix not in SUFFIXES or not p.is_file() or p.name.startswith("."):
                continue
            st = p.stat()
            sig = [st.st_size, st.st_mtime_ns]
            key = str(p.resolve())
            if self.done.get(key) == sig:
                continue
            if self._last.get(key) != tuple(sig):
                self._last[key] = tuple(sig)  # first sight, or still growing: wait a poll
                continue
            total.merge(ingest_files(self.ws, [p]))
            self.done[key] = sig
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.done, indent=1))
            tmp.replace(self.state_path)
        return total

    def run(self, interval_s: float = 2.0, stop: threading.Event | None = None,
            on_report: Callable[[IntakeReport], None] | None = None) -> None:
        stop = stop or threading.Event()
        while not stop.is_set():
            r = self.poll()
            if r.received and on_report:
                on_report(r)
            stop.wait(interval_s)


# ---------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------

MAX_BODY = 64 * 1024 * 1024


class NonLoopbackBind(ValueError):
    pass


def check_bind(host: str, allow_remote: bool) -> None:
    """Feedback carries users' prompts and images: serve on loopback unless told otherwise."""
    if allow_remote:
        return
    try:
        loopback = ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise NonLoopbackBind(f"refusing to serve feedback on {host!r}: it is not a loopback address "
                              "(pass --allow-remote to expose it to the network)")


def _records_of_body(body: bytes, base: Path | None) -> list[RawRecord]:
    """A JSON object, a JSON array of objects, or JSON lines."""
    text = body.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
        objs = obj if isinstance(obj, list) else [obj]
        return [RawRecord(f"http#{i + 1}", json.dumps(o, default=str), o, base=base) for i, o in enumerate(objs)]
    except json.JSONDecodeError:
        pass
    return [_line_record(f"http#{i + 1}", line, base)
            for i, line in enumerate(l for l in text.splitlines() if l.strip())]


def make_server(ws: Workspace, host: str = "127.0.0.1", port: int = 8765, allow_remote: bool = False,
                base: Path | None = None) -> ThreadingHTTPServer:
    """`POST /feedback` stores records and answers the intake report; `GET /health` answers ok.
    Relative image paths resolve against `base` (None: they are refused)."""
    check_bind(host, allow_remote)

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, code: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/health":
                self._answer(200, {"ok": True, "workspace": str(ws.root)})
            else:
                self._answer(404, {"error": f"no such path {self.path}; POST /feedback"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/feedback":
                return self._answer(404, {"error": f"no such path {self.path}; POST /feedback"})
            n = int(self.headers.get("Content-Length") or 0)
            if n <= 0 or n > MAX_BODY:
                return self._answer(413 if n > MAX_BODY else 400,
                                    {"error": f"body of {n} bytes (1 to {MAX_BODY} accepted)"})
            report = store(ws, _records_of_body(self.rfile.read(n), base))
            # 200 whatever the records held: each reject is in the report and in quarantine.
            self._answer(200, report.to_dict())

        def log_message(self, fmt: str, *args) -> None:
            pass  # the CLI prints each batch's counts instead

    return ThreadingHTTPServer((host, port), Handler)


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    return t


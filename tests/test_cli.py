"""The command line a newcomer uses: init, ingest, status, and clear errors."""

from __future__ import annotations

import re

import io
import tarfile

from typer.testing import CliRunner

from conftest import good_sample
from cli.app import app
from dataengine.shards import write_shards

runner = CliRunner()


def test_help_lists_the_commands():
    out = runner.invoke(app, ["--help"], terminal_width=200).output
    # A command's row starts with its name after the box border: "│ ingest   Scan ...".
    listed = {m.group(1) for m in re.finditer(r"^[│|] +([a-z][a-z-]*) {2,}\S", out, re.M)}
    registered = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    registered |= {g.name for g in app.registered_groups}
    assert {"demo", "init", "ingest", "status", "sceneworld", "import-real", "enhance", "gaps"} <= registered
    assert registered <= listed, registered - listed


def test_init_ingest_status(tmp_path):
    ws = tmp_path / "ws"
    assert runner.invoke(app, ["init", "-w", str(ws)]).exit_code == 0
    for sub in ("shards/train", "shards/pool", "shards/patches", "lake/samples", "indexes", "models"):
        assert (ws / sub).is_dir(), sub
    assert (ws / "catalog.duckdb").is_file()
    [good] = write_shards([good_sample(f"k{i}") for i in range(5)], tmp_path / "in", "g", 10)
    bad = tmp_path / "in" / "bad.tar"
    with tarfile.open(bad, "w") as tf:
        for name, data in (("x1.png", b"garbage"), ("x1.txt", b"a caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    res = runner.invoke(app, ["ingest", str(tmp_path / "in" / "*.tar"), "-w", str(ws), "--no-ray"])
    assert res.exit_code == 0, res.output
    assert "read 6 = accepted 5 + quarantined 1" in res.output
    res = runner.invoke(app, ["status", "-w", str(ws)])
    assert res.exit_code == 0, res.output
    assert "undecodable image 'png'" in res.output
    assert "accounting: exact" in res.output


def test_clear_errors(tmp_path):
    res = runner.invoke(app, ["status", "-w", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "dataengine init" in res.output
    res = runner.invoke(app, ["ingest", str(tmp_path / "none-*.tar"), "-w", str(tmp_path / "ws")])
    assert res.exit_code == 2 and "no shard matches" in res.output
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[ingest]\nsplitt = 'x'\n")
    res = runner.invoke(app, ["init", "-w", str(tmp_path / "ws"), "--config", str(cfg)])
    assert res.exit_code == 2 and "splitt" in res.output
    res = runner.invoke(app, ["init", "-w", str(tmp_path / "ws2"), "--config", str(tmp_path / "typo.toml")])
    assert res.exit_code == 2 and "typo.toml: no such config file" in " ".join(res.output.split())
    assert not (tmp_path / "ws2").exists()


def test_demo_fresh_refuses_a_folder_that_is_not_a_workspace(tmp_path):
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"not yours to delete")
    res = runner.invoke(app, ["demo", "-w", str(precious), "--fresh"])
    assert res.exit_code == 2 and "not a dataengine workspace" in " ".join(res.output.split())
    assert (precious / "holiday.jpg").read_bytes() == b"not yours to delete"

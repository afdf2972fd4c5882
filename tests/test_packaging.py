"""The set-up a newcomer relies on: the README's two commands, CI, pinned dependencies."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    assert text.index("make demo") < 200, "the commands must be the README's first lines"
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:.*\n\t.*dataengine demo", makefile, re.M)
    assert re.search(r"^test:", makefile, re.M)


def test_dependencies_pinned_and_one_faiss():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {re.split(r"[=<>\[ ]", d)[0]: d for d in meta["dependencies"]}
    # An open torch range pulls a several-GB build; these two are a matched pair.
    assert deps["torch"] == "torch==2.14.1" and deps["torchvision"] == "torchvision==0.29.1"
    for needed in ("ray", "pyarrow", "webdataset", "open_clip_torch", "transformers", "tokenizers",
                   "prefect", "prefect-ray", "duckdb", "typer", "rich"):
        assert needed in deps, needed
    assert not any(d.startswith("faiss") for d in deps), "faiss belongs in the cpu/gpu extras"
    extras = meta["optional-dependencies"]
    faiss_in = {name for name, reqs in extras.items() if any(r.startswith("faiss") for r in reqs)}
    assert faiss_in == {"cpu", "gpu"}, "faiss-cpu and faiss-gpu both install `faiss`: never both"
    assert meta["scripts"]["dataengine"] == "cli.app:app"

# Two entry points for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Extras: cpu takes faiss-cpu; a GPU machine runs `make EXTRAS=gpu,dev setup`.
EXTRAS ?= cpu,dev
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast bench real-data clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

setup: $(STAMP)

# The main job on the embedded default: local Ray, Prefect without a server, ./workspace.
demo: $(STAMP)
	$(BIN)/dataengine demo --workspace workspace

# Tuxpaint's captioned photographs (Debian package files only, no install) for the
# real-image connector test; skipped quietly where apt cannot reach its mirror.
real-data:
	bash scripts/fetch_tuxpaint.sh

test: $(STAMP) real-data
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/ingest.py

clean:
	rm -rf workspace .pytest_cache

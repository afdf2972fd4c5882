# Two entry points for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Extras: cpu takes faiss-cpu; a GPU machine runs `make EXTRAS=gpu,dev setup`.
EXTRAS ?= cpu,dev
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast bench real-data browser clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

setup: $(STAMP)

# The main job on the embedded default: local Ray, Prefect without a server, ./workspace.
# The real photographs train the default embedding model beside the scene world.
demo: $(STAMP) real-data
	$(BIN)/dataengine demo --workspace workspace

# Tuxpaint's captioned photographs (Debian package files only, no install) for the
# real-image connector test; skipped quietly where apt cannot reach its mirror.
real-data:
	bash scripts/fetch_tuxpaint.sh

# Two workers, a test file each (module fixtures train once): tests run with one torch
# thread (dataengine/runtime.py), so the two cores are used twice over (907 s -> 625-715 s here).
test: $(STAMP) real-data browser
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# Debian's Chromium for the dashboard's browser tests (Playwright's own download cannot
# work offline); they skip, saying so, where it cannot be installed.
browser:
	@test -x /usr/bin/chromium || apt-get install -y -q chromium >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) || \
	  echo "chromium not installed: the browser tests will skip"

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/embed.py
	$(BIN)/python benchmarks/index.py --n 1000000
	$(BIN)/python benchmarks/gaps.py

clean:
	rm -rf workspace .pytest_cache

# patternlake — the two commands a fresh machine needs are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PL := $(VENV)/bin/patternlake
DEMO_DIR ?= data/demo
STAMP := $(VENV)/.patternlake-setup

.PHONY: setup demo test test-fast lint format bench clean-lake

setup: $(STAMP)

$(STAMP): requirements/lock.txt pyproject.toml scripts/setup.sh scripts/build_horovod.sh scripts/fetch_delta_jars.sh scripts/check_imports.py scripts/check_requirements.py
	bash scripts/setup.sh

## The main job end to end on the embedded default (local Spark, lake in ./lake)
demo: setup
	bash scripts/demo.sh $(DEMO_DIR)

## The full test suite, slow end-to-end tests included
test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

lint: setup
	$(PY) -m ruff check libs jobs tests bench
	$(PY) -m ruff format --check libs jobs tests bench

format: setup
	$(PY) -m ruff format libs jobs tests bench
	$(PY) -m ruff check --fix libs jobs tests bench

bench: setup
	$(PY) bench/lake_write.py

clean-lake:
	rm -rf lake data mlruns mlruns.db

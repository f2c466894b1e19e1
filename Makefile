# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv on first run and install the project into it.
#
# torch is installed FIRST, pinned to 2.13.0: on this machine that takes the CPU
# wheel from local disk, while a bare `torch` requirement would pull a multi-GB
# CUDA build. The project's own `torch>=2.13.0` is then already satisfied.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.strata-installed
TORCH_PIN := torch==2.13.0

.PHONY: demo test test-fast lint proto docs bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/strata demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -rs

# everything except tests marked slow
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# regenerate proto/*_pb2*.py from proto/strata.proto (tests fail if they are stale)
proto: $(STAMP)
	$(PY) -m proto.generate

# regenerate the README's config tables from the config dataclasses
docs: $(STAMP)
	$(PY) -m strata.readme

bench: $(STAMP)
	$(PY) bench/cid_throughput.py
	$(PY) bench/fedavg_streaming.py
	$(PY) bench/ingest.py
	$(PY) bench/round_time.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

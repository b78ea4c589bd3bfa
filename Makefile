# overunlearn: two commands set everything up on a fresh machine.
#   make demo   -- create .venv if missing, install, run the main job (Data Poisoning benchmark)
#   make test   -- create .venv if missing, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch and torchvision are pinned to the versions available offline on our machines
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test test-all lint bench-perf clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[dev,hf]'
	touch $(STAMP)

demo: setup
	$(PY) -m overunlearn bench poison $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check src tests benchmarks

bench-perf: setup
	$(PY) benchmarks/perf_projection.py --cases a,b,d,f --interleave

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

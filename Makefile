# Two commands do everything from a fresh clone: `make demo` and `make test`.
# Each creates the virtual environment (CPU PyTorch 2.13.0 pinned) when none exists.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ewc-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ewc demo

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples

test: lint
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_fisher.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Two entry points: `make demo` and `make test`.  Each creates .venv on first use and
# installs torch (the 2.13.0 CPU wheel when no torch is present), the package and its
# test extras.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stashpoint-installed
PYTEST_ARGS ?=

.PHONY: demo test lint bench-cpu clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/stashpoint demo

test: $(STAMP) lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests $(wildcard benchmarks)

bench-cpu: $(STAMP)
	$(PY) benchmarks/cpu_save_load.py

clean:
	rm -rf demo-output .pytest_cache build *.egg-info src/*.egg-info

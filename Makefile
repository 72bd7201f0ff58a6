# Two entry points: `make demo` and `make test`.  Each creates .venv on first use and
# installs torch (the 2.13.0 CPU wheel when no torch is present), the package and its
# test extras (the framework adapters' frameworks included), holding torch at its version.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stashpoint-installed
PYTEST_ARGS ?=
# The torchtitan adapter's tests need torchtitan's checkpoint, optimizer and config modules
# and what they import, not its trainer's dependencies (datasets, wandb, tensorboard...,
# which would move huggingface_hub and fsspec); torch stays at the installed version.
# Users install the adapter with `pip install 'stashpoint[torchtitan]'`.
TITAN         := 0.3.0
TITAN_IMPORTS := tyro==1.0.17 spmd_types==0.2.3 torchdata==0.11.0 einops==0.8.2

.PHONY: demo test lint bench-cpu clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e '.[test]'  # extras never replace torch
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt $(TITAN_IMPORTS)
	$(PY) -m pip install -q --no-deps torchtitan==$(TITAN)
	touch $@

demo: $(STAMP)
	$(VENV)/bin/stashpoint demo

# The S3 tests need a real server: scripts/s3-server installs Ceph (apt-get, once) and
# starts a single-node RADOS Gateway, exporting its endpoint to pytest; it is stopped
# by PID afterwards whatever pytest's outcome, and pytest's exit status is kept.
# Exit status 3 means Ceph cannot be installed here: the S3 tests then skip loudly.
test: $(STAMP) lint
	@set +e; \
	exports=$$(scripts/s3-server start); rc=$$?; \
	if [ $$rc -eq 3 ]; then echo "*** S3 server unavailable: S3 tests will be SKIPPED ***" >&2; \
	elif [ $$rc -ne 0 ]; then scripts/s3-server stop; exit $$rc; fi; \
	eval "$$exports"; \
	$(PY) -m pytest -q $(PYTEST_ARGS); status=$$?; \
	scripts/s3-server stop; \
	exit $$status

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests $(wildcard benchmarks)

bench-cpu: $(STAMP)
	$(PY) benchmarks/cpu_save_load.py

clean:
	rm -rf demo-output .pytest_cache build *.egg-info src/*.egg-info

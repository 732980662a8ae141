# The two commands of the README: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints-cpu.txt
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q -c $(CONSTRAINTS)

# Every command runs as in an activated environment, the venv's tools first on PATH, as on the nodes
# cluster/local.sh starts. DeepSpeed compiles its CPU ops with the first `ninja` on PATH: the venv's
# (1.13) and the system's (1.11) sharing one build cache rebuilt the op (35 s on 2 cores) each time
# the other one had run, three times in a `make test`.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test test-fast lint install clean

install: $(STAMP)

# torch first (the CPU wheel pinned by constraints), then DeepSpeed, whose build imports torch,
# without build isolation and without compiling its C++/CUDA ops, then the project itself.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) torch
	DS_BUILD_OPS=0 $(PIP) --no-build-isolation "deepspeed>=0.19,<0.20"
	$(PIP) -e ".[test]"
	touch $(STAMP)

# The quickstart end to end: datasets, preprocessing, pretraining (ZeRO-2, 2 Ray workers), fine-tuning
# pretrained vs scratch, report (runs/quickstart/report.md). A second `make demo` reuses every stage.
demo: $(STAMP)
	$(BIN)/vitpipe run jobs/quickstart.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The inner loop: every test but the slow ones (a multi-node cluster, a Ray Train group, a whole run,
# a killed process: tests/conftest.py marks them), in under 3 minutes. CI runs `make test`.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) data runs .pytest_cache

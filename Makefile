# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
export TRAINCTL_STORAGE ?= $(CURDIR)/.trainctl

.PHONY: install dev demo test lint typecheck unit clean

# torch is installed explicitly first so that pip takes the CPU wheel at hand instead of
# resolving a multi-GB CUDA build from the looser range in pyproject.toml.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is named again beside the project: with the dev extras in the request, pip's resolver
# otherwise replaced the installed 2.13.0 CPU wheel with a newer CUDA build (5.8 GB venv).
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e . torch==$(TORCH_VERSION)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -q -e '.[dev,ray]' torch==$(TORCH_VERSION)
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

DEMO_JOB ?= demo-$(shell date +%Y%m%d-%H%M%S)

# A 2-node job with a spare; node-1 is killed at step 15 (as a dead host): trainctl blames and
# excludes it, promotes the spare, restores the newest checkpoint and finishes; then the
# job's status and its goodput report (with a timeline picture).
demo: install
	$(BIN)/trainctl launch recipes/tiny-gpt-spare.yaml --job-id $(DEMO_JOB) \
		--fault kill-node:node-1@step=15
	@echo "--- trainctl status $(DEMO_JOB)"
	$(BIN)/trainctl status $(DEMO_JOB)
	@echo "--- trainctl report $(DEMO_JOB)"
	$(BIN)/trainctl report $(DEMO_JOB)

lint: dev
	$(BIN)/ruff check trainctl tests benchmarks recipes
	$(BIN)/ruff format --check trainctl tests benchmarks recipes

typecheck: dev
	$(BIN)/mypy

test: dev lint typecheck
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) .trainctl .pytest_cache .mypy_cache .ruff_cache

# The two commands of the Quickstart are `make run` and `make test`; both do all
# set-up first (a virtual environment in .venv, pinned versions) and redo it only
# when requirements.lock or pyproject.toml change.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedfleet-installed
ARGS   ?=

.PHONY: setup run test test-fast lint lint-playbooks typecheck bench bench-plan bench-configure case-study clean

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "fedfleet needs Python 3.11 (set PYTHON=...)"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: any other spec pulls a multi-GB CUDA build.
	$(BIN)/pip install --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/fedfleet run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not e2e" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd playbooks && PATH="$(CURDIR)/$(BIN):$$PATH" ../$(BIN)/ansible-lint --offline --profile production .

# ansible-lint alone (also run by the tests: tests/test_playbooks.py).
lint-playbooks: $(STAMP)
	cd playbooks && PATH="$(CURDIR)/$(BIN):$$PATH" ../$(BIN)/ansible-lint --offline --profile production .

# mypy catches typos in the dict inputs of Pulumi resources (about 2.5 min cold).
typecheck: $(STAMP)
	$(BIN)/mypy infra/

bench: $(STAMP)
	$(BIN)/python bench/bench_run.py --variants $(ARGS)

bench-plan: $(STAMP)
	$(BIN)/python bench/bench_plan.py $(ARGS)

bench-configure: $(STAMP)
	$(BIN)/python bench/bench_configure.py $(ARGS)

case-study: $(STAMP)
	$(BIN)/python bench/case_study.py $(ARGS)

clean:
	rm -rf .fedfleet

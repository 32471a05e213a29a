# The two commands of the Quickstart are `make run` and `make test`; both do all
# set-up first (a virtual environment in .venv, pinned versions) and redo it only
# when requirements.lock or pyproject.toml change.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedfleet-installed
ARGS   ?=

.PHONY: setup run test test-ssh test-long test-fast lint lint-playbooks typecheck bench bench-plan bench-seed bench-registry bench-ssh case-study clean

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "fedfleet needs Python 3.11 (set PYTHON=...)"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: any other spec pulls a multi-GB CUDA build.
	$(BIN)/pip install --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --disable-pip-version-check --no-deps --no-build-isolation -e .
	@# The proxy in front of the SuperLink (the participants reach its Fleet API only): nginx
	@# from the OS packages; installed here when this is root on a Debian/Ubuntu machine.
	@if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx \
	      && { systemctl disable --now nginx 2>/dev/null || true; }; \
	  else echo "fedfleet needs nginx, the proxy in front of the SuperLink: sudo apt-get install nginx"; exit 1; fi; \
	fi
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/fedfleet run $(ARGS)

# The unit tests on two pytest-xdist workers, then the end-to-end tests one after another
# (each keeps 2 cores busy: a SuperLink, three SuperNodes, warm workers; two at once only
# double each one's time). Exit code 5 is "no test selected" (ARGS picked the other kind).
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m "not e2e" $(ARGS) || [ $$? -eq 5 ]
	$(BIN)/python -m pytest -p no:xdist -m "e2e and not ssh and not long" $(ARGS) || [ $$? -eq 5 ]

# Whole runs over SSH on a lab of hosts in network namespaces (root and openssh-server;
# they skip saying why elsewhere).
test-ssh: $(STAMP)
	$(BIN)/python -m pytest -p no:xdist -m ssh $(ARGS) || [ $$? -eq 5 ]

# What `make test` leaves out to stay under 12 minutes on 2 cores: the SSH lab's whole runs
# and the seed's orchestrator evaluation (several runs). CI runs it after `make test`.
test-long: $(STAMP)
	$(BIN)/python -m pytest -p no:xdist -m "ssh or long" $(ARGS) || [ $$? -eq 5 ]

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m "not e2e" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	cd playbooks && PATH="$(CURDIR)/$(BIN):$$PATH" ../$(BIN)/ansible-lint --offline --profile production .

# ansible-lint alone (also run by the tests: tests/test_playbooks.py).
lint-playbooks: $(STAMP)
	cd playbooks && PATH="$(CURDIR)/$(BIN):$$PATH" ../$(BIN)/ansible-lint --offline --profile production .

# mypy: fedfleet/, the Flower app and the Pulumi program (where it catches typos in the
# dict inputs of resources); about 3 min cold.
typecheck: $(STAMP)
	$(BIN)/mypy fedfleet/ fl/fedfleet_app/ infra/

bench: $(STAMP)
	$(BIN)/python bench/bench_run.py --variants $(ARGS)

bench-plan: $(STAMP)
	$(BIN)/python bench/bench_plan.py $(ARGS)

bench-seed: $(STAMP)
	$(BIN)/python bench/bench_seed.py $(ARGS)

bench-registry: $(STAMP)
	$(BIN)/python bench/bench_registry.py $(ARGS)

bench-ssh: $(STAMP)
	$(BIN)/python bench/bench_ssh.py $(ARGS)

case-study: $(STAMP)
	$(BIN)/python bench/case_study.py $(ARGS)

clean:
	rm -rf .fedfleet

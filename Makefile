# Saddle Escape — `make book` builds the HTML book (`make book JOBS=2`: two chapters at once),
# `make test` runs the tests.
# Both create .venv (with $(PYTHON) -m venv) and install the package with its pinned
# dependencies when needed. To use an environment you already have (e.g. conda, see
# environment.yml) instead of .venv:  make test VENV=   or   make test PY=python

PYTHON  ?= python3
VENV    ?= .venv
PROFILE ?= full
JOBS    ?= 1
TEST_JOBS ?= auto
CH      ?=
ARGS    ?=
PIP_ARGS ?=

ifeq ($(strip $(VENV)),)
PY ?= python
else
PY ?= $(VENV)/bin/python
endif

ifeq ($(PY),$(VENV)/bin/python)
# Our own virtual environment: (re)install whenever pyproject.toml changes.
STAMP := $(VENV)/.saddle-escape-installed
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_ARGS) -e .
	touch $@
else
# An existing environment (e.g. conda from environment.yml) already holds the dependencies:
# only the package itself is installed into it, editable.
STAMP := _build/.saddle-escape-installed-into-env
$(STAMP): pyproject.toml
	$(PY) -m pip install $(PIP_ARGS) --no-deps -e .
	mkdir -p $(dir $@) && touch $@
endif

.PHONY: venv book test chapter bench clean

venv: $(STAMP)

# JOBS=N executes N chapters at once (each in its own process); staging and HTML wait for all.
book: venv
	$(PY) -m saddle_escape book --profile $(PROFILE) -j $(JOBS)

# The tests run on every core (pytest-xdist), a test file per worker at a time (module fixtures
# such as a LocalCluster or the quick book are then set up once).
test: venv
	$(PY) -m pytest -n $(TEST_JOBS) --dist loadfile tests

chapter: venv
	@test -n "$(CH)" || { echo "usage: make chapter CH=05 ARGS='-p eps_min 1e-5'"; exit 2; }
	$(PY) -m saddle_escape run $(CH) $(ARGS)

# The integrator benchmark of SPEC §7 (a few minutes; not part of `make test`).
bench: venv
	$(PY) benchmarks/escape_sweep.py --json $(ARGS)

clean:
	rm -rf _build results figures executed .pytest_cache
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

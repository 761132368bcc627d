# Two entry points for a fresh machine (nothing installed by hand):
#   make demo   set up .venv, fetch SmolLM2 once, run `djinn demo`
#   make test   set up .venv, fetch SmolLM2 once, run the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
DJINN := $(VENV)/bin/djinn
PYTEST_ARGS ?=

.PHONY: setup demo test test-all pull clean

$(VENV)/.installed: requirements-cpu.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-cpu.txt
	touch $@

setup: $(VENV)/.installed

pull: setup
	$(DJINN) models pull smollm2-135m

demo: pull
	$(DJINN) demo

# The SmolLM2 tests skip (and say so) if the pull could not run.
test: setup
	-$(DJINN) models pull smollm2-135m
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

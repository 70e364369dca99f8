# The two commands (README): `make demo` runs the main job, `make test` runs every test suite.
# Both create (once) and reuse the project's virtual environment (scripts/env.sh).
SHELL := /bin/bash
VENV = $(shell bash scripts/env.sh)
PY = $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test test-fast env bench

env:
	@echo $(VENV)

demo:
	@$(PY) -m dinomed demo --out demo_output

test:
	@cd core_lib && OMP_NUM_THREADS=1 $(PY) -m pytest -q $(PYTEST_ARGS) tests ../Testing

test-fast:
	@cd core_lib && OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests ../Testing

# The two commands (README): `make demo` runs the main job, `make test` runs every test suite.
# Both create (once) and reuse the project's virtual environment (scripts/env.sh). `make web` serves the
# browser front-end (web/, its own small venv from scripts/web_env.sh; the dinomed children use the main venv).
SHELL := /bin/bash
VENV = $(shell bash scripts/env.sh)
PY = $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test test-fast test-web web env bench
WEB_PORT ?= 8080
WEB_ARGS ?=
WEB_DATA ?= $(CURDIR)

env:
	@echo $(VENV)

demo:
	@$(PY) -m dinomed demo --out demo_output

test:
	@cd core_lib && OMP_NUM_THREADS=1 $(PY) -m pytest -q $(PYTEST_ARGS) tests ../Testing
	@$(MAKE) --no-print-directory test-web VENV=$(VENV)

# the browser tests: the web server and headless Chromium (as root the set-up installs chromium and libosmesa6;
# DINOSEG_WEB_TESTS_REQUIRED=1 makes a missing piece a failure, never a skip)
test-web:
	@WV=$$(bash scripts/web_env.sh --test) && cd web && DINOSEG_WEB_TESTS_REQUIRED=1 DINOSEG_DINOMED_PYTHON=$(PY) \
		OMP_NUM_THREADS=1 $$WV/bin/python -m pytest -q $(WEB_PYTEST_ARGS) tests

# DINOSeg in the browser on http://127.0.0.1:$(WEB_PORT)/ (WEB_ARGS e.g. "--data-dir /data/petct")
web:
	@WV=$$(bash scripts/web_env.sh) && cd web && $$WV/bin/python -m dinoseg_web --port $(WEB_PORT) \
		--dinomed-python $(PY) --data-dir $(WEB_DATA) $(WEB_ARGS)

test-fast:
	@cd core_lib && OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests ../Testing

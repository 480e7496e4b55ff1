# make train: create .venv if missing, install, run the quick config. make test: the test suite
# without the tests marked slow (minutes each); make test-all: all of it, as CI runs it.
# Tests run in TEST_WORKERS processes (pytest-xdist), a test file per process at a time so
# that a module's shared run is made once, the longest files first (tests/conftest.py
# LONGEST_FIRST): most tests wait on subprocesses, Ray and servers, so two processes keep two
# cores busy. TEST_WORKERS=0 runs them in this process.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/cifar10_quick.yaml
ARGS ?=
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
SHARED ?= $(abspath ../shared)

# Offline data and weights when this checkout sits next to ../shared; online defaults otherwise.
ifneq ($(wildcard $(SHARED)/datasets),)
export TFDS_DATA_DIR ?= $(SHARED)/datasets
endif
ifneq ($(wildcard $(SHARED)/keras),)
export KERAS_HOME ?= $(SHARED)/keras
endif

.PHONY: train test test-all install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) -m job train $(CONFIG) $(ARGS)

test: install
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q $(XDIST) --slow $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache

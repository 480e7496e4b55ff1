# make train: create .venv if missing, install, run the quick config. make test: the test suite
# without the tests marked slow (minutes each); make test-all: all of it, as CI runs it.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/cifar10_quick.yaml
ARGS ?=
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
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q --slow $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache

# flexnbd: build, test, lint, benchmark.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install build test lint bench wheel annotate clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Install flexnbd (editable, compiled in place) with the test and lint tools.
install: $(PY)
	$(PY) -m pip install -q -e '.[test,lint]'

# Recompile the extensions in place after editing a .pyx.
build: $(PY)
	$(PY) -m pip install -q --no-deps -e .

test: install
	$(PY) -m pytest tests

lint: install
	$(PY) -m ruff check flexnbd tests benchmarks
	$(PY) -m mypy
	PATH=$(VENV)/bin:$$PATH cython-lint flexnbd
	$(VENV)/bin/lint-imports

# Every benchmark: throughput rows against nbdkit and qemu-nbd, map build, migration, proxy.
bench: install
	$(PY) benchmarks/run.py
	$(PY) benchmarks/sparse.py
	$(PY) benchmarks/migration.py
	$(PY) benchmarks/proxy.py

wheel: $(PY)
	$(PY) -m pip wheel --no-deps -w dist .

annotate: $(PY)
	FLEXNBD_DEBUG_BUILD=1 $(PY) -m pip install -q --no-deps -e .

clean:
	rm -rf build dist wheelhouse *.egg-info flexnbd/*.so flexnbd/*.c flexnbd/*.html

# flexnbd: build, test, lint, benchmark.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install build test lint man bench bench-ci chaos wheel wheels wheel-test sdist-test annotate clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Install flexnbd (editable, compiled in place) with the test, lint and release tools. pip
# compiles every extension again each time (a minute), so it runs only when the build's
# inputs are newer than the last install (the stamp file); Python edits need no install.
INSTALLED := $(VENV)/.installed
install: $(INSTALLED)
$(INSTALLED): $(PY) pyproject.toml setup.py $(wildcard flexnbd/*.pyx flexnbd/*.pxd)
	$(PY) -m pip install -q -e '.[test,lint,release]'
	touch $@

# Recompile the extensions in place after editing a .pyx.
build: $(PY)
	$(PY) -m pip install -q --no-deps -e .
	if [ -f $(INSTALLED) ]; then touch $(INSTALLED); fi

# The tests spend most of their time waiting on sockets and deadlines, so TEST_JOBS of them run
# at once (pytest-xdist), each file's tests on one worker, in order.
TEST_JOBS ?= 4
test: install
	$(PY) -m pytest tests -n $(TEST_JOBS) --dist loadfile

lint: install
	$(PY) -m ruff check flexnbd tests benchmarks scripts
	$(PY) -m mypy
	PATH=$(VENV)/bin:$$PATH cython-lint flexnbd
	$(VENV)/bin/lint-imports

# Rewrite man/flexnbd.1 and man/flexnbd-proxy.1 from the parsers and the modules' documentation
# (flexnbd/manpage.py); commit them: tests/unit/test_manpages.py fails while they are stale.
man: install
	$(PY) -m flexnbd.manpage man

# Every benchmark: throughput rows against nbdkit and qemu-nbd, map build, migration, proxy;
# the results go to benchmarks/results/NAME.json (RESULTS.md is written from them).
bench: install
	$(PY) benchmarks/run.py
	$(PY) benchmarks/sparse.py
	$(PY) benchmarks/migration.py
	$(PY) benchmarks/proxy.py
	$(PY) benchmarks/tls.py
	$(PY) benchmarks/scale.py

# Every benchmark in its quick mode (~4 minutes), one JSON in benchmarks/out/bench-ci.json:
# fails on errors (client, server, exit status, migrated data, sparse wire), never on ratios.
bench-ci: install
	$(PY) benchmarks/ci.py

# The randomized fault campaign (tests/chaos; as root: it makes network namespaces, tc qdiscs
# and tmpfs mounts): CHAOS_N scenarios from CHAOS_SEED (default: the time). The last line says
# "chaos: N scenarios, K faults injected, V violations"; V > 0 fails.
CHAOS_N ?= 200
chaos: install
	CHAOS_N=$(CHAOS_N) CHAOS_SEED=$(CHAOS_SEED) $(PY) -m tests.chaos

wheel: $(PY)
	$(PY) -m pip wheel --no-deps -w dist .

# manylinux wheels for every CPython 3.10-3.13 on this machine, in wheelhouse/ (no container:
# a release machine with one uses cibuildwheel, configured in pyproject.toml).
wheels: install
	$(PY) scripts/wheels.py --auditwheel $(abspath $(VENV))/bin/auditwheel

# Install the oldest and newest wheel in fresh venvs and run the console scripts end to end.
wheel-test: wheels
	$(PY) scripts/wheel_test.py

# Build the sdist, check its contents, build it in a fresh venv, run the unit tests.
sdist-test: install
	$(PY) scripts/sdist_test.py

annotate: $(PY)
	FLEXNBD_DEBUG_BUILD=1 $(PY) -m pip install -q --no-deps -e .

clean:
	rm -rf build dist wheelhouse *.egg-info flexnbd/*.so flexnbd/*.c flexnbd/*.html $(INSTALLED)

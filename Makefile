# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU machines: pin torch to the local CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
CONSTRAINTS ?= constraints-cpu.txt

.PHONY: venv test test-quick lint demo clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test]'
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .

# Test processes (pytest-xdist): one per core, at most 4 (each test file runs whole in one of them).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n > 4 ? 4 : n )))

# Whole test files are shared out in the order tests/conftest.py gives them (the longest first), not
# xdist's default (the files with the most tests first, which left the two longest to run last).
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The whole suite, as CI runs it; the slowest tests are listed at the end so they stay visible.
test: venv lint
	$(PY) -m pytest -q $(XDIST) --durations=15

# The developer's loop: everything but the multi-process and end-to-end tests (marked slow).
test-quick: venv lint
	$(PY) -m pytest -q $(XDIST) -m "not slow"

demo: venv
	$(PY) -m jobs.demo $(if $(DATA),--data $(DATA))

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo-out

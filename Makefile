# Two commands a newcomer needs: `make demo` and `make test`. Both set up everything first (idempotent).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
APT_PACKAGES := libturbojpeg0-dev libopencv-dev pkg-config

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@bash tools/install_system_deps.sh $(APT_PACKAGES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	@bash tools/demo.sh $(PY)

# Lint, the import layers and import cycles first (seconds), then the suite on two workers: it is mostly
# single-threaded start-up and compile work. No test asserts a timing margin.
test: $(STAMP)
	$(VENV)/bin/ruff check capfast converters tests tools
	$(VENV)/bin/lint-imports
	$(PY) tools/check_import_cycles.py
	$(PY) -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) demo_out .pytest_cache

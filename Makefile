# Two commands do everything on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DAGSTER_HOME := $(CURDIR)/dagster_home

.PHONY: install demo test ui browser clean

# Re-installs when pyproject.toml (the lower bounds) or constraints.txt (the tested versions) changes.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,deploy,ray]'
	touch $(STAMP)

install: $(STAMP)

## Materialize every asset of the catalog (NFHM_CATALOG, default demo) and print the results.
demo: install
	$(BIN)/nfhm demo

## Run the whole test suite (installs the browser for the UI test where it can).
test: install browser
	$(BIN)/python -m pytest

## Start the Dagster UI on http://127.0.0.1:3000
ui: install
	$(BIN)/dagster dev -w workspace.yaml

browser:
	-@bash scripts/install_browser.sh

clean:
	rm -rf data/lake data/warehouse.duckdb data/manifests data/reports data/cache data/sources data/models

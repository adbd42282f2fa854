# Lumiere on Ray. `make demo` and `make test` set up .venv from constraints.txt on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench lint serve-config clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow"

demo: $(STAMP)
	$(BIN)/lumiere demo

bench: $(STAMP)
	$(BIN)/python benchmarks/stunet_vs_fixed.py

lint: $(STAMP)
	$(BIN)/ruff check lumiere pipelines serve cli infra tests benchmarks

# kustomize loads no file outside infra/k8s: the RayService embeds this copy of the Serve config
# (tests/test_infra.py fails while it differs from serve/config.yaml)
serve-config:
	cp serve/config.yaml infra/k8s/base/serve-config.yaml

clean:
	rm -rf $(VENV) demo-output .pytest_cache

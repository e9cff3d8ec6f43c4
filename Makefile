# `make test` is what CI runs (via .ci/run): lint, types, then every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint types unit e2e demo system-packages clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

types: $(STAMP)
	$(BIN)/mypy src tests

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit tests/integration

e2e: $(STAMP)
	$(BIN)/pytest -q tests/e2e

test: lint types $(STAMP)
	$(BIN)/pytest -q

# The real parts the sandbox runs: installed when root, otherwise the line to run is printed.
SYSTEM_PACKAGES := docker-registry skopeo
system-packages:
	@if [ -x /usr/bin/docker-registry ] && command -v skopeo >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES); \
	else \
		echo "The demo needs: sudo apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES)"; \
		exit 1; \
	fi

# A local balenaCloud stand-in plus the proxy, with real pulls through it; Ctrl-C stops it.
demo: $(STAMP) system-packages
	$(BIN)/balena-registry-proxy sandbox --demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

# `make test` is what CI runs (via .ci/run): lint, types, then every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint types unit e2e demo system-packages bench bench-quick bench-profile bench-packages clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,sandbox]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

types: $(STAMP)
	$(BIN)/mypy src tests
	$(BIN)/mypy --strict --ignore-missing-imports bench

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit tests/integration

e2e: $(STAMP)
	$(BIN)/pytest -q tests/e2e

test: lint types $(STAMP)
	$(BIN)/pytest -q

# Debian packages $(1) (each providing the command of its name) for $(2): installed when
# root, otherwise the line to run is printed.
define need-packages
	@if $(foreach p,$(1),command -v $(p) >/dev/null &&) true; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $(1); \
	else \
		echo "$(2) needs: sudo apt-get install -y --no-install-recommends $(1)"; \
		exit 1; \
	fi
endef

SYSTEM_PACKAGES := docker-registry skopeo
system-packages:
	$(call need-packages,$(SYSTEM_PACKAGES),The demo)

# A local balenaCloud stand-in plus the proxy, with real pulls through it; Ctrl-C stops it.
demo: $(STAMP) system-packages
	$(BIN)/balena-registry-proxy sandbox --demo

BENCH_STAMP := $(VENV)/.bench-installed
BENCH_PACKAGES := docker-registry nginx wrk curl

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,sandbox,bench]'
	touch $(BENCH_STAMP)

bench-packages:
	$(call need-packages,$(BENCH_PACKAGES),The benchmark)

# The proxy against the registry and nginx on loopback: about 1 min quick, 6.5 min full.
bench-quick: $(BENCH_STAMP) bench-packages
	$(BIN)/python -m bench --quick

bench: $(BENCH_STAMP) bench-packages
	$(BIN)/python -m bench

bench-profile: $(BENCH_STAMP) bench-packages
	$(BIN)/python -m bench --quick --profile

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

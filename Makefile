# `make test` is what CI runs (via .ci/run): lint, types, then every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint types unit e2e demo system-packages bench bench-quick bench-profile bench-packages clean \
	go-tools conformance readme readme-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
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

# The Go programs of go-tools.txt, each built once per pinned version into
# .tools/<name>@<version>/ from the Go module proxy alone (no VCS, no cgo). An interrupted build
# leaves no binary behind: each is installed into a scratch folder that is renamed when complete.
GO_TOOLS_DIR := $(CURDIR)/.tools
GO_BUILD_ENV := GOPROXY=https://proxy.golang.org GOFLAGS=-mod=mod CGO_ENABLED=0

go-tools:
	@command -v go >/dev/null || { echo "go-tools needs Go 1.26: https://go.dev/dl/"; exit 1; }
	@grep -v '^#' go-tools.txt | while read -r name package; do \
		dir="$(GO_TOOLS_DIR)/$$name@$${package##*@}"; \
		[ -x "$$dir/$$name" ] && continue; \
		rm -rf "$$dir.part"; start=$$(date +%s); \
		GOBIN="$$dir.part" $(GO_BUILD_ENV) go install "$$package" || exit 1; \
		[ -x "$$dir.part/$$name" ] || { echo "$$package built no $$name"; exit 1; }; \
		mv "$$dir.part" "$$dir"; \
		echo "built $$name ($$package) in $$(( $$(date +%s) - start )) s"; \
	done

# The OCI distribution-spec conformance suite against the proxy and against the registry behind
# it (Debian's 2.8 and distribution 3); reports in reports/conformance/.
conformance: $(STAMP) go-tools
	$(BIN)/pytest -q tests/e2e/test_conformance.py

# The README's client matrix and conformance figures, from the records of the last test run.
readme: $(STAMP)
	$(BIN)/python -m tests.readme_tables

readme-check: $(STAMP)
	$(BIN)/python -m tests.readme_tables --check

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
	$(BIN)/pip install -q -e '.[dev,bench]'
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
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .tools reports

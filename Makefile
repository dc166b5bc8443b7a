# DCE inference stack. `make help` lists the targets.
SHELL := /bin/bash
export COMPOSE_BAKE := false
# testcontainers' reaper image would have to be pulled; the suite removes its own stack.
export TESTCONTAINERS_RYUK_DISABLED := true

VENV := .venv
# pip-tools for `make lock` only, apart from the test venv it compiles the pins of.
LOCK_VENV := .venv-lock
PIP_TOOLS := pip-tools==7.6.2
PYTEST := $(VENV)/bin/python -m pytest

.DEFAULT_GOAL := help
.PHONY: help up down logs ps restart-proxy upgrade backup restore keys key-add key-revoke metrics usage images lock test test-unit test-integration bench

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

up: ## Start the stack (checks prerequisites; CPU profile when there is no NVIDIA GPU)
	@scripts/up.sh

down: ## Stop the stack: new requests get a JSON 503 while running streams finish (DCE_STOP_GRACE_SECONDS); certificates and models are kept
	@scripts/down.sh $(ARGS)

logs: ## Follow the logs of all services
	docker compose logs -f --tail 100

ps: ## Show the services and their health
	docker compose ps

restart-proxy: ## Restart the proxy with its settings: its streams finish first, new requests get 502 meanwhile
	docker compose restart proxy

upgrade: ## Back up, then fetch or rebuild the images .env names and recreate what changed (each service drains first)
	@scripts/backup.py backup
	@DCE_UPGRADE=1 scripts/up.sh

backup: ## Save .env, the secrets and Caddy's CA and certificates in backups/ (owner-only; keep a copy off the host)
	@scripts/backup.py backup

restore: ## Restore a backup on this host, stack stopped: make restore FILE=backups/dce-backup-….tar.gz
	@scripts/backup.py restore "$(FILE)"

keys: ## List the API key names (the keys stay in their file)
	@scripts/keys.sh list

key-add: ## Add a key: make key-add NAME=alice (prints it once; in force within seconds, no restart)
	@scripts/keys.sh add "$(NAME)"

key-revoke: ## Revoke a key: make key-revoke NAME=alice (401 within seconds; its running streams finish)
	@scripts/keys.sh revoke "$(NAME)"

# The proxy's metrics port is not published: both read it from inside its container.
metrics: ## Print the proxy's Prometheus metrics (per key, route and outcome)
	docker compose exec -T proxy python3 -m dce_proxy.report metrics

usage: ## Requests, errors and tokens per key since the proxy started
	docker compose exec -T proxy python3 -m dce_proxy.report usage

images: ## Build every image locally, without a registry
	scripts/build-images.sh

# Each requirements.in holds the pins a person chooses; its requirements.txt, every package that
# ends up installed, with its sha256 (pip then installs nothing else and nothing altered).
lock: ## Re-resolve requirements.in into the hash-locked requirements.txt (proxy, router, tests)
	python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --disable-pip-version-check $(PIP_TOOLS)
	for dir in proxy router tests; do \
	  (cd $$dir && ../$(LOCK_VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	    --no-emit-index-url --no-emit-find-links -o requirements.txt requirements.in) || exit 1; \
	done

test: test-unit test-integration ## Run all tests (sets up Docker and builds images first)

test-unit: $(VENV)/.installed ## Fast proxy tests, no Docker
	$(PYTEST) tests/unit

test-integration: $(VENV)/.installed ## The composed stack with the real vLLM engine, over HTTPS
	scripts/ensure-docker.sh
	scripts/build-images.sh
	@# The slowest tests are listed at the end: where the suite's minutes go.
	$(PYTEST) tests/integration --durations=12

# When `make bench` began: run_bench.py's time budget counts the set-up too.
bench: export DCE_BENCH_STARTED := $(shell date +%s)
bench: ## Benchmark direct vs proxy vs Caddy + proxy, and the real engine (not a test; ~10 min)
	scripts/ensure-docker.sh
	@# The images build while pip fills the venv: both mostly wait on the network.
	scripts/build-images.sh & images=$$!; \
	$(MAKE) --no-print-directory $(VENV)/.installed \
	  && $(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/bench/requirements.txt; \
	venv=$$?; wait $$images && exit $$venv
	$(VENV)/bin/python tests/bench/run_bench.py $(BENCH_ARGS)

$(VENV)/.installed: tests/requirements.txt proxy/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	touch $@

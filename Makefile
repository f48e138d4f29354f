# `make test` installs everything (a virtualenv in .venv, plus redis-server and
# redis-cli from apt when missing), checks with ruff and mypy and runs the test suite. `make up` starts
# the whole system on embedded defaults.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: test install system-deps up bench clean

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

install: system-deps $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,hf,bench]'
	touch $@

# redis-server (tests start their own on a free port), redis-cli (the schema test runs the
# commands docs/redis.md documents), chromium (the web UI's browser tests) and docker-compose
# (validates compose.yaml; there is no Docker engine here, the smoke test runs its services locally).
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v redis-cli >/dev/null || missing="$$missing redis-tools"; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else echo "need:$$missing (Debian: apt-get install$$missing)"; exit 1; fi; \
	fi

up: install
	$(VENV)/bin/redserve up

clean:
	rm -rf $(VENV) .pytest_cache

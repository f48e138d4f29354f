# `make test` installs everything (a virtualenv in .venv, plus redis-server and
# redis-cli from apt when missing) and runs the test suite. `make up` starts
# the whole system on embedded defaults.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: test install system-deps up bench clean

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

install: system-deps $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,hf]'
	touch $@

# redis-server (tests start their own on a free port) and redis-cli (the
# schema test runs the commands docs/redis.md documents).
system-deps:
	@if ! command -v redis-cli >/dev/null || ! command -v redis-server >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null; \
		else echo "need redis-server and redis-cli (Debian: apt-get install redis-server redis-tools)"; exit 1; fi; \
	fi

up: install
	$(VENV)/bin/redserve up

clean:
	rm -rf $(VENV) .pytest_cache

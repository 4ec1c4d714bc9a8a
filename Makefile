# keyfence: `make demo` runs the main job, `make test` the whole test suite.
# Both set up a fresh machine first (apt packages and a venv, scripts/setup.sh).

VENV := .venv
STAMP := $(VENV)/.setup-done

.PHONY: setup demo test lint bench bench-quick

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

demo: setup
	$(VENV)/bin/keyfence demo

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q

bench: setup
	$(VENV)/bin/python bench/keys_bench.py --json bench/results/keys-latest.json
	$(VENV)/bin/python bench/notify_bench.py --json bench/results/notify-latest.json
	$(VENV)/bin/python bench/client_bench.py --json bench/results/client-latest.json

bench-quick: setup
	$(VENV)/bin/python bench/keys_bench.py --quick
	$(VENV)/bin/python bench/notify_bench.py --quick
	$(VENV)/bin/python bench/client_bench.py --quick

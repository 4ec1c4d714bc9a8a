# keyfence: `make demo` runs the main job, `make test` the whole test suite.
# Both set up a fresh machine first (apt packages and a venv, scripts/setup.sh).

VENV := .venv
STAMP := $(VENV)/.setup-done
# kfctl's -IS launcher and its bundle of code, (re)written for this tree
# (keyfence.cli.launcher): after pip, and before a benchmark times kfctl
KFCTL_LAUNCHER := $(VENV)/bin/python -m keyfence.cli.launcher $(VENV)/bin/kfctl

.PHONY: setup demo test lint bench bench-quick

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

# As root, the seed scenario through a real login (PAM; an account and a PAM
# service made for the demo and removed after it); otherwise on a mount alone.
demo: setup
	if [ "$$(id -u)" = 0 ]; then $(VENV)/bin/keyfence demo --login; \
	else $(VENV)/bin/keyfence demo; fi

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

test: lint
	$(VENV)/bin/pytest -q

# The benchmarks also need the bench extra (matplotlib, for the charts).
BENCH_STAMP := $(VENV)/.bench-setup-done

$(BENCH_STAMP): $(STAMP)
	$(VENV)/bin/python -m pip install -q -e '.[test,bench]'
	# pip put its own kfctl script back: the -IS launcher again (setup.sh)
	$(KFCTL_LAUNCHER)
	touch $@

# Every benchmark, side by side with the kernel, keyctl, gocryptfs, ext4+fscrypt
# and the plain disk (missing peers are installed from apt first): writes
# bench/results/<date>.{json,md}, latest.md, charts/, and README's bench block.
bench: $(BENCH_STAMP)
	$(KFCTL_LAUNCHER)
	$(VENV)/bin/python bench/suite.py --install-peers --readme

# The same suite in quick mode (seconds; CI): proves it still works with every
# peer (installed from apt as for bench), figures go to bench/results/quick/
# (not committed); fails if a benchmark crashes.
bench-quick: $(BENCH_STAMP)
	$(KFCTL_LAUNCHER)
	$(VENV)/bin/python bench/suite.py --quick --strict --install-peers

# georep: the two commands of the README are `make demo` and `make test`.
PY ?= python3
STAMP := .setup.stamp

.PHONY: setup bytecode demo test lint bench clean

# Installs what the project needs on a fresh Debian machine (idempotent, quick when done).
$(STAMP): setup.cfg pyproject.toml scripts/setup.sh
	PY=$(PY) bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

# Fresh bytecode for every module (only changed ones are compiled): an environment with
# PYTHONDONTWRITEBYTECODE=1 otherwise compiles georep from source in every process it
# starts (~0.1 s of CPU each for the primary and its secondary host).
bytecode:
	$(PY) -m compileall -q actors fsops transport bench tests > /dev/null

demo: $(STAMP) bytecode
	PY=$(PY) bash scripts/demo.sh

test: $(STAMP) bytecode
	$(PY) -m pytest -q -p no:cacheprovider tests

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

# Every scenario vs rsync/lsyncd/ssh (bench/all.py); BENCH_ARGS=--quick for a smoke run,
# BENCH_ARGS=--million adds the 1,000,000-entry tree.
bench: $(STAMP) bytecode
	$(PY) -m bench.all $(BENCH_ARGS)

clean:
	rm -f $(STAMP)

# georep: the two commands of the README are `make demo` and `make test`.
PY ?= python3
STAMP := .setup.stamp

.PHONY: setup demo test lint bench clean

# Installs what the project needs on a fresh Debian machine (idempotent, quick when done).
$(STAMP): setup.cfg pyproject.toml scripts/setup.sh
	PY=$(PY) bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	PY=$(PY) bash scripts/demo.sh

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

# Every scenario vs rsync/lsyncd/ssh (bench/all.py); BENCH_ARGS=--quick for a smoke run,
# BENCH_ARGS=--million adds the 1,000,000-entry tree.
bench: $(STAMP)
	$(PY) -m bench.all $(BENCH_ARGS)

clean:
	rm -f $(STAMP)

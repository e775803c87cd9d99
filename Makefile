# Two commands from a fresh clone: `make demo` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo test lint protos bench clean

setup: $(STAMP)

# Re-run when the dependency list changes; `pip install -e` keeps the code live.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

demo: setup
	$(BIN)/fedmoe local --peers 4 --rounds 10 --dataset digits --out runs/demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy common coordinator peer fedmoe

protos: setup
	$(BIN)/python scripts/gen_protos.py

bench: setup
	$(BIN)/python bench/stream_bench.py
	$(BIN)/python bench/compare.py --dataset digits --peers 4 --rounds 3 --out runs/bench-bytes

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache

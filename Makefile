# Two commands from a fresh clone: `make demo` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo test lint protos bench clean image test-compose test-compose-tls test-swarm test-multihost bench-netns

setup: $(STAMP)

# Re-run when the dependency list changes; `pip install -e` keeps the code live.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

demo: setup
	$(BIN)/fedmoe local --peers 4 --rounds 20 --dataset digits --out runs/demo

test: setup
	$(BIN)/python -m pytest -q tests --ignore=tests/system

# Container image, built without any registry when none is reachable (scripts/make_image.sh).
image:
	bash scripts/make_image.sh

# `docker compose up`: coordinator + 3 peers in containers (needs docker; .ci/run installs it).
test-compose: setup image
	$(BIN)/python -m pytest -q -s tests/system/test_compose.py tests/system/test_compose_peers.py

# The same with docker-compose.tls.yml: certificates made by a one-shot service, mutual TLS.
test-compose-tls: setup image
	$(BIN)/python -m pytest -q -s tests/system/test_compose_tls.py

# `docker stack deploy -c docker-stack.yml` on a one-node swarm (made and left if none is there).
test-swarm: setup image
	$(BIN)/python -m pytest -q -s tests/system/test_swarm.py

# Coordinator and peers on separate hosts: Linux network namespaces (needs root and iproute2);
# test_scenario: bench/scenario.py end to end on a tiny run.
test-multihost: setup
	$(BIN)/python -m pytest -q -s tests/system/test_multihost.py tests/system/test_scenario.py

bench-netns: setup
	$(BIN)/python bench/netns_bench.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy fedmoe  # fedmoe/common etc. link to the role folders

protos: setup
	$(BIN)/python scripts/gen_protos.py

bench: setup
	$(BIN)/python bench/stream_bench.py --repeats 5
	@if [ "$$(id -u)" = 0 ]; then $(BIN)/python bench/netns_bench.py; \
	else echo "shaped-link rows need root (network namespaces): sudo make bench-netns"; fi
	$(BIN)/python bench/compare.py --dataset digits --peers 4 --rounds 4 --out runs/bench-bytes

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache

# yolo-tokens — `make serve` starts the service, `make test` runs every test.
# Both create .venv on first use (pip + venv; torch comes from this machine's wheel cache).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# The Ray environment (loopback, token auth, the proxy hook, offline) is not set here: every entry
# point (yolo-tokens, tests/conftest.py, the benchmarks) applies it from serve_app/launcher.py.

.PHONY: proto venv browser prometheus serve test chaos fuzz sim lint bench isolation screenshots clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel setuptools
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e ".[dev,postgres]"
	touch $(STAMP)

venv: $(STAMP)

# the gRPC stubs beside serve_app/proto/yolo_tokens/v1/detect.proto (checked in: the serving path needs
# no protoc; tests/serve_app/test_grpc_api.py fails when they are stale)
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. serve_app/proto/yolo_tokens/v1/detect.proto

# `make serve THROUGHPUT=1`: Serve's throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1; README
# "Configuration": user code and the handles' router on each replica's event loop, direct ingress on
# the ingress replicas' own ports). A Ray job's handle must then be used from a running event loop.
THROUGHPUT ?=
serve: $(STAMP)
	$(if $(THROUGHPUT),RAY_SERVE_THROUGHPUT_OPTIMIZED=1 ,)$(BIN)/yolo-tokens serve

# the console's end-to-end test looks at it in Debian's headless chromium (Playwright drives it)
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# Debian's Prometheus server, for the scrape test (tests/serve_app/test_prometheus.py; bound to 127.0.0.1)
prometheus:
	@command -v prometheus >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null)

test: lint browser prometheus
	$(BIN)/python -m pytest -q -p no:cacheprovider

# the quota-lease chaos tests of `make test` at full size (20 SIGKILL seeds per policy, 5,000-request
# bursts, PostgreSQL down 30 s) and those only here (a node with ingress replicas removed from a
# 3-node cluster, the lease load on PostgreSQL, every replica killed under charge, the 3-node shard
# failover on SQLite): about an hour on 2 cores
chaos: $(STAMP)
	YT_LEASE_LONG=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/hostile -k "lease or replica_crash or ledger_kill"
	YT_LEASE_LONG=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/ledger/test_shard_failover.py

# the lease-protocol simulator (tests/sim) for as long as asked: make sim SIM_SECONDS=3600; one seed:
# .venv/bin/python -m tests.sim.run --seed N (prints its trace); a reverted fix: --mutation NAME
SIM_SECONDS ?= 600
sim: $(STAMP)
	$(BIN)/python -m tests.sim.run --seconds $(SIM_SECONDS) --steps 300 --workers 2

# the fuzz targets of `make test`, for longer: make fuzz FUZZ_SECONDS=3600
FUZZ_SECONDS ?= 600
fuzz: $(STAMP)
	YT_FUZZ_RUNS=1000000000 YT_FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/hostile/test_fuzz.py

# ruff on every package; mypy strict on ledger/ (pyproject overrides), plain on serve_app/ and ui/;
# the import contracts of DESIGN §2 (pyproject [tool.importlinter])
lint: $(STAMP)
	$(BIN)/ruff check ledger serve_app ui bench cluster tests
	$(BIN)/mypy ledger serve_app ui
	$(BIN)/lint-imports --no-logo

bench: $(STAMP)
	$(BIN)/python -m bench.ledger --db sqlite
	$(BIN)/python -m bench.ledger --db postgres

# tenant isolation at the detector, fair against fifo on 1 and 2 replicas (issue 21): about 3 minutes
isolation: $(STAMP)
	mkdir -p var && $(BIN)/python -m bench.isolation --out var/isolation.json

# the console's pages in docs/screenshots/ on realistic data made through the real API (issue 18 §8;
# tests/ui/screenshots.py says how): about 5 minutes
screenshots: $(STAMP) browser
	$(BIN)/python -m tests.ui.screenshots --out docs/screenshots

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .import_linter_cache .grimp_cache

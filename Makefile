# Constellation: one command each. `make run` sets up everything from nothing and runs the demo;
# `make test` runs the suite; `make lint` runs ruff, mypy and buf lint; `make bench` runs the benchmarks.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_FILES := $(wildcard protos/constellation/v1/*.proto) $(wildcard protos/constellation/keda/*.proto)
STUBS := libs/constellation/constellation/v1/.stubs
PYTEST_ARGS ?=
# Nothing may fetch weights from a hub: the models come from installed packages.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: all setup stubs run up test lint bench clean deploy-check

all: setup

$(STAMP): requirements.txt requirements-nodeps.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

setup: $(STAMP) $(STUBS)

# Python stubs and .pyi type stubs, generated into the shared library (never committed).
# google/rpc/*.proto come from the installed googleapis-common-protos wheel.
$(STUBS): $(STAMP) $(PROTO_FILES)
	@site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	PATH="$(abspath $(BIN)):$$PATH" $(PY) -m grpc_tools.protoc -I protos -I "$$site" \
	  --python_out=libs/constellation --grpc_python_out=libs/constellation \
	  --mypy_out=libs/constellation --mypy_grpc_out=libs/constellation $(PROTO_FILES)
	@mkdir -p build/proto-deps/google/rpc && site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  cp "$$site"/google/rpc/{status,error_details}.proto build/proto-deps/google/rpc/
	touch $@

stubs: $(STUBS)

# Starts Triton and the services, streams an answer to a demo question, then serves until Ctrl-C.
run: setup
	$(BIN)/constellation up --demo

test: setup
	$(BIN)/pytest -q $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure" >&2; exit 1; fi; exit $$rc

lint: setup
	$(BIN)/ruff check libs services apps tests bench
	$(BIN)/ruff format --check libs services apps tests bench
	$(BIN)/mypy libs/constellation/constellation services apps bench
	$(BIN)/buf lint

bench: setup
	$(PY) -m bench.dispatch_hop
	$(PY) -m bench.mesh_overhead
	$(PY) -m bench.relay_floor
	$(PY) -m services.ranking.train
	$(PY) -m services.dispatch.router_train --quiet
	$(PY) -m bench.pools
	$(PY) -m bench.cascade_search
	$(PY) -m bench.quorum
	$(PY) -m bench.tail_latency
	$(PY) -m bench.line_rate
	$(PY) -m bench.classifier --train
	$(PY) -m bench.fusion --train
	$(PY) -m bench.ranker
	$(PY) -m bench.ranked_fanout
	$(PY) -m bench.planner
	$(PY) -m bench.planned_mesh
	$(PY) -m bench.cache --write-md
	$(PY) -m bench.http_overhead --write-md
	$(PY) -m bench.faults
	$(PY) -m bench.fuzz
	$(PY) -m bench.soak
	$(PY) -m bench.auth_overhead
	$(PY) -m bench.elastic

# The Helm chart and alert rules, offline: lint, render three value sets, validate every object against
# Kubernetes' and KEDA's schemas, refuse bad values, promtool check/test rules (Debian: prometheus).
deploy-check: setup
	$(BIN)/ruff check deploy
	$(BIN)/mypy deploy/check.py
	$(PY) -m deploy.check

clean:
	rm -rf build .run $(STUBS) libs/constellation/constellation/v1/*_pb2*.py* 

# InteractiveOmni serving platform. `make demo` and `make test` are all a newcomer needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BASE ?= /usr/bin/python3.11
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
STAMP       := $(VENV)/.installed
WHEELS      := $(wildcard /opt/wheels)
PIP_FLAGS   := --disable-pip-version-check -q $(if $(WHEELS),--find-links $(WHEELS))
APT_PACKAGES := espeak-ng redis-server prometheus chromium
CKPT_DIR    ?= .cache/checkpoints
PROTOS      := $(wildcard protos/iomni/v1/*.proto)
PROTO_OUT   := services/iomni/v1/.generated

.PHONY: help setup system-packages demo test lint bench chaos fuzz soak checkpoints triton engines up down clean

help:
	@echo "make demo   - set everything up and run a 3-turn audio-visual conversation"
	@echo "make test   - run the whole test suite"
	@echo "make lint   - ruff"
	@echo "make bench  - benchmarks, written to docs/benchmarks/"
	@echo "make chaos  - kill/pause each process under load; figures in docs/benchmarks/chaos.md"
	@echo "make fuzz   - 20000 malformed gRPC requests and Realtime events (FUZZ_EXAMPLES=...)"
	@echo "make soak   - steady load for DURATION (default 30m); curves in docs/benchmarks/soak.md"
	@echo "make triton - the four models on a local tritonserver (CPU profile)"
	@echo "make engines - ONNX exports + GPU repository (TensorRT build needs NVIDIA's container)"

setup: system-packages $(STAMP) $(PROTO_OUT)

# Installs the Debian packages the demo and tests need, only when one is missing.
system-packages:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV)
	$(PIP) install $(PIP_FLAGS) --upgrade pip
	$(PIP) install $(PIP_FLAGS) torch==2.13.0
	$(PIP) install $(PIP_FLAGS) -e '.[dev]'
	@touch $(STAMP)

# Generated protobuf/gRPC code lands in services/iomni/v1/ (not committed).
$(PROTO_OUT): $(PROTOS) | $(STAMP)
	mkdir -p services/iomni/v1
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=services --grpc_python_out=services \
	  --pyi_out=services $(PROTOS)
	@touch services/iomni/v1/__init__.py $@

checkpoints: setup $(CKPT_DIR)/tiny/config.json

# Regenerated whenever the model code changes (a few seconds for `tiny`).
$(CKPT_DIR)/tiny/config.json: $(wildcard services/iomni/model/*.py) | $(STAMP)
	rm -rf $(CKPT_DIR)/tiny
	$(VENV)/bin/iomni make-checkpoint --size tiny --out $(CKPT_DIR)/tiny

# The 3-turn audio-visual conversation through the gateway over gRPC (stack up, then down).
demo: setup checkpoints
	$(PY) -m iomni.cli.stack up --model $(CKPT_DIR)/tiny
	$(PY) -m iomni.cli.demo --server localhost:50051 --kafka 127.0.0.1:9092 --live \
	  --workdir .cache/demo || \
	  { $(PY) -m iomni.cli.stack down; exit 1; }
	$(PY) -m iomni.cli.stack down

test: setup
	$(PY) -m pytest -q --durations=15

lint: setup
	$(VENV)/bin/ruff check services tests loadtests
	$(VENV)/bin/ruff format --check services tests loadtests

# The local stack in the background (Redis, Triton CPU profile, gateway); logs in .run/.
up: setup checkpoints
	$(PY) -m iomni.cli.stack up --model $(CKPT_DIR)/tiny

down:
	@test -x $(PY) && $(PY) -m iomni.cli.stack down || true

# Triton on loopback (8000 HTTP / 8001 gRPC / 8002 metrics) with the CPU profile; Ctrl-C stops.
triton: setup checkpoints
	$(VENV)/bin/iomni triton serve --model $(CKPT_DIR)/tiny

# ONNX exports here; the TensorRT plans need NVIDIA's Triton container and a GPU
# (services/iomni/triton/engines/README.md).
engines: setup checkpoints
	$(VENV)/bin/iomni export onnx --model $(CKPT_DIR)/tiny --out .cache/onnx
	$(VENV)/bin/iomni triton render --profile gpu --out .cache/model_repository_gpu
	@if command -v trtexec >/dev/null; then \
	  bash services/iomni/triton/engines/build_engines.sh .cache/onnx .cache/model_repository_gpu; \
	else \
	  echo "trtexec not found: run services/iomni/triton/engines/build_engines.sh inside NVIDIA's Triton container (see its README)"; \
	fi

bench: setup
	$(PY) -m loadtests.bench_inprocess --out docs/benchmarks
	$(PY) -m loadtests.bench_engine --out docs/benchmarks
	$(PY) -m loadtests.bench_triton --out docs/benchmarks
	$(PY) -m loadtests.bench_gateway --out docs/benchmarks
	$(PY) -m loadtests.bench_streams --out docs/benchmarks
	$(PY) -m loadtests.bench_live --out docs/benchmarks
	$(PY) -m loadtests.bench_gpu --out docs/benchmarks  # on a CUDA machine only; says so elsewhere

# Reliability (docs/reliability.md): bounded, re-runnable, never part of `make test`.
FUZZ_EXAMPLES ?= 20000
DURATION      ?= 30m
chaos: setup checkpoints
	$(PY) -m loadtests.chaos --out docs/benchmarks

fuzz: setup checkpoints
	rm -f docs/benchmarks/fuzz.json
	IOMNI_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) IOMNI_FUZZ_REPORT=docs/benchmarks/fuzz.json \
	  $(PY) -m pytest -q -p no:cacheprovider tests/fuzz

soak: setup checkpoints
	$(PY) -m loadtests.soak --duration $(DURATION) --out docs/benchmarks

clean:
	rm -rf $(VENV) .cache .pytest_cache

# Kubernetes: lint, render and check the Helm chart offline (tests/helm), and regenerate the
# plain manifests in k8s/<profile>/ from it (docs/deploy.md).
.PHONY: helm k8s
helm: setup
	$(PY) -m pytest -q tests/helm

k8s: setup
	$(PY) -m iomni.deploy.render --all

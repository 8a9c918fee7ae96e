# Set-up and everyday commands. `make demo` and `make test` each build the environment first,
# so either works on a fresh machine with Python 3.10+.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# CPU machines pin the CPU build of torch (an unpinned torch pulls a multi-GB CUDA build);
# GPU machines install with CONSTRAINTS= to keep their own torch.
CONSTRAINTS ?= constraints-cpu.txt
PIP_C   = $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

export NO_ALBUMENTATIONS_UPDATE = 1
export WANDB_MODE = disabled

.PHONY: setup demo test lint bench clean

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIP_C) -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

demo: setup  ## the whole chain on the offline synthetic world, ending with reports/world/report.md
	$(BIN)/synseg-train demo

test: setup  ## the test suite
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python benchmarks/nouns.py
	$(BIN)/python benchmarks/filter.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/infer.py

clean:  ## remove generated data (keeps the environment)
	rm -rf data manifests/nouns manifests/labels

# Set-up and everyday commands. `make demo` and `make test` each build the environment first,
# so either works on a fresh machine with Python 3.10+.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# Every dependency is pinned in a lock file (pip-tools, from pyproject.toml and
# constraints-cpu.txt), so a fresh machine installs what CI tested. The lock holds the CPU build
# of torch: an unpinned torch pulls a multi-GB CUDA build. A machine that brings its own torch
# (a GPU machine) uses `make demo TORCH=own`: the venv then sees the system's torch and
# torchvision and installs everything else from the lock.
LOCK   ?= requirements/cpu.lock
TORCH  ?= cpu
VENV_FLAGS = $(if $(filter own,$(TORCH)),--system-site-packages,)

export NO_ALBUMENTATIONS_UPDATE = 1
export WANDB_MODE = disabled

.PHONY: setup demo test lint bench lock clean

$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/pip install -q --upgrade pip
ifeq ($(TORCH),own)
	grep -vE '^(torch|torchvision)==' $(LOCK) > $(VENV)/lock-own-torch.txt
	$(BIN)/pip install -q -r $(VENV)/lock-own-torch.txt
else
	$(BIN)/pip install -q -r $(LOCK)
endif
	$(BIN)/pip install -q --no-deps -e .
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
	$(BIN)/python benchmarks/threads.py
	$(BIN)/python benchmarks/resume.py
	$(BIN)/python benchmarks/stages.py

lock:  ## refresh requirements/cpu.lock from pyproject.toml and constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/pip install -q pip-tools
	$(VENV)-lock/bin/pip-compile -q --upgrade --extra dev --extra ray -c constraints-cpu.txt \
		--no-emit-find-links --no-emit-index-url --strip-extras \
		--output-file $(LOCK) pyproject.toml

clean:  ## remove generated data (keeps the environment)
	rm -rf data manifests/nouns manifests/labels

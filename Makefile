# The two commands of the README: `make demo` and `make test`. Everything installs into .venv.
PY_SYS ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
export WANDB_MODE ?= offline
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install test demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY_SYS) -m venv $(VENV)
	$(PIP) install --upgrade pip wheel setuptools
	@# The pinned torch first, alone: on a machine without CUDA it is the CPU build (see README),
	@# and once it is installed no other package can pull a multi-GB CUDA build in its place.
	$(PIP) install -c constraints.txt torch
	$(PIP) install -c constraints.txt -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest

demo: install
	bash scripts/demo.sh

bench: install
	$(PY) -m bench.data_prep
	$(PY) -m bench.model
	$(PY) -m bench.loader
	$(PY) -m bench.train
	$(PY) -m bench.server
	$(PY) -m bench.finetune

clean:
	rm -rf $(VENV) outputs demo_out

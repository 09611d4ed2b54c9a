# Two entry points (see README): `make study` runs the main job, `make test` runs the tests.
# TORCH is the torch release installed before everything else. `pip install torch==2.13.0` takes the CPU wheel
# where one lies on disk (this project's machines) and PyPI's CUDA build on a Linux CUDA box.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= 2.13.0
PY := $(VENV)/bin/python

.PHONY: setup study demo test bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

setup: $(VENV)/.installed

study: setup
	$(PY) -m bwl demo

demo: study

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf runs cache

# Two entry points (see README): `make study` runs the main job, `make test` runs the tests.
# TORCH is the torch release installed before everything else. `pip install torch==2.13.0` takes the CPU wheel
# where one lies on disk (this project's machines) and PyPI's CUDA build on a Linux CUDA box.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= 2.13.0
PY := $(VENV)/bin/python

.PHONY: setup study demo test docs notebooks bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -qq "torch==$(TORCH)"
	$(PY) -m pip install -qq -c constraints.txt -e ".[dev,docs]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

setup: $(VENV)/.installed

study: setup
	$(PY) -m bwl run --profile toy

demo: setup
	$(PY) -m bwl demo

# Lint, unit tests (tests/test_layers.py checks the layering), then the notebooks against the outputs committed from
# an earlier smoke run (nbval, lax mode).
test: setup
	$(VENV)/bin/ruff check bwl tests benchmarks notebooks
	$(PY) -m pytest -q tests
	rm -rf runs/smoke
	$(PY) -m pytest -q --nbval-lax --nbval-sanitize-with notebooks/nbval_sanitize.cfg notebooks/01_data_preparation.ipynb notebooks/02_training.ipynb notebooks/03_ablation_grids.ipynb notebooks/04_figures.ipynb

# Write the repository's address (pyproject.toml) into every notebook's Colab cell, then regenerate the committed
# notebook outputs from a fresh smoke run (what nbval compares against). BWL_CONSOLE: no progress bars stored in them
# (bwl.study.running.console). papermill's injected-parameters cell is dropped from the committed copies.
notebooks: setup
	$(PY) -c "from bwl.study.running.notebook_files import sync_colab_cells; sync_colab_cells()"
	rm -rf runs/smoke
	for nb in 01_data_preparation 02_training 03_ablation_grids 04_figures; do \
		BWL_CONSOLE=1 $(PY) -m papermill -k python3 --cwd notebooks notebooks/$$nb.ipynb notebooks/$$nb.ipynb || exit 1; done
	$(PY) -c "from bwl.study.running.notebook_files import drop_injected_parameters; drop_injected_parameters()"

# The book (docs/ and the committed, executed notebooks), built offline without executing anything. CI adds -W.
SPHINXOPTS ?=
docs: setup
	$(PY) -m sphinx -b html -q $(SPHINXOPTS) docs build/docs
	@echo "the book: build/docs/index.html"

bench: setup
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_blocks.py
	$(PY) benchmarks/bench_generate.py

clean:
	rm -rf runs cache

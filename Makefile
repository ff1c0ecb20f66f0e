# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
INSTALLED := $(VENV)/.installed
DEMO_DIR ?= outputs/demo

.PHONY: install test test-fast demo clean

# torch first: with no torch present, a plain `torch` requirement would pull a multi-GB CUDA build,
# while torch==2.13.0 takes the CPU wheel that lies on this disk. DeepSpeed is built against the torch
# in the venv (no build isolation) and without its C++ ops, which CPU runs do not need.
$(INSTALLED): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation -e ".[test]"
	touch $(INSTALLED)

install: $(INSTALLED)

test: $(INSTALLED)
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest --durations=10

test-fast: $(INSTALLED)
	$(PYTHON) -m pytest -m "not slow"

# The embedded default, offline: the tiny recipe with DualAdam and with AdamW, then the comparison.
demo: $(INSTALLED)
	$(PYTHON) scripts/finetune.py recipes/tiny_alpaca.yaml --overwrite_output_dir true --output_dir $(DEMO_DIR)/dualadam
	$(PYTHON) scripts/finetune.py recipes/tiny_alpaca.yaml --optim adamw_torch --overwrite_output_dir true --output_dir $(DEMO_DIR)/adamw
	$(PYTHON) scripts/compare.py $(DEMO_DIR)/dualadam $(DEMO_DIR)/adamw --out $(DEMO_DIR)

clean:
	rm -rf $(VENV) outputs

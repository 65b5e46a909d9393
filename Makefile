# megalm: the everyday commands. `make help` lists them.
PYTHON ?= python3
PYTEST_WORKERS ?= 2

.PHONY: help install quickstart test test-gpu bench lint check-cuda

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# An installation is remembered per Python environment by a file under build/: `make test` and
# `make quickstart` install again only when a requirement file, setup.py or a C++ source changed
# since (or for another environment); `make install` always installs.
ENVIRONMENT := $(shell $(PYTHON) -c "import os, sys, zlib; cfg = os.path.join(sys.prefix, 'pyvenv.cfg'); \
	print(zlib.crc32(f'{sys.prefix} {os.path.exists(cfg) and os.path.getmtime(cfg)}'.encode()))")
INSTALLED := build/installed-$(ENVIRONMENT)
INSTALL_INPUTS := requirements.txt requirements-dev.txt setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/cuda/*)

# One line per step, then pip's own lines and download progress bars.
define install_steps
	@$(PYTHON) -c "import torch; print('==> keeping the installed PyTorch', torch.__version__)" 2>/dev/null || { \
		echo "==> installing PyTorch (torch==2.13.0): a large download, several minutes"; \
		$(PYTHON) -m pip install torch==2.13.0; }
	@echo "==> installing the dependencies and test tools (requirements-dev.txt): about 2 minutes"
	$(PYTHON) -m pip install -r requirements-dev.txt
	@echo "==> building the C++ helpers, installing megalm in editable mode: about 1 minute"
	$(PYTHON) -m pip install --no-deps --no-build-isolation -e .
	@mkdir -p build && touch $(INSTALLED)
	@echo "==> installed"
endef

install: ## install megalm and its dependencies (keeps an installed torch; else the CPU/CUDA wheel)
	$(install_steps)

$(INSTALLED): $(INSTALL_INPUTS)
	$(install_steps)

quickstart: $(INSTALLED) ## raw text -> tokenizer -> dataset -> train a small GPT -> sample text (CPU, minutes)
	bash examples/quickstart.sh

test: $(INSTALLED) ## the test suite (CPU; Triton kernels through the interpreter)
	$(PYTHON) -m pytest -q -n $(PYTEST_WORKERS) --durations=15

test-gpu: $(INSTALLED) ## only the GPU tests (needs CUDA)
	$(PYTHON) -m pytest -q -m gpu

bench: $(INSTALLED) ## training throughput vs a nanoGPT-style reference, and the kernel benchmarks
	$(PYTHON) tools/bench/train_throughput.py
	$(PYTHON) tools/bench/kernels.py

lint: ## ruff
	$(PYTHON) -m ruff check .

check-cuda: ## compile-check the CUDA sources with nvcc (no GPU needed)
	bash tools/check_cuda_sources.sh

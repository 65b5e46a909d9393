# megalm: the everyday commands. `make help` lists them.
PYTHON ?= python3
PYTEST_WORKERS ?= 2

.PHONY: help install quickstart test test-gpu bench lint check-cuda

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: ## install megalm and its dependencies (keeps an installed torch; else the CPU/CUDA wheel)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(PYTHON) -m pip install -q --no-build-isolation -e .

quickstart: install ## raw text -> tokenizer -> dataset -> train a small GPT -> sample text (CPU, minutes)
	bash examples/quickstart.sh

test: install ## the test suite (CPU; Triton kernels through the interpreter)
	$(PYTHON) -m pytest -q -n $(PYTEST_WORKERS) --durations=15

test-gpu: install ## only the GPU tests (needs CUDA)
	$(PYTHON) -m pytest -q -m gpu

bench: install ## training throughput vs a nanoGPT-style reference, and the kernel benchmarks
	$(PYTHON) tools/bench/train_throughput.py
	$(PYTHON) tools/bench/kernels.py

lint: ## ruff
	$(PYTHON) -m ruff check .

check-cuda: ## compile-check the CUDA sources with nvcc (no GPU needed)
	bash tools/check_cuda_sources.sh

# alignkit developer commands. `make setup` then `make test` on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: setup data test test-fast lint format smoke demo reproduce clean slurm-up slurm-down gpu-check gpu-wheels

setup: ## virtualenv with pinned torch 2.14.1 / torchvision 0.29.1 and every test/lint/offline-asset extra
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c requirements/constraints.txt torch==2.14.1 torchvision==0.29.1
	# benchmark: the clip_benchmark CLI (its metric functions are also the tests' independent reference)
	$(BIN)/pip install -q -c requirements/constraints.txt -e '.[slurm,offline-assets,eval,benchmark,sweep,test,lint]'
	$(MAKE) data

data: ## real offline data from Debian (Fashion-MNIST, openclipart) used by tests and the demo
	@if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -d /usr/share/openclipart/png ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist openclipart-png; fi

test: setup ## set up (idempotent), then the whole suite (CPU, offline)
	$(BIN)/python -m pytest -q

test-fast: ## skip the slow end-to-end tier
	$(BIN)/python -m pytest -q -m "not slow"

slurm-up: ## a real single-node SLURM on localhost (root, Debian 12; tests/test_slurm.py starts it by itself too)
	bash scripts/slurm/localhost_cluster.sh up

slurm-down:
	bash scripts/slurm/localhost_cluster.sh down

gpu-wheels: ## wheels beyond torch/lightning/timm/transformers for an offline GPU node, into .whl/ (GPU_PYVER=3.12)
	PYTHON=$(BIN)/python bash scripts/gpu_wheels.sh

gpu-check: ## bf16 / DDP / FSDP / cache-and-recompute on the GPUs present (< 5 min)
	PYTHON=$(BIN)/python bash scripts/gpu_check.sh

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: setup ## the main offline job: STRUCTURE on real offline encoders (EffNet-Lite0 + MiniLM) and real pairs
	$(BIN)/python train.py +experiment=structure_offline

smoke: setup ## one-minute check of the CLIP-Refine path: CLIP-Refine losses on the shipped tiny CLIP and synthetic pairs (< 1 min)
	$(BIN)/python train.py +experiment=smoke

reproduce: setup ## the offline replication table of both papers (real small encoders and data; ~30 min on 2 CPU cores)
	$(BIN)/python scripts/reproduce.py offline --out outputs/reproduce

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache

# make bench, bench-overhead, bench-peer, bench-structure, bench-data, bench-gpu (results: BENCHMARKS.md)
include scripts/bench.mk

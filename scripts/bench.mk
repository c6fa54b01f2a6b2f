# Benchmarks (issue 6). Include from the Makefile (`include scripts/bench.mk`) or run `make -f scripts/bench.mk bench`.
# Each prints min/median/max after warm-up and ratios measured side by side in one run; results: BENCHMARKS.md.
BIN ?= .venv/bin
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: bench bench-overhead bench-peer bench-structure bench-data bench-gpu

bench: bench-overhead bench-peer bench-structure bench-data ## every CPU benchmark (~15 min on 2 shared cores)

bench-overhead: ## 1 + 3 (+6): alignkit vs a bare PyTorch loop; CLIP-Refine teacher cost; peak RSS per variant
	cd scripts && ../$(BIN)/python bench_overhead.py --memory

bench-peer: ## 2: alignkit train.py vs open_clip_train, same shards / model / batch
	@test -d /tmp/alignkit-oc-extra/pandas || $(BIN)/pip install -q --no-deps --target /tmp/alignkit-oc-extra pandas
	cd scripts && ../$(BIN)/python bench_peer.py

bench-structure: ## 4 + 6: FeatureCache extraction, cached-feature epochs, layer selection, R_S at batch 4,096
	cd scripts && ../$(BIN)/python bench_structure.py

bench-data: ## 5: webdataset pipeline samples/s for 1, 2, 4 workers vs a training step
	cd scripts && ../$(BIN)/python bench_data.py

bench-gpu: ## ViT-B-32 CLIP-Refine at bf16 on a GPU: samples/s, MFU, ratio to open_clip_train
	cd scripts && ../$(BIN)/python bench_gpu.py

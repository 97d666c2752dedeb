# triton-rag: `make serve` runs the real tritonserver on this machine; `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is the CPU build on this project's CI machines; on a GPU machine pick a CUDA build, e.g. TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0

# make serve PROFILE=rtx5070ti-16gb: a whole settings file from profiles/ (or a path) instead of rag.toml
CONFIG :=
ifdef PROFILE
CONFIG := --profile $(PROFILE)
endif
# make serve EMBED_MODEL=Qwen/Qwen3-Embedding-8B RERANK_MODEL=/models/Qwen3-Reranker-4B EMBED_DIM=1024
SET :=
ifdef EMBED_MODEL
SET += --set embed.model=$(EMBED_MODEL)
endif
ifdef RERANK_MODEL
SET += --set rerank.model=$(RERANK_MODEL)
endif
ifdef EMBED_DIM
SET += --set embed.dim=$(EMBED_DIM)
endif
# make serve VRAM_BUDGET=12GiB VRAM_HIGH_WATERMARK=0.85 (the router's memory budget; docs/ROUTER.md)
ifdef VRAM_BUDGET
SET += --set router.budget=$(VRAM_BUDGET)
endif
ifdef VRAM_HIGH_WATERMARK
SET += --set router.high_watermark=$(VRAM_HIGH_WATERMARK)
endif
# make serve DEVICE_MEMORY=16303MiB: act as a GPU of this much memory (an H100/H200 standing in for a 16 GB card)
ifdef DEVICE_MEMORY
SET += --set router.device_memory=$(DEVICE_MEMORY)
endif
SERVE_ARGS ?=

.PHONY: install install-test test-tools prepare serve plan lint test bench bench-seed engines clean

# What serving needs (make serve, prepare, plan, bench): the package, torch and the embedded tritonserver
install: $(VENV)/.installed
# ... and what the tests, the linters and the engine builds need besides (pyproject.toml's test extra)
install-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[embedded]'
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e '.[embedded,test]'
	@touch $@

# perf_analyzer (and docker-compose for the compose check): see tools/install_test_tools.sh
test-tools: install
	bash tools/install_test_tools.sh $(VENV)

prepare: install .env
	$(PY) -m triton_rag prepare $(CONFIG) $(SET)

# Will the configured models fit? Bytes per model, which co-reside, the steady state; downloads nothing.
# make plan PROFILE=rtx5070ti-16gb (DEVICE_MEMORY=16GiB plans for a GPU of that size)
plan: install
	$(PY) -m triton_rag plan $(CONFIG) $(SET)

# The admin key for docker compose, which reads TRITON_RAG_ADMIN_KEY from .env: the key `make serve` uses (from the
# environment, else .cache/admin.key, made if missing), so the same clients work with both. Written once, if missing.
.env: | install
	@key=$$($(PY) -m triton_rag admin-key) && umask 077 && printf 'TRITON_RAG_ADMIN_KEY=%s\n' "$$key" > $@
	@echo "wrote .env (TRITON_RAG_ADMIN_KEY, the admin key docker compose passes to tritonserver)"

serve: install
	$(PY) -m triton_rag serve $(CONFIG) $(SET) $(SERVE_ARGS)

# Style (ruff), types (mypy on the package) and the layer contracts (lint-imports; docs/ARCHITECTURE.md)
lint: install-test
	$(VENV)/bin/ruff check backends tests tools
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: install-test test-tools
	$(PY) -m pytest $(PYTEST_ARGS)

# The encoder benchmark: on a GPU the 0.6B and 8B shapes against the transformers baseline in the same run, bare and
# through tritonserver (perf_analyzer), table appended to BENCHMARKS.md; on a CPU a short smoke run with the tiny
# models. Results in bench_results/encoders/. Parts: make bench BENCH_ARGS="--shapes 8b --tasks embed"
bench: install test-tools
	$(PY) tools/bench_encoders.py --e2e --out bench_results/encoders --append BENCHMARKS.md $(BENCH_ARGS)

# The RAG seed scenario on the 16 GB profile (convert a PDF, embed its chunks, then embed + rerank queries; swaps,
# the device's peak memory, accuracy against bfloat16), then the same with the reranker in FP8: tools/bench_seed.py.
# On a GPU: 8B shapes of random weights under the profile's device_memory cap; on a CPU: BENCH_ARGS="--shape tiny".
bench-seed: install
	$(PY) tools/bench_seed.py --out bench_results/seed $(BENCH_ARGS)

# Engine builds (issue 6, in progress): each encoder to ONNX with the PyTorch engine's contract, checked with
# onnxruntime; FP8 Q/DQ (ModelOpt, MatMuls only) with its accuracy; a TensorRT-RTX engine for RTX 50 (SM120) with
# its manifest (built on any machine, no GPU needed). docs/ENGINES.md
engines: install-test
	$(PY) tools/export_onnx.py $(SET)

clean:
	rm -rf .cache model_repository/*/config.pbtxt model_repository/*/1/hf model_repository/*/1/tokenizer

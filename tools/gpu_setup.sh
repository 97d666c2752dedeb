#!/usr/bin/env bash
# Source this on the GPU machine (no network; torch and transformers are there) to unpack what
# tools/pack_gpu_bundle.sh put in .bench/ (carry [".bench"]): tritonserver and tritonclient, numpy 1.26 for the
# Python 3.12 stub, docling-core and its dependencies, the Qwen3 and cl100k_base tokenizers in .cache. The stub
# ignores PYTHONPATH, so a .pth file makes the unpacked packages and triton_rag importable from the system Python.
set -e
mkdir -p .cache /tmp/site
for archive in .bench/*-tokenizer.tar.xz; do tar -xJf "$archive" -C .cache; done
tar -xJf .bench/site.tar.xz -C /tmp/site
python3 -m pip install -q --no-index --no-deps --break-system-packages .bench/numpy-*.whl
# built against numpy 2: transformers would import them and fail under numpy 1.26
python3 -m pip uninstall -q -y --break-system-packages scipy scikit-learn || true
site_packages=$(python3 -c "import site; print(site.getsitepackages()[0])")
# /tmp/site goes first: where the machine has its own copy of a package carried there (pydantic, typing_extensions,
# pandas), the carried one, which matches the rest of the bundle and numpy 1.26, is the one imported
printf 'import sys; sys.path.insert(0, "/tmp/site")\n%s/backends\n' "$PWD" > "$site_packages/triton-rag-bench.pth"
# The machine's site-packages hold no byte code and its Python writes none: every process (each Triton stub too)
# would compile torch's sources again, 8-12 s (BENCHMARKS.md). A byte-code cache, filled by the first import, is one
# of the warm caches a cold load is measured with.
printf 'import sys; sys.dont_write_bytecode = False; sys.pycache_prefix = "/tmp/pycache"\n' >> "$site_packages/triton-rag-bench.pth"
export PYTHONPATH=$PWD/tools:$PWD PYTHONUNBUFFERED=1
set +e

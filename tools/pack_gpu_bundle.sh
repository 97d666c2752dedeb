#!/usr/bin/env bash
# Packs what the GPU machine lacks (it has torch and transformers, no network) into .bench/, small enough to carry
# there (64 MiB per run): the embedded tritonserver slimmed to the Python 3.12 stub, the tritonclient that drives it,
# numpy 1.26 (that stub was built against numpy 1.x) and the Qwen3 tokenizer. tools/gpu_setup.sh unpacks it there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=.bench
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out" "$work/site"

echo "pack-gpu-bundle: downloading wheels for CPython 3.12"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$work/wheels" \
    nvidia-pytriton==0.7.0 python-rapidjson==1.25 tritonclient==2.73.0 numpy==1.26.4
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
rm -rf "$work"/site/*.dist-info
chmod +x "$server/bin/"* "$server/python_backend_stubs/3.12/triton_python_backend_stub"
find "$work/site" -path '*/bin/*' -type f -exec chmod +x {} +
tar -C "$work/site" -cJf "$out/site.tar.xz" .

echo "pack-gpu-bundle: the Qwen3 tokenizer"
test -f .cache/qwen3-tokenizer/tokenizer.json || { echo "missing .cache/qwen3-tokenizer: run make install first" >&2; exit 1; }
tar -C .cache -cJf "$out/qwen3-tokenizer.tar.xz" qwen3-tokenizer
du -ch "$out"/* | tail -n 1 | sed 's/^/pack-gpu-bundle: .bench holds /'

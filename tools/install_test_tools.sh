#!/usr/bin/env bash
# Installs what the test suite drives besides Python packages:
#  - perf_analyzer: the binary shipped in the tritonclient 2.41.0 wheel (newer perf-analyzer wheels need glibc 2.38),
#    with libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel and Debian's libb64-0d;
#  - docker-compose (Debian), so that `docker-compose config` can check docker-compose.yml without a Docker engine.
# Result: .cache/bin/perf_analyzer (a wrapper that sets LD_LIBRARY_PATH). Idempotent.
set -euo pipefail
venv=${1:-.venv}
py="$venv/bin/python"
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/.cache/bin"
mkdir -p "$bin" "$root/.cache/perf_analyzer"

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "install-test-tools: please install the Debian/Ubuntu packages: $*" >&2
    return 1
  fi
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  fi
}

if ! ldconfig -p | grep -q 'libb64.so.0d'; then
  echo "install-test-tools: installing libb64-0d (perf_analyzer needs it)"
  apt_install libb64-0d
fi
if ! command -v docker-compose >/dev/null && ! docker compose version >/dev/null 2>&1; then
  echo "install-test-tools: installing docker-compose (to validate docker-compose.yml)"
  apt_install docker-compose || echo "install-test-tools: docker-compose unavailable; the compose check will fail" >&2
fi

if [ ! -x "$root/.cache/perf_analyzer/perf_analyzer" ]; then
  echo "install-test-tools: fetching perf_analyzer (tritonclient 2.41.0 wheel, 12 MB)"
  tmp=$(mktemp -d)
  "$py" -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux1_x86_64 \
    tritonclient==2.41.0 -d "$tmp"
  "$py" - "$tmp" "$root/.cache/perf_analyzer" <<'PY'
import sys, zipfile, pathlib
wheel = next(pathlib.Path(sys.argv[1]).glob("tritonclient-2.41.0-*.whl"))
out = pathlib.Path(sys.argv[2]) / "perf_analyzer"
with zipfile.ZipFile(wheel) as archive:
    out.write_bytes(archive.read("tritonclient-2.41.0.data/data/bin/perf_analyzer"))
out.chmod(0o755)
PY
  rm -rf "$tmp"
fi
"$py" -c "import nvidia.cuda_runtime" 2>/dev/null || "$py" -m pip install --quiet "nvidia-cuda-runtime-cu12>=12,<13"
cudart=$("$py" -c "import nvidia.cuda_runtime, os; print(os.path.join(list(nvidia.cuda_runtime.__path__)[0], 'lib'))")
cat > "$bin/perf_analyzer" <<SH
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$cudart\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$root/.cache/perf_analyzer/perf_analyzer" "\$@"
SH
chmod +x "$bin/perf_analyzer"
missing=$(LD_LIBRARY_PATH="$cudart" ldd "$root/.cache/perf_analyzer/perf_analyzer" | grep 'not found' || true)
if [ -n "$missing" ]; then echo "install-test-tools: perf_analyzer lacks libraries: $missing" >&2; exit 1; fi
echo "install-test-tools: perf_analyzer ready at $bin/perf_analyzer"

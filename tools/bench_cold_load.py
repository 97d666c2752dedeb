"""Engine-level cold loads of a random-weight Qwen3 encoder, each in a fresh process (as a Triton stub starts), with
warm caches: the page cache holds the checkpoint, the inductor cache and the saved compiled layer are there (the
first, unmeasured load makes them). Variants of the load's knobs run in turn, so they are compared on one machine:

    python tools/bench_cold_load.py --shape 8b --cache-dir .cache

Prints each load's engine log (the phases `triton_rag.core.load_phases` reads) and its wall time from process start.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from triton_rag.build.offline import QWEN3_SHAPES, TINY_QWEN3, build_random_qwen3

SHAPES = QWEN3_SHAPES | {"tiny": TINY_QWEN3}

#: name -> Python statements run before the load (they change the loader's module constants, or COMPILE)
VARIANTS = {
    "default": "",
    # the layer not compiled at all: eager kernels in CUDA graphs, no package to load (the floor for a load's time)
    "eager": "COMPILE = False",
    "four-buffers-64MiB": "import triton_rag.engines.checkpoint as c; c.BUFFERS = 4; c.STAGING_BYTES = 64 * 2**20",
}

LOAD = """
import time, sys
COMPILE = True
{setup}
from triton_rag.engines.torch_encoder import TorchEncoder
TorchEncoder({model!r}, "embed", precision="fp8", compile_model=COMPILE, sleepable=True,
             log=lambda m: print(f"  {{m}}", flush=True))
from triton_rag.core.load_phases import compiler_packages_imported, process_age_seconds
print(f"  loaded: process {{process_age_seconds():.2f}} s old; compiler modules imported: "
      f"{{compiler_packages_imported() or 'none'}}", flush=True)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda", help="where the random weights are built (cpu: a smoke test)")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    cache = args.cache_dir.resolve()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    started = time.perf_counter()
    model = build_random_qwen3(
        "embed", cache / f"qwen3-{args.shape}-embed", cache, SHAPES[args.shape], print, "bfloat16", args.device
    )
    print(f"model ready in {time.perf_counter() - started:.1f} s", flush=True)
    runs = [("first load (fills the caches)", "")] + [
        (name, VARIANTS[name]) for _ in range(args.repeats) for name in args.variants
    ]
    for name, setup in runs:
        print(f"{name}:", flush=True)
        code = LOAD.format(setup=setup, model=str(model))
        subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    return 0


if __name__ == "__main__":
    sys.exit(main())

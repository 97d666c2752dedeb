"""What a sleeping encoder still holds on the GPU, part by part (issue 21: the 1.07 GB a sleeping 8B encoder kept).

One process, the device's own reading (NVML, this process) after each step: the CUDA context alone; cuBLAS and the
attention kernels' first calls; the engine loaded and warmed up (weights in the arena, compiled layers, CUDA graphs);
asleep; asleep with the allocator's cache emptied; with the context's stack reserve trimmed; with the CUDA graphs
and their pool, the compiled code and cuBLAS's workspaces dropped (what each would save; the engine keeps them, or
a wake would have to rebuild them). Beside NVML,
torch's allocator (reserved, allocated), so the part NVML sees outside the allocator (the context, cuBLAS's
handles, loaded kernel images) is the difference.

    python tools/profile_residue.py --layers 4 --precision fp8 --out bench_results/residue

The 8B width with fewer layers (`--layers`) holds the same activations, graphs and context as the full model; only
the weights (which sleep) are fewer.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from triton_rag.build.offline import QWEN3_SHAPES, build_random_qwen3
from triton_rag.engines.cuda_context import trim_stack_reserve
from triton_rag.engines.torch_encoder import TorchEncoder

_log = logging.getLogger("profile_residue")
MIB = 2**20


def process_bytes() -> int:
    """This process's GPU memory as the driver reports it (NVML)."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if process.pid == os.getpid():
            return int(process.usedGpuMemory)
    return 0


def reading(step: str) -> dict[str, Any]:
    torch.cuda.synchronize()
    row = {
        "step": step,
        "nvml_mib": round(process_bytes() / MIB, 1),
        "reserved_mib": round(torch.cuda.memory_reserved() / MIB, 1),
        "allocated_mib": round(torch.cuda.memory_allocated() / MIB, 1),
    }
    row["outside_allocator_mib"] = round(row["nvml_mib"] - row["reserved_mib"], 1)
    _log.info(json.dumps(row))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8b", choices=sorted(QWEN3_SHAPES))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--precision", default="fp8")
    parser.add_argument("--task", default="embed", choices=["embed", "rerank"])
    parser.add_argument("--max-batch-tokens", type=int, default=32768)
    parser.add_argument("--work", type=Path, default=Path("/tmp/residue"))
    parser.add_argument("--out", type=Path, default=Path("bench_results/residue"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[profile_residue %(asctime)s] %(message)s", stream=sys.stderr)
    rows: list[dict[str, Any]] = []
    torch.empty(1, device="cuda")
    rows.append(reading("CUDA context (torch.empty(1))"))
    a = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16)
    (a @ a.T).sum().item()
    rows.append(reading("+ a bfloat16 cuBLAS matmul"))
    del a
    shape = dict(QWEN3_SHAPES[args.shape], num_hidden_layers=args.layers)
    model_dir = build_random_qwen3(
        args.task, args.work / f"{args.shape}-{args.layers}-{args.task}", Path(".cache"), shape, dtype="bfloat16",
        device="cuda",
    )  # fmt: skip
    gc.collect()
    torch.cuda.empty_cache()
    rows.append(reading("checkpoint built, its tensors freed"))
    started = time.perf_counter()
    engine = TorchEncoder(
        model_dir, args.task, precision=args.precision, compile_model=True, sleepable=True,
        max_batch_tokens=args.max_batch_tokens, yes_no_ids=(2152, 9693) if args.task == "rerank" else None,
        log=_log.info,
    )  # fmt: skip
    engine.warm_up(_log.info)
    rows.append(reading(f"engine loaded and warmed up ({time.perf_counter() - started:.0f} s)"))
    ids = np.full((16, 2048), 100, dtype=np.int64)
    engine.forward(ids, np.ones_like(ids))
    rows.append(reading("after a 16 x 2048-token batch (packed passes)"))
    weights = engine.arena.nbytes if engine.arena is not None else 0
    engine.sleep()
    rows.append(reading(f"asleep (arena of {weights / MIB:.0f} MiB released)"))
    torch.cuda.empty_cache()
    rows.append(reading("asleep, allocator cache emptied"))
    trim_stack_reserve(torch.device("cuda"))
    rows.append(reading("asleep, the context's stack reserve trimmed (cuda_context.trim_stack_reserve)"))
    graphs = len(engine._graphs)
    engine._graphs.clear()
    engine._graph_pool = None
    gc.collect()
    torch.cuda.empty_cache()
    rows.append(reading(f"asleep, {graphs} CUDA graphs and their pool dropped"))
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    rows.append(reading("asleep, compiled code dropped too (torch._dynamo.reset)"))
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    rows.append(reading("asleep, cuBLAS workspaces freed too"))
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": args.shape,
        "layers": args.layers,
        "precision": args.precision,
        "max_batch_tokens": args.max_batch_tokens,
        "rows": rows,
    }
    (args.out / "residue.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

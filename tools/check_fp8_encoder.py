"""First look at the encoder engine's precisions on a GPU (issue 5): bfloat16 and FP8 (rowwise), eager and compiled,
on the same random weights of a real Qwen3-Embedding shape; 8 texts of 512 tokens, and one 16-token query.

    PYTHONPATH=backends OUT=/tmp python3 tools/check_fp8_encoder.py 0.6b [8b]

Prints one line per variant and writes fp8_<shape>.json under $OUT. `make bench` (issue 5) supersedes it."""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from triton_rag.engines.torch_encoder import TorchEncoder
from triton_rag.offline import QWEN3_SHAPES, build_random_qwen3

out = Path(os.environ.get("OUT", "/tmp"))
for shape in sys.argv[1:]:
    d = build_random_qwen3(
        "embed",
        Path(f".cache/q-{shape}"),
        Path(".cache"),
        QWEN3_SHAPES[shape],
        dtype="bfloat16",
        device="cuda",
        log=lambda m: None,
    )
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 100000, size=(8, 512)).astype(np.int64)
    mask = np.ones_like(ids)
    results = {}
    pooled = {}
    for name, kw in [
        ("bf16", dict(precision="bfloat16")),
        ("fp8 eager", dict(precision="fp8")),
        ("fp8 compiled", dict(precision="fp8", compile_model=True)),
        ("bf16 compiled", dict(precision="bfloat16", compile_model=True)),
    ]:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        enc = TorchEncoder(d, "embed", device="cuda", log=lambda m: None, **kw)
        for _ in range(3):
            enc.forward(ids, mask)
        torch.cuda.synchronize()
        t = time.perf_counter()
        n = 10
        for _ in range(n):
            p = enc.forward(ids, mask)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / n
        pooled[name] = p
        a = p / np.linalg.norm(p, axis=1, keepdims=True)
        b = pooled["bf16"] / np.linalg.norm(pooled["bf16"], axis=1, keepdims=True)
        results[name] = dict(
            tokens_per_s=round(ids.size / dt),
            ms=round(dt * 1e3, 1),
            peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
            min_cos_vs_bf16=float((a * b).sum(1).min()),
        )
        t = time.perf_counter()
        q = np.array([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 151643]])
        qm = np.ones_like(q)
        for _ in range(3):
            enc.forward(q, qm)
        torch.cuda.synchronize()
        lat = []
        for _ in range(20):
            t = time.perf_counter()
            enc.forward(q, qm)
            torch.cuda.synchronize()
            lat.append((time.perf_counter() - t) * 1e3)
        results[name]["query16_p50_ms"] = round(float(np.median(lat)), 2)
        print(shape, name, results[name], flush=True)
        del enc
    (out / f"fp8_{shape}.json").write_text(json.dumps(results, indent=1))

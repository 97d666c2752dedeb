"""Encoder benchmark (issue 5, in progress): the transformers baseline a user would pick against our engine, same
card, same run, same random weights of a real Qwen3-Embedding shape.

Workload: `--texts` random-token texts of 32-512 tokens (CPU smoke: 16-64), and one 16-token query.
- baseline: transformers `AutoModel` in bfloat16 (SDPA), texts sorted by length, left-padded batches of 32,
  last-token pooling (the Qwen3-Embedding card's recipe);
- ours: `TorchEncoder` at each `--precisions` (optionally compiled), with the endpoint's own micro-batching
  (length-sorted groups under a padded-token budget).
Reported: tokens/s over real tokens, the 16-token query's p50/p99, peak GPU memory, and the cosine of each
variant's embeddings to the baseline's. With `--e2e`, each precision of ours is also served by the real
tritonserver (`qwen_embed` endpoint, router on) and driven over gRPC: the same texts as strings, 16 per request,
`--concurrency` requests in flight, and the 16-token query one at a time.

    python tools/bench_encoders.py --out bench_results/encoders                  # GPU: 0.6B and 8B shapes
    python tools/bench_encoders.py --shapes tiny --texts 64 --out /tmp/enc       # CPU smoke run
Writes encoders.json and encoders.md (a table for BENCHMARKS.md), and encoders.png when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchlib import markdown_table, timed

from triton_rag.batching import pad_rows, plan_micro_batches
from triton_rag.engines.torch_encoder import TorchEncoder, pool
from triton_rag.offline import QWEN3_SHAPES, TINY_QWEN3, build_random_qwen3

SHAPES = QWEN3_SHAPES | {"tiny": TINY_QWEN3}
PAD_ID = 151643
BASELINE_BATCH = 32


def log(message: str) -> None:
    print(f"[bench_encoders {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def workload(count: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1000, 100000, size=int(n)).tolist() for n in rng.integers(low, high + 1, size=count)]


def baseline(model_dir: Path, device: torch.device, dtype: torch.dtype) -> Callable[[list[list[int]]], np.ndarray]:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa").to(device).eval()

    @torch.inference_mode()
    def embed(texts: list[list[int]]) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
        for start in range(0, len(order), BASELINE_BATCH):
            group = order[start : start + BASELINE_BATCH]
            width = max(len(texts[i]) for i in group)
            ids = torch.full((len(group), width), PAD_ID, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, width - len(texts[i]) :] = torch.tensor(texts[i])
                mask[row, width - len(texts[i]) :] = 1
            ids, mask = ids.to(device), mask.to(device)
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            out[group] = pool(hidden, mask, "last_token").float().cpu().numpy()
        return out

    return embed


def ours(encoder: TorchEncoder, max_batch_tokens: int) -> Callable[[list[list[int]]], np.ndarray]:
    def embed(texts: list[list[int]]) -> np.ndarray:
        out: np.ndarray | None = None
        for group in plan_micro_batches([len(t) for t in texts], 32, max_batch_tokens):
            ids, mask = pad_rows([texts[i] for i in group], PAD_ID)
            pooled = encoder.forward(ids, mask)
            if out is None:
                out = np.empty((len(texts), pooled.shape[1]), dtype=np.float32)
            out[group] = pooled
        assert out is not None
        return out

    return embed


def measure(
    name: str, embed: Callable[[list[list[int]]], np.ndarray], texts: list[list[int]], device: torch.device
) -> tuple[dict[str, Any], np.ndarray]:
    embed(texts[: min(64, len(texts))])  # warm-up (kernels, compilation, allocator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    vectors, seconds = timed(lambda: embed(texts), device)
    query = [list(range(5, 20)) + [PAD_ID]]
    latencies = []
    for _ in range(30):
        _, elapsed = timed(lambda: embed(query), device)
        latencies.append(elapsed * 1e3)
    row = {
        "variant": name,
        "tokens_per_s": round(sum(map(len, texts)) / seconds),
        "query16_p50_ms": round(float(np.percentile(latencies[5:], 50)), 2),
        "query16_p99_ms": round(float(np.percentile(latencies[5:], 99)), 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }
    log(json.dumps(row))
    return row, vectors


def end_to_end(model_dir: Path, precision: str, texts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """Ours behind tritonserver: the endpoint tokenizes, batches and calls the encoder through the router."""
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.grpc as grpcclient
    from transformers import AutoTokenizer

    from triton_rag.repository import prepare_repository
    from triton_rag.server import TritonServer, free_ports
    from triton_rag.settings import EmbedSettings, Settings

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    strings = [tokenizer.decode(ids) for ids in texts]
    real_tokens = sum(len(tokenizer(text)["input_ids"]) + 1 for text in strings)  # + the appended end-of-text
    repository = args.work / f"e2e-{model_dir.name}-{precision}"
    settings = Settings(
        embed=EmbedSettings(model=str(model_dir), max_length=1024, precision=precision, dim=1024),
        offline_fallback=False,
    )
    prepare_repository(settings, repository, args.cache, log=log, endpoints=("embed",))
    with open(args.out / f"server-{precision}.log", "wb") as server_log:
        server = TritonServer(repository, args.cache, free_ports(), log=server_log)
        server.start()
        try:
            server.wait_ready(600)
            client = grpcclient.InferenceServerClient(server.grpc_url)

            def send(batch: list[str]) -> None:
                data = np.array([[text.encode()] for text in batch], dtype=object)
                tensor = grpcclient.InferInput("TEXT", list(data.shape), "BYTES")
                tensor.set_data_from_numpy(data)
                client.infer("qwen_embed", [tensor])

            send(strings[:16])  # first use: the router loads the encoder
            batches = [strings[i : i + 16] for i in range(0, len(strings), 16)]
            start = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(send, batches))
            seconds = time.perf_counter() - start
            query = tokenizer.decode(list(range(5, 20)))
            latencies = []
            for _ in range(50):
                begin = time.perf_counter()
                send([query])
                latencies.append((time.perf_counter() - begin) * 1e3)
        finally:
            server.stop()
    row = {
        "variant": f"ours {precision}, through Triton (concurrency {args.concurrency})",
        "tokens_per_s": round(real_tokens / seconds),
        "query16_p50_ms": round(float(np.percentile(latencies[5:], 50)), 2),
        "query16_p99_ms": round(float(np.percentile(latencies[5:], 99)), 2),
        "peak_gib": None,
        "min_cosine_to_baseline": "-",
    }
    log(json.dumps(row))
    return row


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--shapes", nargs="+", default=["0.6b", "8b"] if gpu else ["tiny"])
    parser.add_argument("--texts", type=int, default=2048 if gpu else 64)
    parser.add_argument("--precisions", nargs="+", default=["bfloat16", "fp8"] if gpu else ["float32"])
    parser.add_argument("--compile", action="store_true", help="also run each precision under torch.compile")
    parser.add_argument("--max-batch-tokens", type=int, default=32768)
    parser.add_argument("--e2e", action="store_true", help="also serve ours with tritonserver and drive it over gRPC")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda" if gpu else "cpu")
    dtype_name = "bfloat16" if gpu else "float32"
    dtype = getattr(torch, dtype_name)
    low, high = (32, 512) if gpu else (16, 64)
    texts = workload(args.texts, low, high)
    summary: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "torch": torch.__version__,
        "texts": len(texts),
        "lengths": [low, high],
        "command": "python " + " ".join(sys.argv),
        "shapes": {},
    }
    for shape in args.shapes:
        model_dir = build_random_qwen3(
            "embed", args.work / f"qwen3-{shape}-embed", args.cache, SHAPES[shape], log, dtype_name, device.type
        )
        rows: list[dict[str, Any]] = []
        reference_row, reference = measure("transformers (baseline)", baseline(model_dir, device, dtype), texts, device)
        reference_row["min_cosine_to_baseline"] = 1.0
        rows.append(reference_row)
        variants = [(p, False) for p in args.precisions] + (
            [(p, True) for p in args.precisions] if args.compile else []
        )
        for precision, compiled in variants:
            encoder = TorchEncoder(
                model_dir, "embed", precision=precision, device=device.type, log=log, compile_model=compiled
            )
            name = f"ours {encoder.precision}{' compiled' if compiled else ''}"
            row, vectors = measure(name, ours(encoder, args.max_batch_tokens), texts, device)
            row["min_cosine_to_baseline"] = round(float(cosine(vectors, reference).min()), 5)
            row["speedup"] = round(row["tokens_per_s"] / reference_row["tokens_per_s"], 2)
            rows.append(row)
            del encoder
            if gpu:
                torch.cuda.empty_cache()
            if args.e2e and not compiled:
                served = end_to_end(model_dir, precision, texts, args)
                served["speedup"] = round(served["tokens_per_s"] / reference_row["tokens_per_s"], 2)
                rows.append(served)
        summary["shapes"][shape] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "encoders.json").write_text(json.dumps(summary, indent=2))
    header = ("shape", "variant", "tokens/s", "x baseline", "16-token p50 ms", "p99 ms", "peak GiB", "min cosine")
    table = [
        [shape, r["variant"], r["tokens_per_s"], r.get("speedup", 1.0), r["query16_p50_ms"], r["query16_p99_ms"],
         r["peak_gib"], r["min_cosine_to_baseline"]]
        for shape, rows in summary["shapes"].items()
        for r in rows
    ]  # fmt: skip
    lines = [
        f"{summary['device']}, {summary['date']}, {len(texts)} texts of {low}-{high} tokens: `{summary['command']}`",
        "",
        *markdown_table(header, table),
    ]
    (args.out / "encoders.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
    else:
        figure, axes = plt.subplots(1, len(summary["shapes"]), figsize=(6 * len(summary["shapes"]), 4), squeeze=False)
        for axis, (shape, rows) in zip(axes[0], summary["shapes"].items(), strict=True):
            axis.barh([r["variant"] for r in rows], [r["tokens_per_s"] for r in rows])
            axis.set_title(f"{shape}: tokens/s ({summary['device']})")
        figure.tight_layout()
        figure.savefig(args.out / "encoders.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

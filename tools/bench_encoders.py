"""Encoder benchmark (`make bench`): the transformers baseline a user would pick against our stack, same card, same
run, same random weights of a real Qwen3 shape, for the embedder and the reranker.

Workload (seeded): `--texts` texts of 32-512 random tokens to embed, `--pairs` query/document pairs of 128-512
tokens to rerank (CPU smoke: 16-64 tokens), and one short request for latency (a 16-token text; a 16-token pair).
- baseline: transformers in bfloat16 (SDPA), the model cards' recipes: rows sorted by length, left-padded batches
  (32 texts; 16 pairs), last-token pooling; the reranker through `AutoModelForCausalLM` (full LM head, then the
  "no"/"yes" logits at the last position).
- ours, bare: `TorchEncoder` at each `--precisions` (torch.compile'd layers and CUDA graphs on a GPU), given the
  whole workload at once (it plans its own micro-batches, as it does inside Triton).
- ours, end to end (`--e2e`): tritonserver with the `qwen_embed`/`qwen_rerank` endpoint (tokenization, dynamic
  batching, router) driven by perf_analyzer over gRPC: one text (pair) per request, `--concurrency` in flight, for
  throughput; then the short request alone (concurrency 1) for p50/p99 latency.
Reported: tokens/s over real tokens (pairs/s for rerank), the short request's p50/p99, peak GPU memory (bare: torch's
peak; end to end: the device's peak by nvidia-smi, the bench process's own context included, and in the JSON what
the router measured the encoder's stub to hold), and accuracy: each
variant against the baseline and FP8 against our bfloat16 (embeddings: cosine per row; rerank: Spearman rank
correlation of the scores and the largest score difference).

    python tools/bench_encoders.py --out bench_results/encoders                         # GPU: 0.6B and 8B shapes
    python tools/bench_encoders.py --shapes 8b --tasks embed --e2e --out /tmp/enc      # one part
    python tools/bench_encoders.py --out /tmp/enc                                      # CPU: tiny smoke run
Writes encoders.json, encoders.md and encoders.png (with matplotlib) under --out; `--append FILE` appends the table
to FILE (make bench: BENCHMARKS.md, on a GPU only: a CPU smoke run measures nothing worth keeping).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchlib import UNSTABLE, find_perf_analyzer, markdown_table, measured, perf_analyzer, time_per_model, timed

from triton_rag.build.offline import QWEN3_SHAPES, TINY_QWEN3, build_random_qwen3
from triton_rag.core import logs
from triton_rag.core.batching import pad_rows
from triton_rag.core.postprocess import row_cosine
from triton_rag.engines.encoder_common import pool
from triton_rag.engines.torch_encoder import TorchEncoder

SHAPES = QWEN3_SHAPES | {"tiny": TINY_QWEN3}
PAD_ID = 151643
NO_YES = (2152, 9693)
BASELINE_BATCH = {"embed": 32, "rerank": 16}
SHORT = 16  # tokens of the latency request


def log(message: str) -> None:
    print(f"[bench_encoders {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def workload(task: str, count: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    """Token rows; a rerank row is a pair: its first 8-24 tokens are the query."""
    rng = np.random.default_rng(seed if task == "embed" else seed + 1)
    return [rng.integers(1000, 100000, size=int(n)).tolist() for n in rng.integers(low, high + 1, size=count)]


def query_length(row: list[int]) -> int:
    return 8 + len(row) % 17


def baseline(task: str, model_dir: Path, device: torch.device) -> Callable[[list[list[int]]], np.ndarray]:
    """The model cards' recipe with transformers, in bfloat16 on a GPU (float32 on a CPU)."""
    from transformers import AutoModel, AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loader = AutoModel if task == "embed" else AutoModelForCausalLM
    model = loader.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa").to(device).eval()

    @torch.inference_mode()
    def run(rows: list[list[int]]) -> np.ndarray:
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out = np.empty((len(rows), model.config.hidden_size if task == "embed" else 2), dtype=np.float32)
        for start in range(0, len(order), BASELINE_BATCH[task]):
            group = order[start : start + BASELINE_BATCH[task]]
            ids, mask = pad_rows([rows[i][::-1] for i in group], PAD_ID)  # reversed twice: left padding
            ids_t = torch.from_numpy(ids[:, ::-1].copy()).to(device)
            mask_t = torch.from_numpy(mask[:, ::-1].copy()).to(device)
            if task == "embed":
                hidden = model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
                out[group] = pool(hidden, mask_t, "last_token").float().cpu().numpy()
            else:
                logits = model(input_ids=ids_t, attention_mask=mask_t).logits[:, -1, list(NO_YES)]
                out[group] = logits.float().cpu().numpy()
        return out

    return run


def ours(encoder: TorchEncoder) -> Callable[[list[list[int]]], np.ndarray]:
    def run(rows: list[list[int]]) -> np.ndarray:
        return encoder.forward(*pad_rows(rows, PAD_ID))

    return run


def measure(
    name: str, run: Callable[[list[list[int]]], np.ndarray], rows: list[list[int]], device: torch.device, task: str
) -> tuple[dict[str, Any], np.ndarray]:
    short = [list(range(1000, 1000 + SHORT))]
    for part in (rows[:64], rows[64:160], short, short):  # warm-up: compilation (two shapes), graphs, allocator
        if part:
            run(part)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    values, seconds = timed(lambda: run(rows), device)
    latencies = []
    for _ in range(50):
        _, elapsed = timed(lambda: run(short), device)
        latencies.append(elapsed * 1e3)
    row = {
        "variant": name,
        "rate": round(sum(map(len, rows)) / seconds) if task == "embed" else round(len(rows) / seconds, 1),
        "short_p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "short_p99_ms": round(float(np.percentile(latencies, 99)), 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }
    log(json.dumps(row))
    return row, values


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def agreement(task: str, values: np.ndarray, reference: np.ndarray) -> str:
    """Embeddings: min/mean cosine per row. Rerank scores (yes - no logit): Spearman and the largest difference."""
    if task == "embed":
        cos = row_cosine(values, reference)
        return f"cos min {cos.min():.4f} mean {cos.mean():.4f}"
    scores, expected = values[:, 1] - values[:, 0], reference[:, 1] - reference[:, 0]
    return f"spearman {spearman(scores, expected):.4f}, max diff {np.abs(scores - expected).max():.3f}"


class DevicePeak:
    """Peak device memory in use (nvidia-smi, sampled every 0.2 s) while the block runs; None without nvidia-smi."""

    def __init__(self) -> None:
        self.peak_mib: int | None = None
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                used = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                    capture_output=True, text=True, timeout=10,
                ).stdout  # fmt: skip
                self.peak_mib = max(self.peak_mib or 0, int(used.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            self._stop.wait(0.2)

    def __enter__(self) -> DevicePeak:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def served(task: str, model_dir: Path, precision: str, args: argparse.Namespace) -> Iterator[Any]:
    """tritonserver with our endpoint for `task` (router on), its encoder loaded and warm."""
    from triton_rag.build.repository import prepare_repository
    from triton_rag.build.settings import EmbedSettings, RerankSettings, Settings
    from triton_rag.server import TritonServer, free_ports

    repository = args.work / f"e2e-{model_dir.name}-{precision}"
    common = {"model": str(model_dir), "max_length": 1024, "precision": precision}
    settings = (
        Settings(embed=EmbedSettings(**common, dim=1024), offline_fallback=False)
        if task == "embed"
        else Settings(rerank=RerankSettings(**common), offline_fallback=False)
    )
    prepare_repository(settings, repository, args.cache, log=log, endpoints=(task,))
    with open(args.out / f"server-{model_dir.name}-{precision}.log", "wb") as server_log:
        server = TritonServer(repository, args.cache, free_ports(), log=server_log)
        server.start()
        try:
            server.wait_ready(900)
            yield server
        finally:
            server.stop()


def pair(tokenizer: Any, query: list[int], document: list[int]) -> dict[str, list[str]]:
    return {"QUERY": [tokenizer.decode(query)], "DOCUMENT": [tokenizer.decode(document)]}


def end_to_end(
    task: str, model_dir: Path, precision: str, rows: list[list[int]], args: argparse.Namespace
) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient
    from transformers import AutoTokenizer

    from triton_rag import contract
    from triton_rag.client import RouterControl

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    endpoint = contract.EMBED_ENDPOINT if task == "embed" else contract.RERANK_ENDPOINT
    if task == "embed":
        steps = [{"TEXT": [tokenizer.decode(row)]} for row in rows]
        short = {"TEXT": [tokenizer.decode(list(range(1000, 1000 + SHORT - 1)))]}  # + the end-of-text token
        # what the endpoint computes per text: its tokens again, plus the end-of-text token it appends
        tokens_per_request = float(np.mean([len(tokenizer(s["TEXT"][0])["input_ids"]) + 1 for s in steps]))
    else:
        steps = [pair(tokenizer, row[: query_length(row)], row[query_length(row) :]) for row in rows]
        short = pair(tokenizer, list(range(1000, 1008)), list(range(2000, 2008)))
        tokens_per_request = 1.0  # pairs
    data, short_data = args.out / f"perf-{task}-data.json", args.out / f"perf-{task}-short.json"
    data.write_text(json.dumps({"data": steps}))
    short_data.write_text(json.dumps({"data": [short]}))
    tag = f"{model_dir.name}-{precision}"
    with DevicePeak() as peak, served(task, model_dir, precision, args) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)

        def send(request: dict[str, list[str]]) -> None:
            inputs = []
            for name, value in request.items():
                tensor = grpcclient.InferInput(name, [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[value[0].encode()]], dtype=object))
                inputs.append(tensor)
            client.infer(endpoint, inputs, client_timeout=900)

        first = time.perf_counter()
        send(short)  # the router loads the encoder (which compiles and captures its graphs)
        log(f"{tag}: first response after {time.perf_counter() - first:.1f} s")
        with ThreadPoolExecutor(args.concurrency) as threads:  # warm-up under load: batches of every size
            list(threads.map(send, steps[:512]))
        log(f"{tag}: warm after {time.perf_counter() - first:.1f} s")
        binary = args.perf_analyzer
        load = perf_analyzer(
            binary, server.grpc_url, endpoint, data, args.concurrency, args.out / f"perf-{tag}-load.txt", args.window_ms
        )
        server_time = time_per_model(client)
        ledger = RouterControl(server.grpc_url, key=server.admin_key).status()["models"]
        encoder = contract.EMBED_ENCODER if task == "embed" else contract.RERANK_ENCODER
        held = ledger.get(encoder, {}).get("measured_bytes")  # the encoder's stub processes (NVML), after the load
        before = client.get_inference_statistics(as_json=True)
        alone = perf_analyzer(binary, server.grpc_url, endpoint, short_data, 1, args.out / f"perf-{tag}-short.txt")
        short_server = time_per_model(client, before)
        # the same request's token ids straight to the encoder model: Triton's path without endpoint and router
        short_ids = tokenized_short(tokenizer, task, short)
        encoder_data = args.out / f"perf-{task}-short-encoder.json"
        encoder_data.write_text(json.dumps({"data": [{
            "INPUT_IDS": {"content": short_ids, "shape": [len(short_ids)]},
            "ATTENTION_MASK": {"content": [1] * len(short_ids), "shape": [len(short_ids)]},
        }]}))  # fmt: skip
        direct = perf_analyzer(binary, server.grpc_url, encoder, encoder_data, 1, args.out / f"perf-{tag}-direct.txt")
    row = {
        "variant": f"ours {precision}, tritonserver + perf_analyzer (concurrency {args.concurrency})",
        # UNSTABLE where perf_analyzer found no stable measurement (benchlib.perf_analyzer): the run goes on
        "rate": measured(load, "infer_per_s", tokens_per_request, None if task == "embed" else 1),
        "short_p50_ms": measured(alone, "p50_ms"),
        "short_p99_ms": measured(alone, "p99_ms"),
        "peak_gib": round(peak.peak_mib / 1024, 2) if peak.peak_mib else None,
        "encoder_held_gib": round(held / 2**30, 2) if held else None,
        "accuracy": "-",
        "server_ms_per_execution": server_time,
        "short_encoder_direct_p50_ms": measured(direct, "p50_ms"),
        "short_server_ms_per_execution": short_server,
    }
    log(json.dumps(row))
    return row


def tokenized_short(tokenizer: Any, task: str, short: dict[str, list[str]]) -> list[int]:
    """The token ids the endpoint sends the encoder for the short request (its own tokenization code)."""
    from triton_rag.build.settings import DEFAULT_RERANK_INSTRUCTION
    from triton_rag.core.text import (
        QWEN3_POOL_TOKEN,
        EmbedTokenization,
        RerankTokenization,
        format_embed_text,
        format_rerank_pair,
    )

    if task == "embed":
        pool = tokenizer.convert_tokens_to_ids(QWEN3_POOL_TOKEN)
        embedding = EmbedTokenization(tokenizer, 1024, "truncate", pool)
        encoded = embedding.encode([format_embed_text(short["TEXT"][0], "")])
    else:
        pair = format_rerank_pair(short["QUERY"][0], short["DOCUMENT"][0], DEFAULT_RERANK_INSTRUCTION)
        encoded = RerankTokenization(tokenizer, 1024, "truncate").encode([pair])
    return [int(i) for i in encoded[0].ids]


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_shape(task: str, shape: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    gpu = device.type == "cuda"
    model_dir = build_random_qwen3(
        task,  # type: ignore[arg-type]
        args.work / f"qwen3-{shape}-{task}",
        args.cache,
        SHAPES[shape],
        log,
        "bfloat16" if gpu else "float32",
        device.type,
    )
    low, high = ((32, 512) if task == "embed" else (128, 512)) if gpu else (16, 64)
    rows = workload(task, args.texts if task == "embed" else args.pairs, low, high)
    base_row, reference = measure("transformers (baseline)", baseline(task, model_dir, device), rows, device, task)
    base_row["accuracy"] = "reference"
    release(device)
    results = [base_row]
    ours_values: dict[str, np.ndarray] = {}
    for precision in args.precisions:
        encoder = TorchEncoder(
            model_dir, task, precision=precision, device=device.type, log=log, compile_model=gpu,  # type: ignore[arg-type]
            yes_no_ids=NO_YES if task == "rerank" else None,
        )  # fmt: skip
        name = f"ours {encoder.precision}{', compiled layers + CUDA graphs' if gpu else ''}"
        row, values = measure(name, ours(encoder), rows, device, task)
        ours_values[encoder.precision] = values
        row["accuracy"] = f"vs baseline: {agreement(task, values, reference)}"
        if encoder.precision == "fp8" and "bfloat16" in ours_values:
            row["accuracy"] += f"; vs ours bfloat16: {agreement(task, values, ours_values['bfloat16'])}"
        results.append(row)
        del encoder
        release(device)
        if args.e2e:
            results.append(end_to_end(task, model_dir, precision, rows, args))
    for row in results:
        row["speedup"] = UNSTABLE if row["rate"] == UNSTABLE else round(row["rate"] / base_row["rate"], 2)
    lengths = [len(r) for r in rows]
    results[0]["workload"] = f"{len(rows)} {'texts' if task == 'embed' else 'pairs'} of {min(lengths)}-{max(lengths)}"
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--shapes", nargs="+", default=["0.6b", "8b"] if gpu else ["tiny"])
    parser.add_argument("--tasks", nargs="+", default=["embed", "rerank"], choices=["embed", "rerank"])
    parser.add_argument("--texts", type=int, default=2048 if gpu else 64)
    parser.add_argument("--pairs", type=int, default=512 if gpu else 32)
    parser.add_argument("--precisions", nargs="+", default=["bfloat16", "fp8"] if gpu else ["float32"])
    parser.add_argument("--e2e", action="store_true", help="also serve ours with tritonserver, driven by perf_analyzer")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--window-ms", type=int, default=5000, help="perf_analyzer's measurement window")
    parser.add_argument("--perf-analyzer", default=find_perf_analyzer())
    parser.add_argument("--work", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--append", type=Path, help="append the table to this file (make bench: BENCHMARKS.md)")
    args = parser.parse_args()
    logs.configure()  # the library's progress lines (model builds, tokenizer download) on stderr
    # one process compiles the layers of several models (shapes, precisions); a server process holds one, so only
    # here can dynamo's per-code recompile limit be reached, and past it a layer would silently run eagerly
    torch._dynamo.config.recompile_limit = 64
    if args.e2e and not args.perf_analyzer:
        parser.error("--e2e needs perf_analyzer: run `make test-tools`, or pass --perf-analyzer PATH")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if gpu else "cpu")
    summary: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "torch": torch.__version__,
        "command": "python " + " ".join(sys.argv),
        "results": {},
    }
    for shape in args.shapes:
        for task in args.tasks:
            summary["results"][f"{shape} {task}"] = bench_shape(task, shape, args, device)
            (args.out / "encoders.json").write_text(json.dumps(summary, indent=2))
    lines = report(summary)
    (args.out / "encoders.md").write_text("\n".join(lines) + "\n")
    plot(summary, args.out / "encoders.png")
    if args.append and (gpu or args.append.name != "BENCHMARKS.md"):
        with args.append.open("a") as handle:
            handle.write("\n" + "\n".join(lines) + "\n")
        log(f"table appended to {args.append}")
    print("\n".join(lines))


def report(summary: dict[str, Any]) -> list[str]:
    header = ("model", "variant", "rate", "x baseline", f"{SHORT}-token p50 ms", "p99 ms", "peak GiB", "accuracy")
    table = []
    for key, rows in summary["results"].items():
        unit = "tokens/s" if key.endswith("embed") else "pairs/s"
        table.extend(
            [key if i == 0 else "", r["variant"], r["rate"] if r["rate"] == UNSTABLE else f"{r['rate']} {unit}",
             r["speedup"], r["short_p50_ms"], r["short_p99_ms"], r["peak_gib"], r["accuracy"]]
            for i, r in enumerate(rows)
        )  # fmt: skip
    workloads = "; ".join(f"{key}: {rows[0]['workload']} tokens" for key, rows in summary["results"].items())
    return [
        f"### Encoders, {summary['device']}, {summary['date']} (torch {summary['torch']})",
        "",
        f"`{summary['command']}`. Random weights of the real shapes; {workloads}.",
        "",
        *markdown_table(header, table),
    ]


def plot(summary: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return
    results = summary["results"]
    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for axis, (key, rows) in zip(axes[0], results.items(), strict=True):
        speedups = [0 if r["speedup"] == UNSTABLE else r["speedup"] for r in rows]  # an unstable row: no bar
        axis.barh([r["variant"].replace(", ", "\n", 1) for r in rows], speedups)
        axis.axvline(1.0, color="gray", linewidth=0.8)
        axis.set_title(f"{key}: x transformers baseline\n{summary['device']}", fontsize=9)
        axis.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

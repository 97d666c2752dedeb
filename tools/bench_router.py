"""Router benchmark on the real tritonserver: swap latency and the router's added latency per request.

For each model shape (random weights of the real Qwen3 sizes, bfloat16 on the GPU):
- swap: with a budget that fits one encoder, alternate embed and rerank requests; each request evicts the other
  encoder and loads its own. Reported per swap: time to the first response (what the client sees), the unload and
  load times the router measured, and the bytes it measured.
- overhead (`--perf`): perf_analyzer on `qwen_embed` (one 12-token query per request) against two servers started in
  the same run: with the router (lease per request) and without it (the endpoint calls its encoder directly).

    python tools/bench_router.py --shapes 0.6b 8b --perf --out bench_results/router
Writes `router.json` and `router.md` (a table for BENCHMARKS.md) under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
import tritonclient.grpc as grpcclient

from triton_rag import contract
from triton_rag.client import RouterControl
from triton_rag.offline import QWEN3_SHAPES, TINY_QWEN3, build_random_qwen3
from triton_rag.repository import prepare_repository
from triton_rag.server import TritonServer, free_ports
from triton_rag.settings import EmbedSettings, RerankSettings, RouterSettings, Settings

#: Real Qwen3 sizes, and the tiny test shape for a quick run on a CPU machine.
SHAPES = QWEN3_SHAPES | {"tiny": TINY_QWEN3}
QUERY = "what is the capital of France and why is it Paris"  # 12 Qwen3 tokens with the end-of-text token
PAIR = ("what is the capital of France?", "Paris is the capital and largest city of France.")


def log(message: str) -> None:
    print(f"[bench_router {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _strings(name: str, values: list[str]) -> grpcclient.InferInput:
    data = np.array([[v.encode()] for v in values], dtype=object)
    tensor = grpcclient.InferInput(name, list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


def embed_once(client: grpcclient.InferenceServerClient) -> None:
    client.infer(contract.EMBED_ENDPOINT, [_strings("TEXT", [QUERY])])


def rerank_once(client: grpcclient.InferenceServerClient) -> None:
    client.infer(contract.RERANK_ENDPOINT, [_strings("QUERY", [PAIR[0]]), _strings("DOCUMENT", [PAIR[1]])])


def prepare(work: Path, cache: Path, shape: str, router: RouterSettings) -> tuple[Path, dict]:
    import torch

    device, dtype = ("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32")
    models = {
        kind: build_random_qwen3(kind, work / f"qwen3-{shape}-{kind}", cache, SHAPES[shape], log, dtype, device)
        for kind in ("embed", "rerank")
    }
    repository = work / f"repository-{shape}-{'router' if router.enabled else 'direct'}"
    settings = Settings(
        embed=EmbedSettings(model=str(models["embed"]), max_length=1024, dim=1024),
        rerank=RerankSettings(model=str(models["rerank"]), max_length=1024),
        router=router,
        offline_fallback=False,
    )
    (repository / contract.ROUTER / "measured.json").unlink(missing_ok=True)  # measure afresh
    return repository, prepare_repository(settings, repository, cache, log=log, endpoints=("embed", "rerank"))


def start(repository: Path, cache: Path, out: Path, name: str) -> TritonServer:
    server = TritonServer(repository, cache, free_ports(), log=open(out / f"{name}.log", "wb"))
    started = time.monotonic()
    server.start()
    server.wait_ready(600)
    log(f"{name}: tritonserver ready in {time.monotonic() - started:.1f} s")
    return server


def bench_swaps(shape: str, work: Path, cache: Path, out: Path, swaps: int) -> dict[str, Any]:
    repository, _ = prepare(work, cache, shape, RouterSettings(min_residency_seconds=0.0))
    server = start(repository, cache, out, f"swap-{shape}")
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        router = RouterControl(server.grpc_url)
        started = time.monotonic()
        embed_once(client)
        cold = time.monotonic() - started
        rerank_once(client)  # both resident under the automatic budget: measure them
        sizes = [router.status()["models"][name]["measured_bytes"] for name in contract.ENCODERS]
        budget = max(sizes) + min(sizes) // 2  # fits one encoder, not two
        router.set_budget(budget)
        deadline = time.monotonic() + 120
        while sum(m["state"] != "unloaded" for m in router.status()["models"].values()) > 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the router did not evict down to one encoder under the new budget")
            time.sleep(0.2)
        embed_once(client)
        rows = []
        calls = [(contract.RERANK_ENCODER, rerank_once), (contract.EMBED_ENCODER, embed_once)]
        for index in range(swaps * 2):
            target, call = calls[index % 2]
            evicted = calls[(index + 1) % 2][0]
            started = time.monotonic()
            call(client)
            first = time.monotonic() - started
            started = time.monotonic()
            call(client)
            warm = time.monotonic() - started
            ledger = router.status()["models"]
            rows.append(
                {
                    "loaded": target,
                    "evicted": evicted,
                    "first_response_s": first,
                    "warm_request_s": warm,
                    "unload_s": ledger[evicted]["last_unload_seconds"],
                    "load_s": ledger[target]["last_load_seconds"],
                    "loaded_bytes": ledger[target]["measured_bytes"],
                    "evicted_unreleased_bytes": ledger[evicted]["unreleased_bytes"],
                }
            )
            log(f"{shape}: evict {evicted}, load {target}: first response {first:.2f} s, load {rows[-1]['load_s']:.2f}")
        final = router.status()
        return {"shape": shape, "budget_bytes": budget, "cold_first_embed_s": cold, "swaps": rows, "status": final}
    finally:
        server.stop()


def perf_analyzer(binary: str, server: TritonServer, out: Path, name: str, concurrency: int) -> dict[str, float]:
    data = out / "perf_input.json"
    data.write_text(json.dumps({"data": [{"TEXT": [QUERY]}]}))
    log_file = out / f"perf-{name}-c{concurrency}.txt"
    return benchlib.perf_analyzer(binary, server.grpc_url, contract.EMBED_ENDPOINT, data, concurrency, log_file)


def lease_round_trip(router: RouterControl, pairs: int = 300) -> dict[str, float]:
    """ACQUIRE + RELEASE of a resident model from a gRPC client: the router's own cost per request, plus one more
    client round trip than an endpoint's BLS calls pay."""

    seconds = []
    for _ in range(pairs):
        started = time.perf_counter()
        router.release(router.acquire(contract.EMBED_ENCODER))
        seconds.append(time.perf_counter() - started)
    ms = np.array(seconds) * 1000
    return {"pairs": pairs, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def bench_overhead(shape: str, work: Path, cache: Path, out: Path, binary: str) -> dict[str, Any]:
    results: dict[str, Any] = {"shape": shape}
    for name, router in (("router", RouterSettings()), ("direct", RouterSettings(enabled=False))):
        repository, _ = prepare(work, cache, shape, router)
        server = start(repository, cache, out, f"perf-{shape}-{name}")
        try:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            for _ in range(20):  # load (router) and warm up
                embed_once(client)
            results[name] = [perf_analyzer(binary, server, out, f"{shape}-{name}", c) for c in (1, 8)]
            if name == "router":
                results["lease_round_trip"] = lease_round_trip(RouterControl(server.grpc_url))
            log(f"{shape} {name}: {results[name]}")
        finally:
            server.stop()
    return results


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"### Router ({report['date']}, {report['device']})",
        "",
        f"Command: `{report['command']}`",
        "",
        "Swap: the budget fits one encoder; each request evicts the other encoder and loads its own.",
        "",
        "| shape | budget | swap (evicted -> loaded) | first response s | unload s | load s | warm request ms | "
        "loaded bytes | unreleased |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for swap in report["swaps"]:
        for row in swap["swaps"]:
            lines.append(
                f"| {swap['shape']} | {swap['budget_bytes'] / 2**30:.1f} GiB | {row['evicted']} -> {row['loaded']} | "
                f"{row['first_response_s']:.2f} | {row['unload_s']:.2f} | {row['load_s']:.2f} | "
                f"{row['warm_request_s'] * 1000:.1f} | {row['loaded_bytes'] / 2**30:.2f} GiB | "
                f"{row['evicted_unreleased_bytes']} |"
            )
        firsts = [row["first_response_s"] for row in swap["swaps"]]
        lines.append(f"| {swap['shape']} | | median of {len(firsts)} | {statistics.median(firsts):.2f} | | | | | |")
    for overhead in report["overhead"]:
        lines += [
            "",
            f"Router overhead, `qwen_embed`, {overhead['shape']}, one 12-token query per request (perf_analyzer):",
            "",
            "| path | concurrency | infer/s | p50 ms | p99 ms |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name in ("direct", "router"):
            for row in overhead[name]:
                lines.append(
                    f"| {name} | {row['concurrency']} | {row['infer_per_s']:.0f} | {row['p50_ms']:.2f} | "
                    f"{row['p99_ms']:.2f} |"
                )
        trip = overhead["lease_round_trip"]
        lines += [
            "",
            f"ACQUIRE + RELEASE of a resident model from a gRPC client ({trip['pairs']} pairs): "
            f"p50 {trip['p50_ms']:.2f} ms, p99 {trip['p99_ms']:.2f} ms.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["0.6b"], choices=sorted(SHAPES))
    parser.add_argument("--swaps", type=int, default=3, help="swaps in each direction")
    parser.add_argument("--perf", action="store_true", help="also measure the router's overhead with perf_analyzer")
    parser.add_argument("--perf-shape", default="0.6b", choices=sorted(SHAPES))
    parser.add_argument("--perf-analyzer", default=benchlib.find_perf_analyzer() or "perf_analyzer")
    parser.add_argument("--work", type=Path, default=Path("/tmp/triton-rag-bench"))
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"))
    parser.add_argument("--out", type=Path, default=Path("bench_results/router"))
    args = parser.parse_args()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "command": "python tools/bench_router.py " + " ".join(sys.argv[1:]),
        "swaps": [],
        "overhead": [],
    }
    if args.perf:
        overhead = bench_overhead(args.perf_shape, args.work, args.cache_dir, args.out, args.perf_analyzer)
        report["overhead"].append(overhead)
    for shape in args.shapes:
        report["swaps"].append(bench_swaps(shape, args.work, args.cache_dir, args.out, args.swaps))
        (args.out / "router.json").write_text(json.dumps(report, indent=2))
    (args.out / "router.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (args.out / "router.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

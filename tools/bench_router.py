"""Router benchmark on the real tritonserver: swap latency and the router's added latency per request.

For each model shape (random weights of the real Qwen3 sizes, bfloat16 on the GPU):
- swap: with a budget that fits one encoder, alternate embed and rerank requests; each request evicts the other
  encoder and loads its own. Reported per swap: time to the first response (what the client sees), the unload and
  load times the router measured, and the bytes it measured.
- overhead (`--perf`): perf_analyzer on `qwen_embed` (one 12-token query per request) against two servers started in
  the same run: with the router (lease per request) and without it (the endpoint calls its encoder directly).
- RAG loop (`--rag-loops N`, FP8): embed one query, then rerank 32 documents of ~256 tokens, under a budget that fits
  one encoder awake (and the other asleep): N loops through the host-RAM tier, then `--baseline-loops` loops with
  the tier off (every swap a full unload and a cold load, inductor cache warm), both in the same run. Each loop's
  seconds, the router's wake and load seconds, and the steady-state latency of the same requests with both resident.

    python tools/bench_router.py --shapes 0.6b 8b --perf --out bench_results/router
    python tools/bench_router.py --shapes --rag-shape 8b --rag-loops 8 --baseline-loops 2
Writes `router.json` and `router.md` (a table for BENCHMARKS.md) under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
import tritonclient.grpc as grpcclient

from triton_rag import contract
from triton_rag.build.offline import QWEN3_SHAPES, TINY_QWEN3, build_random_qwen3
from triton_rag.build.repository import Prepared, prepare_repository
from triton_rag.build.settings import EmbedSettings, RerankSettings, RouterSettings, Settings
from triton_rag.client import RouterControl
from triton_rag.contract.params import Precision
from triton_rag.core.load_phases import PHASES, cold_loads
from triton_rag.server import TritonServer, free_ports

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


#: A rerank of 32 documents of about 256 Qwen3 tokens each, all different
DOCUMENTS = [f"Document {n}: " + "Paris is the capital and largest city of France. " * 25 for n in range(32)]


def prepare(
    work: Path, cache: Path, shape: str, router: RouterSettings, precision: Precision = "auto", name: str = ""
) -> tuple[Path, dict[str, Prepared]]:
    import torch

    device, dtype = ("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32")
    models = {
        kind: build_random_qwen3(kind, work / f"qwen3-{shape}-{kind}", cache, SHAPES[shape], log, dtype, device)
        for kind in ("embed", "rerank")
    }
    repository = work / f"repository-{shape}-{name or ('router' if router.enabled else 'direct')}"
    settings = Settings(
        embed=EmbedSettings(model=str(models["embed"]), max_length=1024, dim=1024, precision=precision),
        rerank=RerankSettings(model=str(models["rerank"]), max_length=1024, precision=precision),
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
    repository, _ = prepare(work, cache, shape, RouterSettings(min_residency_seconds=0.0, host_budget="0"))
    server = start(repository, cache, out, f"swap-{shape}")
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        router = RouterControl(server.grpc_url, key=server.admin_key)
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


def rerank_documents(client: grpcclient.InferenceServerClient) -> None:
    """32 pairs as two concurrent requests of 16 (qwen_rerank's max_batch_size), as a client would send them."""
    halves = [DOCUMENTS[:16], DOCUMENTS[16:]]

    def call(documents: list[str]) -> None:
        client.infer(
            contract.RERANK_ENDPOINT, [_strings("QUERY", [PAIR[0]] * len(documents)), _strings("DOCUMENT", documents)]
        )

    with ThreadPoolExecutor(len(halves)) as pool:
        list(pool.map(call, halves))


def wait_for_states(router: RouterControl, done: Any, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not done(router.status()["models"]):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def bench_rag_loop(shape: str, work: Path, cache: Path, out: Path, loops: int, host_tier: bool) -> dict[str, Any]:
    """Embed one query, rerank 32 documents; the budget fits one encoder awake, so each step swaps."""
    name = "rag-host-tier" if host_tier else "rag-cold-tier"
    import torch

    tier_budget = "auto" if torch.cuda.is_available() else "4GiB"  # auto is off on a CPU-only machine
    router_settings = RouterSettings(min_residency_seconds=0.0, host_budget=tier_budget if host_tier else "0")
    repository, _ = prepare(work, cache, shape, router_settings, precision="fp8", name=name)
    server = start(repository, cache, out, f"{name}-{shape}")
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        router = RouterControl(server.grpc_url, key=server.admin_key)
        embed_once(client)
        rerank_documents(client)  # both loaded (cold) and resident under the automatic budget
        steady_embed = statistics.median(_seconds(lambda: embed_once(client)) for _ in range(10))
        steady_rerank = statistics.median(_seconds(lambda: rerank_documents(client)) for _ in range(5))
        # the engines report their exact weight bytes after a load (the repository's estimate assumes bfloat16)
        wait_for_states(
            router,
            lambda m: all(m[n]["weight_bytes"] < m[n]["measured_bytes"] for n in contract.ENCODERS),
            "the engines' weight bytes",
            timeout=60,
        )
        models = router.status()["models"]
        first_loads = {n: models[n]["last_load_seconds"] for n in contract.ENCODERS}
        sizes = {n: models[n]["measured_bytes"] for n in contract.ENCODERS}
        weights = {n: models[n]["weight_bytes"] for n in contract.ENCODERS}
        large = max(sizes, key=lambda n: sizes[n])
        (small,) = set(contract.ENCODERS) - {large}
        # one encoder awake, the other asleep (its weights gone): what a 16 GB card holds of two 8B encoders
        budget = sizes[large] + sizes[small] - weights[small] + weights[small] // 4
        router.set_budget(budget)
        wait_for_states(router, lambda m: sum(m[n]["tier"] == "gpu" for n in contract.ENCODERS) <= 1, "one encoder")
        rows = []
        for _ in range(loops):
            started = time.monotonic()
            embed_s = _seconds(lambda: embed_once(client))
            rerank_s = _seconds(lambda: rerank_documents(client))
            ledger = router.status()["models"]
            rows.append(
                {
                    "loop_s": time.monotonic() - started,
                    "embed_s": embed_s,
                    "rerank_s": rerank_s,
                    **{f"{n}_wake_s": ledger[n]["last_wake_seconds"] for n in contract.ENCODERS},
                    **{f"{n}_load_s": ledger[n]["last_load_seconds"] for n in contract.ENCODERS},
                    **{f"{n}_unload_s": ledger[n]["last_unload_seconds"] for n in contract.ENCODERS},
                }
            )
            log(f"{name} {shape}: loop {rows[-1]['loop_s']:.2f} s (embed {embed_s:.2f}, rerank {rerank_s:.2f})")
        result = {
            "shape": shape,
            "host_tier": host_tier,
            "budget_bytes": budget,
            "measured_bytes": sizes,
            "weight_bytes": weights,
            "first_load_s": first_loads,
            "steady_embed_s": steady_embed,
            "steady_rerank_s": steady_rerank,
            "loops": rows,
            "status": router.status(),
        }
    finally:
        server.stop()
    loads = cold_loads((out / f"{name}-{shape}.log").read_text("utf-8", "replace"))
    result["cold_loads"] = [dataclasses.asdict(load) | {"unaccounted_s": load.unaccounted_s} for load in loads]
    return result


def _seconds(call: Any) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


def perf_analyzer(binary: str, server: TritonServer, out: Path, name: str, concurrency: int) -> dict[str, Any]:
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
                results["lease_round_trip"] = lease_round_trip(RouterControl(server.grpc_url, key=server.admin_key))
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
                    f"| {name} | {row['concurrency']} | {benchlib.measured(row, 'infer_per_s', digits=None)} | "
                    f"{benchlib.measured(row, 'p50_ms')} | {benchlib.measured(row, 'p99_ms')} |"
                )
        trip = overhead["lease_round_trip"]
        lines += [
            "",
            f"ACQUIRE + RELEASE of a resident model from a gRPC client ({trip['pairs']} pairs): "
            f"p50 {trip['p50_ms']:.2f} ms, p99 {trip['p99_ms']:.2f} ms.",
        ]
    for rag in report.get("rag", []):
        lines += ["", *rag_markdown(rag)]
    return "\n".join(lines) + "\n"


def rag_markdown(rag: dict[str, Any]) -> list[str]:
    tier = "host-RAM tier (sleep/wake)" if rag["host_tier"] else "tier off (full unload, cold load; baseline)"
    loops = rag["loops"]
    wake_or_load = "wake_s" if rag["host_tier"] else "load_s"
    lines = [
        f"RAG loop, {rag['shape']} FP8, {tier}: budget {rag['budget_bytes'] / 2**30:.1f} GiB; steady state (both "
        f"resident): embed {rag['steady_embed_s'] * 1e3:.1f} ms, rerank 32 docs {rag['steady_rerank_s'] * 1e3:.1f} ms",
        "",
        f"| loop | loop s | embed s | rerank s | embedder {wake_or_load[:-2]} s | reranker {wake_or_load[:-2]} s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for index, row in enumerate(loops):
        swaps = [row[f"{n}_{wake_or_load}"] for n in contract.ENCODERS]
        cells = ["-" if value is None else f"{value:.3f}" for value in swaps]
        lines.append(
            f"| {index + 1} | {row['loop_s']:.2f} | {row['embed_s']:.3f} | {row['rerank_s']:.3f} "
            f"| {cells[0]} | {cells[1]} |"
        )
    lines.append(f"| p50 | {statistics.median(r['loop_s'] for r in loops):.2f} | | | | |")
    return lines + ["", *cold_load_markdown(rag.get("cold_loads", []))]


def cold_load_markdown(loads: list[dict[str, Any]]) -> list[str]:
    """Each load of that server, phase by phase from its log (triton_rag.core.load_phases)."""
    if not loads:
        return []
    names = list(PHASES)
    lines = [
        "Cold loads in that server, phase by phase (s; from the server log):",
        "",
        f"| model | total | compiled layer | {' | '.join(names)} | unaccounted |",
        "| --- | --- | --- |" + " --- |" * (len(names) + 1),
    ]
    for load in loads:
        phases = load["phases"]
        cells = ["-" if phases.get(name) is None else f"{phases[name]:.1f}" for name in names]
        rest = "-" if load["unaccounted_s"] is None else f"{load['unaccounted_s']:.1f}"
        total = "-" if load["total_s"] is None else f"{load['total_s']:.2f}"
        lines.append(f"| {load['model']} | {total} | {load['compiled_layer'] or '-'} | {' | '.join(cells)} | {rest} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=["0.6b"], choices=sorted(SHAPES))
    parser.add_argument("--swaps", type=int, default=3, help="swaps in each direction")
    parser.add_argument("--perf", action="store_true", help="also measure the router's overhead with perf_analyzer")
    parser.add_argument("--perf-shape", default="0.6b", choices=sorted(SHAPES))
    parser.add_argument("--perf-analyzer", default=benchlib.find_perf_analyzer() or "perf_analyzer")
    parser.add_argument("--rag-loops", type=int, default=0, help="RAG loops through the host-RAM tier (0: none)")
    parser.add_argument("--baseline-loops", type=int, default=2, help="RAG loops with the tier off, same run")
    parser.add_argument("--rag-shape", default="8b", choices=sorted(SHAPES))
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
        "rag": [],
    }
    if args.rag_loops:
        for host_tier, loops in ((True, args.rag_loops), (False, args.baseline_loops)):
            if loops:
                loop = bench_rag_loop(args.rag_shape, args.work, args.cache_dir, args.out, loops, host_tier)
                report["rag"].append(loop)
                (args.out / "router.json").write_text(json.dumps(report, indent=2))
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

"""The gateway against direct gRPC to the same Triton endpoint, in the same run (issue 22, item 9).

Starts tritonserver on a prepared repository (by default the tiny offline Qwen3 embedder, which any machine can
build), then the gateway beside it, and measures:

1. a 16-token embedding at concurrency 1: p50/p90 of direct gRPC (tritonclient) and of the gateway (OpenAI JSON over
   HTTP/1.1 keep-alive, httpx), alternating in rounds so drift hits both alike; target: the gateway adds <= 1 ms p50;
2. throughput with 64 concurrent clients for a fixed time each (asyncio: 64 tasks on one gRPC channel, or 64 HTTP
   connections); target: the gateway >= 0.95x direct.

The load generator runs on the same machine as the server (on a small CPU box it takes cores from both sides alike).
Results as JSON in --out and as a markdown table (--append BENCHMARKS.md appends it).

    .venv/bin/python tools/bench_gateway.py --out bench_results/gateway --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
from datetime import date
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "backends"))

from triton_rag import contract  # noqa: E402
from triton_rag.build.offline import build_tiny_qwen3  # noqa: E402
from triton_rag.build.repository import prepare_repository  # noqa: E402
from triton_rag.build.settings import EmbedSettings, Settings  # noqa: E402
from triton_rag.gateway.tokens import FastTokenizer  # noqa: E402
from triton_rag.server import TritonServer, free_ports  # noqa: E402

CACHE_DIR = Path(os.environ.get("TRITON_RAG_CACHE", PROJECT_ROOT / ".cache"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sixteen_token_text(tokenizer_file: Path, tokens: int = 16) -> str:
    """A text the endpoint tokenizes to `tokens` tokens, the pooling token included."""
    tokenizer = FastTokenizer.from_file(tokenizer_file)
    words = "retrieval augmented generation needs fast embeddings of short queries and long documents alike".split()
    for count in range(1, 60):
        text = " ".join((words * 4)[:count])
        if len(tokenizer([text])["input_ids"][0]) + 1 == tokens:
            return text
    raise RuntimeError("no text of that many tokens")


def tensor(text: str) -> grpcclient.InferInput:
    value = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
    value.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
    return value


class KeepAlive:
    """One keep-alive HTTP/1.1 connection (the standard library's client: the lightest a Python caller has, so the
    client's own cost stays out of the gateway's figure as far as it can)."""

    def __init__(self, url: str) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.connection = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=60)

    def post(self, path: str, body: dict) -> dict:
        self.connection.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {data[:300]!r}")
        return json.loads(data)


def latency(grpc_url: str, gateway_url: str, text: str, rounds: int, per_round: int) -> dict[str, list[float]]:
    client = grpcclient.InferenceServerClient(grpc_url)
    gateway = KeepAlive(gateway_url)
    body = {"model": contract.EMBED_ENDPOINT, "input": text, "encoding_format": "float"}
    times: dict[str, list[float]] = {"direct": [], "gateway": []}
    for _ in range(20):  # warm-up: the encoder's first load, connections, caches
        client.infer(contract.EMBED_ENDPOINT, [tensor(text)]).as_numpy("EMBEDDING")
        gateway.post("/v1/embeddings", body)
    for _ in range(rounds):
        for _ in range(per_round):
            start = time.perf_counter()
            client.infer(contract.EMBED_ENDPOINT, [tensor(text)]).as_numpy("EMBEDDING")
            times["direct"].append(time.perf_counter() - start)
        for _ in range(per_round):
            start = time.perf_counter()
            gateway.post("/v1/embeddings", body)
            times["gateway"].append(time.perf_counter() - start)
    client.close()
    return times


async def throughput_direct(grpc_url: str, text: str, clients: int, seconds: float) -> float:
    client = aioclient.InferenceServerClient(grpc_url)
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        value = aioclient.InferInput("TEXT", [1, 1], "BYTES")
        value.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
        while time.perf_counter() < stop:
            result = await client.infer(contract.EMBED_ENDPOINT, [value])
            result.as_numpy("EMBEDDING")
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    await client.close()
    return done / elapsed


async def throughput_gateway(gateway_url: str, text: str, clients: int, seconds: float) -> float:
    """64 keep-alive connections from one asyncio process (aiohttp's client: the fastest Python one here)."""
    import aiohttp

    body = {"model": contract.EMBED_ENDPOINT, "input": text, "encoding_format": "float"}
    done = 0
    stop = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base_url=gateway_url, connector=connector) as session:

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                async with session.post("/v1/embeddings", json=body) as response:
                    response.raise_for_status()
                    await response.json()
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return done / elapsed


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, no GPU used"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench_results" / "gateway")
    parser.add_argument("--append", type=Path, help="append the markdown section to this file (BENCHMARKS.md)")
    parser.add_argument("--model", help="embedder (hub id or directory); default: the tiny offline Qwen3")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or str(build_tiny_qwen3("embed", CACHE_DIR / "offline" / "tiny-qwen3-embed", CACHE_DIR))
    repository = args.out / "repository"
    prepare_repository(
        Settings(embed=EmbedSettings(model=model), offline_fallback=False), repository, CACHE_DIR, endpoints=("embed",)
    )
    text = sixteen_token_text(repository / contract.EMBED_ENDPOINT / "1" / "tokenizer" / "tokenizer.json")
    ports, gateway_port = free_ports(), free_port()
    triton_log = open(args.out / "triton.log", "wb")
    server = TritonServer(repository, CACHE_DIR, ports, log=triton_log)
    server.start()
    gateway = None
    try:
        server.wait_ready(300)
        gateway_log = open(args.out / "gateway.log", "wb")
        gateway = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "triton_rag.gateway",
                "--repository",
                str(repository),
                "--triton-url",
                server.grpc_url,
                "--port",
                str(gateway_port),
            ],
            stdout=gateway_log,
            stderr=subprocess.STDOUT,
        )
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{gateway_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        times = latency(server.grpc_url, gateway_url, text, args.rounds, args.per_round)
        # throughput: direct and gateway twice each, alternating, the better of each kept (a noisy box's outliers)
        direct_runs, gateway_runs = [], []
        for _ in range(2):
            direct_runs.append(asyncio.run(throughput_direct(server.grpc_url, text, args.clients, args.seconds)))
            gateway_runs.append(asyncio.run(throughput_gateway(gateway_url, text, args.clients, args.seconds)))
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(timeout=30)
        server.stop()
        triton_log.close()
    ms = {name: [t * 1000 for t in values] for name, values in times.items()}
    p50 = {name: statistics.median(values) for name, values in ms.items()}
    p90 = {name: percentile(values, 90) for name, values in ms.items()}
    added = p50["gateway"] - p50["direct"]
    direct_rps, gateway_rps = max(direct_runs), max(gateway_runs)
    ratio = gateway_rps / direct_rps
    result = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "model": model,
        "text": text,
        "tokens": 16,
        "latency_ms": {"p50": p50, "p90": p90, "samples": len(ms["direct"])},
        "added_p50_ms": added,
        "throughput_rps": {"direct": direct_runs, "gateway": gateway_runs},
        "throughput_ratio": ratio,
        "clients": args.clients,
        "seconds": args.seconds,
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    verdict_latency = "met" if added <= 1.0 else "**missed**"
    verdict_rps = "met" if ratio >= 0.95 else "**missed**"
    lines = [
        "",
        f"### Gateway against direct gRPC, CPU ({result['date']})",
        "",
        f"Machine: {result['machine']}. Model: the tiny offline Qwen3 embedder (2 layers, hidden 64, the real Qwen3 "
        "tokenizer), torch engine on the CPU; the load generator on the same machine. Command:",
        "",
        "    .venv/bin/python tools/bench_gateway.py --out bench_results/gateway --append BENCHMARKS.md",
        "",
        "| measure | direct gRPC (tritonclient) | gateway (/v1/embeddings, JSON) | gateway - direct | target |",
        "| --- | --- | --- | --- | --- |",
        f"| 16-token embedding, concurrency 1, p50 ms ({result['latency_ms']['samples']} each, alternating rounds) | "
        f"{p50['direct']:.2f} | {p50['gateway']:.2f} | +{added:.2f} ms | <= +1 ms: {verdict_latency} |",
        f"| same, p90 ms | {p90['direct']:.2f} | {p90['gateway']:.2f} | +{p90['gateway'] - p90['direct']:.2f} ms | |",
        f"| {args.clients} concurrent clients, requests/s (best of 2 x {args.seconds:g} s) | {direct_rps:.0f} | "
        f"{gateway_rps:.0f} | {ratio:.2f}x | >= 0.95x: {verdict_rps} |",
        "",
    ]
    text_block = "\n".join(lines)
    print(text_block)
    if args.append:
        with open(args.append, "a") as handle:
            handle.write(text_block)
    return 0


if __name__ == "__main__":
    sys.exit(main())

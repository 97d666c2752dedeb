"""The gateway against direct gRPC to the same Triton endpoint, in the same run (issue 22, item 9).

Starts tritonserver on a prepared repository (by default the tiny offline Qwen3 embedder, which any machine can
build), then the gateway beside it (`--workers`: its [gateway] workers, "auto" or a number), and measures:

1. a 16-token embedding at concurrency 1: p50/p90 of direct gRPC (tritonclient, sync) and of the gateway (OpenAI
   JSON over one HTTP/1.1 keep-alive connection, the standard library's client), alternating in rounds so that drift
   hits both alike; target: the gateway adds <= 1 ms p50;
2. throughput with 64 concurrent clients for a fixed time, each side twice, alternating, the better run kept;
   target: the gateway >= 0.95x direct.

The load generator must not be what limits either side, and must weigh on both alike: each side's clients are spread
over the same number of processes (`--client-processes`; direct: tritonclient's asyncio gRPC, one channel a process;
gateway: aiohttp, one keep-alive connection a client), which start together once all are connected. Each run
records the CPU the load generator used (all its processes, and the busiest one: near 1.0 core, that process was a
limit) and the CPU of the gateway's processes and of tritonserver's (its python stubs included), so a machine too
small for all three shows as such. Results as JSON in --out and as a markdown table (--append BENCHMARKS.md
appends it).

    .venv/bin/python tools/bench_gateway.py --out bench_results/gateway --workers auto --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import importlib.util
import json
import multiprocessing
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from datetime import date
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "backends"))

from triton_rag import contract  # noqa: E402
from triton_rag.build.offline import build_tiny_qwen3  # noqa: E402
from triton_rag.build.repository import prepare_repository  # noqa: E402
from triton_rag.build.settings import EmbedSettings, GatewaySettings, Settings  # noqa: E402
from triton_rag.gateway.tokens import FastTokenizer  # noqa: E402
from triton_rag.gateway.workers import available_cpus  # noqa: E402
from triton_rag.server import TritonServer, free_ports  # noqa: E402

CACHE_DIR = Path(os.environ.get("TRITON_RAG_CACHE", PROJECT_ROOT / ".cache"))
SIDES = ("direct", "gateway")
#: Requests each client sends before the measured window (connections made, the encoder's first load done).
WARM_UP_REQUESTS = 3


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


def embedding_body(text: str) -> dict[str, str]:
    return {"model": contract.EMBED_ENDPOINT, "input": text, "encoding_format": "float"}


def latency(grpc_url: str, gateway_url: str, text: str, rounds: int, per_round: int) -> dict[str, list[float]]:
    client = grpcclient.InferenceServerClient(grpc_url)
    gateway = KeepAlive(gateway_url)
    body = embedding_body(text)
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


# --- throughput: the load generator's processes ----------------------------------------------------------------------


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_clients(side: str, url: str, text: str, clients: int, conn: Connection) -> tuple[int, float]:
    """`clients` concurrent clients of one side in this process: each warms up, then, once the parent has sent the
    window (wall-clock start and stop, the same for every process), sends requests back to back from its start to
    its stop. The requests completed within the window, and this process's CPU seconds over it."""
    if side == "direct":
        client = aioclient.InferenceServerClient(url)
        value = aioclient.InferInput("TEXT", [1, 1], "BYTES")
        value.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))

        async def send() -> None:
            (await client.infer(contract.EMBED_ENDPOINT, [value])).as_numpy("EMBEDDING")

        try:
            return await measure(send, clients, conn)
        finally:
            await client.close()

    import aiohttp

    body = embedding_body(text)
    async with aiohttp.ClientSession(base_url=url, connector=aiohttp.TCPConnector(limit=clients)) as session:

        async def post() -> None:
            async with session.post("/v1/embeddings", json=body) as response:
                response.raise_for_status()
                await response.json()

        return await measure(post, clients, conn)


async def measure(send: Callable[[], Awaitable[None]], clients: int, conn: Connection) -> tuple[int, float]:
    """`clients` tasks calling `send`: warmed up, "ready" to the parent, its window back, requests until its stop."""
    window: list[float] = []
    warm = 0
    done = 0
    all_warm, go = asyncio.Event(), asyncio.Event()

    async def client() -> None:
        nonlocal warm, done
        for _ in range(WARM_UP_REQUESTS):
            await send()
        warm += 1
        if warm == clients:
            all_warm.set()
        await go.wait()
        start, stop = window
        await asyncio.sleep(max(0.0, start - time.time()))
        while time.time() < stop:
            await send()
            done += time.time() < stop

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    waiting = asyncio.create_task(all_warm.wait())
    await asyncio.wait([waiting, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        if task.done():
            task.result()  # a client that failed to warm up: its error
    conn.send("ready")
    window.extend(await asyncio.to_thread(conn.recv))
    go.set()
    cpu = cpu_seconds()
    await asyncio.gather(*tasks)
    return done, cpu_seconds() - cpu


def load_generator(side: str, url: str, text: str, clients: int, conn: Connection) -> None:
    """One process of the load generator (spawned): its counts back through `conn`."""
    try:
        import uvloop

        result = uvloop.run(run_clients(side, url, text, clients, conn))
    except ImportError:
        result = asyncio.run(run_clients(side, url, text, clients, conn))
    conn.send(result)


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) of `root` and every process below it, from /proc."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    tree, total = {root}, 0.0
    for _ in range(8):  # depth: tritonserver -> stubs; the gateway -> its workers
        tree |= {pid for pid, (parent, _) in stats.items() if parent in tree}
    for pid in tree:
        total += stats.get(pid, (0, 0.0))[1]
    return total


def throughput(
    side: str, url: str, text: str, clients: int, processes: int, seconds: float, servers: dict[str, int]
) -> dict[str, Any]:
    """`clients` spread over `processes` load-generator processes for `seconds`: requests/s and the CPU (in cores)
    of the load generator, its busiest process, and each server process tree in `servers`."""
    spawn = multiprocessing.get_context("spawn")
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    links, children = [], []
    for share in shares:
        parent_end, child_end = spawn.Pipe()
        child = spawn.Process(target=load_generator, args=(side, url, text, share, child_end), daemon=True)
        child.start()
        links.append(parent_end)
        children.append(child)
    try:
        for link in links:
            if not link.poll(300) or link.recv() != "ready":
                raise RuntimeError(f"a {side} load-generator process did not get ready")
        start = time.time() + 0.5
        stop = start + seconds
        for link in links:
            link.send((start, stop))
        time.sleep(max(0.0, start - time.time()))
        server_cpu = {name: tree_cpu_seconds(pid) for name, pid in servers.items()}
        time.sleep(max(0.0, stop - time.time()))
        server_cpu = {name: tree_cpu_seconds(pid) - server_cpu[name] for name, pid in servers.items()}
        results = []
        for link in links:
            if not link.poll(120):
                raise RuntimeError(f"a {side} load-generator process did not finish")
            results.append(link.recv())
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
    done = sum(count for count, _ in results)
    return {
        "rps": done / seconds,
        "requests": done,
        "client_cores": sum(cpu for _, cpu in results) / seconds,
        "busiest_client_process_cores": max(cpu for _, cpu in results) / seconds,
        "server_cores": {name: cpu / seconds for name, cpu in server_cpu.items()},
    }


# --- the run --------------------------------------------------------------------------------------------------------


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
    return f"{cpu}, {available_cpus()} cores, no GPU used"


def serving_stack() -> str:
    """What uvicorn serves the gateway with (the same interpreter as this one): uvloop and httptools when they are
    installed, else asyncio's own loop and the pure-Python h11 parser, which cost more per request."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    parser = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"{loop} + {parser}"


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the gateway did not become healthy:\n{log.read_text()[-3000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench_results" / "gateway")
    parser.add_argument("--append", type=Path, help="append the markdown section to this file (BENCHMARKS.md)")
    parser.add_argument("--model", help="embedder (hub id or directory); default: the tiny offline Qwen3")
    parser.add_argument("--workers", default="auto", help='the gateway\'s [gateway] workers: "auto" or a number')
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument(
        "--client-processes",
        type=int,
        help="load-generator processes a side (default: a quarter of the cores, 2 to 8)",
    )
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    cpus = available_cpus()
    workers = GatewaySettings(workers=args.workers).worker_count(cpus)  # what the gateway will start
    processes = args.client_processes or max(2, min(8, cpus // 4))
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
    gateway_log = args.out / "gateway.log"
    try:
        server.wait_ready(300)
        command = [sys.executable, "-m", "triton_rag.gateway", "--repository", str(repository), "--triton-url"]
        command += [server.grpc_url, "--port", str(gateway_port), "--set", f"gateway.workers={args.workers}"]
        with open(gateway_log, "wb") as handle:
            gateway = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        wait_healthy(gateway_url, gateway, gateway_log)
        assert server.process is not None
        servers = {"gateway": gateway.pid, "triton": server.process.pid}
        times = latency(server.grpc_url, gateway_url, text, args.rounds, args.per_round)
        # throughput: each side twice, alternating, the better run of each kept (a noisy machine's outliers)
        urls = {"direct": server.grpc_url, "gateway": gateway_url}
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
        for _ in range(2):
            for side in SIDES:
                runs[side].append(throughput(side, urls[side], text, args.clients, processes, args.seconds, servers))
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
    best = {side: max(runs[side], key=lambda run: run["rps"]) for side in SIDES}
    ratio = best["gateway"]["rps"] / best["direct"]["rps"]
    result = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "model": model,
        "text": text,
        "tokens": 16,
        "gateway_workers": {"setting": args.workers, "processes": workers},
        "gateway_serving": serving_stack(),
        "latency_ms": {"p50": p50, "p90": p90, "samples": len(ms["direct"])},
        "added_p50_ms": added,
        "throughput": runs,
        "throughput_ratio": ratio,
        "clients": args.clients,
        "client_processes": processes,
        "seconds": args.seconds,
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    text_block = markdown(result, best)
    print(text_block)
    if args.append:
        with open(args.append, "a") as handle:
            handle.write(text_block)
    return 0


def markdown(result: dict[str, Any], best: dict[str, dict[str, Any]]) -> str:
    p50, p90 = result["latency_ms"]["p50"], result["latency_ms"]["p90"]
    added, ratio = result["added_p50_ms"], result["throughput_ratio"]
    workers = result["gateway_workers"]
    clients, processes, seconds = result["clients"], result["client_processes"], result["seconds"]

    def cores(run: dict[str, Any]) -> str:
        servers = run["server_cores"]
        return (
            f"load generator {run['client_cores']:.2f} (busiest process {run['busiest_client_process_cores']:.2f}), "
            f"gateway {servers['gateway']:.2f}, tritonserver {servers['triton']:.2f}"
        )

    lines = [
        "",
        f"### Gateway against direct gRPC ({result['date']}, gateway workers {workers['setting']} = "
        f"{workers['processes']})",
        "",
        f"Machine: {result['machine']}. Gateway: {workers['processes']} process(es), uvicorn on "
        f"{result['gateway_serving']}. Load generator: {processes} processes a side on the same machine. Command:",
        "",
        f"    .venv/bin/python tools/bench_gateway.py --out bench_results/gateway --workers {workers['setting']}",
        "",
        "| measure | direct gRPC | gateway | gateway vs direct | target |",
        "| --- | --- | --- | --- | --- |",
        f"| 16-token embedding, concurrency 1, p50 ({result['latency_ms']['samples']} each, alternating rounds) | "
        f"{p50['direct']:.2f} ms | {p50['gateway']:.2f} ms | {added:+.2f} ms | <= +1 ms: "
        f"{'met' if added <= 1.0 else '**missed**'} |",
        f"| same, p90 | {p90['direct']:.2f} ms | {p90['gateway']:.2f} ms | "
        f"{p90['gateway'] - p90['direct']:+.2f} ms | |",
        f"| {clients} concurrent clients, requests/s (best of 2 x {seconds:g} s) | {best['direct']['rps']:,.0f} | "
        f"{best['gateway']['rps']:,.0f} | {ratio:.2f}x | >= 0.95x: {'met' if ratio >= 0.95 else '**missed**'} |",
        "",
        f"CPU in cores during the best runs: direct: {cores(best['direct'])}; gateway: {cores(best['gateway'])}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

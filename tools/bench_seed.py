"""The RAG seed scenario on the real tritonserver, under a settings profile and its device-memory cap.

Each configuration is one tritonserver started from the profile (default profiles/rtx5070ti-16gb.toml, rag.toml's
format) with the models replaced by local random-weight checkpoints this tool builds (and reuses) under --work:
one Qwen3ForCausalLM of the Qwen3-8B shape serves both `qwen_embed` and `qwen_rerank` (the embedder ignores its
lm_head), and a granite-docling of the real shape. Per configuration, in order:

1. convert: the tool's own multi-page text PDF (Helvetica, Letter) through `docling_document`, --converts times (the
   first includes the VLM's load); pages/s from the later ones. Random weights never write a stop token, so each
   page generates --new-tokens tokens.
2. chunk and embed: the returned DoclingDocument's text (its `texts` and table cells) split on whitespace and packed
   in order into chunks of at most --chunk-chars characters. A random-weight VLM writes little text, so when that
   gives fewer than --min-chunks chunks, chunks of the PDF's own text (what a real model would have read) fill up
   to it; the report counts both. Every chunk through `qwen_embed` (--rows-per-request rows a request, all in
   flight at once, as a client would send them).
3. the query loop: --queries different queries, one after the other: embed the query (with the default query
   instruction), take the --top-k chunks by cosine, rerank them through `qwen_rerank` (--rows-per-request rows a
   request, all in flight at once). The router's STATUS before and after each query gives its swaps (loads,
   evictions, sleeps, wakes). Then the same queries from --concurrency client threads at once.
4. steady state: where the loop swapped, the cap is lifted on the same server (the router reloaded with the GPU's
   whole memory as its budget and no device_memory, as RouterControl.set_budget reloads it), both encoders warmed,
   and --steady-queries more queries run: "query loop p50 / steady-state p50" is the cost of the cap. A loop that
   did not swap is its own steady state.

Configurations: the profile as it is (one per --batching preset when given: `[embed]`, `[rerank]` and `[docling]`
`batching` set to it), with --device-tables the profile with both FP8 embedding tables on the device
(`embedding_table = "device"`), then the profile with `rerank.precision=fp8` (two 8B FP8 encoders do not fit a 16 GB cap
together, so it swaps). The device's own memory reading (NVML "used", every process on the GPU) is sampled every
50 ms for the whole run. Last, with no server running: accuracy on the same random weights in this process
(TorchEncoder, no Triton): the profile's reranker precision against bfloat16 (Spearman and largest difference of
sigmoid(yes - no) over --accuracy-pairs query/chunk pairs) and its embedder precision against bfloat16 (cosine per
row of the --dim vectors).

    python3 tools/bench_seed.py --out $OUT        # GPU (after `source tools/gpu_setup.sh`): 8B shapes, the profile
    python3 tools/bench_seed.py --batching project design --no-fp8-run --accuracy-pairs 0 --out $OUT   # the presets
    .venv/bin/python tools/bench_seed.py --shape tiny --queries 4 --profile rag.toml --out /tmp/seedsmoke   # CPU
Writes seed.json (after each configuration) and seed.md (a table for BENCHMARKS.md) under --out, progress on stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import random
import re
import shutil
import sys
import textwrap
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
import tritonclient.grpc as grpcclient

from triton_rag import contract
from triton_rag.build.offline import QWEN3_SHAPES, TINY_QWEN3, build_random_qwen3
from triton_rag.build.offline_docling import GRANITE_DOCLING_TEXT, GRANITE_DOCLING_VISION, build_random_granite_docling
from triton_rag.build.repository import prepare_repository
from triton_rag.build.settings import Settings, load_settings
from triton_rag.client import RouterControl
from triton_rag.contract.params import DEFAULT_RERANK_INSTRUCTION
from triton_rag.core import logs
from triton_rag.server import TritonServer, free_ports

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROFILE = ROOT / "profiles" / "rtx5070ti-16gb.toml"
#: (Qwen3 shape, granite-docling text and vision shapes; None: the tiny stand-in)
SHAPES: dict[str, tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]] = {
    "8b": (QWEN3_SHAPES["8b"], GRANITE_DOCLING_TEXT, GRANITE_DOCLING_VISION),
    "tiny": (TINY_QWEN3, None, None),
}
COUNTERS = ("loads", "evictions", "sleeps", "wakes")
#: A compute model's line after its load: "qwen_rerank_encoder: rerank engine on cuda:0 in fp8, hidden size ..."
ENGINE_LINE = re.compile(r"^(\w+): \w+ engine on (\S+ in [\w.]+)")
#: Lines of the server log the report keeps: precision fallbacks and the device-memory cap each process set.
NOTE_LINE = re.compile(r"precision: |device memory capped")
ENCODERS = (contract.EMBED_ENCODER, contract.RERANK_ENCODER)
#: Qwen3-Embedding's query instruction for web search (the same words as the reranker's default instruction).
QUERY_INSTRUCTION = DEFAULT_RERANK_INSTRUCTION
_log = logging.getLogger("triton_rag.bench_seed")


def log(message: str) -> None:
    _log.info(message)


def configure_logging() -> None:
    """Progress lines, the library's included, on stderr with a timestamp (this process and the builder's)."""
    logging.Formatter.default_time_format = "%H:%M:%S"
    logs.configure(fmt="[bench_seed %(asctime)s] %(message)s")


# --- the document and the queries ---------------------------------------------------------------------------------

SUBJECTS = ("the cooling loop", "the billing service", "the ingestion queue", "the storage array", "the vector index",
            "the embedding model", "the reranker", "the document parser", "the load balancer", "the cache layer",
            "the audit log", "the scheduler")  # fmt: skip
VERBS = ("reduces", "increases", "depends on", "replaces", "monitors", "limits", "stores", "validates", "compresses",
         "routes")  # fmt: skip
OBJECTS = ("latency", "the memory budget", "throughput", "the error rate", "the request queue", "disk usage",
           "the page count", "token usage", "the eviction rate", "startup time")  # fmt: skip
WHEN = ("during peak hours", "after each deployment", "when the budget is exceeded", "for every tenant",
        "under sustained load", "in the nightly batch", "before the first query", "across all regions")  # fmt: skip
#: Letter at 10 pt Helvetica, 13 pt leading: lines of about 95 characters, 52 lines a page.
LINE_CHARS, PAGE_LINES = 95, 52


def page_texts(pages: int, seed: int = 21) -> list[str]:
    """Each page's text: a heading and sentences about made-up systems (so queries and chunks share words)."""
    rng = random.Random(seed)
    texts = []
    for page in range(pages):
        words = [f"Section {page + 1}: {rng.choice(SUBJECTS)} and {rng.choice(OBJECTS)}."]
        while sum(len(w) + 1 for w in words) < LINE_CHARS * (PAGE_LINES - 2):
            sentence = (
                f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(WHEN)}."
            )
            if rng.random() < 0.3:
                sentence += f" The measured value was {rng.randint(1, 999)} units, {rng.randint(2, 60)} percent off."
            words.append(sentence)
        texts.append(" ".join(textwrap.wrap(" ".join(words), LINE_CHARS)[:PAGE_LINES]))  # what the page shows
    return texts


def make_pdf(texts: Sequence[str]) -> bytes:
    """A text PDF written by hand, one Letter page per text (standard Helvetica, no embedded font)."""

    def escape(line: str) -> str:
        return line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    pages = len(texts)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>"
        % (" ".join(f"{3 + 2 * i} 0 R" for i in range(pages)).encode(), pages),
    ]
    font = 3 + 2 * pages
    for index, text in enumerate(texts):
        lines = textwrap.wrap(text, LINE_CHARS)[:PAGE_LINES]
        stream = "BT /F1 10 Tf 13 TL 54 740 Td " + " ".join(f"({escape(line)}) Tj T*" for line in lines) + " ET"
        data = stream.encode("latin-1")
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 %d 0 R >> >> "
            b"/Contents %d 0 R >>" % (font, 4 + 2 * index)
        )
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(data), data))
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def make_queries(count: int, seed: int = 5) -> list[str]:
    rng = random.Random(seed)
    return [f"How does {rng.choice(SUBJECTS)} affect {rng.choice(OBJECTS)} {rng.choice(WHEN)}?" for _ in range(count)]


def document_text(structured_json: str) -> str:
    """The text a DoclingDocument (as JSON) holds: its text items, then its table cells."""
    document = json.loads(structured_json)
    parts = [item.get("text", "") for item in document.get("texts", [])]
    for table in document.get("tables", []):
        parts += [cell.get("text", "") for cell in table.get("data", {}).get("table_cells", [])]
    return "\n".join(part for part in parts if part.strip())


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Whitespace-separated words, in order, packed into chunks of at most `max_chars` characters (a longer word is
    cut): fixed-size chunking, the simplest a RAG pipeline does."""
    words = [word[i : i + max_chars] for word in text.split() for i in range(0, len(word), max_chars)]
    chunks: list[str] = []
    current = ""
    for word in words:
        if current and len(current) + 1 + len(word) > max_chars:
            chunks.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    return chunks + ([current] if current else [])


# --- the models ---------------------------------------------------------------------------------------------------


def build_models(shape: str, work: Path, cache: Path) -> dict[str, str]:
    """Build (once; reused when present) the random-weight checkpoints. Runs in a child process so this one never
    holds a CUDA context or torch's cached blocks while the servers run (the device reading would count them)."""
    import torch

    configure_logging()
    qwen_shape, docling_text, docling_vision = SHAPES[shape]
    device, dtype = ("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32")
    started = time.monotonic()
    qwen = build_random_qwen3("rerank", work / f"qwen3-{shape}-{dtype}", cache, qwen_shape, log, dtype, device)
    log(f"Qwen3 checkpoint ready at {qwen} after {time.monotonic() - started:.1f} s")
    started = time.monotonic()
    docling_dir = work / f"granite-docling-{shape}-{dtype}"
    docling = build_random_granite_docling(docling_dir, cache, docling_text, docling_vision, log, dtype, device)
    log(f"granite-docling checkpoint ready at {docling} after {time.monotonic() - started:.1f} s")
    return {"qwen3": str(qwen), "docling": str(docling)}


# --- the client ---------------------------------------------------------------------------------------------------


def _strings(name: str, values: Sequence[str | bytes], rows: bool = True) -> grpcclient.InferInput:
    encoded = [v.encode() if isinstance(v, str) else v for v in values]
    data = np.array([[v] for v in encoded] if rows else encoded, dtype=np.object_)
    tensor = grpcclient.InferInput(name, list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


class SeedClient:
    """The scenario's requests over gRPC, each request's seconds recorded; several requests go out at once
    (async_infer), as a client with many rows to send would send them."""

    def __init__(self, url: str, rows_per_request: int) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.rows = rows_per_request

    def _send(self, model: str, inputs: list[grpcclient.InferInput]) -> Future[tuple[Any, float]]:
        future: Future[tuple[Any, float]] = Future()
        started = time.monotonic()

        def done(result: Any, error: Any) -> None:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result((result, time.monotonic() - started))

        self.client.async_infer(model, inputs, done)
        return future

    def _many(
        self, model: str, requests: list[list[grpcclient.InferInput]], output: str
    ) -> tuple[np.ndarray, list[float]]:
        futures = [self._send(model, inputs) for inputs in requests]
        results = [f.result() for f in futures]
        return np.concatenate([r.as_numpy(output) for r, _ in results]), [seconds for _, seconds in results]

    def _groups(self, values: Sequence[str]) -> list[Sequence[str]]:
        return [values[i : i + self.rows] for i in range(0, len(values), self.rows)]

    def convert(self, pdf: bytes) -> tuple[str, list[Any], float]:
        result, seconds = self._send(contract.DOCLING_DOCUMENT_ENDPOINT, [_strings("DOCUMENT", [pdf], False)]).result()
        errors = json.loads(result.as_numpy("PAGE_ERRORS")[0])
        return result.as_numpy("STRUCTURED_JSON")[0].decode(), errors, seconds

    def embed(self, texts: Sequence[str], instruction: str = "") -> tuple[np.ndarray, list[float]]:
        requests = [
            [_strings("TEXT", group)] + ([_strings("INSTRUCTION", [instruction] * len(group))] if instruction else [])
            for group in self._groups(texts)
        ]
        vectors, seconds = self._many(contract.EMBED_ENDPOINT, requests, "EMBEDDING")
        return vectors.astype(np.float32), seconds

    def rerank(self, query: str, documents: Sequence[str]) -> tuple[np.ndarray, list[float]]:
        requests = [[_strings("QUERY", [query] * len(g)), _strings("DOCUMENT", g)] for g in self._groups(documents)]
        scores, seconds = self._many(contract.RERANK_ENDPOINT, requests, "SCORE")
        return scores.reshape(-1), seconds


def counters(status: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Each model's swap counters from the router's STATUS."""
    return {name: {key: int(row[key]) for key in COUNTERS} for name, row in status["models"].items()}


def counted(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, int]:
    """The swaps between two snapshots, summed over the models."""
    return {key: sum(after[m][key] - before.get(m, {}).get(key, 0) for m in after) for key in COUNTERS}


def swapped(swaps: dict[str, int]) -> bool:
    return any(swaps.values())


@dataclass
class Query:
    """One query's seconds: the query's embedding, the rerank of its top chunks, the whole (search included)."""

    embed_s: float
    rerank_s: float
    loop_s: float
    swaps: dict[str, int] = field(default_factory=dict)


class Scenario:
    """One server's run through the stages, with the chunks' embeddings the queries search."""

    def __init__(self, seed: SeedClient, router: RouterControl, args: argparse.Namespace) -> None:
        self.seed, self.router, self.args = seed, router, args
        self.chunks: list[str] = []
        self.vectors = np.zeros((0, 1), dtype=np.float32)

    def counters(self) -> dict[str, dict[str, int]]:
        return counters(self.router.status())

    def query(self, text: str) -> Query:
        started = time.monotonic()
        vector, _ = self.seed.embed([text], QUERY_INSTRUCTION)
        embed_s = time.monotonic() - started
        top = np.argsort(self.vectors @ vector[0])[::-1][: self.args.top_k]
        middle = time.monotonic()
        self.seed.rerank(text, [self.chunks[i] for i in top])
        done = time.monotonic()
        return Query(embed_s, done - middle, done - started)

    def loop(self, queries: Sequence[str], label: str) -> list[Query]:
        """One query after another, the router's counters read between them (outside the timing)."""
        rows = []
        for index, text in enumerate(queries):
            before = self.counters()
            row = self.query(text)
            row.swaps = counted(before, self.counters())
            rows.append(row)
            log(f"{label} {index + 1}/{len(queries)}: {row.loop_s:.3f} s (embed {row.embed_s:.3f}, rerank "
                f"{row.rerank_s:.3f}), swaps {row.swaps}")  # fmt: skip
        return rows

    def concurrent(self, queries: Sequence[str], threads: int) -> dict[str, Any]:
        before = self.counters()
        started = time.monotonic()
        with ThreadPoolExecutor(threads) as pool:
            rows = list(pool.map(self.query, queries))
        wall = time.monotonic() - started
        return {
            "concurrency": threads,
            "queries": len(rows),
            "wall_s": wall,
            "queries_per_s": len(rows) / wall,
            "loop_s": [r.loop_s for r in rows],
            "swaps": counted(before, self.counters()),
        }


def lift_cap(router: RouterControl, client: grpcclient.InferenceServerClient, budget: int, seed: SeedClient) -> int:
    """Reload the router with `budget` bytes and no device_memory (a budget may not exceed it), as
    RouterControl.set_budget does for the budget alone; then wake both encoders and wait until both are on the GPU.
    Each compute model's process keeps its own device_memory limit (set at its load), which one encoder fits."""
    config = router.client.get_model_config(contract.ROUTER, as_json=True)["config"]
    config["parameters"]["budget"] = {"string_value": str(budget)}
    config["parameters"]["device_memory"] = {"string_value": "auto"}
    router.client.load_model(contract.ROUTER, config=json.dumps(config))
    deadline = time.monotonic() + 300
    while not client.is_model_ready(contract.ROUTER):
        if time.monotonic() > deadline:
            raise RuntimeError("the router did not come back after its budget was changed")
        time.sleep(0.2)
    seed.embed(["warm-up"])
    seed.rerank("warm-up", ["warm-up"])
    while any(router.status()["models"][name]["tier"] != "gpu" for name in ENCODERS):
        if time.monotonic() > deadline:
            raise RuntimeError("the encoders did not both reach the GPU under the lifted budget")
        time.sleep(0.2)
    return int(router.status()["budget_bytes"])


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def settings_summary(settings: Settings) -> dict[str, Any]:
    """What the report prints of a configuration's settings (device_memory, batching: where the settings have them)."""
    router = settings.router
    return {
        "router": {
            key: getattr(router, key, None)
            for key in ("device_memory", "budget", "reserve", "host_budget", "high_watermark", "min_residency_seconds")
        },
        **{
            section: {
                key: getattr(getattr(settings, section), key, None)
                for key in ("precision", "batching", "max_batch_tokens", "max_length", "dim", "max_new_tokens")
                if hasattr(getattr(settings, section), key)
            }
            for section in ("embed", "rerank", "docling")
        },
    }


def run_configuration(
    name: str,
    settings: Settings,
    pdf: bytes,
    source_text: str,
    queries: list[str],
    args: argparse.Namespace,
    sampler: benchlib.DeviceMemorySampler,
) -> dict[str, Any]:
    """Prepare a repository for `settings`, start tritonserver and run the stages; the server is stopped in any case.
    A failure is kept in the result ("error") with whatever was measured before it."""
    server_log = args.out / f"server-{slug(name)}.log"
    marks: dict[str, float] = {"start": time.monotonic()}
    result: dict[str, Any] = {"name": name, "settings": settings_summary(settings), "server_log": server_log.name}
    try:
        repository = args.work / f"repository-{slug(name)}"
        shutil.rmtree(repository, ignore_errors=True)  # fresh configs and measurements for each configuration
        prepare_repository(settings, repository, args.cache_dir, log=log)
        with open(server_log, "wb") as log_file:
            server = TritonServer(repository, args.cache_dir, free_ports(), log=log_file)
            try:
                server.start()
                server.wait_ready(600)
                result["server_ready_s"] = time.monotonic() - marks["start"]
                log(f"{name}: tritonserver ready in {result['server_ready_s']:.1f} s")
                run_stages(name, server, pdf, source_text, queries, args, sampler, result, marks)
            finally:
                server.stop()
    except Exception as exc:  # keep what was measured; main() reports the failure in the exit code
        logging.getLogger("triton_rag").exception(f"configuration {name!r} failed")
        result["error"] = f"{type(exc).__name__}: {exc}"
    marks["end"] = time.monotonic()
    stages = list(marks)
    result["peak_device_bytes"] = {
        stage: sampler.peak(marks[stage], marks[stages[i + 1]]) for i, stage in enumerate(stages[:-1])
    } | {"whole": sampler.peak(marks["start"], marks["end"])}
    result["process_peak_bytes"] = sampler.process_peaks(marks["start"], marks["end"])
    result["wall_s"] = marks["end"] - marks["start"]
    server_lines = server_log.read_text("utf-8", "replace").splitlines() if server_log.exists() else []
    result["engines"] = {m.group(1): m.group(2) for m in map(ENGINE_LINE.match, server_lines) if m}
    result["log_notes"] = sorted({line.strip() for line in server_lines if NOTE_LINE.search(line)})
    return result


def run_stages(
    name: str,
    server: TritonServer,
    pdf: bytes,
    source_text: str,
    queries: list[str],
    args: argparse.Namespace,
    sampler: benchlib.DeviceMemorySampler,
    result: dict[str, Any],
    marks: dict[str, float],
) -> None:
    """The scenario's stages on a running server, each one's figures into `result` as soon as it ends and its start
    into `marks` (the device-memory peaks are per stage)."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    router = RouterControl(server.grpc_url, key=server.admin_key)
    seed = SeedClient(server.grpc_url, args.rows_per_request)
    scenario = Scenario(seed, router, args)
    result["counters_start"] = scenario.counters()
    stage_swaps: dict[str, dict[str, int]] = {}
    result["stage_swaps"] = stage_swaps

    marks["convert"] = time.monotonic()
    before = scenario.counters()
    converts = []
    for index in range(args.converts):
        structured, errors, seconds = seed.convert(pdf)
        converts.append(seconds)
        log(f"{name}: convert {index + 1}/{args.converts}: {args.pages} pages in {seconds:.2f} s, "
            f"{len(errors)} page errors")  # fmt: skip
        if index == 0:
            text, page_errors = document_text(structured), errors
    stage_swaps["convert"] = counted(before, scenario.counters())
    converted = chunk_text(text, args.chunk_chars)
    filler = chunk_text(source_text, args.chunk_chars)[: max(args.min_chunks - len(converted), 0)]
    scenario.chunks = converted + filler
    result["convert"] = {
        "seconds": converts,
        "pages": args.pages,
        "pages_per_s": args.pages / float(np.median(converts[1:] or converts)),  # the first loads the VLM
        "page_errors": page_errors,
        "text_chars": len(text),
        "chunks_from_conversion": len(converted),
        "chunks_from_source_text": len(filler),
    }

    marks["embed_chunks"] = time.monotonic()
    before = scenario.counters()
    scenario.vectors, seconds = seed.embed(scenario.chunks)
    total = time.monotonic() - marks["embed_chunks"]
    stage_swaps["embed_chunks"] = counted(before, scenario.counters())
    result["embed_chunks"] = {"chunks": len(scenario.chunks), "request_s": seconds, "total_s": total}
    log(f"{name}: embedded {len(scenario.chunks)} chunks ({len(converted)} from the conversion) in {total:.2f} s")

    marks["warmup"] = time.monotonic()
    for index in range(args.warmup_queries):  # the reranker's first load is not part of the loop
        scenario.query(f"warm-up query {index}: {queries[index % len(queries)]}")
    marks["query_loop"] = time.monotonic()
    before = scenario.counters()
    loop = scenario.loop(queries, f"{name}: query")
    stage_swaps["query_loop"] = counted(before, scenario.counters())
    result["query_loop"] = [vars(row) for row in loop]
    result["status_capped"] = router.status()

    if args.concurrency > 1:
        marks["concurrent_loop"] = time.monotonic()
        c = result["concurrent_loop"] = scenario.concurrent(queries, args.concurrency)
        log(f"{name}: {c['queries']} queries from {c['concurrency']} threads in {c['wall_s']:.2f} s, "
            f"swaps {c['swaps']}")  # fmt: skip
    if swapped(stage_swaps["query_loop"]) and args.steady_queries:
        marks["steady_loop"] = time.monotonic()
        budget = sampler.total or 4 * int(result["status_capped"]["budget_bytes"])
        result["steady_budget_bytes"] = lift_cap(router, client, budget, seed)
        log(f"{name}: budget lifted to {result['steady_budget_bytes'] / 2**30:.1f} GiB for the steady state")
        steady = scenario.loop(queries[: args.steady_queries], f"{name}: steady query")
        result["steady_loop"] = [vars(row) for row in steady]
    marks["stop"] = time.monotonic()
    result["counters_end"] = scenario.counters()


# --- accuracy on the same weights, in this process ----------------------------------------------------------------


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties broken by order: the scores are floats)."""
    ranks = [np.argsort(np.argsort(x)).astype(np.float64) for x in (a, b)]
    return float(np.corrcoef(ranks[0], ranks[1])[0, 1])


def accuracy(
    model_dir: Path, settings: Settings, chunks: list[str], queries: list[str], pairs: int, batch: int = 16
) -> dict[str, Any]:
    """The profile's reranker and embedder precisions against bfloat16 on the same weights, engines called directly."""
    import torch
    from transformers import AutoTokenizer

    from triton_rag.core.batching import pad_rows
    from triton_rag.core.postprocess import matryoshka_normalize, row_cosine, yes_probability
    from triton_rag.core.text import (
        QWEN3_POOL_TOKEN,
        EmbedTokenization,
        RerankTokenization,
        format_embed_text,
        format_rerank_pair,
    )
    from triton_rag.engines.torch_encoder import TorchEncoder

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 151643
    yes_no = (tokenizer.convert_tokens_to_ids("no"), tokenizer.convert_tokens_to_ids("yes"))
    rng = random.Random(7)
    combos = [(q, c) for q in queries for c in chunks]
    chosen = rng.sample(combos, min(pairs, len(combos)))
    rerank_rows = RerankTokenization(tokenizer, 4096, "truncate").encode(
        [format_rerank_pair(q, c, settings.rerank.default_instruction) for q, c in chosen]
    )
    pool_id = tokenizer.convert_tokens_to_ids(QWEN3_POOL_TOKEN)
    embed_texts = chunks + [format_embed_text(q, QUERY_INSTRUCTION) for q in queries]
    embed_rows = EmbedTokenization(tokenizer, 4096, "truncate", pool_id).encode(embed_texts)

    def outputs(task: str, precision: str, rows: list[Any]) -> tuple[np.ndarray, str]:
        started = time.monotonic()
        engine = TorchEncoder(model_dir, task, yes_no_ids=yes_no if task == "rerank" else None,  # type: ignore[arg-type]
                              precision=precision, log=log, use_graphs=False)  # fmt: skip
        parts = [
            engine.forward(*pad_rows([r.ids for r in rows[i : i + batch]], pad)) for i in range(0, len(rows), batch)
        ]
        ran_as = engine.precision
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log(f"accuracy: {task} {precision} (ran as {ran_as}), {len(rows)} rows in {time.monotonic() - started:.1f} s")
        return np.concatenate(parts), ran_as

    result: dict[str, Any] = {}
    reference, reference_as = outputs("rerank", "bfloat16", rerank_rows)
    tested, tested_as = outputs("rerank", settings.rerank.precision, rerank_rows)
    scores = [yes_probability(x).reshape(-1) for x in (reference, tested)]
    result["rerank"] = {
        "requested": settings.rerank.precision,
        "ran_as": tested_as,
        "reference": reference_as,
        "pairs": len(chosen),
        "spearman": spearman(*scores),
        "max_abs_score_diff": float(np.max(np.abs(scores[0] - scores[1]))),
        "mean_abs_score_diff": float(np.mean(np.abs(scores[0] - scores[1]))),
    }
    dim = min(int(settings.embed.dim), int(json.loads((model_dir / "config.json").read_text())["hidden_size"]))
    reference, reference_as = outputs("embed", "bfloat16", embed_rows)
    tested, tested_as = outputs("embed", settings.embed.precision, embed_rows)
    cosine = row_cosine(*(matryoshka_normalize(x, dim).astype(np.float32) for x in (reference, tested)))
    result["embed"] = {
        "requested": settings.embed.precision,
        "ran_as": tested_as,
        "reference": reference_as,
        "rows": len(embed_rows),
        "dim": dim,
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
    }
    return result


# --- the report ---------------------------------------------------------------------------------------------------


def _p(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    """p50 / p99 of `values` as text, or "-"."""
    if not values:
        return "-"
    points = benchlib.percentiles(values)
    return " / ".join(f"{(points[k] or 0.0) * scale:.{digits}f}" for k in ("p50", "p99"))


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def _swaps(swaps: dict[str, int] | None) -> str:
    return "-" if not swaps else " / ".join(str(swaps[key]) for key in COUNTERS)


def steady_p50(config: dict[str, Any]) -> tuple[float | None, str]:
    """The configuration's steady-state query p50 and where it comes from: the loop with the cap lifted, else its own
    loops that did not swap."""
    rows = config.get("steady_loop") or []
    if rows and not any(swapped(r["swaps"]) for r in rows):
        return float(np.median([r["loop_s"] for r in rows])), "cap lifted"
    calm = [r["loop_s"] for r in config.get("query_loop", []) if not swapped(r["swaps"])]
    if calm:
        return float(np.median(calm)), f"{len(calm)} loops without a swap"
    return None, "none measured"


def markdown(report: dict[str, Any]) -> str:
    gpu = report["device"]
    lines = [
        f"### RAG seed scenario ({report['date']}, {gpu}, torch {report['torch']})",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Profile `{report['profile']}`, {report['shape']} shape (random weights), {report['pages']} pages of text, "
        f"{report['queries']} queries, top {report['top_k']} chunks reranked, {report['rows_per_request']} row(s) per "
        f"request. Device memory idle before the first server: {_gib(report['idle_device_bytes'])}; the largest "
        f"reading over the whole run: {_gib(report['peak_device_bytes'])} (NVML, every 50 ms). Wall time "
        f"{report.get('wall_s', 0.0):.0f} s.",
        "",
        "Per stage, p50 / p99 seconds (convert: per PDF; embed chunks: per request, all in flight; query embed, "
        "rerank: per query; query loop: per query, concurrency 1):",
        "",
        "| configuration | convert | pages/s | embed chunks (total s) | query embed | rerank | query loop "
        "| steady-state p50 | loop p50 / steady p50 | swaps in the loop (loads / evictions / sleeps / wakes) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for config in report["configurations"]:
        if "query_loop" not in config:
            lines.append(f"| {config['name']} | failed: {config.get('error', '?')} | | | | | | | | |")
            continue
        loop = config["query_loop"]
        steady, source = steady_p50(config)
        loop_p50 = float(np.median([r["loop_s"] for r in loop])) if loop else None
        ratio = f"{loop_p50 / steady:.2f}" if steady and loop_p50 else "-"
        lines.append(
            f"| {config['name']} | {_p(config['convert']['seconds'], digits=2)} | "
            f"{config['convert']['pages_per_s']:.2f} | {_p(config['embed_chunks']['request_s'])} "
            f"({config['embed_chunks']['total_s']:.2f}) | {_p([r['embed_s'] for r in loop])} | "
            f"{_p([r['rerank_s'] for r in loop])} | {_p([r['loop_s'] for r in loop])} | "
            f"{'-' if steady is None else f'{steady:.3f}'} ({source}) | {ratio} | "
            f"{_swaps(config['stage_swaps']['query_loop'])} |"
        )
    lines += [
        "",
        "Memory: the settings' cap and budget, the router's budget and measured bytes per model (STATUS, after the "
        "query loop), and the device's own peak reading (NVML used, all processes):",
        "",
        "| configuration | device_memory / budget / reserve (settings) | router budget | measured: embed / rerank / "
        "docling VLM | where each is after the loop: embed / rerank / docling VLM | peak device: convert / embed "
        "chunks / query loop / whole server | precision asked (ran as): embed / rerank |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes: set[str] = set()
    for config in report["configurations"]:
        if "status_capped" not in config:
            continue
        router = config["settings"]["router"]
        status = config["status_capped"]
        measured = [status["models"].get(m, {}).get("measured_bytes") for m in (*ENCODERS, contract.DOCLING_VLM)]
        tiers = [str(status["models"].get(m, {}).get("tier", "-")) for m in (*ENCODERS, contract.DOCLING_VLM)]
        peaks = config["peak_device_bytes"]
        ran = [
            f"{config['settings'][section].get('precision')} ({config['engines'].get(model, '?')})"
            for section, model in zip(("embed", "rerank"), ENCODERS, strict=True)
        ]
        notes.update(config["log_notes"])
        lines.append(
            f"| {config['name']} | {router['device_memory'] or '-'} / {router['budget']} / {router['reserve']} | "
            f"{_gib(status['budget_bytes'])} | {' / '.join(_gib(m) for m in measured)} | {' / '.join(tiers)} | "
            f"{' / '.join(_gib(peaks.get(k)) for k in ('convert', 'embed_chunks', 'query_loop', 'whole'))} | "
            f"{' / '.join(ran)} |"
        )
    per_process = [
        f"- {config['name']}: "
        + ", ".join(f"{label} {_gib(used)}" for label, used in sorted(config["process_peak_bytes"].items()))
        for config in report["configurations"]
        if config.get("process_peak_bytes")
    ]
    if per_process:
        lines += ["", "Each GPU process's largest reading (NVML, every 50 ms; a stub by its model):", "", *per_process]
    if notes:
        lines += ["", "From the server logs:", "", *(f"- `{note}`" for note in sorted(notes))]
    failures = [f"- {c['name']}: {c['error']}" for c in report["configurations"] if "error" in c]
    if failures:
        lines += ["", "Stopped by an error (the figures above are what was measured before it):", "", *failures]
    concurrent = [c for c in report["configurations"] if c.get("concurrent_loop")]
    if concurrent:
        lines += [
            "",
            "The query loop at concurrency 1 and from several client threads at once (same queries), per configuration "
            "(batching: the `[embed]` / `[rerank]` / `[docling]` preset in force):",
            "",
            "| configuration | batching | concurrency 1: query p50 / p99 s | concurrency N: query p50 / p99 s | "
            "queries/s | swaps (loads / evictions / sleeps / wakes) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for config in concurrent:
            c = config["concurrent_loop"]
            batching = " / ".join(
                str(config["settings"][s].get("batching", "-")) for s in ("embed", "rerank", "docling")
            )
            lines.append(
                f"| {config['name']} | {batching} | {_p([r['loop_s'] for r in config['query_loop']])} | "
                f"N={c['concurrency']}: {_p(c['loop_s'])} | {c['queries_per_s']:.2f} | {_swaps(c['swaps'])} |"
            )
    if report.get("accuracy"):
        rerank, embed = report["accuracy"]["rerank"], report["accuracy"]["embed"]
        lines += [
            "",
            "Accuracy on the same random weights, engines called directly (TorchEncoder, no server):",
            "",
            "| model | precision (ran as) | against | rows | result |",
            "| --- | --- | --- | --- | --- |",
            f"| reranker | {rerank['requested']} ({rerank['ran_as']}) | {rerank['reference']} | "
            f"{rerank['pairs']} pairs | Spearman {rerank['spearman']:.4f}; sigmoid(yes - no) differs by "
            f"{rerank['max_abs_score_diff']:.4f} at most, {rerank['mean_abs_score_diff']:.4f} on average |",
            f"| embedder | {embed['requested']} ({embed['ran_as']}) | {embed['reference']} | {embed['rows']} texts | "
            f"cosine per row (dim {embed['dim']}): mean {embed['cosine_mean']:.5f}, min {embed['cosine_min']:.5f} |",
        ]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> str:
    """seed.json and seed.md; returns the markdown."""
    (out / "seed.json").write_text(json.dumps(report, indent=2, default=str))
    table = markdown(report)
    (out / "seed.md").write_text(table)
    return table


# --- main -----------------------------------------------------------------------------------------------------------


def configurations(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, the overrides that make it) for each server run."""
    runs = [("profile", [])] if not args.batching else [
        (f"profile, batching {preset}", [f"{section}.batching={preset}" for section in ("embed", "rerank", "docling")])
        for preset in args.batching
    ]  # fmt: skip
    if args.device_tables:
        runs.append(("device tables", ["embed.embedding_table=device", "rerank.embedding_table=device"]))
    if args.fp8_run:
        runs.append(("rerank fp8", ["rerank.precision=fp8"]))
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", type=Path, default=DEFAULT_PROFILE, help="a settings file in rag.toml's format")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="overrides for every configuration, after the tool's own (repeatable)")  # fmt: skip
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--pages", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=256, help="docling.max_new_tokens: tokens a page")
    parser.add_argument("--converts", type=int, default=3, help="conversions of the PDF (the first loads the VLM)")
    parser.add_argument("--chunk-chars", type=int, default=1000)
    parser.add_argument("--min-chunks", type=int, default=48)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--warmup-queries", type=int, default=1, help="untimed queries before the loop")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--rows-per-request", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8, help="client threads of the concurrent loop (<2: none)")
    parser.add_argument("--steady-queries", type=int, default=16, help="queries with the cap lifted, where it swapped")
    parser.add_argument("--batching", nargs="*", default=[], help="run the profile once per preset (project, design)")
    parser.add_argument("--fp8-run", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the profile with rerank.precision=fp8")  # fmt: skip
    parser.add_argument("--device-tables", action="store_true",
                        help="also run the profile with both FP8 embedding tables on the device")  # fmt: skip
    parser.add_argument("--accuracy-pairs", type=int, default=256, help="0: no accuracy stage")
    parser.add_argument("--work", type=Path, default=Path("/tmp/triton-rag-bench"))
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    configure_logging()
    if args.converts < 1:
        parser.error("--converts must be at least 1")
    args.cache_dir, args.work, args.out = args.cache_dir.resolve(), args.work.resolve(), args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    import torch

    started = time.monotonic()
    sampler = benchlib.DeviceMemorySampler().start()
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "device": sampler.name or "cpu (no NVML)",
        "torch": torch.__version__,
        "command": "python tools/bench_seed.py " + " ".join(sys.argv[1:]),
        "profile": str(args.profile),
        "shape": args.shape,
        "pages": args.pages,
        "queries": args.queries,
        "top_k": args.top_k,
        "rows_per_request": args.rows_per_request,
        "idle_device_bytes": sampler.used(),
        "configurations": [],
    }
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        models = pool.submit(build_models, args.shape, args.work, args.cache_dir).result()
    report["models"] = models
    texts = page_texts(args.pages)
    pdf = make_pdf(texts)
    queries = make_queries(args.queries)
    base = [
        f"embed.model={models['qwen3']}",
        f"rerank.model={models['qwen3']}",
        f"docling.model={models['docling']}",
        f"docling.max_new_tokens={args.new_tokens}",
        "offline.fallback=false",
    ]
    failed = False
    first: Settings | None = None
    for name, overrides in configurations(args):
        settings = load_settings(args.profile, base + overrides + args.set)
        first = first or settings
        log(f"configuration {name!r}: {settings_summary(settings)}")
        config = run_configuration(name, settings, pdf, " ".join(texts), queries, args, sampler)
        failed = failed or "error" in config
        report["configurations"].append(config)
        report["peak_device_bytes"], report["wall_s"] = sampler.peak(), time.monotonic() - started
        write_report(report, args.out)  # after each configuration: a run cut short keeps what it measured
    if args.accuracy_pairs and first is not None:  # the PDF's own text as chunks: the same for every configuration
        chunks = chunk_text(" ".join(texts), args.chunk_chars)
        report["accuracy"] = accuracy(Path(models["qwen3"]), first, chunks, queries, args.accuracy_pairs)
    sampler.stop()
    report["peak_device_bytes"] = sampler.peak()
    report["wall_s"] = time.monotonic() - started
    print(write_report(report, args.out))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

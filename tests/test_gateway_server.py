"""The gateway (triton_rag.gateway) on the real tritonserver, through the real client libraries a RAG stack uses: the
`openai` SDK, langchain-openai, the `cohere` SDK, httpx for docling-serve's conversion; every error path; the
README's examples run as they are written; `triton-rag serve` starting and stopping it.

One tritonserver serves all-MiniLM-L6-v2 (a real embedder), the tiny random Qwen3 reranker and docling, whose page
model is a stand-in writing fixed DocTags (a title and a line of text; landscape pages fail on purpose), so that a
converted document has content and a failed page can be checked; `docling_document` is the real one around it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from docling_core.types.doc import DoclingDocument
from prometheus_client.metrics_core import Metric
from tritonclient.utils import InferenceServerException

from tests.harness import (
    CACHE_DIR,
    PROJECT_ROOT,
    RunningServer,
    landscape_failing_page_py,
    rerank,
    serve_command,
    start_server,
    strings,
    wait_until,
)
from tests.test_docling_parts import make_pdf, noise_page
from triton_rag import contract
from triton_rag.build.repository import prepare_repository
from triton_rag.build.settings import DoclingSettings, EmbedSettings, RerankSettings, Settings
from triton_rag.core.text import format_embed_text, format_rerank_pair, text_byte_limit

pytestmark = pytest.mark.server

KEY = "gateway-test-key"
JSON = {"Content-Type": "application/json"}
BODY_LIMIT = 4 * 2**20
#: The endpoints' max_length here (rag_server), and the bytes each of their text fields may have.
EMBED_MAX_LENGTH = 128
RERANK_MAX_LENGTH = 256
EMBED_BYTES = text_byte_limit(EMBED_MAX_LENGTH)
RERANK_BYTES = text_byte_limit(RERANK_MAX_LENGTH)
TEXTS = [
    "Paris is the capital of France.",
    "The mitochondria is the powerhouse of the cell.",
    "A cat sits on the mat.",
    "Rust guarantees memory safety without a garbage collector.",
]
STAND_IN_DOCTAGS = (
    "<doctag><section_header_level_1><loc_50><loc_25><loc_450><loc_50>Title</section_header_level_1>"
    "<text><loc_50><loc_60><loc_450><loc_80>Retrieval needs clean text.</text></doctag>"
)
#: The `docling` page model replaced by fixed DocTags (the document merge and the export are what is tested here;
#: tests/test_docling_server.py checks the real VLM against transformers).
STAND_IN_PAGE_PY = landscape_failing_page_py(STAND_IN_DOCTAGS)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Gateway:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log
        self.url = f"http://127.0.0.1:{port}"

    def http(self, key: str | None = KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_gateway(repository: Path, triton_url: str, log: Path, *overrides: str) -> Gateway:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "triton_rag.gateway",
        "--repository",
        str(repository),
        "--triton-url",
        triton_url,
        "--port",
        str(port),
    ]
    for item in overrides:
        command += ["--set", item]
    handle = open(log, "wb")
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
    gateway = Gateway(process, port, log)

    def listening() -> bool:
        try:
            return httpx.get(f"{gateway.url}/metrics", timeout=2).status_code == 200
        except httpx.HTTPError:
            return process.poll() is not None

    assert wait_until(listening, 60), log.read_text()
    assert process.poll() is None, log.read_text()
    return gateway


@pytest.fixture(scope="module")
def rag_server(
    tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path, tiny_rerank_dir: Path, tiny_docling_dir: Path
) -> Iterator[RunningServer]:
    repository = tmp_path_factory.mktemp("gateway_repository")
    settings = Settings(
        embed=EmbedSettings(model=str(minilm_dir), max_length=EMBED_MAX_LENGTH),
        rerank=RerankSettings(model=str(tiny_rerank_dir), max_length=RERANK_MAX_LENGTH),
        docling=DoclingSettings(model=str(tiny_docling_dir), max_new_tokens=8, max_pages=4),
        offline_fallback=False,
    )
    prepare_repository(settings, repository, CACHE_DIR)
    (repository / contract.DOCLING_ENDPOINT / "1" / "model.py").write_text(STAND_IN_PAGE_PY)
    yield from start_server(repository, tmp_path_factory.mktemp("logs") / "gateway_triton.log")


@pytest.fixture(scope="module")
def gateway(rag_server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    log = tmp_path_factory.mktemp("logs") / "gateway.log"
    running = start_gateway(
        rag_server.repository,
        rag_server.server.grpc_url,
        log,
        f"gateway.api_keys={KEY}",
        f"gateway.max_body_bytes={BODY_LIMIT}",
    )
    try:
        yield running
    finally:
        running.stop()
        text = log.read_text()
        assert "Traceback" not in text, text


def direct_embed(server: RunningServer, texts: list[str], instruction: str | None = None) -> np.ndarray:
    inputs = [strings("TEXT", texts)]
    if instruction:
        inputs.append(strings("INSTRUCTION", [instruction] * len(texts)))
    return server.client().infer(contract.EMBED_ENDPOINT, inputs).as_numpy("EMBEDDING").astype(np.float32)


def direct_rerank(server: RunningServer, query: str, documents: list[str]) -> np.ndarray:
    inputs = [strings("QUERY", [query] * len(documents)), strings("DOCUMENT", documents)]
    return server.client().infer(contract.RERANK_ENDPOINT, inputs).as_numpy("SCORE").reshape(-1)


def minilm_tokens(minilm_dir: Path, texts: list[str]) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    return sum(len(ids) for ids in tokenizer(texts)["input_ids"])


# --- OpenAI embeddings ---------------------------------------------------------------------------------------------


def test_openai_sdk_embeddings_equal_triton_with_dimensions_and_base64(
    gateway: Gateway, rag_server: RunningServer, minilm_dir: Path
) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY)
    direct = direct_embed(rag_server, TEXTS)
    answer = client.embeddings.create(model="qwen_embed", input=TEXTS, encoding_format="float")
    assert [d.index for d in answer.data] == [0, 1, 2, 3]
    np.testing.assert_array_equal(np.array([d.embedding for d in answer.data], dtype=np.float32), direct)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == minilm_tokens(minilm_dir, TEXTS)
    # the SDK's default wire form is base64 (little-endian float32), decoded by the SDK itself
    cut = client.embeddings.create(model="qwen_embed", input=TEXTS, dimensions=64)
    rows = np.array([d.embedding for d in cut.data], dtype=np.float32)
    head = direct[:, :64]
    np.testing.assert_allclose(rows, head / np.linalg.norm(head, axis=1, keepdims=True), atol=1e-6)
    raw = httpx.post(
        f"{gateway.url}/v1/embeddings",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "qwen_embed", "input": TEXTS[0], "encoding_format": "base64"},
    ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, direct_embed(rag_server, TEXTS[:1])[0])  # the same request alone
    assert raw["model"] == answer.model


def test_a_text_alone_equals_itself_in_a_large_list_split_across_triton_requests(
    gateway: Gateway, rag_server: RunningServer
) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY)
    texts = [f"{TEXTS[i % 4]} (copy {i})" for i in range(150)]  # qwen_embed takes 64 rows a request: 3 requests
    many = client.embeddings.create(model="qwen_embed", input=texts, encoding_format="float")
    rows = np.array([d.embedding for d in many.data], dtype=np.float32)
    alone = np.array(
        client.embeddings.create(model="qwen_embed", input=texts[97], encoding_format="float").data[0].embedding,
        dtype=np.float32,
    )
    np.testing.assert_allclose(rows[97], alone, atol=2e-3)  # FP16 rows; batch composition may round one unit apart
    direct = np.concatenate([direct_embed(rag_server, texts[i : i + 64]) for i in range(0, 150, 64)])
    np.testing.assert_allclose(rows, direct, atol=2e-3)
    assert [d.index for d in many.data] == list(range(150))


def test_queries_carry_an_instruction_documents_none(gateway: Gateway, rag_server: RunningServer) -> None:
    with gateway.http() as http:
        body = {"model": "qwen_embed", "input": TEXTS[:2], "input_type": "query", "instruction": "Find facts"}
        query = http.post("/v1/embeddings", json=body).json()
        rows = np.array([d["embedding"] for d in query["data"]], dtype=np.float32)
        np.testing.assert_array_equal(rows, direct_embed(rag_server, TEXTS[:2], "Find facts"))
        document = http.post("/v1/embeddings", json={"model": "qwen_embed", "input": TEXTS[:2]}).json()
        assert document["usage"]["prompt_tokens"] < query["usage"]["prompt_tokens"]
        refused = http.post("/v1/embeddings", json={"model": "qwen_embed", "input": "x", "instruction": "Find"})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "instruction"


def test_langchain_openai_embeddings(gateway: Gateway, rag_server: RunningServer) -> None:
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model="qwen_embed",
        base_url=f"{gateway.url}/v1",
        api_key=KEY,
        check_embedding_ctx_length=False,  # type: ignore[arg-type]
    )
    documents = embeddings.embed_documents(TEXTS)
    np.testing.assert_allclose(np.array(documents, dtype=np.float32), direct_embed(rag_server, TEXTS), atol=1e-6)
    assert len(embeddings.embed_query("what is the capital of France?")) == 384


# --- rerank ----------------------------------------------------------------------------------------------------------


def test_cohere_sdk_v2_rerank_sorted_with_top_n(gateway: Gateway, rag_server: RunningServer) -> None:
    import cohere

    client = cohere.ClientV2(api_key=KEY, base_url=gateway.url)
    answer = client.rerank(model="qwen_rerank", query="capital of France?", documents=TEXTS, top_n=3)
    direct = direct_rerank(rag_server, "capital of France?", TEXTS)
    expected = sorted(range(4), key=lambda i: -direct[i])[:3]
    assert [r.index for r in answer.results] == expected
    np.testing.assert_allclose([r.relevance_score for r in answer.results], direct[expected], atol=1e-5)
    assert answer.meta is not None and answer.meta.billed_units is not None
    assert answer.meta.billed_units.search_units == 1 and answer.meta.tokens.input_tokens > 0  # type: ignore[union-attr]


def test_v1_rerank_jina_and_cohere_shapes(gateway: Gateway, rag_server: RunningServer) -> None:
    documents = [TEXTS[0], {"text": TEXTS[1]}, TEXTS[2]]
    body = {"model": "qwen_rerank", "query": "biology", "documents": documents, "return_documents": True}
    with gateway.http() as http:
        answer = http.post("/v1/rerank", json=body).json()
    scores = [r["relevance_score"] for r in answer["results"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
    for result in answer["results"]:
        assert result["document"] == {"text": TEXTS[result["index"]]}
    assert answer["usage"]["total_tokens"] > 0 and answer["model"] == "tiny-qwen3-rerank"
    direct = direct_rerank(rag_server, "biology", TEXTS[:3])
    np.testing.assert_allclose([direct[r["index"]] for r in answer["results"]], scores, atol=1e-5)


# --- docling-serve conversion ----------------------------------------------------------------------------------------


def docling_document(server: RunningServer, pdf: bytes) -> tuple[DoclingDocument, dict[str, str]]:
    tensor = grpcclient.InferInput("DOCUMENT", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([pdf], dtype=np.object_))
    result = server.client().infer(contract.DOCLING_DOCUMENT_ENDPOINT, [tensor])
    document = DoclingDocument.model_validate_json(result.as_numpy("STRUCTURED_JSON")[0])
    return document, json.loads(result.as_numpy("PAGE_ERRORS")[0])


def test_convert_file_json_and_md_equal_the_docling_document_endpoint(
    gateway: Gateway, rag_server: RunningServer
) -> None:
    pdf = make_pdf((612, 792), (500, 700))
    with gateway.http() as http:
        answer = http.post(
            "/v1/convert/file",
            files={"files": ("report.pdf", pdf, "application/pdf")},
            data={"to_formats": ["md", "json"]},
        ).json()
    assert answer["status"] == "success" and answer["errors"] == []
    document = answer["document"]
    assert document["filename"] == "report.pdf" and document["text_content"] is None
    expected, errors = docling_document(rag_server, pdf)
    assert errors == {}
    expected.name = "report"
    assert DoclingDocument.model_validate(document["json_content"]) == expected
    assert document["md_content"] == expected.export_to_markdown() and "Title" in document["md_content"]
    assert answer["processing_time"] > 0 and answer["timings"] == {}


def test_convert_source_every_format_and_a_page_image(gateway: Gateway) -> None:
    pdf = make_pdf((612, 792), (842, 595))  # the stand-in fails landscape pages
    source = {"kind": "file", "base64_string": base64.b64encode(pdf).decode(), "filename": "two.pdf"}
    options = {"to_formats": ["md", "json", "text", "doctags", "html"], "do_ocr": True, "pipeline": "vlm"}
    with gateway.http() as http:
        answer = http.post("/v1/convert/source", json={"sources": [source], "options": options}).json()
        assert answer["status"] == "partial_success"
        assert answer["errors"] == [
            {
                "component_type": "model",
                "module_name": "docling_document",
                "error_message": "page 2: injected failure for a landscape page",
            }
        ]
        document = answer["document"]
        assert "Retrieval needs clean text." in document["text_content"]
        assert "<doctag>" in document["doctags_content"] and "<html" in document["html_content"]
        aborted = {"sources": [source], "options": {"abort_on_error": True}}
        assert http.post("/v1/convert/source", json=aborted).json()["status"] == "failure"
        image = noise_page(5, 400, 500)
        from io import BytesIO

        png = BytesIO()
        image.save(png, "PNG")
        page = http.post(
            "/v1/convert/file",
            files={"files": ("page.png", png.getvalue(), "image/png")},
            data={"to_formats": "md,doctags"},
        ).json()
        assert page["status"] == "success" and "Title" in page["document"]["md_content"]
        not_a_document = {"kind": "file", "base64_string": base64.b64encode(b"plain text").decode(), "filename": "a"}
        failed = http.post("/v1/convert/source", json={"sources": [not_a_document]}).json()
        assert (
            failed["status"] == "failure" and "neither a PDF nor a page image" in failed["errors"][0]["error_message"]
        )
        broken = {"kind": "file", "base64_string": base64.b64encode(b"%PDF-1.4 broken").decode(), "filename": "b.pdf"}
        failed = http.post("/v1/convert/source", json={"sources": [broken]}).json()
        assert failed["status"] == "failure" and failed["errors"][0]["component_type"] == "user_input"


def test_unsupported_convert_options_and_http_sources_are_refused(gateway: Gateway) -> None:
    pdf = make_pdf((612, 792))
    with gateway.http() as http:
        refused = http.post(
            "/v1/convert/file",
            files={"files": ("a.pdf", pdf)},
            data={"do_ocr": "false", "table_mode": "fast", "page_range": ["2", "3"]},
        )
        assert refused.status_code == 422
        detail = refused.json()["detail"]
        assert "do_ocr=false" in detail and "page_range" in detail and "table_mode" not in detail
        unknown = http.post(
            "/v1/convert/source",
            json={
                "sources": [{"kind": "file", "base64_string": base64.b64encode(pdf).decode(), "filename": "a.pdf"}],
                "options": {"to_formats": ["yaml"], "ocr_magic": 1},
            },
        )
        assert unknown.status_code == 422 and "ocr_magic" in unknown.json()["detail"]
        assert "to_formats=yaml" in unknown.json()["detail"]
        web = http.post("/v1/convert/source", json={"sources": [{"kind": "http", "url": "http://example.com/a.pdf"}]})
        assert web.status_code == 403 and "allow_http_sources" in web.json()["detail"]


# --- models, health, metrics, errors ---------------------------------------------------------------------------------


def test_models_health_and_metrics(gateway: Gateway) -> None:
    with gateway.http() as http:
        models = http.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["model", "tiny-qwen3-rerank", "tiny-granite-docling"]
        assert http.get("/health").json() == {"status": "ok"}
        metrics = httpx.get(f"{gateway.url}/metrics").text  # no key needed
    assert re.search(r'rag_gateway_requests_total\{route="/v1/embeddings",status="200"\} [1-9]', metrics)
    assert 'rag_gateway_request_seconds_bucket{le="0.005",route="/v1/embeddings"}' in metrics
    assert re.search(r'rag_gateway_errors_total\{route="/v1/convert/file",status="422"\}', metrics)


@pytest.mark.parametrize(
    ("path", "body", "status", "expected"),
    [
        ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"}, 404, ("model", "model_not_found")),
        ("/v1/embeddings", {"model": "qwen_embed", "input": "x", "dimensions": 385}, 400, ("dimensions", None)),
        ("/v1/embeddings", {"model": "qwen_embed", "input": [101, 2023]}, 400, ("input", "unsupported_input")),
        ("/v1/embeddings", {"model": "qwen_embed", "input": [[101, 2023]]}, 400, ("input", "unsupported_input")),
        ("/v1/embeddings", {"model": "qwen_embed", "input": ["a"] * 2049}, 400, ("input", "too_many_inputs")),
        ("/v1/embeddings", {"model": "qwen_embed", "input": ["a", " "]}, 400, ("input", "empty_input")),
        ("/v1/embeddings", {"model": "qwen_embed", "input": ["a", "word " * 200]}, 400, ("input", "input_too_long")),
        ("/v1/embeddings", {"model": "qwen_embed", "input": "x", "user_id": 1}, 400, ("user_id", "invalid_request")),
        ("/v2/rerank", {"model": "qwen_rerank", "query": "q", "documents": ["a"] * 2049}, 400, None),
        ("/v2/rerank", {"model": "nope", "query": "q", "documents": ["a"]}, 404, None),
        ("/v2/rerank", {"model": "qwen_rerank", "query": "q", "documents": ["a", "word " * 300]}, 400, None),
    ],
)
def test_errors_in_each_apis_shape(
    gateway: Gateway, path: str, body: dict, status: int, expected: tuple[str, str | None] | None
) -> None:
    with gateway.http() as http:
        answer = http.post(path, json=body)
    assert answer.status_code == status, answer.text
    if expected is None:  # Cohere's shape
        assert set(answer.json()) == {"message"}
        return
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == expected[0]
    if expected[1]:
        assert error["code"] == expected[1]
    if error["code"] in ("input_too_long", "empty_input"):
        assert error["message"].startswith("input 1")  # the offending index


def test_over_long_rerank_document_names_its_index(gateway: Gateway) -> None:
    with gateway.http() as http:
        answer = http.post("/v1/rerank", json={"query": "q", "documents": ["a", "b", "word " * 300]})
    assert answer.status_code == 400 and answer.json()["message"].startswith("documents 2")


def triton_refuses(server: RunningServer, model: str, inputs: list[grpcclient.InferInput]) -> str:
    """Triton's own INVALID_ARGUMENT message for a request the endpoint refuses."""
    with pytest.raises(InferenceServerException) as caught:
        server.client().infer(model, inputs)
    assert "INVALID_ARGUMENT" in str(caught.value.status()), caught.value
    return str(caught.value.message())


def test_embed_texts_are_held_to_the_endpoints_byte_limit_each_on_its_own(
    gateway: Gateway, rag_server: RunningServer
) -> None:
    """The gateway applies the endpoint's byte rule as the endpoint does: to TEXT and INSTRUCTION each, not to the
    prompt they are formatted into. A text of exactly the limit (in bytes: "é" is two) with an instruction is
    answered as Triton answers it; one byte more is refused by both, naming the input, its size and the limit."""
    at_limit = "é" * (EMBED_BYTES // 2)
    assert len(at_limit.encode()) == EMBED_BYTES < len(format_embed_text(at_limit, "Find facts").encode())
    instruction = "i" * EMBED_BYTES  # an instruction at the limit too
    with gateway.http() as http:
        for text, task in ((at_limit, "Find facts"), ("capital of France", instruction)):
            body = {"model": "qwen_embed", "input": [TEXTS[0], text], "input_type": "query", "instruction": task}
            answer = http.post("/v1/embeddings", json=body)
            assert answer.status_code == 200, answer.text
            rows = np.array([d["embedding"] for d in answer.json()["data"]], dtype=np.float32)
            np.testing.assert_array_equal(rows, direct_embed(rag_server, [TEXTS[0], text], task))
        over = at_limit + "a"
        body = {"model": "qwen_embed", "input": [TEXTS[0], over], "input_type": "query", "instruction": "Find facts"}
        refused = http.post("/v1/embeddings", json=body)
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert (error["param"], error["code"], error["type"]) == ("input", "input_too_long", "invalid_request_error")
        assert error["message"].startswith(f"input 1 is {EMBED_BYTES + 1} bytes, more than the {EMBED_BYTES} bytes")
        assert f"max_length {EMBED_MAX_LENGTH} tokens" in error["message"]
        message = triton_refuses(rag_server, contract.EMBED_ENDPOINT, [strings("TEXT", [over])])
        assert message.startswith(f"TEXT row 0 is {EMBED_BYTES + 1:,} bytes")
        body = {"model": "qwen_embed", "input": "x", "input_type": "query", "instruction": instruction + "i"}
        refused = http.post("/v1/embeddings", json=body)
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert (error["param"], error["code"]) == ("instruction", "input_too_long")
        assert error["message"].startswith(f"instruction is {EMBED_BYTES + 1} bytes, more than the {EMBED_BYTES}")
        inputs = [strings("TEXT", ["x"]), strings("INSTRUCTION", [instruction + "i"])]
        assert triton_refuses(rag_server, contract.EMBED_ENDPOINT, inputs).startswith("INSTRUCTION row 0 is")


def test_rerank_query_documents_and_instruction_are_held_to_the_byte_limit_each_on_its_own(
    gateway: Gateway, rag_server: RunningServer
) -> None:
    """QUERY, DOCUMENT and INSTRUCTION are checked apart (the endpoint's rule): a query and a document of exactly the
    limit, whose pair is twice over it, are scored as Triton scores them, with an instruction and with the
    endpoint's default one (which is not the client's to count); one byte more is refused by both."""
    query = "q" + " " * (RERANK_BYTES - 1)  # long runs of spaces are few tokens: the pair fits max_length
    document = "d" + " " * (RERANK_BYTES - 1)
    assert len(format_rerank_pair(query, document, "").encode()) > 2 * RERANK_BYTES
    with gateway.http() as http:
        for instruction in ("Find facts", None):
            body = {"model": "qwen_rerank", "query": query, "documents": [TEXTS[0], document]}
            if instruction:
                body["instruction"] = instruction
            answer = http.post("/v2/rerank", json=body)
            assert answer.status_code == 200, answer.text
            scores = {r["index"]: r["relevance_score"] for r in answer.json()["results"]}
            direct = rerank(rag_server, [(query, TEXTS[0]), (query, document)], instruction)
            np.testing.assert_allclose([scores[0], scores[1]], direct, atol=1e-5)
        overs = [
            ({"query": query + " ", "documents": ["a"]}, "query is"),
            ({"query": "q", "documents": ["a", document + " "]}, "documents 1 is"),
            ({"query": "q", "documents": ["a"], "instruction": "i" * (RERANK_BYTES + 1)}, "instruction is"),
        ]
        for body, name in overs:
            refused = http.post("/v1/rerank", json=body)
            assert refused.status_code == 400 and set(refused.json()) == {"message"}  # Cohere's shape
            message = refused.json()["message"]
            assert message.startswith(f"{name} {RERANK_BYTES + 1} bytes, more than the {RERANK_BYTES} bytes")
            assert f"max_length {RERANK_MAX_LENGTH} tokens" in message
    inputs = [strings("QUERY", [query + " "]), strings("DOCUMENT", ["a"])]
    assert triton_refuses(rag_server, contract.RERANK_ENDPOINT, inputs).startswith("QUERY row 0 is")
    inputs = [strings("QUERY", ["q"]), strings("DOCUMENT", [document + " "])]
    assert triton_refuses(rag_server, contract.RERANK_ENDPOINT, inputs).startswith("DOCUMENT row 0 is")
    inputs = [strings("QUERY", ["q"]), strings("DOCUMENT", ["a"]), strings("INSTRUCTION", ["i" * (RERANK_BYTES + 1)])]
    assert triton_refuses(rag_server, contract.RERANK_ENDPOINT, inputs).startswith("INSTRUCTION row 0 is")


def test_text_with_no_utf8_form_is_a_400(gateway: Gateway) -> None:
    """JSON's \\ud800 escape decodes to a lone surrogate, which has no UTF-8 bytes to send to Triton."""
    headers = {"Content-Type": "application/json"}
    with gateway.http() as http:
        body = b'{"model": "qwen_embed", "input": ["a", "b\\ud800c"]}'
        refused = http.post("/v1/embeddings", content=body, headers=headers)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert (error["param"], error["code"]) == ("input", "invalid_text")
        assert error["message"].startswith("input 1 is not valid Unicode text")
        body = b'{"query": "q", "documents": ["a\\udfffb"], "max_tokens_per_doc": 4}'
        refused = http.post("/v2/rerank", content=body, headers=headers)
        assert refused.status_code == 400 and refused.json()["message"].startswith("documents 0 is not valid")


def test_json_routes_refuse_other_methods_and_bodies_that_are_not_json(gateway: Gateway) -> None:
    with gateway.http() as http:
        wrong_method = http.get("/v1/embeddings")
        assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
        assert wrong_method.json()["error"]["code"] == "method_not_allowed"
        broken = http.post("/v1/embeddings", content=b'{"model": "qwen_embed", "input": ', headers=JSON)
        assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_request"
        assert broken.json()["error"]["message"].startswith("the body is not valid JSON")
        form_type = {"Content-Type": "application/x-www-form-urlencoded"}
        form = http.post("/v2/rerank", content=b"query=q", headers=form_type)
        assert form.status_code == 400 and "Content-Type: application/json" in form.json()["message"]
        untyped = http.post("/v1/embeddings", content=b'{"model": "qwen_embed", "input": "x"}')
        assert untyped.status_code == 200  # no Content-Type: read as JSON, as FastAPI reads it


def test_api_keys_and_the_body_limit(gateway: Gateway) -> None:
    body = {"model": "qwen_embed", "input": "x"}
    with gateway.http(key=None) as http:
        missing = http.post("/v1/embeddings", json=body)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        assert http.post("/v2/rerank", json={"query": "q", "documents": ["a"]}).json() == {
            "message": "the API key is missing: send it as 'Authorization: Bearer <key>'"
        }
        assert http.get("/health").status_code == 200  # open: a probe needs no key
    with gateway.http(key="wrong") as http:
        assert http.post("/v1/embeddings", json=body).status_code == 401
        assert http.get("/v1/models").status_code == 401
    with gateway.http() as http:
        big = http.post("/v1/embeddings", json={"model": "qwen_embed", "input": ["x" * 1000] * (BODY_LIMIT // 900)})
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        # chunked (no Content-Length): refused as the bytes arrive, in each API's shape
        part = b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.pdf"\r\n\r\n%PDF-'
        chunked = http.post(
            "/v1/convert/file",
            content=iter([part] + [b"-" * 2**20] * 6),
            headers={"Content-Type": "multipart/form-data; boundary=x"},
        )
        assert chunked.status_code == 413 and "max_body_bytes" in chunked.json()["detail"]
        text = iter([b'{"model": "qwen_embed", "input": "'] + [b"y" * 2**20] * 6 + [b'"}'])
        chunked = http.post("/v1/embeddings", content=text, headers={"Content-Type": "application/json"})
        assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"


def test_many_concurrent_clients_get_their_own_answers(gateway: Gateway, rag_server: RunningServer) -> None:
    direct = direct_embed(rag_server, TEXTS)

    def one(i: int) -> np.ndarray:
        with gateway.http() as http:
            data = http.post("/v1/embeddings", json={"model": "qwen_embed", "input": TEXTS[i % 4]}).json()["data"]
        return np.array(data[0]["embedding"], dtype=np.float32)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(48)))
    for i, row in enumerate(answers):
        np.testing.assert_allclose(row, direct[i % 4], atol=2e-3)


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command's name (state, parent, ...), or None once it is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pids: Iterable[int]) -> list[int]:
    """Those of `pids` still running (a zombie has ended)."""
    return [pid for pid in pids if (stat := _stat(pid)) is not None and stat[0] != "Z"]


def processes_below(pid: int) -> dict[int, str]:
    """The live processes under `pid` (children, theirs, ...) and their command lines."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None and stat[0] != "Z":
            parents[int(entry.name)] = int(stat[1])
    below: set[int] = set()
    while more := {child for child, parent in parents.items() if parent in below | {pid}} - below:
        below |= more
    commands = {}
    for child in below:
        try:
            commands[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return commands


def requests_served(families: Iterable[Metric]) -> float:
    """rag_gateway_requests_total of /v1/embeddings answered with 200."""
    wanted = {"route": "/v1/embeddings", "status": "200"}
    return sum(
        sample.value
        for family in families
        for sample in family.samples
        if sample.name == "rag_gateway_requests_total" and sample.labels == wanted
    )


def test_several_workers_answer_count_every_request_in_one_metrics_and_stop_with_the_gateway(
    rag_server: RunningServer, tmp_path: Path
) -> None:
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.parser import text_string_to_metric_families

    log = tmp_path / "gateway.log"
    gateway = start_gateway(rag_server.repository, rag_server.server.grpc_url, log, "gateway.workers=2")
    try:
        below = processes_below(gateway.process.pid)
        workers = [pid for pid, command in below.items() if "spawn_main" in command]
        assert len(workers) == 2, below
        state = Path(
            dict(
                line.split("=", 1)
                for line in (Path("/proc") / str(workers[0]) / "environ").read_text().split("\0")
                if "=" in line
            )["TRITON_RAG_GATEWAY_STATE"]
        )
        assert state.is_dir() and oct(state.stat().st_mode & 0o777) == "0o700"
        direct = direct_embed(rag_server, TEXTS)

        def one(i: int) -> np.ndarray:  # a connection each: the workers take turns at accepting them
            answer = httpx.post(f"{gateway.url}/v1/embeddings", json={"model": "qwen_embed", "input": TEXTS[i % 4]})
            assert answer.status_code == 200, answer.text
            return np.array(answer.json()["data"][0]["embedding"], dtype=np.float32)

        sent = 48
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(one, range(sent)))
        for i, row in enumerate(answers):
            np.testing.assert_allclose(row, direct[i % 4], atol=2e-3)
        per_worker = {
            int(path.stem.rsplit("_", 1)[1]): requests_served(MultiProcessCollector.merge([str(path)]))
            for path in (state / "metrics").glob("counter_*.db")
        }
        assert sum(per_worker.values()) == sent and sum(1 for n in per_worker.values() if n) == 2, per_worker
        assert set(per_worker) <= set(workers)
        metrics = httpx.get(f"{gateway.url}/metrics").text  # whichever worker answers: every worker's counts
        assert requests_served(text_string_to_metric_families(metrics)) == sent
    finally:
        gateway.stop()
    assert gateway.process.returncode == 0 and not alive(workers)  # the parent waited for its workers
    # and multiprocessing's resource tracker ends once the parent's end of its pipe is closed
    assert wait_until(lambda: not alive(below), 5), {pid: below[pid] for pid in alive(below)}
    assert not state.exists()
    assert "Traceback" not in log.read_text()


def test_a_worker_count_that_is_not_a_number_is_refused(rag_server: RunningServer) -> None:
    command = [sys.executable, "-m", "triton_rag.gateway", "--repository", str(rag_server.repository)]
    result = subprocess.run(command + ["--set", "gateway.workers=many"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and 'workers must be "auto" or a number of at least 1' in result.stderr


def test_triton_down_is_503_with_retry_after(rag_server: RunningServer, tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    gateway = start_gateway(rag_server.repository, dead, tmp_path / "gateway.log", "gateway.retry_after_seconds=7")
    try:
        with gateway.http(key=None) as http:
            health = http.get("/health")
            assert health.status_code == 503 and health.headers["retry-after"] == "7"
            answer = http.post("/v1/embeddings", json={"model": "qwen_embed", "input": "x"})
            assert answer.status_code == 503 and answer.headers["retry-after"] == "7"
            assert (
                answer.json()["error"]["type"] == "server_error" and "retry later" in answer.json()["error"]["message"]
            )
            rerank = http.post("/v2/rerank", json={"query": "q", "documents": ["a"]})
            assert rerank.status_code == 503 and "message" in rerank.json()
    finally:
        gateway.stop()
    assert "Traceback" not in (tmp_path / "gateway.log").read_text()


def forward(port: int, target: str) -> socket.socket:
    """Open `port` from now on, each connection piped to `target` ("host:port"): Triton coming up there."""
    host, target_port = target.rsplit(":", 1)
    listener = socket.create_server(("127.0.0.1", port))

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def accept() -> None:
        with contextlib.suppress(OSError):  # the listener closed
            while True:
                client, _ = listener.accept()
                upstream = socket.create_connection((host, int(target_port)))
                threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
                threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener


def test_the_gateway_reaches_triton_within_a_second_or_two_of_it_coming_up(
    rag_server: RunningServer, tmp_path: Path
) -> None:
    """gRPC's own reconnection backoff grows to minutes while Triton cannot be reached (serve starts the gateway
    before Triton is ready), and a request meanwhile is a 503: the gateway caps it at a second."""
    port = free_port()
    gateway = start_gateway(rag_server.repository, f"127.0.0.1:{port}", tmp_path / "gateway.log", "gateway.workers=1")
    listener = None
    try:
        down_until = time.monotonic() + 10  # gRPC's default backoff would be at 6.5 s between attempts by now
        while time.monotonic() < down_until:
            assert httpx.get(f"{gateway.url}/health", timeout=5).status_code == 503
            time.sleep(0.5)
        listener = forward(port, rag_server.server.grpc_url)
        reachable = time.monotonic()
        assert wait_until(lambda: httpx.get(f"{gateway.url}/health", timeout=5).status_code == 200, 10, 0.05)
        assert time.monotonic() - reachable < 2.5
    finally:
        gateway.stop()
        if listener is not None:
            listener.close()


def test_a_public_gateway_without_keys_refuses_to_start(rag_server: RunningServer) -> None:
    command = [
        sys.executable,
        "-m",
        "triton_rag.gateway",
        "--repository",
        str(rag_server.repository),
        "--host",
        "0.0.0.0",
        "--port",
        str(free_port()),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=60, env={**os.environ, "TRITON_RAG_API_KEYS": ""}
    )
    assert result.returncode == 2 and "allow_insecure_public" in result.stderr


# --- README examples -----------------------------------------------------------------------------------------------


def readme_examples() -> dict[str, str]:
    """The code blocks of README's "Use it from your RAG stack", by language and order (python-1, bash-1, ...)."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme.split("## Use it from your RAG stack", 1)[1].split("\n## ", 1)[0]
    blocks: dict[str, str] = {}
    for language, code in re.findall(r"```(python|bash)\n(.*?)```", section, flags=re.S):
        blocks[f"{language}-{sum(k.startswith(language) for k in blocks) + 1}"] = code
    return blocks


def test_the_readme_examples_run_against_the_gateway(gateway: Gateway, tmp_path: Path) -> None:
    blocks = readme_examples()
    assert {"python-1", "python-2", "python-3", "bash-1"} <= set(blocks), sorted(blocks)
    environment = {**os.environ, "TRITON_RAG_API_KEY": KEY}
    for name, code in blocks.items():
        code = code.replace("http://localhost:8080", gateway.url)
        if name.startswith("python"):
            command = [sys.executable, "-c", code]
        else:
            command = ["bash", "-eu", "-c", code]  # README's `| head` may close curl's pipe early
        (tmp_path / "report.pdf").write_bytes(make_pdf((612, 792)))
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=environment)
        assert result.returncode == 0, f"{name}:\n{code}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        assert "Traceback" not in result.stderr and '"error"' not in result.stdout, result.stdout
        if name.startswith("bash"):
            for expected in ('"embedding"', '"relevance_score"', '"md_content"'):
                assert expected in result.stdout, result.stdout


# --- triton-rag serve starts and stops it ------------------------------------------------------------------------


def test_serve_starts_the_gateway_and_stops_it_with_tritonserver(rag_server: RunningServer, tmp_path: Path) -> None:
    from triton_rag.server import free_ports

    ports, gateway_port = free_ports(), free_port()
    log = open(tmp_path / "serve.log", "wb")
    options = ("--gateway-port", str(gateway_port), "--set", "gateway.workers=2")
    process = subprocess.Popen(
        serve_command(rag_server.repository, ports, *options), cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{gateway_port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200 or process.poll() is not None
        except httpx.HTTPError:
            return False

    try:
        assert wait_until(healthy, 300), (tmp_path / "serve.log").read_text()
        assert process.poll() is None, (tmp_path / "serve.log").read_text()

        def embed() -> httpx.Response:
            return httpx.post(f"{url}/v1/embeddings", json={"model": "qwen_embed", "input": "hello"}, timeout=60)

        # a worker whose channel tried Triton before it listened answers 503 until it tries again (within a second)
        assert wait_until(lambda: embed().status_code == 200, 10)
        assert len(embed().json()["data"][0]["embedding"]) == 384
        below = processes_below(process.pid)  # tritonserver and its stubs, the gateway and its 2 workers
        assert sum("spawn_main" in command for command in below.values()) == 2, below
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert not alive(below), {pid: below[pid] for pid in alive(below)}
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=2)
        text = (tmp_path / "serve.log").read_text()
        assert "starting the gateway" in text and "listening on" in text and "Traceback" not in text
    finally:
        if process.poll() is None:
            process.kill()
        log.close()

"""The gateway's pure parts, without a server: request decisions (inputs, dimensions, the Matryoshka cut, wire
encodings, rerank order and top_n, convert options), error shapes and mappings, settings and exposure, and the token
counts against transformers' tokenizers on the same files."""

from __future__ import annotations

import base64
import itertools
import time
from pathlib import Path
from typing import Literal

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from triton_rag.build import repository
from triton_rag.build.settings import GatewaySettings, SettingsError, load_settings
from triton_rag.core.errors import TooLarge
from triton_rag.core.text import (
    QWEN3_POOL_TOKEN,
    EmbedTokenization,
    RerankTokenization,
    decode_utf8,
    format_embed_text,
    format_rerank_pair,
    text_byte_limit,
)
from triton_rag.gateway import catalog, convert, embeddings, rerank
from triton_rag.gateway.__main__ import api_keys, exposure_problem, is_loopback
from triton_rag.gateway.errors import BadRequest, Internal, NotFound, Unavailable, Unprocessable, error_body, style_of
from triton_rag.gateway.tokens import EmbedCounter, FastTokenizer, RerankCounter
from triton_rag.gateway.triton import chunks, map_error


@given(st.integers(0, 5000), st.integers(0, 100))
def test_chunks_cover_every_row_once_in_order(rows: int, max_batch: int) -> None:
    parts = chunks(rows, max_batch)
    assert [i for part in parts for i in part] == list(range(rows))
    assert all(len(part) <= max(1, max_batch) for part in parts)


@given(st.lists(st.floats(0, 1, width=32), min_size=1, max_size=60), st.none() | st.integers(1, 80))
def test_ranking_is_by_score_ties_in_document_order(scores: list[float], top_n: int | None) -> None:
    order = rerank.ranking(np.array(scores, dtype=np.float32), top_n)
    full = rerank.ranking(np.array(scores, dtype=np.float32), None)
    assert sorted(full) == list(range(len(scores)))
    assert all((scores[a], -a) >= (scores[b], -b) for a, b in zip(full, full[1:], strict=False))
    assert order == full[: top_n or len(scores)]


@given(st.integers(32, 96), st.integers(0, 2**31 - 1))
def test_matryoshka_cut_is_a_normalised_prefix(dimensions: int, seed: int) -> None:
    rows = np.random.default_rng(seed).normal(size=(3, 96)).astype(np.float32)
    served = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    cut = embeddings.shape_vectors(served.astype(np.float16), dimensions)
    assert cut.dtype == np.float32 and cut.shape == (3, dimensions)
    # a cut is normalised again in float32; the full width is the served FP16 numbers, unit length up to FP16's
    # rounding (hypothesis found 3.9e-5 at 96 of 96)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-5 if dimensions < 96 else 1e-3)
    expected = rows[:, :dimensions] / np.linalg.norm(rows[:, :dimensions], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, atol=2e-3)
    same = embeddings.shape_vectors(served.astype(np.float16), 96)
    np.testing.assert_array_equal(same, served.astype(np.float16).astype(np.float32))  # no cut: the served numbers


def test_base64_is_little_endian_float32() -> None:
    row = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    encoded = embeddings.encode_row(row, "base64")
    assert isinstance(encoded, str)
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(encoded), dtype="<f4"), row)
    assert orjson.loads(orjson.dumps(embeddings.encode_row(row, "float"), option=orjson.OPT_SERIALIZE_NUMPY)) == [
        0.5,
        -1.25,
        3.0,
    ]


def test_text_inputs_and_dimensions() -> None:
    assert embeddings.text_inputs("a", 4) == ["a"]
    for bad, code in (
        ([1, 2], "unsupported_input"),
        ([[1, 2]], "unsupported_input"),
        (["a"] * 5, "too_many_inputs"),
        (["a", " \n"], "empty_input"),
        ([], None),
    ):
        with pytest.raises(BadRequest) as caught:
            embeddings.text_inputs(bad, 4)
        assert caught.value.param == "input" and (code is None or caught.value.code == code)
    assert "input 1 is empty" in str(pytest.raises(BadRequest, embeddings.text_inputs, ["a", ""], 4).value)
    assert embeddings.check_dimensions(None, 384) == 384 and embeddings.check_dimensions(64, 384) == 64
    for bad in (385, 8):
        with pytest.raises(BadRequest):
            embeddings.check_dimensions(bad, 384)


def test_rerank_documents_and_refused_fields() -> None:
    request = rerank.RerankRequest(
        query="q", documents=["a", {"text": "b"}], rank_fields=["title"], relevant_spans={"mode": "enabled"}
    )
    assert rerank.refused_fields(request) == ["rank_fields", "relevant_spans"]
    assert rerank.document_texts(request.documents, 4) == ["a", "b"]
    with pytest.raises(BadRequest, match="document 1 is empty"):
        rerank.document_texts(["a", ""], 4)
    body = rerank.response_body("v2", [1, 0], np.array([0.2, 0.9]), ["a", "b"], False, "m", 10)
    assert [r["index"] for r in body["results"]] == [1, 0] and "usage" not in body
    assert body["meta"]["billed_units"] == {"search_units": 1} and body["meta"]["tokens"]["input_tokens"] == 10
    body = rerank.response_body("v1", [1], np.array([0.2, 0.9]), ["a", "b"], True, "m", 10)
    assert body["results"] == [{"index": 1, "relevance_score": pytest.approx(0.9), "document": {"text": "b"}}]
    assert body["usage"] == {"prompt_tokens": 10, "total_tokens": 10} and body["model"] == "m"


def test_convert_options_honoured_defaults_accepted_the_rest_refused() -> None:
    assert convert.convert_options({}) == convert.ConvertOptions()
    defaults = {
        "do_ocr": True,
        "table_mode": "fast",
        "pipeline": "standard",
        "page_range": [1, 2**63 - 1],
        "images_scale": 2,
        "ocr_lang": None,
        "to_formats": ["json", "md", "json"],
    }
    assert convert.convert_options(defaults).to_formats == ("json", "md")
    with pytest.raises(Unprocessable) as caught:
        convert.convert_options(
            {
                "do_ocr": False,
                "page_range": [2, 3],
                "image_export_mode": "referenced",
                "to_formats": ["md", "vtt"],
                "frobnicate": 1,
            }
        )
    message = str(caught.value)
    for part in ("do_ocr=false", "page_range=[2, 3]", "image_export_mode=referenced", "to_formats=vtt", "frobnicate"):
        assert part in message
    form = convert.form_options(
        [
            ("files", "x"),
            ("to_formats", "md,json"),
            ("to_formats", "text"),
            ("do_ocr", "true"),
            ("document_timeout", "30"),
            ("page_range", "1"),
        ]
    )
    assert form == {"to_formats": ["md", "json", "text"], "do_ocr": True, "document_timeout": 30.0, "page_range": [1]}
    options = convert.convert_options({"document_timeout": 30.0, "abort_on_error": True, "from_formats": ["pdf"]})
    assert (options.timeout, options.abort_on_error, options.from_formats) == (30.0, True, ("pdf",))


def test_detect_kind() -> None:
    assert convert.detect_kind(b"%PDF-1.7\n...") == "pdf"
    assert convert.detect_kind(b"\x89PNG\r\n\x1a\n....") == "image"
    assert convert.detect_kind(b"\xff\xd8\xff\xe0") == "image"
    assert convert.detect_kind(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image"
    assert convert.detect_kind(b"<html>") is None


def test_error_shapes_and_styles() -> None:
    error = NotFound("no such model", param="model")
    assert error_body(error, "openai") == {
        "error": {
            "message": "no such model",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    assert error_body(error, "cohere") == {"message": "no such model"}
    assert error_body(error, "docling") == {"detail": "no such model"}
    assert Unavailable("later", retry_after=9).headers() == {"Retry-After": "9"}
    assert [style_of(p) for p in ("/v1/embeddings", "/v1/rerank", "/v2/rerank", "/v1/convert/file", "/x")] == [
        "openai",
        "cohere",
        "cohere",
        "docling",
        "openai",
    ]


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        ("StatusCode.UNAVAILABLE", Unavailable),
        ("StatusCode.DEADLINE_EXCEEDED", Unavailable),
        ("StatusCode.INVALID_ARGUMENT", BadRequest),
        ("StatusCode.INTERNAL", Internal),
        (None, Internal),
    ],
)
def test_triton_errors_map_by_grpc_code(status: str | None, kind: type) -> None:
    error = InferenceServerException("row 1: input is 900 tokens, more than max_length 512", status=status)
    mapped = map_error(error, "qwen_embed", range(64, 128), 120.0, 5)
    assert type(mapped) is kind
    if kind is BadRequest:
        assert mapped.message.startswith("input 65:")  # the request's index, not the call's row
    if status == "StatusCode.DEADLINE_EXCEEDED":
        assert "within 120 s" in mapped.message and mapped.headers() == {"Retry-After": "5"}


def test_settings_keys_and_exposure(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# clients\nalpha\n\nbeta\n")
    settings = load_settings(None, ["gateway.api_keys=one,two", f"gateway.api_key_file={keys}"]).gateway
    assert api_keys(settings, {"TRITON_RAG_API_KEYS": "three, one"}) == ("one", "two", "alpha", "beta", "three")
    assert exposure_problem("127.0.0.1", (), False) is None and exposure_problem("::1", (), False) is None
    assert "allow_insecure_public" in (exposure_problem("0.0.0.0", (), False) or "")
    assert exposure_problem("0.0.0.0", ("k",), False) is None and exposure_problem("10.0.0.2", (), True) is None
    assert is_loopback("localhost") and not is_loopback("example.com")
    for bad in (["gateway.max_body_bytes=lots"], ["gateway.port=70000"], ["gateway.nope=1"]):
        with pytest.raises(SettingsError):
            load_settings(None, bad)
    assert GatewaySettings().body_limit() == 96 * 2**20
    with pytest.raises(SettingsError, match="printable"):
        api_keys(load_settings(None, ["gateway.api_keys=bad key"]).gateway, {})


def test_workers_auto_leaves_most_cores_to_triton_and_a_bad_count_is_refused(tmp_path: Path) -> None:
    auto = GatewaySettings()
    assert auto.workers == "auto"
    assert [auto.worker_count(cpus) for cpus in (1, 2, 4, 7, 8, 12, 16, 64)] == [1, 1, 1, 1, 2, 3, 4, 4]
    assert load_settings(None, ["gateway.workers=3"]).gateway.worker_count(2) == 3  # as given, whatever the cores
    config = tmp_path / "rag.toml"
    config.write_text("[gateway]\nworkers = 2\n")  # a TOML integer
    assert load_settings(config).gateway.worker_count(64) == 2
    message = 'workers must be "auto" or a number of at least 1'
    for bad in ("0", "-1", "two", "1.5", "", " 2", "\u00b2", "True"):
        with pytest.raises(SettingsError, match=message):
            GatewaySettings(workers=bad)
    with pytest.raises(SettingsError, match=message):
        load_settings(None, ["gateway.workers=0"])


def test_the_prepared_file_name_is_builds() -> None:
    assert catalog.PREPARED_FILE == repository.PREPARED_FILE
    assert catalog.model_ids("Qwen/Qwen3-Embedding-8B", "qwen_embed") == (
        "Qwen/Qwen3-Embedding-8B",
        "Qwen3-Embedding-8B",
        "qwen_embed",
    )
    assert catalog.model_ids("/models/minilm", "qwen_embed") == ("minilm", "qwen_embed")


TEXTS = ["Paris is the capital of France.", "naïve café 東京 🚀", "a" * 300, "Hello\nworld\t!"]


def test_token_counts_equal_transformers(minilm_dir: Path, tiny_embed_dir: Path, tiny_rerank_dir: Path) -> None:
    from transformers import AutoTokenizer

    minilm = EmbedCounter(FastTokenizer.from_file(minilm_dir / "tokenizer.json"), 512, "reject", "")
    reference = AutoTokenizer.from_pretrained(str(minilm_dir))
    assert minilm.count(TEXTS, "") == sum(len(ids) for ids in reference(TEXTS)["input_ids"])
    qwen = EmbedCounter(FastTokenizer.from_file(tiny_embed_dir / "tokenizer.json"), 512, "reject", QWEN3_POOL_TOKEN)
    reference = AutoTokenizer.from_pretrained(str(tiny_embed_dir))
    rows = [format_embed_text(t, "Find it") for t in TEXTS]
    expected = sum(len(ids) + (ids[-1:] != [151643]) for ids in reference(rows)["input_ids"])
    assert qwen.count(TEXTS, "Find it") == expected
    with pytest.raises(BadRequest, match=r"^input 1: input is \d+ tokens, more than max_length 8"):
        EmbedCounter(FastTokenizer.from_file(tiny_embed_dir / "tokenizer.json"), 8, "reject", QWEN3_POOL_TOKEN).count(
            ["short", "a much longer text that has more than eight tokens in it"], ""
        )
    truncating = EmbedCounter(FastTokenizer.from_file(minilm_dir / "tokenizer.json"), 8, "truncate", "")
    assert truncating.count(["one two three four five six seven eight nine ten"], "") == 8
    reranker = RerankCounter(FastTokenizer.from_file(tiny_rerank_dir / "tokenizer.json"), 256, "reject", "Judge")
    assert reranker.count("q", ["a", "b"], "") > 0
    assert reranker.cut_documents(["one two three four"], 2) == ["one two"]


def test_a_huge_text_is_refused_before_it_is_tokenized(tiny_embed_dir: Path) -> None:
    counter = EmbedCounter(FastTokenizer.from_file(tiny_embed_dir / "tokenizer.json"), 8192, "reject", QWEN3_POOL_TOKEN)
    started = time.monotonic()
    with pytest.raises(BadRequest, match="^input 0 is 52428800 bytes, more than the"):
        counter.count(["x" * 50 * 2**20], "")
    assert time.monotonic() - started < 1.0


def bytes_long(size: int) -> str:
    """A text of exactly `size` UTF-8 bytes, two-byte characters but one: a single word ([UNK] to MiniLM)."""
    return "é" * (size // 2) + "a" * (size % 2)


def endpoint_reads(values: dict[str, str], limit: int, cut: bool = False) -> dict[str, str] | None:
    """Each field as the endpoint reads its tensor (core.text.decode_utf8 at `limit`): None when it refuses one."""
    try:
        return {name: decode_utf8([value.encode()], name, limit, cut)[0] for name, value in values.items()}
    except TooLarge:
        return None


MINILM_MAX_LENGTH = 128


def minilm_counter(minilm_dir: Path, overflow: Literal["reject", "truncate"]) -> EmbedCounter:
    return EmbedCounter(FastTokenizer.from_file(minilm_dir / "tokenizer.json"), MINILM_MAX_LENGTH, overflow, "")


def test_the_gateway_refuses_for_size_exactly_what_the_endpoint_refuses(minilm_dir: Path) -> None:
    """TEXT and INSTRUCTION are each held to text_byte_limit on their own, as the endpoint holds them: a text at
    the limit with an instruction (a prompt over it) is counted; one byte over either is refused, naming it."""
    limit = text_byte_limit(MINILM_MAX_LENGTH)
    counter = minilm_counter(minilm_dir, "reject")
    for text_delta, task_delta in itertools.product(range(-2, 3), repeat=2):
        text, instruction = bytes_long(limit + text_delta), bytes_long(limit + task_delta)
        if endpoint_reads({"TEXT": text, "INSTRUCTION": instruction}, limit) is not None:
            assert counter.count(["short", text], instruction) > 0
            continue
        with pytest.raises(BadRequest) as caught:
            counter.count(["short", text], instruction)
        what, size = ("input 1", limit + text_delta) if text_delta > 0 else ("instruction", limit + task_delta)
        assert caught.value.code == "input_too_long" and caught.value.param == what.split()[0]
        assert caught.value.message.startswith(f"{what} is {size} bytes, more than the {limit} bytes")


def test_truncate_cuts_each_field_as_the_endpoint_does(minilm_dir: Path, tiny_rerank_dir: Path) -> None:
    """overflow = "truncate": each field cut to the byte limit on its own (a character split by the cut dropped),
    then the prompt formatted, as the endpoint does; before, the formatted prompt was cut, which dropped the text
    after a long instruction (or the document after a long query) from the count."""
    limit = text_byte_limit(MINILM_MAX_LENGTH)
    text, instruction = "a" + "é" * limit, "i" * (limit + 500)  # both over the limit; the cut splits an "é"
    read = endpoint_reads({"TEXT": text, "INSTRUCTION": instruction}, limit, cut=True)
    assert read is not None and len(read["TEXT"]) == limit // 2 and len(read["INSTRUCTION"]) == limit
    tokenizer = FastTokenizer.from_file(minilm_dir / "tokenizer.json")
    endpoint = EmbedTokenization(tokenizer, MINILM_MAX_LENGTH, "truncate", None)
    expected = endpoint.encode([format_embed_text(read["TEXT"], read["INSTRUCTION"])])
    assert minilm_counter(minilm_dir, "truncate").count([text], instruction) == len(expected[0].ids) > 5

    rerank_limit = text_byte_limit(256)
    query, document = "q" + " " * (rerank_limit + 9), "d" + " " * (rerank_limit + 9)  # spaces: few tokens
    read = endpoint_reads({"QUERY": query, "DOCUMENT": document}, rerank_limit, cut=True)
    assert read is not None
    tokenizer = FastTokenizer.from_file(tiny_rerank_dir / "tokenizer.json")
    pair = RerankTokenization(tokenizer, 256, "truncate").encode(
        [format_rerank_pair(read["QUERY"], read["DOCUMENT"], "Judge")]
    )
    counter = RerankCounter(tokenizer, 256, "truncate", "Judge")
    assert counter.count(query, [document], "") == len(pair[0].ids) and not pair[0].truncated

"""Fuzzing every client-facing endpoint on the real tritonserver (issue 23): random and mutated text fields, images
and PDFs (truncated, bit-flipped, not what they claim, huge declared sizes, decompression bombs). Each request gets a
correct answer or a clear INVALID_ARG, never INTERNAL, never a hang; the server answers a good request afterwards.

Examples are few per run (CI's time) and the same in every run (`derandomize`: a CI result never depends on luck);
to explore further, turn derandomize off and raise max_examples locally. A failure prints the input
that caused it, to be pinned as a regular test."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.harness import CACHE_DIR, RunningServer, embed, rerank, start_server, strings
from tests.test_docling_parts import make_pdf
from triton_rag import contract
from triton_rag.build.repository import prepare_repository
from triton_rag.build.settings import DoclingSettings, Settings

pytestmark = pytest.mark.server

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
FUZZ_DOCUMENTS = settings(
    max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)

#: Text-like inputs: any bytes (mostly not UTF-8), any unicode (controls, combining marks, emoji), whitespace only,
#: and long runs around the byte limit of the qwen_server fixture (max_length 512 x 32 bytes = 16,384).
TEXTS = st.one_of(
    st.binary(min_size=0, max_size=64),
    st.text(min_size=0, max_size=200),
    st.sampled_from(["", " ", "\n\t", "\u200b", "\x00", "\ufeff", "a\u0301" * 50, "😀" * 100]),
    st.integers(16_000, 17_000).map(lambda n: "x" * n),
    st.integers(1, 4000).map(lambda n: "word " * n),
)


def _accepted_or_refused(call: object) -> object | None:
    """The answer, or None for INVALID_ARG; anything else (INTERNAL, UNAVAILABLE) fails the test."""
    try:
        return call()  # type: ignore[operator]
    except InferenceServerException as error:
        assert "INVALID_ARG" in str(error.status()), f"{error.status()}: {error.message()}"
        return None


@FUZZ
@given(TEXTS, st.one_of(st.none(), TEXTS))
def test_embed_answers_or_refuses_any_text(qwen_server: RunningServer, text: str | bytes, instruction: object) -> None:
    inputs = [strings("TEXT", [text])]  # type: ignore[list-item]
    if instruction is not None:
        inputs.append(strings("INSTRUCTION", [instruction]))  # type: ignore[list-item]
    answer = _accepted_or_refused(lambda: qwen_server.client().infer(contract.EMBED_ENDPOINT, inputs))
    if answer is not None:
        vector = answer.as_numpy("EMBEDDING").astype(np.float32)  # type: ignore[attr-defined]
        assert vector.shape[0] == 1 and np.isfinite(vector).all()
        assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-2


@FUZZ
@given(TEXTS, TEXTS)
def test_rerank_answers_or_refuses_any_pair(qwen_server: RunningServer, query: object, document: object) -> None:
    inputs = [strings("QUERY", [query]), strings("DOCUMENT", [document])]  # type: ignore[list-item]
    answer = _accepted_or_refused(lambda: qwen_server.client().infer(contract.RERANK_ENDPOINT, inputs))
    if answer is not None:
        score = answer.as_numpy("SCORE")  # type: ignore[attr-defined]
        assert score.shape == (1, 1) and 0.0 <= float(score[0, 0]) <= 1.0


def test_the_text_endpoints_still_answer_after_the_fuzzing(qwen_server: RunningServer) -> None:
    assert embed(qwen_server, ["still alive"]).shape[0] == 1
    assert rerank(qwen_server, [("still", "alive")]).shape == (1,)


# --- documents ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_docling(tmp_path_factory: pytest.TempPathFactory, tiny_docling_dir: Path) -> Iterator[RunningServer]:
    repository = tmp_path_factory.mktemp("fuzz_docling")
    docling = DoclingSettings(
        model=str(tiny_docling_dir), max_new_tokens=8, max_image_pixels=4_000_000, max_pages=3,
        max_document_bytes=4 * 2**20,
    )  # fmt: skip
    prepare_repository(Settings(docling=docling, offline_fallback=False), repository, CACHE_DIR, endpoints=("docling",))
    yield from start_server(repository, tmp_path_factory.mktemp("logs") / "fuzz_docling.log")


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` pixels (its pixel data is a few bytes): a decompression bomb if
    the server decoded before checking."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    data = zlib.compress(b"\x00" * 64)
    idat = struct.pack(">I", len(data)) + b"IDAT" + data + struct.pack(">I", zlib.crc32(b"IDAT" + data))
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + ihdr + idat + iend


def _mutated(data: bytes, cut: float, flips: list[int]) -> bytes:
    """`data` cut to a fraction of its length, with some bytes flipped."""
    out = bytearray(data[: max(1, int(len(data) * cut))])
    for flip in flips:
        out[flip % len(out)] ^= 0xFF
    return bytes(out)


GOOD_PNG, GOOD_PDF = _png(64, 48), make_pdf((200, 100), (100, 200))
#: A page that declares a 9e9 x 9e9 pt MediaBox (pixels before decoding: it must be rendered within the limit or
#: refused, never drawn at its declared size)
HUGE_PAGE_PDF = GOOD_PDF.replace(b"/MediaBox [ 0 0 200.0 100.0 ]", b"/MediaBox [ 0 0 9e9 9e9 ]")
IMAGES = st.one_of(
    st.binary(min_size=0, max_size=256),
    st.builds(_mutated, st.just(GOOD_PNG), st.floats(0.05, 1.0), st.lists(st.integers(0, 10**6), max_size=4)),
    st.builds(_png_declaring, st.integers(1, 200_000), st.integers(1, 200_000)),
    st.sampled_from([GOOD_PNG, GOOD_PDF, b"%PDF-1.7\n", b"GIF89a"]),
)
PDFS = st.one_of(
    st.binary(min_size=0, max_size=256),
    st.builds(_mutated, st.just(GOOD_PDF), st.floats(0.05, 1.0), st.lists(st.integers(0, 10**6), max_size=4)),
    st.sampled_from([GOOD_PNG, b"%PDF-1.7\n%%EOF", HUGE_PAGE_PDF]),
)


@FUZZ_DOCUMENTS
@given(IMAGES)
def test_docling_answers_or_refuses_any_image(fuzz_docling: RunningServer, data: bytes) -> None:
    tensor = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[data]], dtype=np.object_))
    answer = _accepted_or_refused(lambda: fuzz_docling.client().infer(contract.DOCLING_ENDPOINT, [tensor]))
    if answer is not None:
        assert answer.as_numpy("STRUCTURED_JSON")[0, 0].startswith(b"{")  # type: ignore[attr-defined]


@FUZZ_DOCUMENTS
@given(PDFS)
def test_docling_document_answers_or_refuses_any_pdf(fuzz_docling: RunningServer, data: bytes) -> None:
    tensor = grpcclient.InferInput("DOCUMENT", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
    answer = _accepted_or_refused(lambda: fuzz_docling.client().infer(contract.DOCLING_DOCUMENT_ENDPOINT, [tensor]))
    if answer is not None:
        assert answer.as_numpy("STRUCTURED_JSON")[0].startswith(b"{")  # type: ignore[attr-defined]


def test_the_docling_endpoints_still_answer_after_the_fuzzing(fuzz_docling: RunningServer) -> None:
    tensor = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[GOOD_PNG]], dtype=np.object_))
    assert fuzz_docling.client().infer(contract.DOCLING_ENDPOINT, [tensor]).as_numpy("DOCTAGS").shape == (1, 1)

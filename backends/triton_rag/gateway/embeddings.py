"""OpenAI `POST /v1/embeddings`: the request model, the pure decisions (which texts, which instruction, the
Matryoshka cut, the wire encoding) and the call that puts them together.

Extension fields (README): `input_type` "query" | "document" (default document) and `instruction` (a query's task;
a Qwen3 embedder's queries get the model card's default one when none is given). Token-id inputs are refused.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from triton_rag.contract import MIN_EMBED_DIM
from triton_rag.core.postprocess import matryoshka_normalize
from triton_rag.gateway.catalog import Catalog, EmbedModel
from triton_rag.gateway.errors import BadRequest
from triton_rag.gateway.triton import TritonShell, count_off_loop


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request (unknown fields are refused, as OpenAI does), plus `input_type` and
    `instruction`."""

    model_config = ConfigDict(extra="forbid")

    input: str | list[str] | list[int] | list[list[int]]
    model: str
    dimensions: int | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None
    input_type: Literal["query", "document"] = "document"
    instruction: str | None = Field(default=None, description="a query's task instruction (input_type query)")


def text_inputs(value: Any, max_inputs: int) -> list[str]:
    """The texts of `input`: a string or a list of strings, at most `max_inputs`, none empty (the index named)."""
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise BadRequest("input is an empty list: give a string or a list of strings", param="input")
    if any(not isinstance(item, str) for item in texts):
        raise BadRequest(
            "input as token ids is not supported: send the text (a string or a list of strings); the server "
            "tokenizes it with the model's own tokenizer",
            param="input",
            code="unsupported_input",
        )
    if len(texts) > max_inputs:
        raise BadRequest(
            f"input has {len(texts)} texts, more than the limit of {max_inputs} per request; send them in several "
            "requests",
            param="input",
            code="too_many_inputs",
        )
    for index, text in enumerate(texts):
        if not text.strip():
            raise BadRequest(f"input {index} is empty", param="input", code="empty_input")
    return texts


def query_instruction(request: EmbeddingRequest, model: EmbedModel) -> str:
    """The INSTRUCTION to send: a query's (given, or the model's default for queries), none for documents."""
    if request.input_type == "document":
        if request.instruction:
            raise BadRequest(
                'instruction applies to queries: send "input_type": "query" with it (documents are embedded as '
                "they are)",
                param="instruction",
            )
        return ""
    return model.query_instruction(request.instruction)


def check_dimensions(dimensions: int | None, served: int) -> int:
    """The size to return: `dimensions` (a Matryoshka cut of the served vector) or the served size."""
    if dimensions is None:
        return served
    if dimensions > served:
        raise BadRequest(
            f"dimensions {dimensions} is more than this model's {served} (rag.toml [embed] dim); ask for at most "
            f"{served}",
            param="dimensions",
            code="invalid_dimensions",
        )
    if dimensions < MIN_EMBED_DIM:
        raise BadRequest(
            f"dimensions must be at least {MIN_EMBED_DIM}, got {dimensions}",
            param="dimensions",
            code="invalid_dimensions",
        )
    return dimensions


def shape_vectors(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """float32 rows of `dimensions`: the served rows as they are when no cut is asked for, else the first
    `dimensions` features L2-normalised again (Qwen3 MRL: truncate, then normalise)."""
    if dimensions >= vectors.shape[1]:
        return vectors.astype(np.float32)
    return matryoshka_normalize(vectors, dimensions, np.float32)


def encode_row(row: np.ndarray, encoding_format: str) -> np.ndarray | str:
    """OpenAI's wire forms: the float32 row (written as a JSON list of floats), or base64 of little-endian float32
    (what the SDKs decode)."""
    if encoding_format == "base64":
        return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
    return np.ascontiguousarray(row, dtype=np.float32)


def response_body(vectors: np.ndarray, encoding_format: str, model: str, tokens: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": encode_row(row, encoding_format)}
            for index, row in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


async def create_embeddings(
    request: EmbeddingRequest, catalog: Catalog, shell: TritonShell, max_inputs: int
) -> tuple[dict[str, Any], int]:
    """The response body and the number of texts."""
    model = catalog.embedder(request.model)
    texts = text_inputs(request.input, max_inputs)
    dimensions = check_dimensions(request.dimensions, model.dim)
    instruction = query_instruction(request, model)
    tokens = await count_off_loop(model.counter.count, len(texts), texts, instruction)
    vectors = await shell.embed(model.endpoint, model.max_batch, texts, instruction)
    return response_body(shape_vectors(vectors, dimensions), request.encoding_format, model.id, tokens), len(texts)

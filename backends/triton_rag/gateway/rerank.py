"""Rerank: Jina / Cohere v1 `POST /v1/rerank` and Cohere v2 `POST /v2/rerank`. One request model for both (their
fields are a superset of each other's), the pure decisions (documents, refused options, order and top_n, each API's
response shape) and the call that puts them together. Results are sorted by relevance_score, highest first (ties in
document order); `index` is the document's position in the request."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from triton_rag.gateway.catalog import Catalog
from triton_rag.gateway.errors import BadRequest
from triton_rag.gateway.triton import TritonShell, count_off_loop

Version = Literal["v1", "v2"]


class TextDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str


class RerankRequest(BaseModel):
    """Cohere v2 / Cohere v1 / Jina rerank request. Unknown fields are refused (400 naming them)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    query: str
    documents: list[str | TextDocument]
    top_n: int | None = Field(default=None, ge=1)
    #: Jina and Cohere v1: each result carries its document's text; Cohere v2 answers never do.
    return_documents: bool = False
    #: Extension: the reranker's task instruction (default: rag.toml [rerank] default_instruction).
    instruction: str | None = None
    #: Cohere v2: each document cut after this many tokens.
    max_tokens_per_doc: int | None = Field(default=None, ge=1)
    #: Cohere v2: a scheduling hint; every request is served in arrival order here.
    priority: int | None = None
    # refused when given (not served here):
    relevant_spans: dict[str, Any] | None = None
    rank_fields: list[str] | None = None
    max_chunks_per_doc: int | None = None


def refused_fields(request: RerankRequest) -> list[str]:
    """Fields given that this server does not do (Cohere v1 structured documents, v2 relevant spans)."""
    refused = [name for name in ("rank_fields", "max_chunks_per_doc") if getattr(request, name) is not None]
    spans = request.relevant_spans
    if spans is not None and spans.get("mode", "disabled") != "disabled":
        refused.append("relevant_spans")
    return refused


def document_texts(documents: Sequence[str | TextDocument], max_inputs: int) -> list[str]:
    """The texts of `documents` (strings or {"text": ...}), at most `max_inputs`, none empty (the index named)."""
    if not documents:
        raise BadRequest("documents is empty: give at least one document", param="documents")
    if len(documents) > max_inputs:
        raise BadRequest(
            f"documents has {len(documents)} entries, more than the limit of {max_inputs} per request",
            param="documents",
        )
    texts = [d if isinstance(d, str) else d.text for d in documents]
    for index, text in enumerate(texts):
        if not text.strip():
            raise BadRequest(f"document {index} is empty", param="documents")
    return texts


def check_query(query: str) -> None:
    if not query.strip():
        raise BadRequest("query is empty", param="query")


def ranking(scores: np.ndarray, top_n: int | None) -> list[int]:
    """Document indices by score, highest first, ties in document order; the first `top_n` (all when None)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return order if top_n is None else order[:top_n]


def response_body(
    version: Version,
    order: list[int],
    scores: np.ndarray,
    texts: Sequence[str],
    return_documents: bool,
    model: str,
    tokens: int,
) -> dict[str, Any]:
    """Cohere v2's `{id, results: [{index, relevance_score}], meta}`; v1 adds what Jina and Cohere v1 clients read:
    `document` ({"text"}) when asked, `model` and `usage`."""
    results: list[dict[str, Any]] = []
    for index in order:
        result: dict[str, Any] = {"index": index, "relevance_score": float(scores[index])}
        if return_documents:
            result["document"] = {"text": texts[index]}
        results.append(result)
    meta = {
        "api_version": {"version": "2" if version == "v2" else "1"},
        "billed_units": {"search_units": 1},
        "tokens": {"input_tokens": tokens, "output_tokens": 0},
    }
    body: dict[str, Any] = {"id": str(uuid.uuid4()), "results": results, "meta": meta}
    if version == "v1":
        body["model"] = model
        body["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return body


async def rerank(
    version: Version, request: RerankRequest, catalog: Catalog, shell: TritonShell, max_inputs: int
) -> tuple[dict[str, Any], int]:
    """The response body and the number of documents."""
    model = catalog.reranker(request.model)
    refused = refused_fields(request)
    if refused:
        raise BadRequest(f"not supported here: {', '.join(refused)}", param=refused[0], code="unsupported_option")
    check_query(request.query)
    texts = document_texts(request.documents, max_inputs)
    originals = texts
    if request.max_tokens_per_doc is not None:
        texts = model.counter.cut_documents(texts, request.max_tokens_per_doc)
    instruction = request.instruction or ""
    tokens = await count_off_loop(model.counter.count, len(texts), request.query, texts, instruction)
    scores = await shell.rerank(model.endpoint, model.max_batch, request.query, texts, instruction)
    order = ranking(scores, request.top_n)
    body = response_body(version, order, scores, originals, request.return_documents, model.id, tokens)
    return body, len(texts)

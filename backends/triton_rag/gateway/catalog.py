"""What the prepared repository serves, as the gateway needs it: each endpoint's model names, its parameters (read
from the config.pbtxt Triton loads, parsed by the same typed classes the endpoint uses), its largest request (the
endpoint's max_batch_size) and its tokenizer. Read once at start-up; nothing here talks to Triton."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from triton_rag import contract
from triton_rag.build.model_config import parse
from triton_rag.contract.params import EmbedEndpointParameters, RerankEndpointParameters
from triton_rag.gateway.errors import NotFound
from triton_rag.gateway.tokens import EmbedCounter, FastTokenizer, RerankCounter

_log = logging.getLogger(__name__)

#: build.repository.PREPARED_FILE (a test keeps the two equal; build.repository itself pulls in the model builders).
PREPARED_FILE = ".prepared.json"
#: Qwen3-Embedding's query instruction when a request asks for a query without one (the model card's example).
DEFAULT_QUERY_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
OWNER = "triton-rag"


class CatalogError(RuntimeError):
    """The repository cannot be served through the gateway (not prepared, a file missing)."""


def model_ids(configured: str, endpoint: str) -> tuple[str, ...]:
    """The names a request may give for a model: the configured id first (a hub id as it is, a local directory by
    its folder name), then the directory's name and the Triton endpoint's name."""
    path = Path(configured)
    primary = path.name if path.is_absolute() or configured.startswith(".") else configured
    names = [primary, path.name, endpoint]
    return tuple(dict.fromkeys(name for name in names if name))


@dataclass(frozen=True)
class ServedModel:
    ids: tuple[str, ...]
    endpoint: str
    #: Rows in one Triton request (the endpoint's max_batch_size; 0: not batched, one row).
    max_batch: int

    @property
    def id(self) -> str:
        return self.ids[0]


@dataclass(frozen=True)
class EmbedModel(ServedModel):
    dim: int
    #: last_token (Qwen3: queries take an instruction) or mean (BERT family: no prompt).
    pooling: str
    counter: EmbedCounter

    def query_instruction(self, given: str | None) -> str:
        if given:
            return given
        return DEFAULT_QUERY_INSTRUCTION if self.pooling == "last_token" else ""


@dataclass(frozen=True)
class RerankModel(ServedModel):
    counter: RerankCounter


@dataclass(frozen=True)
class Catalog:
    embed: EmbedModel | None
    rerank: RerankModel | None
    #: The docling model's ids when conversion is served (`docling` for images, `docling_document` for PDFs).
    docling: ServedModel | None
    created: int

    def models(self) -> list[ServedModel]:
        return [model for model in (self.embed, self.rerank, self.docling) if model is not None]

    def embedder(self, name: str | None) -> EmbedModel:
        return _pick(self.embed, name, "embedding", "embed")

    def reranker(self, name: str | None) -> RerankModel:
        return _pick(self.rerank, name, "rerank", "rerank")

    def converter(self) -> ServedModel:
        if self.docling is None:
            raise NotFound("this deployment does not convert documents (rag.toml has no [docling] model prepared)")
        return self.docling


def _pick(model: Any, name: str | None, what: str, section: str) -> Any:
    if model is None:
        raise NotFound(
            f"this deployment serves no {what} model (the [{section}] endpoint was not prepared)", param="model"
        )
    if name and name not in model.ids:
        raise NotFound(
            f"the model {name!r} is not served here; the {what} model is {model.id!r} (also called "
            f"{', '.join(repr(n) for n in model.ids[1:])})",
            param="model",
        )
    return model


def _config(repository: Path, endpoint: str) -> tuple[dict[str, str], int]:
    path = repository / endpoint / "config.pbtxt"
    if not path.is_file():
        raise CatalogError(f"{path} is missing: run `triton-rag prepare`")
    config = parse(path.read_text())
    return {key: value.string_value for key, value in config.parameters.items()}, int(config.max_batch_size)


def _tokenizer(repository: Path, endpoint: str) -> FastTokenizer:
    path = repository / endpoint / "1" / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        raise CatalogError(f"{path} is missing: the gateway counts tokens with the endpoint's fast tokenizer")
    return FastTokenizer.from_file(path)


def load_catalog(repository: Path) -> Catalog:
    """The catalog of a prepared repository (`triton-rag prepare` wrote it and its `.prepared.json`)."""
    summary_file = repository / PREPARED_FILE
    if not summary_file.is_file():
        raise CatalogError(f"{repository} has not been prepared (no {PREPARED_FILE}): run `triton-rag prepare`")
    prepared: dict[str, Any] = json.loads(summary_file.read_text()).get("endpoints", {})
    embed = rerank = docling = None
    if "embed" in prepared:
        record = prepared["embed"]
        values, max_batch = _config(repository, contract.EMBED_ENDPOINT)
        params = EmbedEndpointParameters.parse(values)
        counter = EmbedCounter(
            _tokenizer(repository, contract.EMBED_ENDPOINT), params.max_length, params.overflow, params.pool_token
        )
        embed = EmbedModel(
            ids=model_ids(record["model"], contract.EMBED_ENDPOINT),
            endpoint=contract.EMBED_ENDPOINT,
            max_batch=max_batch,
            dim=params.dim,
            pooling=str(record.get("pooling", "last_token")),
            counter=counter,
        )
    if "rerank" in prepared:
        record = prepared["rerank"]
        values, max_batch = _config(repository, contract.RERANK_ENDPOINT)
        rerank_params = RerankEndpointParameters.parse(values)
        rerank = RerankModel(
            ids=model_ids(record["model"], contract.RERANK_ENDPOINT),
            endpoint=contract.RERANK_ENDPOINT,
            max_batch=max_batch,
            counter=RerankCounter(
                _tokenizer(repository, contract.RERANK_ENDPOINT),
                rerank_params.max_length,
                rerank_params.overflow,
                rerank_params.default_instruction,
            ),
        )
    if "docling" in prepared:
        docling = ServedModel(
            ids=model_ids(prepared["docling"]["model"], contract.DOCLING_DOCUMENT_ENDPOINT),
            endpoint=contract.DOCLING_DOCUMENT_ENDPOINT,
            max_batch=0,
        )
    catalog = Catalog(embed, rerank, docling, created=int(time.time()))
    if not catalog.models():
        raise CatalogError(f"{repository} serves no endpoint the gateway knows")
    return catalog

"""The client-facing python models `qwen_embed` and `qwen_rerank`.

Each execute() gets the requests the dynamic batcher gathered, tokenizes all their rows in one tokenizer call (the
fast tokenizer spreads a batch over its threads; one call per request cost ~2 ms a text), sends them to the compute
model over BLS (one call per batch unless the encoder's limits need more), and answers every request on its own: a
bad request gets its own error while the others in the same batch are answered.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_rag import contract
from triton_rag.contract.params import EmbedEndpointParameters, RerankEndpointParameters, TextEndpointParameters
from triton_rag.core.batching import pad_rows, plan_encoder_calls
from triton_rag.core.postprocess import matryoshka_normalize, yes_probability
from triton_rag.core.text import (
    EmbedTokenization,
    Encoded,
    InputError,
    RerankTokenization,
    format_embed_text,
    format_rerank_pair,
    require_non_empty,
    text_byte_limit,
)
from triton_rag.triton.common import (
    RouterClient,
    call_model,
    execute_jointly,
    model_parameters,
    read_strings,
    stub_logger,
)

P = TypeVar("P", bound=TextEndpointParameters)


class _TextEndpoint(Generic[P]):
    """Shared flow: validate per request, tokenize all good rows at once, one encoder pass, split the results."""

    #: The endpoint's typed config.pbtxt parameters.
    parameters: type[P]
    encoder_output: str
    max_rows: int
    tokenization: EmbedTokenization | RerankTokenization

    def initialize(self, args: dict[str, str]) -> None:
        self.log = stub_logger(args)
        from transformers import AutoTokenizer

        params = self.parameters.parse(model_parameters(args))
        self.encoder = params.encoder
        self.max_length = params.max_length
        self.overflow = params.overflow
        self.max_batch_tokens = params.max_batch_tokens
        self.max_text_bytes = text_byte_limit(self.max_length)  # each text field, before decoding or tokenizing
        self.router = RouterClient(params.router)
        tokenizer_dir = Path(args["model_repository"]) / args["model_version"] / "tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.setup(params, tokenizer)

    def setup(self, params: P, tokenizer: Any) -> None:
        raise NotImplementedError

    def read_request(self, request: Any) -> list[str]:
        """The request's rows as the texts to tokenize (its own InputError when malformed)."""
        raise NotImplementedError

    def read_texts(self, request: Any, name: str, optional: bool = False) -> list[str] | None:
        """A text input, each value's size checked first: refused above the byte limit, or cut to it where the
        endpoint truncates."""
        return read_strings(request, name, optional, self.max_text_bytes, cut=self.overflow == "truncate")

    def respond(self, outputs: np.ndarray, encoded: list[Encoded]) -> Any:
        raise NotImplementedError

    def run_encoder(self, rows: list[Encoded]) -> np.ndarray:
        """All rows through the encoder under one router lease."""
        return self.router.run(self.encoder, lambda: self._encode(rows))

    def _encode(self, rows: list[Encoded]) -> np.ndarray:
        groups = plan_encoder_calls([len(row.ids) for row in rows], self.max_rows, self.max_batch_tokens)
        result: np.ndarray | None = None
        for group in groups:
            ids, mask = pad_rows([rows[i].ids for i in group], self.pad_id)
            out = call_model(self.encoder, {"INPUT_IDS": ids, "ATTENTION_MASK": mask}, [self.encoder_output])
            values = out[self.encoder_output]
            if result is None:
                result = np.empty((len(rows),) + values.shape[1:], dtype=values.dtype)
            result[group] = values
        assert result is not None
        return result

    def execute(self, requests: list[Any]) -> list[Any]:
        return execute_jointly(
            requests,
            self.read_request,
            self.run_encoder,
            self._respond,
            prepare=self.tokenization.encode_groups,
            log=self.log,
        )

    def _respond(self, encoded: Sequence[Encoded], outputs: Any) -> Any:
        return self.respond(outputs, list(encoded))

    def finalize(self) -> None:
        pass


def _truncated(encoded: list[Encoded]) -> Any:
    return pb_utils.Tensor("TRUNCATED", np.array([[row.truncated] for row in encoded], dtype=bool))


def _rows_match(name: str, values: list[str], rows: int) -> None:
    if len(values) != rows:
        raise InputError(f"{name} has {len(values)} rows but the request has {rows}")


class EmbedEndpoint(_TextEndpoint[EmbedEndpointParameters]):
    parameters = EmbedEndpointParameters
    encoder_output = "POOLED"
    max_rows = contract.embed_encoder(1).max_batch_size

    def setup(self, params: EmbedEndpointParameters, tokenizer: Any) -> None:
        self.dim = params.dim
        self.output_dtype = np.float32 if params.output_dtype == "fp32" else np.float16
        append_id = tokenizer.convert_tokens_to_ids(params.pool_token) if params.pool_token else None
        self.tokenization = EmbedTokenization(tokenizer, self.max_length, self.overflow, append_id)

    def read_request(self, request: Any) -> list[str]:
        texts = self.read_texts(request, "TEXT")
        assert texts is not None
        require_non_empty(texts, "TEXT")
        instructions = self.read_texts(request, "INSTRUCTION", optional=True) or [""] * len(texts)
        _rows_match("INSTRUCTION", instructions, len(texts))
        return [format_embed_text(t, i) for t, i in zip(texts, instructions, strict=True)]

    def respond(self, outputs: np.ndarray, encoded: list[Encoded]) -> Any:
        embedding = pb_utils.Tensor("EMBEDDING", matryoshka_normalize(outputs, self.dim, self.output_dtype))
        return pb_utils.InferenceResponse(output_tensors=[embedding, _truncated(encoded)])


class RerankEndpoint(_TextEndpoint[RerankEndpointParameters]):
    parameters = RerankEndpointParameters
    encoder_output = "LOGITS"
    max_rows = contract.rerank_encoder().max_batch_size

    def setup(self, params: RerankEndpointParameters, tokenizer: Any) -> None:
        self.default_instruction = params.default_instruction
        self.tokenization = RerankTokenization(tokenizer, self.max_length, self.overflow)

    def read_request(self, request: Any) -> list[str]:
        queries = self.read_texts(request, "QUERY")
        documents = self.read_texts(request, "DOCUMENT")
        assert queries is not None and documents is not None
        require_non_empty(queries, "QUERY")
        require_non_empty(documents, "DOCUMENT")
        _rows_match("DOCUMENT", documents, len(queries))
        instructions = self.read_texts(request, "INSTRUCTION", optional=True) or [""] * len(queries)
        _rows_match("INSTRUCTION", instructions, len(queries))
        rows = zip(queries, documents, instructions, strict=True)
        return [format_rerank_pair(q, d, i or self.default_instruction) for q, d, i in rows]

    def respond(self, outputs: np.ndarray, encoded: list[Encoded]) -> Any:
        score = pb_utils.Tensor("SCORE", yes_probability(outputs))
        return pb_utils.InferenceResponse(output_tensors=[score, _truncated(encoded)])

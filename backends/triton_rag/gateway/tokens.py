"""The real tokenizer of the served embedder and reranker (the `tokenizers` library, from the tokenizer.json that
`prepare` put beside each endpoint), for `usage` and for the per-text limits before anything is sent to Triton.

The token counts are the endpoint's own: the same prompt formatting and the same tokenization rules
(triton_rag.core.text), so a text over `max_length` is refused here with its index, and `usage` counts what the
encoder runs. A text's bytes are capped before it is tokenized (issue 23: tokenizing 50 MB took a minute and GBs):
the endpoints' own rule, `max_length` x `core.text.MAX_BYTES_PER_TOKEN` bytes (`text_byte_limit`): above it a text is
refused (overflow = "reject") or cut to that many bytes for counting (overflow = "truncate": the endpoint does the
same).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from tokenizers import Tokenizer

from triton_rag.core.text import (
    MAX_BYTES_PER_TOKEN,
    EmbedTokenization,
    InputError,
    RerankTokenization,
    format_embed_text,
    format_rerank_pair,
    text_byte_limit,
)
from triton_rag.gateway.errors import BadRequest

Overflow = Literal["reject", "truncate"]


class FastTokenizer:
    """A `tokenizers.Tokenizer` behind the part of the Hugging Face tokenizer interface core.text uses
    (`core.text.Tokenizer`): `tokenizer(texts, add_special_tokens=..., truncation=..., max_length=...)["input_ids"]`
    and `convert_tokens_to_ids`."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self._truncating: dict[int, Tokenizer] = {}

    @classmethod
    def from_file(cls, path: Path) -> FastTokenizer:
        return cls(Tokenizer.from_file(str(path)))

    def __call__(
        self, text: list[str], add_special_tokens: bool = True, truncation: bool = False, max_length: int = 0, **_: Any
    ) -> Mapping[str, Any]:
        tokenizer = self.tokenizer
        if truncation:  # a copy per length (configuring truncation mutates a tokenizer; this one stays as it is)
            if max_length not in self._truncating:
                copy = Tokenizer.from_str(self.tokenizer.to_str())
                copy.no_padding()
                copy.enable_truncation(max_length)
                self._truncating[max_length] = copy
            tokenizer = self._truncating[max_length]
        encodings = tokenizer.encode_batch(list(text), add_special_tokens=add_special_tokens)
        return {"input_ids": [encoding.ids for encoding in encodings]}

    def convert_tokens_to_ids(self, tokens: str) -> int:
        token_id = self.tokenizer.token_to_id(tokens)
        if token_id is None:
            raise KeyError(f"the tokenizer has no token {tokens!r}")
        return int(token_id)

    def cut_to_tokens(self, text: str, tokens: int) -> str:
        """`text` cut after its first `tokens` tokens (no special tokens), at the character where that token ends."""
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        if len(encoding.ids) <= tokens:
            return text
        return text[: encoding.offsets[tokens - 1][1]]


def _limit_error(what: str, index: int, size: int, limit: int, max_length: int) -> BadRequest:
    return BadRequest(
        f"{what} {index} is {size} bytes, more than the {limit} bytes a text of max_length {max_length} tokens can "
        "have here; split it into smaller chunks",
        param=what.split("[")[0],
        code="input_too_long",
    )


def _input_error(error: InputError, what: str, offset: int = 0) -> BadRequest:
    """core.text's "row N: ..." as "<what> N: ..." (N counted in the whole request)."""
    message = str(error)
    if message.startswith("row "):
        number, _, rest = message[4:].partition(":")
        if number.isdigit():
            message = f"{what} {int(number) + offset}:{rest}"
    return BadRequest(message, param=what, code="input_too_long")


class EmbedCounter:
    """Token counts (and the max_length check) of texts as the `qwen_embed` endpoint tokenizes them."""

    def __init__(self, tokenizer: FastTokenizer, max_length: int, overflow: Overflow, pool_token: str) -> None:
        append_id = tokenizer.convert_tokens_to_ids(pool_token) if pool_token else None
        self.tokenization = EmbedTokenization(tokenizer, max_length, overflow, append_id)
        self.max_length = max_length
        self.overflow = overflow
        self.byte_limit = text_byte_limit(max_length)  # the endpoints' own rule

    def count(self, texts: Sequence[str], instruction: str) -> int:
        """The tokens of all texts (prompt and special tokens included); BadRequest naming the first text over a
        limit ("input N")."""
        rows: list[str] = []
        for index, text in enumerate(texts):
            row = format_embed_text(text, instruction)
            size = len(row.encode())
            if size > self.byte_limit:
                if self.overflow == "reject":
                    raise _limit_error("input", index, size, self.byte_limit, self.max_length)
                row = row.encode()[: self.byte_limit].decode(errors="ignore")
            rows.append(row)
        result = self.tokenization.encode_groups([rows])[0]
        if isinstance(result, InputError):
            raise _input_error(result, "input")
        return sum(len(row.ids) for row in result)


class RerankCounter:
    """Token counts (and the max_length check) of (query, document) pairs as `qwen_rerank` tokenizes them."""

    def __init__(self, tokenizer: FastTokenizer, max_length: int, overflow: Overflow, default_instruction: str) -> None:
        self.tokenizer = tokenizer
        self.tokenization = RerankTokenization(tokenizer, max_length, overflow)
        self.max_length = max_length
        self.overflow = overflow
        self.default_instruction = default_instruction
        self.byte_limit = text_byte_limit(max_length)  # the endpoints' own rule

    def check_query(self, query: str, instruction: str) -> None:
        size = len(query.encode()) + len(instruction.encode())
        if size > self.byte_limit and self.overflow == "reject":
            raise BadRequest(
                f"the query (with its instruction) is {size} bytes, more than the {self.byte_limit} bytes a pair of "
                f"max_length {self.max_length} tokens can have",
                param="query",
                code="input_too_long",
            )

    def count(self, query: str, documents: Sequence[str], instruction: str) -> int:
        """The tokens of every pair (prompt included); BadRequest naming the first document over a limit."""
        instruction = instruction or self.default_instruction
        self.check_query(query, instruction)
        rows: list[str] = []
        for index, document in enumerate(documents):
            row = format_rerank_pair(query, document, instruction)
            size = len(row.encode())
            if size > self.byte_limit:
                if self.overflow == "reject":
                    raise _limit_error("documents", index, size, self.byte_limit, self.max_length)
                row = row.encode()[: self.byte_limit].decode(errors="ignore")
            rows.append(row)
        result = self.tokenization.encode_groups([rows])[0]
        if isinstance(result, InputError):
            raise _input_error(result, "documents")
        return sum(len(row.ids) for row in result)

    def cut_documents(self, documents: Sequence[str], max_tokens: int) -> list[str]:
        """Cohere's `max_tokens_per_doc`: each document cut after that many tokens (bytes capped first)."""
        cap = max_tokens * MAX_BYTES_PER_TOKEN
        return [
            self.tokenizer.cut_to_tokens(d.encode()[:cap].decode(errors="ignore") if len(d) > cap else d, max_tokens)
            for d in documents
        ]

"""Prompt formatting and tokenization for the embedding and rerank endpoints (no Triton here, so unit-testable).

The formats are the Qwen3 model cards' recipes; FACTS.md and docs/CONTRACT.md quote them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from triton_rag.core.errors import BadInput, TooLarge

EMBED_QUERY_TEMPLATE = "Instruct: {instruction}\nQuery:{text}"

RERANK_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
RERANK_PAIR_TEMPLATE = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"

#: The token Qwen3-Embedding pools at; its own tokenizer appends it, a plain Qwen3 tokenizer does not.
QWEN3_POOL_TOKEN = "<|endoftext|>"


#: Bad client input; the message is returned to the client as the request's error (INVALID_ARG). The name of
#: core/errors.py's BadInput that this module and its callers grew up with.
InputError = BadInput


class Tokenizer(Protocol):
    """The part of a Hugging Face (fast) tokenizer we use."""

    def __call__(self, text: list[str], **kwargs: Any) -> Mapping[str, Any]: ...

    def convert_tokens_to_ids(self, tokens: str) -> int: ...


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    truncated: bool


def format_embed_text(text: str, instruction: str) -> str:
    """Queries carry an instruction; documents are embedded as they are."""
    if instruction:
        return EMBED_QUERY_TEMPLATE.format(instruction=instruction, text=text)
    return text


def format_rerank_pair(query: str, document: str, instruction: str) -> str:
    return RERANK_PAIR_TEMPLATE.format(instruction=instruction, query=query, document=document)


def _overflow_error(row: int, length: int, limit: int) -> TooLarge:
    return TooLarge(
        f"row {row}: input is {length} tokens, more than max_length {limit}; split it into smaller chunks "
        f'or deploy with overflow = "truncate"'
    )


class EmbedTokenization:
    """Texts -> token ids ending in the pooling token (for last-token pooling), under max_length."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_length: int,
        overflow: Literal["reject", "truncate"],
        append_token_id: int | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.overflow = overflow
        self.append_token_id = append_token_id

    def _with_pool_token(self, ids: list[int]) -> list[int]:
        if self.append_token_id is not None and (not ids or ids[-1] != self.append_token_id):
            return ids + [self.append_token_id]
        return ids

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        return _raise_or_return(self.encode_groups([texts])[0])

    def encode_groups(self, groups: Sequence[Sequence[str]]) -> list[list[Encoded] | InputError]:
        """Each group's rows, or the error of its first row over max_length (rejected); one tokenizer call for all."""
        texts = [text for group in groups for text in group]
        rows = iter(self.tokenizer(texts, add_special_tokens=True)["input_ids"])
        results: list[list[Encoded] | InputError] = []
        for group in groups:
            encoded: list[Encoded] = []
            error: InputError | None = None
            for index, text in enumerate(group):
                ids = self._with_pool_token(list(next(rows)))
                if error is not None or len(ids) <= self.max_length:
                    encoded.append(Encoded(ids, truncated=False))
                elif self.overflow == "reject":
                    error = _overflow_error(index, len(ids), self.max_length)
                else:  # the tokenizer truncates (keeping its own special tokens), leaving room for the pool token
                    room = self.max_length - (1 if self.append_token_id is not None else 0)
                    cut = self.tokenizer([text], add_special_tokens=True, truncation=True, max_length=room)
                    encoded.append(Encoded(self._with_pool_token(list(cut["input_ids"][0])), truncated=True))
            results.append(error or encoded)
        return results


class RerankTokenization:
    """(query, document, instruction) -> prefix + pair + suffix ids, as the Qwen3-Reranker model card builds them."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, overflow: Literal["reject", "truncate"]) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.overflow = overflow
        self.prefix_ids = list(tokenizer([RERANK_PREFIX], add_special_tokens=False)["input_ids"][0])
        self.suffix_ids = list(tokenizer([RERANK_SUFFIX], add_special_tokens=False)["input_ids"][0])
        self.pair_budget = max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.pair_budget < 16:
            raise ValueError(f"max_length {max_length} leaves no room for the reranker prompt")

    def encode(self, pairs: Sequence[str]) -> list[Encoded]:
        return _raise_or_return(self.encode_groups([pairs])[0])

    def encode_groups(self, groups: Sequence[Sequence[str]]) -> list[list[Encoded] | InputError]:
        """Each group's rows, or the error of its first row over max_length (rejected); one tokenizer call for all."""
        rows = iter(self.tokenizer([pair for group in groups for pair in group], add_special_tokens=False)["input_ids"])
        results: list[list[Encoded] | InputError] = []
        for group in groups:
            encoded: list[Encoded] = []
            error: InputError | None = None
            for index in range(len(group)):
                ids = list(next(rows))
                truncated = len(ids) > self.pair_budget
                if truncated and self.overflow == "reject" and error is None:
                    total = len(ids) + len(self.prefix_ids) + len(self.suffix_ids)
                    error = _overflow_error(index, total, self.max_length)
                encoded.append(Encoded(self.prefix_ids + ids[: self.pair_budget] + self.suffix_ids, truncated))
            results.append(error or encoded)
        return results


def _raise_or_return(result: list[Encoded] | InputError) -> list[Encoded]:
    if isinstance(result, InputError):
        raise result
    return result


#: Bytes a text field may carry per token of max_length, checked before it is decoded or tokenized: far above real
#: text (English ~4 bytes a token, CJK 3-6), so what it refuses could not fit max_length anyway, and a 50 MB text is
#: refused unread instead of tokenized in full (issue 23: 51-99 s and 6.7 GB of a stub's RAM before).
MAX_BYTES_PER_TOKEN = 32


def text_byte_limit(max_length: int) -> int:
    """The bytes one text field may have for an endpoint of `max_length` tokens."""
    return max_length * MAX_BYTES_PER_TOKEN


def decode_utf8(
    values: Sequence[object], tensor: str, max_bytes: int | None = None, cut: bool = False
) -> list[str]:
    """Triton string tensors arrive as bytes; reject what is not UTF-8, naming the row. A value above `max_bytes`
    is refused before decoding (TooLarge), or with `cut` (overflow = "truncate") cut to `max_bytes` at a character
    boundary: the tokenizer then truncates what is left."""
    texts: list[str] = []
    for row, value in enumerate(values):
        data = value.encode() if isinstance(value, str) else bytes(value)  # type: ignore[call-overload]
        if max_bytes is not None and len(data) > max_bytes:
            if not cut:
                raise TooLarge(
                    f"{tensor} row {row} is {len(data):,} bytes, more than the {max_bytes:,} this endpoint reads "
                    f"({MAX_BYTES_PER_TOKEN} bytes a token of max_length); split it into smaller chunks"
                )
            data = data[:max_bytes]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            if not (cut and exc.reason == "unexpected end of data"):
                raise InputError(f"{tensor} row {row} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            text = data[: exc.start].decode("utf-8")  # the cut split a character: drop its first bytes
        texts.append(text)
    return texts


def require_non_empty(texts: Sequence[str], tensor: str) -> None:
    for row, text in enumerate(texts):
        if not text.strip():
            raise InputError(f"{tensor} row {row} is empty")

"""The real tokenizer of the served embedder and reranker (the `tokenizers` library, from the tokenizer.json that
`prepare` put beside each endpoint), for `usage` and for the per-text limits before anything is sent to Triton.

The token counts are the endpoint's own: the same prompt formatting and the same tokenization rules
(triton_rag.core.text), so a text over `max_length` is refused here with its index, and `usage` counts what the
encoder runs. Each text field's bytes are checked before it is formatted or tokenized (issue 23: tokenizing 50 MB
took a minute and GBs) by the endpoints' own rule, applied as they apply it: field by field (the input; the query,
each document, the instruction), each against `core.text.text_byte_limit(max_length)` through
`core.text.decode_utf8`, never the formatted prompt. Above the limit a field is refused (overflow = "reject") or cut
to it (overflow = "truncate"), as the endpoint refuses or cuts the same field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from tokenizers import Tokenizer

from triton_rag.core.errors import TooLarge
from triton_rag.core.text import (
    MAX_BYTES_PER_TOKEN,
    EmbedTokenization,
    InputError,
    RerankTokenization,
    decode_utf8,
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
        # the ids only: without the offsets, which nothing here reads, the Qwen3 tokenizer takes ~16% less time
        encodings = tokenizer.encode_batch_fast(list(text), add_special_tokens=add_special_tokens)
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


def _decode(text: str, name: str, param: str, limit: int, cut: bool) -> str:
    """`text` through `core.text.decode_utf8`, the function each endpoint reads its text tensors with (a str is
    encoded to the UTF-8 bytes the gateway sends): TooLarge above `limit` bytes unless `cut`, which cuts it to
    `limit` bytes at a character boundary. A str that has no UTF-8 form (a lone surrogate, which JSON's \\ud800
    escapes can carry) is refused here: it could not be sent."""
    try:
        return decode_utf8([text], name, limit, cut)[0]
    except UnicodeEncodeError as exc:
        raise BadRequest(
            f"{name} is not valid Unicode text (a lone surrogate at character {exc.start}); send the text as UTF-8",
            param=param,
            code="invalid_text",
        ) from None


class TextFields:
    """The endpoint's byte rule for its text fields (TEXT and INSTRUCTION; QUERY, DOCUMENT and INSTRUCTION), applied
    here as the endpoint applies it: each field on its own against `core.text.text_byte_limit(max_length)`, before
    the prompt is formatted (the prompt's own bytes are never counted), through the same `core.text.decode_utf8`.
    overflow = "reject": a field over the limit is refused (BadRequest naming it, its size and the limit);
    "truncate": cut to the limit, as the endpoint cuts it."""

    def __init__(self, max_length: int, overflow: Overflow) -> None:
        self.max_length = max_length
        self.overflow = overflow
        self.byte_limit = text_byte_limit(max_length)

    def read(self, text: str, what: str, index: int | None = None, required: bool = True) -> str:
        """The field as the endpoint reads it. `what`: the request's field ("input", "query", "documents",
        "instruction"), named with `index` in errors; `required`: the endpoint refuses it empty (after a cut)."""
        name = what if index is None else f"{what} {index}"
        try:
            field = _decode(text, name, what, self.byte_limit, cut=self.overflow == "truncate")
        except TooLarge:
            raise BadRequest(
                f"{name} is {len(text.encode())} bytes, more than the {self.byte_limit} bytes one text may have "
                f"for max_length {self.max_length} tokens ({MAX_BYTES_PER_TOKEN} bytes a token; each text is checked "
                "on its own, without the prompt around it); split it into smaller chunks",
                param=what,
                code="input_too_long",
            ) from None
        if required and not field.strip():  # the endpoint's require_non_empty, on what is left after a cut
            raise BadRequest(
                f"{name} is only whitespace in its first {self.byte_limit} bytes, which is all the endpoint reads "
                'of it (overflow = "truncate")',
                param=what,
                code="empty_input",
            )
        return field


def _input_error(error: InputError, what: str, offset: int = 0) -> BadRequest:
    """core.text's "row N: ..." as "<what> N: ..." (N counted in the whole request)."""
    message = str(error)
    if message.startswith("row "):
        number, _, rest = message[4:].partition(":")
        if number.isdigit():
            message = f"{what} {int(number) + offset}:{rest}"
    return BadRequest(message, param=what, code="input_too_long")


class EmbedCounter:
    """Token counts (and the byte and max_length checks) of texts as the `qwen_embed` endpoint tokenizes them."""

    def __init__(self, tokenizer: FastTokenizer, max_length: int, overflow: Overflow, pool_token: str) -> None:
        append_id = tokenizer.convert_tokens_to_ids(pool_token) if pool_token else None
        self.tokenization = EmbedTokenization(tokenizer, max_length, overflow, append_id)
        self.fields = TextFields(max_length, overflow)  # the endpoint's own byte rule, per field

    def count(self, texts: Sequence[str], instruction: str) -> int:
        """The tokens of all texts (prompt and special tokens included); BadRequest naming the first text over a
        limit ("input N"), or the instruction. `instruction` is what is sent as INSTRUCTION ("" when none is)."""
        fields = [self.fields.read(text, "input", index) for index, text in enumerate(texts)]
        if instruction:
            instruction = self.fields.read(instruction, "instruction", required=False)
        result = self.tokenization.encode_groups([[format_embed_text(text, instruction) for text in fields]])[0]
        if isinstance(result, InputError):
            raise _input_error(result, "input")
        return sum(len(row.ids) for row in result)


class RerankCounter:
    """Token counts (and the byte and max_length checks) of (query, document) pairs as `qwen_rerank` tokenizes
    them."""

    def __init__(self, tokenizer: FastTokenizer, max_length: int, overflow: Overflow, default_instruction: str) -> None:
        self.tokenizer = tokenizer
        self.tokenization = RerankTokenization(tokenizer, max_length, overflow)
        self.default_instruction = default_instruction
        self.fields = TextFields(max_length, overflow)  # the endpoint's own byte rule, per field

    def count(self, query: str, documents: Sequence[str], instruction: str) -> int:
        """The tokens of every pair (prompt included); BadRequest naming the query, the instruction or the first
        document over a limit. `instruction` is what is sent as INSTRUCTION ("": none, the endpoint's default
        instruction, which is the deployment's and not checked against the limit, as the endpoint does not)."""
        query = self.fields.read(query, "query")
        fields = [self.fields.read(document, "documents", index) for index, document in enumerate(documents)]
        given = self.fields.read(instruction, "instruction", required=False) if instruction else ""
        rows = [format_rerank_pair(query, document, given or self.default_instruction) for document in fields]
        result = self.tokenization.encode_groups([rows])[0]
        if isinstance(result, InputError):
            raise _input_error(result, "documents")
        return sum(len(row.ids) for row in result)

    def cut_documents(self, documents: Sequence[str], max_tokens: int) -> list[str]:
        """Cohere's `max_tokens_per_doc`: each document cut after that many tokens (its bytes capped first, so that
        a huge document is not tokenized in full)."""
        cap = max_tokens * MAX_BYTES_PER_TOKEN
        return [
            self.tokenizer.cut_to_tokens(_decode(text, f"documents {index}", "documents", cap, cut=True), max_tokens)
            for index, text in enumerate(documents)
        ]

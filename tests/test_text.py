"""Prompt formats and tokenization rules, on the real Qwen3 and BERT tokenizers (no server)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from triton_rag.core.errors import BadInput, TooLarge
from triton_rag.core.text import (
    MAX_BYTES_PER_TOKEN,
    EmbedTokenization,
    InputError,
    RerankTokenization,
    decode_utf8,
    format_embed_text,
    format_rerank_pair,
    require_non_empty,
    text_byte_limit,
)

ENDOFTEXT = 151643


@pytest.fixture(scope="module")
def qwen_tokenizer(tiny_embed_dir: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(str(tiny_embed_dir))


def test_query_format_has_no_space_after_query_colon() -> None:
    assert format_embed_text("what?", "Find answers") == "Instruct: Find answers\nQuery:what?"
    assert format_embed_text("a document", "") == "a document"


def test_rerank_pair_format() -> None:
    assert format_rerank_pair("q", "d", "i") == "<Instruct>: i\n<Query>: q\n<Document>: d"


def test_pool_token_is_appended_exactly_once(qwen_tokenizer) -> None:  # type: ignore[no-untyped-def]
    tokenization = EmbedTokenization(qwen_tokenizer, 64, "reject", ENDOFTEXT)
    plain, already = tokenization.encode(["hello world", "hello world<|endoftext|>"])
    assert plain.ids[-1] == ENDOFTEXT and plain.ids[:-1] == qwen_tokenizer("hello world")["input_ids"]
    assert already.ids == plain.ids


def test_overflow_is_rejected_or_truncated_as_configured(qwen_tokenizer) -> None:  # type: ignore[no-untyped-def]
    long_text = "token " * 100
    with pytest.raises(TooLarge, match=r"row 0: input is \d+ tokens, more than max_length 16"):
        EmbedTokenization(qwen_tokenizer, 16, "reject", ENDOFTEXT).encode([long_text])
    (cut,) = EmbedTokenization(qwen_tokenizer, 16, "truncate", ENDOFTEXT).encode([long_text])
    assert cut.truncated and len(cut.ids) == 16 and cut.ids[-1] == ENDOFTEXT
    assert cut.ids[:15] == qwen_tokenizer(long_text)["input_ids"][:15]


def test_bert_truncation_keeps_its_special_tokens(minilm_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    (cut,) = EmbedTokenization(tokenizer, 8, "truncate", None).encode(["one two three four five six seven eight nine"])
    assert len(cut.ids) == 8 and cut.ids[0] == tokenizer.cls_token_id and cut.ids[-1] == tokenizer.sep_token_id


def test_rerank_ids_are_prefix_pair_suffix_and_truncate_the_pair(qwen_tokenizer) -> None:  # type: ignore[no-untyped-def]
    tokenization = RerankTokenization(qwen_tokenizer, 200, "truncate")
    pair = format_rerank_pair("q", "word " * 500, "i")
    (row,) = tokenization.encode([pair])
    assert row.truncated and len(row.ids) == 200
    assert row.ids[: len(tokenization.prefix_ids)] == tokenization.prefix_ids
    assert row.ids[-len(tokenization.suffix_ids) :] == tokenization.suffix_ids
    with pytest.raises(TooLarge, match="more than max_length 200"):
        RerankTokenization(qwen_tokenizer, 200, "reject").encode([pair])


@pytest.mark.parametrize("task", ["embed", "rerank"])
def test_grouped_tokenization_equals_each_group_alone_and_keeps_errors_in_their_group(
    qwen_tokenizer,
    task: str,  # type: ignore[no-untyped-def]
) -> None:
    """One tokenizer call for a dynamic batch of requests: each request gets what it would get alone, and a row
    over max_length fails only its own request, named by its row within that request."""
    if task == "embed":
        tokenization = EmbedTokenization(qwen_tokenizer, 40, "reject", ENDOFTEXT)
        short, long = "a short text", "word " * 60
    else:
        tokenization = RerankTokenization(qwen_tokenizer, 120, "reject")  # type: ignore[assignment]
        short, long = format_rerank_pair("q", "d", "i"), format_rerank_pair("q", "word " * 150, "i")
    groups = [[short, short + " two"], [short, long, long], ["three " + short]]
    results = tokenization.encode_groups(groups)
    assert results[0] == tokenization.encode(groups[0]) and results[2] == tokenization.encode(groups[2])
    assert isinstance(results[1], TooLarge) and str(results[1]).startswith("row 1:")


def test_utf8_and_empty_checks_name_the_row() -> None:
    assert InputError is BadInput  # the request's own mistake: INVALID_ARG (core/errors.py)
    assert decode_utf8([b"ok", "caf\u00e9".encode()], "TEXT") == ["ok", "café"]
    with pytest.raises(InputError, match="TEXT row 1 is not valid UTF-8"):
        decode_utf8([b"ok", b"\xff"], "TEXT")
    with pytest.raises(InputError, match="QUERY row 2 is empty"):
        require_non_empty(["a", "b", " \n"], "QUERY")


def test_a_text_above_the_byte_limit_is_refused_or_cut_before_decoding() -> None:
    """Bytes before tokenizing (issue 23): a value above the limit is refused unread, naming its row, size and the
    limit; where the endpoint truncates it is cut to the limit on a character boundary instead."""
    limit = text_byte_limit(4)
    assert limit == 4 * MAX_BYTES_PER_TOKEN
    fits = "é" * (limit // 2)  # exactly the limit in bytes
    assert decode_utf8([fits.encode()], "TEXT", limit) == [fits]
    with pytest.raises(TooLarge, match=f"TEXT row 1 is {limit + 1:,} bytes, more than the {limit:,}"):
        decode_utf8([b"ok", b"x" * (limit + 1)], "TEXT", limit)
    with pytest.raises(TooLarge, match="QUERY row 0"):
        decode_utf8(["a" * (limit + 1)], "QUERY", limit)  # a str is measured in UTF-8 bytes too
    (cut,) = decode_utf8([("a" + "é" * limit).encode()], "TEXT", limit, cut=True)  # the limit splits an "é"
    assert cut == "a" + "é" * ((limit - 1) // 2) and len(cut.encode()) == limit - 1
    with pytest.raises(InputError, match="not valid UTF-8"):  # a bad byte before the cut is still an error
        decode_utf8([b"\xff" + b"a" * limit], "TEXT", limit, cut=True)

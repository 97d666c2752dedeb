"""End to end on the real tritonserver: qwen_embed and qwen_rerank against the model cards' recipes on the same
(tiny, random) weights, batching invariance, concurrency, bad input and a perf_analyzer smoke run."""

from __future__ import annotations

import concurrent.futures
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests import reference
from tests.harness import PROJECT_ROOT, RunningServer, embed, process_memory, rerank, strings
from triton_rag.triton.router.memory import stub_pids

pytestmark = pytest.mark.server

DIM = 64  # the tiny model's hidden size: embed.dim 2000 is clamped to it

TEXTS = [
    "The capital of France is Paris.",
    "Qwen3 embeddings use last-token pooling.",
    "short",
    "A much longer passage about retrieval-augmented generation, where a retriever finds documents and a reranker "
    "orders them before a language model reads the best ones. " * 3,
    "Ünïcödé text — with emoji 🚀 and CJK 文字.",
    "Numbers 1234567890 and symbols !@#$%^&*()",
]


def test_embeddings_match_model_card_recipe(qwen_server: RunningServer, tiny_embed_dir: Path) -> None:
    ours = embed(qwen_server, TEXTS)
    expected = reference.qwen3_embed(tiny_embed_dir, TEXTS, DIM).numpy()
    assert ours.dtype == np.float16 and ours.shape == (len(TEXTS), DIM)
    np.testing.assert_allclose(ours.astype(np.float32), expected, atol=2e-3, rtol=0)
    # The texts are distinguishable (the comparison above is not between near-identical vectors).
    assert np.max(np.abs(expected[0] - expected[1])) > 0.05


def test_query_embeddings_use_the_instruction_format(qwen_server: RunningServer, tiny_embed_dir: Path) -> None:
    task = "Given a web search query, retrieve relevant passages that answer the query"
    ours = embed(qwen_server, TEXTS[:3], instruction=task)
    expected = reference.qwen3_embed(tiny_embed_dir, TEXTS[:3], DIM, instruction=task).numpy()
    np.testing.assert_allclose(ours.astype(np.float32), expected, atol=2e-3, rtol=0)
    as_documents = embed(qwen_server, TEXTS[:3])
    assert np.max(np.abs(as_documents.astype(np.float32) - expected)) > 0.05


def test_rerank_scores_match_model_card_recipe(qwen_server: RunningServer, tiny_rerank_dir: Path) -> None:
    pairs = [(TEXTS[i], TEXTS[j]) for i in range(4) for j in range(3)]
    ours = rerank(qwen_server, pairs)
    expected = reference.qwen3_rerank(tiny_rerank_dir, pairs).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-3, rtol=0)
    assert expected.max() - expected.min() > 0.05, "scores should spread, else the comparison proves little"
    custom = "Judge whether the document is written in English"
    ours_custom = rerank(qwen_server, pairs[:4], instruction=custom)
    expected_custom = reference.qwen3_rerank(tiny_rerank_dir, pairs[:4], instruction=custom).numpy()
    np.testing.assert_allclose(ours_custom, expected_custom, atol=1e-3, rtol=0)


def mixed_texts(count: int) -> list[str]:
    rng = np.random.default_rng(7)
    words = "retrieval rerank embedding vector index query passage document model token".split()
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 120)))) for _ in range(count)]


def test_a_text_alone_and_inside_a_batch_of_16_agree(qwen_server: RunningServer) -> None:
    texts = mixed_texts(16)
    batched = embed(qwen_server, texts)
    for index in (0, 5, 15):
        alone = embed(qwen_server, [texts[index]])
        np.testing.assert_allclose(alone[0].astype(np.float32), batched[index].astype(np.float32), atol=2e-3)
    pairs = [(texts[0], t) for t in texts]
    scores = rerank(qwen_server, pairs)
    for index in (0, 7, 15):
        assert abs(rerank(qwen_server, [pairs[index]])[0] - scores[index]) < 1e-4


def test_64_concurrent_requests_are_all_answered_correctly(qwen_server: RunningServer) -> None:
    texts = mixed_texts(64)
    expected = embed(qwen_server, texts[:32]), embed(qwen_server, texts[32:])
    expected_all = np.concatenate(expected)

    def one(index: int) -> np.ndarray:
        if index % 4 == 3:  # interleave rerank traffic
            return rerank(qwen_server, [(texts[index], texts[0])])
        return embed(qwen_server, [texts[index]])[0]

    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(one, range(64)))
    for index, result in enumerate(results):
        if index % 4 == 3:
            assert 0.0 <= float(result[0]) <= 1.0
        else:
            np.testing.assert_allclose(result.astype(np.float32), expected_all[index].astype(np.float32), atol=2e-3)


def assert_rejected(server: RunningServer, model: str, inputs: list[grpcclient.InferInput], needle: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        server.client().infer(model, inputs)
    assert needle in str(info.value), str(info.value)


def test_bad_input_gets_a_clear_error_and_the_server_carries_on(qwen_server: RunningServer) -> None:
    ints = grpcclient.InferInput("TEXT", [1, 1], "INT32")
    ints.set_data_from_numpy(np.array([[5]], dtype=np.int32))
    assert_rejected(qwen_server, "qwen_embed", [ints], "TEXT")  # wrong dtype, refused by Triton
    wide = grpcclient.InferInput("TEXT", [1, 2], "BYTES")
    wide.set_data_from_numpy(np.array([[b"a", b"b"]], dtype=object))
    assert_rejected(qwen_server, "qwen_embed", [wide], "TEXT")  # wrong shape
    assert_rejected(qwen_server, "qwen_embed", [strings("TEXT", ["fine", "  "])], "TEXT row 1 is empty")
    assert_rejected(qwen_server, "qwen_embed", [strings("TEXT", [b"\xff\xfe bad"])], "not valid UTF-8")
    assert_rejected(qwen_server, "qwen_embed", [strings("TEXT", ["word " * 600])], "more than max_length 512")
    # bytes before tokenizing: 50 MB is refused unread (512 tokens x 32 bytes), not tokenized in full first
    huge = "word " * (10 * 2**20)
    assert_rejected(qwen_server, "qwen_embed", [strings("TEXT", [huge])], "TEXT row 0 is 52,428,800 bytes, more than")
    too_big = [strings("QUERY", ["q"]), strings("DOCUMENT", [huge])]
    assert_rejected(qwen_server, "qwen_rerank", too_big, "DOCUMENT row 0 is 52,428,800 bytes, more than the 16,384")
    assert_rejected(qwen_server, "qwen_embed", [strings("TEXT", ["x"] * 65)], "batch")  # above max_batch_size 64
    assert_rejected(qwen_server, "qwen_rerank", [strings("QUERY", ["q"]), strings("DOCUMENT", [""])], "DOCUMENT")
    assert_rejected(qwen_server, "qwen_rerank", [strings("QUERY", ["q"])], "DOCUMENT")  # missing input
    assert_rejected(qwen_server, "qwen_rerank", [strings("QUERY", ["q"]), strings("DOCUMENT", ["d " * 600])], "512")
    # Straight to the encoder (loaded by the router for this request): token ids outside the vocabulary are refused,
    # not crashed on.
    embed(qwen_server, ["load the encoder"])
    ids = grpcclient.InferInput("INPUT_IDS", [1, 2], "INT64")
    ids.set_data_from_numpy(np.array([[1, 10**9]], dtype=np.int64))
    mask = grpcclient.InferInput("ATTENTION_MASK", [1, 2], "INT64")
    mask.set_data_from_numpy(np.ones((1, 2), dtype=np.int64))
    assert_rejected(qwen_server, "qwen_embed_encoder", [ids, mask], "token ids must lie in")
    # The next good request is answered.
    assert embed(qwen_server, ["still alive"]).shape == (1, DIM)
    assert rerank(qwen_server, [("still", "alive")]).shape == (1,)


def test_the_endpoints_memory_comes_back_after_their_largest_requests(qwen_server: RunningServer) -> None:
    """Issue 23: after the largest requests an endpoint accepts (a full batch of texts of ~max_length tokens: 64 to
    embed, 16 pairs to rerank) and the largest it refuses after tokenizing (a full batch at the byte limit), each
    endpoint stub's RSS is within 20% of its baseline."""
    server_pid = qwen_server.server.process.pid  # type: ignore[union-attr]
    longest = "word " * 400  # ~400 tokens: under max_length 512 with the rerank prompt and a 20-word query
    at_byte_limit = "x" * (512 * 32)  # tokenized, then refused for its length
    embed(qwen_server, ["warm"])
    rerank(qwen_server, [("warm", "up")])
    stubs = {name: stub_pids(name, server_pid)[0] for name in ("qwen_embed", "qwen_rerank")}
    baseline = {name: process_memory(pid)["VmRSS"] for name, pid in stubs.items()}
    for _ in range(5):
        assert embed(qwen_server, [longest] * 64).shape == (64, DIM)
        assert rerank(qwen_server, [("query " * 20, longest)] * 16).shape == (16,)
        assert_rejected(qwen_server, "qwen_embed", [strings("TEXT", [at_byte_limit] * 64)], "max_length 512")
        pairs = [strings("QUERY", ["q"] * 16), strings("DOCUMENT", [at_byte_limit] * 16)]
        assert_rejected(qwen_server, "qwen_rerank", pairs, "512")
    for name, pid in stubs.items():
        after = process_memory(pid)["VmRSS"]
        print(f"{name} stub RSS: baseline {baseline[name] >> 20} MiB, after {after >> 20} MiB")
        assert after <= 1.2 * baseline[name], f"{name}: {baseline[name] >> 20} -> {after >> 20} MiB"


def test_a_bad_request_does_not_fail_its_batch_mates(qwen_server: RunningServer) -> None:
    """Requests that fail when read (bad UTF-8) or when the batch is tokenized together (too long) get their own
    errors; their batch mates are answered."""
    client = qwen_server.client()
    good = [strings("TEXT", ["good text"])]
    bad_utf8, too_long = [strings("TEXT", [b"\xc3\x28"])], [strings("TEXT", ["fine", "word " * 600])]
    requests = [good, bad_utf8, good, too_long] * 6
    with concurrent.futures.ThreadPoolExecutor(max_workers=24) as pool:
        futures = [pool.submit(client.infer, "qwen_embed", request) for request in requests]
    for request, future in zip(requests, futures, strict=True):
        if request is bad_utf8:
            with pytest.raises(InferenceServerException, match="UTF-8"):
                future.result()
        elif request is too_long:
            with pytest.raises(InferenceServerException, match="row 1: input is .* more than max_length 512"):
                future.result()
        else:
            assert future.result().as_numpy("EMBEDDING").shape == (1, DIM)


def test_perf_analyzer_runs_against_qwen_embed_without_errors(qwen_server: RunningServer, tmp_path: Path) -> None:
    perf_analyzer = PROJECT_ROOT / ".cache" / "bin" / "perf_analyzer"
    assert perf_analyzer.exists(), "run `make test-tools` (make test does) to install perf_analyzer"
    embed(qwen_server, ["load the encoder"])  # not inside perf_analyzer's measurement window
    data = tmp_path / "input.json"
    data.write_text('{"data": [{"TEXT": ["what is retrieval augmented generation?"]}]}')
    result = subprocess.run(
        [
            str(perf_analyzer),
            "-m",
            "qwen_embed",
            "-u",
            qwen_server.server.grpc_url,
            "-i",
            "grpc",
            "-b",
            "8",
            "--input-data",
            str(data),
            "--concurrency-range",
            "1:2",
            "--measurement-interval",
            "1500",
            "--max-trials",
            "4",
            "--stability-percentage",
            "999",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Concurrency: 2" in output and "throughput" in output.lower(), output
    assert "error" not in output.lower(), output

"""A BERT-family embedder (all-MiniLM-L6-v2, mean pooling) through the same backends, against sentence-transformers."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.harness import RunningServer
from tests.test_server_qwen import TEXTS, embed

pytestmark = pytest.mark.server


def test_minilm_through_our_pipeline_matches_sentence_transformers(
    minilm_server: RunningServer, minilm_dir: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_dir), device="cpu").encode(TEXTS, normalize_embeddings=True)
    ours = embed(minilm_server, TEXTS).astype(np.float32)
    assert ours.shape == (len(TEXTS), 384)  # embed.dim 2000 clamped to the model's hidden size
    cosines = np.sum(ours * reference, axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosines.min() >= 0.9999, cosines
    # Real semantics: related sentences are closer than unrelated ones.
    related = embed(minilm_server, ["A cat sits on the mat.", "A kitten is sitting on a rug.", "GDP rose 3%."])
    related = related.astype(np.float32)
    assert related[0] @ related[1] > related[0] @ related[2] + 0.2


def test_fp32_embeddings_come_back_as_json_over_plain_http(minilm_server: RunningServer) -> None:
    """`embed.output_dtype = "fp32"`: Triton's HTTP/JSON returns the embedding itself (it has no JSON for FP16), so the
    README's curl works: the same request body, sent with the standard library's HTTP client."""
    body = {"inputs": [{"name": "TEXT", "shape": [2, 1], "datatype": "BYTES", "data": TEXTS[:2]}]}
    request = urllib.request.Request(
        f"http://{minilm_server.server.http_url}/v2/models/qwen_embed/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    outputs = {output["name"]: output for output in answer["outputs"]}
    embedding = outputs["EMBEDDING"]
    assert embedding["datatype"] == "FP32" and embedding["shape"] == [2, 384]
    rows = np.array(embedding["data"], dtype=np.float32).reshape(2, 384)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(rows, embed(minilm_server, TEXTS[:2]), atol=1e-6)  # the gRPC client's answer
    assert outputs["TRUNCATED"]["data"] == [False, False]

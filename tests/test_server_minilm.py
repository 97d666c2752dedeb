"""A BERT-family embedder (all-MiniLM-L6-v2, mean pooling) through the same backends, against sentence-transformers."""

from __future__ import annotations

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

"""What turns encoder outputs into endpoint outputs: Matryoshka truncation plus normalisation, and rerank scores."""

from __future__ import annotations

import numpy as np


def matryoshka_normalize(pooled: np.ndarray, dim: int, dtype: type[np.floating] = np.float16) -> np.ndarray:
    """Keep the first `dim` features, then L2-normalise (Qwen3-Embedding MRL): rows of unit length in `dtype`."""
    head = pooled[:, :dim].astype(np.float32)
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    return (head / np.maximum(norms, 1e-12)).astype(dtype)


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of `a` with the same row of `b` (how close two encoders' outputs are)."""
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def yes_probability(logits_no_yes: np.ndarray) -> np.ndarray:
    """softmax([no, yes])[yes], computed as sigmoid(yes - no) in float64 for stability; shape [rows, 1]."""
    diff = logits_no_yes[:, 1].astype(np.float64) - logits_no_yes[:, 0].astype(np.float64)
    return (1.0 / (1.0 + np.exp(-diff))).astype(np.float32).reshape(-1, 1)

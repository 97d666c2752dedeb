"""What the encoder engines (PyTorch, TensorRT-RTX) and the VLM engine share: device and dtype choice, pooling,
and the checks on an encoder request's tensors (a bad tensor is the client's error, raised before any work)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Pooling = Literal["last_token", "mean"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def choose_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def choose_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[requested]


def last_real_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token; works for left and right padding alike."""
    width = mask.shape[1]
    return (width - 1) - torch.argmax(torch.flip(mask, dims=[1]), dim=1)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    if pooling == "last_token":
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_real_positions(mask)]
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def validate_encoder_inputs(
    input_ids: np.ndarray, attention_mask: np.ndarray, vocab_size: int, max_positions: int | None = None
) -> None:
    """Reject what would otherwise fail deep inside an engine (or trip a device assert on CUDA)."""
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"INPUT_IDS {list(input_ids.shape)} and ATTENTION_MASK {list(attention_mask.shape)} "
            "must both be [rows, tokens] of the same shape"
        )
    if input_ids.size == 0:
        raise ValueError("empty batch")
    if input_ids.min() < 0 or input_ids.max() >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size})")
    if not np.isin(attention_mask, (0, 1)).all():
        raise ValueError("ATTENTION_MASK must hold only 0 and 1")
    if (attention_mask.sum(axis=1) == 0).any():
        raise ValueError("every row needs at least one real token")
    if max_positions is not None and input_ids.shape[1] > max_positions:
        raise ValueError(f"rows longer than the model's {max_positions} positions")


def real_spans(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of each row's real tokens; ValueError unless they are one contiguous run (left or right
    padding, as every tokenizer pads)."""
    starts = mask[:, 0] + (np.diff(mask, axis=1) == 1).sum(axis=1)
    if (starts != 1).any():
        raise ValueError("ATTENTION_MASK must mark one contiguous run of real tokens per row (left or right padding)")
    return np.argmax(mask, axis=1), mask.sum(axis=1)

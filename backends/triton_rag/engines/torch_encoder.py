"""PyTorch engine behind the encoder contract: token ids in, one small pooled row (or two logits) out.

Runs on CUDA when present, else on the CPU. The transformer is transformers' own implementation of the checkpoint's
architecture, so the numbers are the reference's; only pooling and the reranker head are ours, and they keep the
output small: the reranker reads just the two LM-head rows it needs instead of the whole vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors import safe_open

from triton_rag.engines.fp8 import convert_linears
from triton_rag.precision import Device, choose_precision

#: What this engine has kernels for (NVFP4 GEMMs come with TensorRT plans, issue 6).
ENGINE_PRECISIONS = frozenset({"fp8", "bfloat16", "float32"})

Task = Literal["embed", "rerank"]
Pooling = Literal["last_token", "mean"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def choose_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def choose_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[requested]


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


def read_lm_head_rows(model_dir: Path, token_ids: list[int]) -> torch.Tensor | None:
    """The given rows of `lm_head.weight` from the checkpoint, or None when the head is tied to the embeddings."""
    index_file = model_dir / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        if "lm_head.weight" not in weight_map:
            return None
        files = [model_dir / weight_map["lm_head.weight"]]
    else:
        files = [model_dir / "model.safetensors"]
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            if "lm_head.weight" not in handle.keys():
                return None
            head = handle.get_slice("lm_head.weight")
            return torch.stack([head[i : i + 1][0] for i in token_ids])
    return None


class TorchEncoder:
    """One loaded encoder; `forward` maps INT64 ids and mask to float32 POOLED rows or [no, yes] LOGITS."""

    def __init__(
        self,
        model_dir: Path,
        task: Task,
        pooling: Pooling = "last_token",
        dtype: str = "auto",
        device: str = "auto",
        yes_no_ids: tuple[int, int] | None = None,
        precision: str = "auto",
        log: Callable[[str], None] = print,
        compile_model: bool = False,
    ) -> None:
        from transformers import AutoModel

        self.task = task
        self.pooling = pooling
        self.device = choose_device(device)
        self.precision, reasons = choose_precision(
            precision,  # type: ignore[arg-type]
            Device(torch.cuda.get_device_capability(self.device) if self.device.type == "cuda" else None),
            ENGINE_PRECISIONS,
        )
        for reason in reasons:
            log(f"precision: {reason}")
        # FP8 quantizes bfloat16 weights; an explicit precision is the dtype; "auto" leaves it to `dtype`
        if self.precision == "fp8":
            self.dtype = torch.bfloat16
        elif precision == "auto":
            self.dtype = choose_dtype(dtype, self.device)
        else:
            self.dtype = _DTYPES[self.precision]
        model = AutoModel.from_pretrained(str(model_dir), dtype=self.dtype, attn_implementation="sdpa")
        self.model = model.to(self.device).eval()
        if self.precision == "fp8":
            log(f"precision: fp8, {convert_linears(self.model)} linear layers quantized rowwise")
        if compile_model and self.device.type == "cuda":  # fuses FP8 activation quantization into its producers
            self.model = torch.compile(self.model, dynamic=True)
        self.vocab_size = int(model.config.vocab_size)
        self.hidden_size = int(model.config.hidden_size)
        self.head: torch.Tensor | None = None
        if task == "rerank":
            if yes_no_ids is None:
                raise ValueError("the reranker needs the token ids of 'no' and 'yes'")
            rows = read_lm_head_rows(Path(model_dir), list(yes_no_ids))
            if rows is None:  # tied head: the rows are the input embeddings
                rows = model.get_input_embeddings().weight[list(yes_no_ids)].detach()
            self.head = rows.to(device=self.device, dtype=self.dtype)

    def validate(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
        """Reject what would otherwise fail deep inside torch (or trip a device assert on CUDA)."""
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"INPUT_IDS {list(input_ids.shape)} and ATTENTION_MASK {list(attention_mask.shape)} "
                "must both be [rows, tokens] of the same shape"
            )
        if input_ids.size == 0:
            raise ValueError("empty batch")
        if input_ids.min() < 0 or input_ids.max() >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        if not np.isin(attention_mask, (0, 1)).all():
            raise ValueError("ATTENTION_MASK must hold only 0 and 1")
        if (attention_mask.sum(axis=1) == 0).any():
            raise ValueError("every row needs at least one real token")

    @torch.inference_mode()
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self.validate(input_ids, attention_mask)
        ids = torch.from_numpy(np.ascontiguousarray(input_ids)).to(self.device)
        mask = torch.from_numpy(np.ascontiguousarray(attention_mask)).to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.task == "embed":
            out = pool(hidden, mask, self.pooling)
        else:
            assert self.head is not None
            out = pool(hidden, mask, "last_token") @ self.head.T
        return out.float().cpu().numpy()

"""Encoders to ONNX with the same tensor contract as the PyTorch engine, and the parity check with onnxruntime.

The exported graph is what a TensorRT build starts from (issue 6): integer ids and mask in (INT64, dynamic batch
and sequence axes), the pooled row out (embeddings: the last real token's hidden state) or the reranker's two
logits (the "no"/"yes" rows of the LM head only, never the vocabulary). It is the engine's own module
(`TorchEncoder.transformers_model()`, transformers' masked forward of the same checkpoint, and
`TorchEncoder.head`) wrapped with the engine's own pooling, so the two cannot drift; the parity check holds the
engine's own packed decoder to the exported graph.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from triton_rag import contract
from triton_rag.core.postprocess import row_cosine
from triton_rag.engines.encoder_common import pool
from triton_rag.engines.torch_encoder import TorchEncoder

_log = logging.getLogger(__name__)

#: The legacy TorchScript exporter: no extra dependency (onnxscript), dynamic axes by name, opset 18.
OPSET = 18


def additive_causal_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[rows, 1, tokens, tokens] in the model's dtype: 0 where a token may attend (itself and earlier real tokens), a
    large negative elsewhere. Built here, not by transformers, so that a float16 graph stays float16: the exporter's
    attention turns a boolean mask into a float32 one, which promotes the scores, softmax and o_proj to float32. Half
    the dtype's minimum, so that adding a score cannot overflow to -inf (a row of -inf would be NaN)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    allowed = (positions[None, :] <= positions[:, None])[None, None] & mask.bool()[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min / 2)


class _Contract(nn.Module):
    """INPUT_IDS, ATTENTION_MASK -> POOLED (embed) or LOGITS (rerank), as the engine computes them. The argument
    names are the contract's: exporters that name inputs after the signature (ModelOpt's) keep them."""

    def __init__(self, engine: TorchEncoder) -> None:
        super().__init__()
        self.model = engine.transformers_model()
        # float16 only: the float32 graph (and the FP8 and NVFP4 graphs made from it) keeps transformers' own mask,
        # whose attention MatMuls ModelOpt's FP8 recipe quantizes like the others (with the additive mask it leaves
        # them out: 14 quantized MatMuls instead of 18 in the tiny encoders)
        self.additive_mask = engine.causal and engine.dtype == torch.float16
        self.dtype = engine.dtype
        self.pooling = engine.pooling if engine.task == "embed" else "last_token"
        self.head = None if engine.head is None else nn.Parameter(engine.head.detach().float(), requires_grad=False)

    def forward(self, INPUT_IDS: torch.Tensor, ATTENTION_MASK: torch.Tensor) -> torch.Tensor:  # noqa: N803
        mask = additive_causal_mask(ATTENTION_MASK, self.dtype) if self.additive_mask else ATTENTION_MASK
        hidden = self.model(input_ids=INPUT_IDS, attention_mask=mask).last_hidden_state
        # pooled in float32, the contract's output type (a float16 mean over thousands of tokens could overflow)
        pooled = pool(hidden.float(), ATTENTION_MASK, self.pooling)
        return pooled if self.head is None else pooled @ self.head.T


def contract_module(engine: TorchEncoder) -> nn.Module:
    """The engine's model with its pooling (and reranker head) as one module in the contract's tensor names."""
    return _Contract(engine).eval()


def output_name(engine: TorchEncoder) -> str:
    return "POOLED" if engine.task == "embed" else "LOGITS"


def export_encoder(engine: TorchEncoder, path: Path, log: Callable[[str], None] = _log.info) -> Path:
    """Write `engine` (float32 or float16, CPU) as ONNX at `path`; the input and output names and types are the
    encoder contract's. A float16 engine gives the FP16 graph of the plan chain's last step: the model's own code
    keeps its float32 islands (RMSNorm's variance), which a blanket float32 -> float16 graph conversion would not."""
    if engine.dtype not in (torch.float32, torch.float16) or engine.device.type != "cpu":
        raise ValueError("export from a float32 or float16 CPU engine (TorchEncoder(dtype=..., device='cpu'))")
    names = [spec.name for spec in contract.embed_encoder(1).inputs]
    sample = (torch.tensor([[100, 200, 300, 400], [5, 6, 7, 8]]), torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]))
    axes = {name: {0: "rows", 1: "tokens"} for name in names} | {output_name(engine): {0: "rows"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"exporting the {engine.task} encoder to {path} (opset {OPSET})")
    with torch.inference_mode():
        torch.onnx.export(
            contract_module(engine),
            sample,
            str(path),
            input_names=names,
            output_names=[output_name(engine)],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    return path


def parity(engine: TorchEncoder, path: Path, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """(smallest cosine, largest absolute difference) between the engine's rows and onnxruntime's on the same
    batches (CPU, float32). The cosine speaks for embeddings, the difference for the reranker's two logits."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst_cosine, worst_difference = 1.0, 0.0
    for ids, mask in batches:
        expected = engine.forward(ids, mask)
        (got,) = session.run(None, {"INPUT_IDS": ids, "ATTENTION_MASK": mask})
        worst_cosine = min(worst_cosine, float(row_cosine(expected, got).min()))
        worst_difference = max(worst_difference, float(np.abs(expected - got).max()))
    return worst_cosine, worst_difference


def sample_batches(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batches of other shapes than the export sample, left- and right-padded: what dynamic axes must handle."""
    rng = np.random.default_rng(seed)
    batches = []
    for rows, tokens in ((1, 3), (3, 17), (8, 64)):
        ids = rng.integers(100, 100000, size=(rows, tokens)).astype(np.int64)
        mask = np.ones_like(ids)
        if rows > 1:
            mask[0, : tokens // 3] = 0  # left padding
            mask[-1, tokens - tokens // 4 :] = 0  # right padding
        batches.append((ids, mask))
    return batches

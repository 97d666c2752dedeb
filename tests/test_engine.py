"""The PyTorch engine in-process against transformers on the same weights (CPU here; CUDA paths: same code)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from triton_rag.batching import pad_rows
from triton_rag.engines.torch_encoder import TorchEncoder, last_real_positions, read_lm_head_rows
from triton_rag.offline import TINY_QWEN3


def test_last_real_position_for_left_and_right_padding() -> None:
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_real_positions(mask).tolist() == [1, 3, 3]


def test_reranker_head_reads_only_the_yes_no_rows(tiny_rerank_dir: Path) -> None:
    full = AutoModelForCausalLM.from_pretrained(str(tiny_rerank_dir), dtype=torch.float32)
    rows = read_lm_head_rows(tiny_rerank_dir, [2152, 9693])
    assert rows is not None and torch.equal(rows, full.lm_head.weight[[2152, 9693]])
    encoder = TorchEncoder(tiny_rerank_dir, "rerank", yes_no_ids=(2152, 9693))
    ids, mask = pad_rows([[100, 200, 300, 400], [5, 6]], pad_id=151643)
    logits = encoder.forward(ids, mask)
    with torch.no_grad():
        rows = ([100, 200, 300, 400], [5, 6])
        expected = torch.stack([full(input_ids=torch.tensor([row])).logits[0, -1, [2152, 9693]] for row in rows])
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4)


def test_tied_head_uses_the_input_embeddings(tmp_path: Path) -> None:
    config = Qwen3Config(**(TINY_QWEN3 | {"vocab_size": 1000}), tie_word_embeddings=True)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(str(tmp_path))
    assert read_lm_head_rows(tmp_path, [1, 2]) is None
    encoder = TorchEncoder(tmp_path, "rerank", yes_no_ids=(1, 2))
    assert encoder.head is not None
    assert torch.equal(encoder.head, model.get_input_embeddings().weight[[1, 2]].detach())


def test_encoder_refuses_malformed_tensors(tiny_embed_dir: Path) -> None:
    encoder = TorchEncoder(tiny_embed_dir, "embed")
    ids = np.array([[1, 2, 3]], dtype=np.int64)
    for bad_ids, bad_mask, message in [
        (ids, np.ones((1, 2), dtype=np.int64), "same shape"),
        (np.array([[1, -5, 3]]), np.ones((1, 3), dtype=np.int64), "token ids must lie"),
        (ids, np.array([[1, 2, 1]]), "only 0 and 1"),
        (ids, np.zeros((1, 3), dtype=np.int64), "at least one real token"),
    ]:
        try:
            encoder.forward(bad_ids, bad_mask)
        except ValueError as exc:
            assert message in str(exc)
        else:
            raise AssertionError(f"accepted input that should fail with {message!r}")

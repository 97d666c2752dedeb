"""The PyTorch engine in-process against transformers on the same weights (CPU here; CUDA paths: same code)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from triton_rag.build.offline import TINY_QWEN3
from triton_rag.core.batching import pad_rows
from triton_rag.engines.checkpoint import read_lm_head_rows
from triton_rag.engines.encoder_common import last_real_positions
from triton_rag.engines.torch_encoder import TorchEncoder


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


def _alone(model_dir: Path, rows: list[list[int]], pooling: str) -> np.ndarray:
    """transformers' forward on each row alone (no padding at all), pooled as the model cards say."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = [model(input_ids=torch.tensor([row])).last_hidden_state[0] for row in rows]
    return torch.stack([h[-1] if pooling == "last_token" else h.mean(dim=0) for h in hidden]).numpy()


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = pad_rows([row[::-1] for row in rows], pad_id)
    return ids[:, ::-1].copy(), mask[:, ::-1].copy()


ROWS = [[7 + i for i in range(n)] for n in (3, 40, 17, 5, 38, 1, 64, 16)]


@pytest.mark.parametrize("pooling", ["last_token", "mean"])
@pytest.mark.parametrize("use_graphs", [False, True])
def test_causal_loop_equals_each_row_alone_for_either_padding(
    tiny_embed_dir: Path, pooling: str, use_graphs: bool
) -> None:
    """Right-aligned rows, causal-only attention, length-planned groups and (with use_graphs) the padded static
    shapes of the CUDA-graph path, run eagerly here: every row equals transformers on that row alone."""
    encoder = TorchEncoder(tiny_embed_dir, "embed", pooling=pooling, use_graphs=use_graphs)  # type: ignore[arg-type]
    assert encoder.causal and encoder.use_graphs == use_graphs
    expected = _alone(tiny_embed_dir, ROWS, pooling)
    for ids, mask in (pad_rows(ROWS, pad_id=151643), _left_pad(ROWS, pad_id=151643)):
        np.testing.assert_allclose(encoder.forward(ids, mask), expected, atol=2e-5, rtol=1e-4)
    single = encoder.forward(np.array([ROWS[2]]), np.ones((1, len(ROWS[2])), dtype=np.int64))
    np.testing.assert_allclose(single[0], expected[2], atol=2e-5, rtol=1e-4)
    if use_graphs:  # the static shapes were the power-of-two ones
        assert set(encoder._graphs) <= {(r, w) for r in (1, 2, 4, 8) for w in (16, 32, 64)}
        assert encoder._graphs


@pytest.mark.parametrize("pooling", ["last_token", "mean"])
def test_packed_passes_equal_each_row_alone(tiny_embed_dir: Path, pooling: str) -> None:
    """A pass budget smaller than the batch: several packed passes, the 64-token row alone in one; every row still
    equals transformers on that row alone (a segment that saw its neighbours would not)."""
    encoder = TorchEncoder(tiny_embed_dir, "embed", pooling=pooling, use_graphs=False, max_batch_tokens=60)  # type: ignore[arg-type]
    np.testing.assert_allclose(
        encoder.forward(*_left_pad(ROWS, 151643)), _alone(tiny_embed_dir, ROWS, pooling), atol=2e-5, rtol=1e-4
    )


def test_reranker_loop_reads_the_head_at_each_rows_last_token(tiny_rerank_dir: Path) -> None:
    full = AutoModelForCausalLM.from_pretrained(str(tiny_rerank_dir), dtype=torch.float32).eval()
    encoder = TorchEncoder(tiny_rerank_dir, "rerank", yes_no_ids=(2152, 9693), use_graphs=True)
    with torch.no_grad():
        expected = torch.stack([full(input_ids=torch.tensor([row])).logits[0, -1, [2152, 9693]] for row in ROWS])
    np.testing.assert_allclose(encoder.forward(*_left_pad(ROWS, 0)), expected.numpy(), atol=1e-4)


def test_a_mask_with_holes_is_refused(tiny_embed_dir: Path) -> None:
    encoder = TorchEncoder(tiny_embed_dir, "embed")
    with pytest.raises(ValueError, match="one contiguous run"):
        encoder.forward(np.array([[5, 6, 7, 8]]), np.array([[1, 0, 1, 1]]))


def test_a_sleeping_engine_gives_its_weights_back_and_wakes_to_the_same_results(tiny_embed_dir: Path) -> None:
    """The host-RAM tier's engine side on the CPU: the arena's storage is emptied by sleep and refilled by wake."""
    encoder = TorchEncoder(tiny_embed_dir, "embed", dtype="float32", device="cpu", sleepable=True)
    assert encoder.arena is not None
    ids = np.array([[5, 17, 300, 2], [0, 0, 9, 12]])
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])
    expected = encoder.forward(ids, mask)
    weights = sum(p.numel() * p.element_size() for p in encoder.model.parameters())
    assert encoder.arena.nbytes >= weights
    state = encoder.sleep()
    assert state["state"] == "asleep" and state["host_bytes"] >= weights
    assert encoder.arena.arena.untyped_storage().nbytes() == 0
    assert encoder.wake()["state"] == "awake"
    np.testing.assert_array_equal(encoder.forward(ids, mask), expected)
    encoder.sleep()
    np.testing.assert_array_equal(encoder.forward(ids, mask), expected)  # a forward while asleep wakes it first
    assert encoder.residency()["state"] == "awake"


def test_a_qwen3_load_does_not_import_transformers(tiny_embed_dir: Path) -> None:
    """What keeps a cold load short (BENCHMARKS.md, issue 13): the stub that loads a Qwen3 encoder does not import
    transformers' modeling stack (~2 s). Checked in a fresh interpreter, as a stub starts."""
    code = (
        "import sys; import numpy as np\n"
        "from triton_rag.engines.torch_encoder import TorchEncoder\n"
        f"encoder = TorchEncoder({str(tiny_embed_dir)!r}, 'embed', log=lambda _: None)\n"
        "encoder.forward(np.array([[5, 6, 7]]), np.ones((1, 3), dtype=np.int64))\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'transformers'))\n"
    )
    backends = str(Path(__file__).parents[1] / "backends")
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"PYTHONPATH": backends},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"

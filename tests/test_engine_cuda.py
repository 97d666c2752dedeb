"""The engine's CUDA-only paths against the float32 reference: FlashAttention over packed rows, compiled layers, CUDA
graphs, FP8 GEMMs. Deselected by default (no GPU on CI); on the GPU machine:

    pytest -m gpu tests/test_engine_cuda.py

The model has the 0.6B encoder's layer shapes (hidden 1024, 16 heads of 128, 8 KV heads, FFN 3072) and 4 layers of
random weights, so bfloat16 and FP8 rounding show at the sizes the kernels really run, in seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen3Config, Qwen3Model

from triton_rag.build.offline import TINY_QWEN3
from triton_rag.core.batching import pad_rows
from triton_rag.engines.checkpoint import load_tensors, stored_tensors
from triton_rag.engines.torch_encoder import TorchEncoder

pytestmark = pytest.mark.gpu

ROWS = [list(np.random.default_rng(n).integers(10, 150000, size=n)) for n in (5, 16, 300, 77, 512, 1, 129, 40)]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need CUDA")
    config = Qwen3Config(
        **(TINY_QWEN3 | dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=16,
                             num_key_value_heads=8, head_dim=128, initializer_range=0.02))
    )  # fmt: skip
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("qwen3-4-layers")
    Qwen3Model(config).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> np.ndarray:
    """Each row alone through the float32 CPU engine (itself equal to transformers, test_engine.py)."""
    encoder = TorchEncoder(model_dir, "embed", dtype="float32", device="cpu")
    return np.concatenate([encoder.forward(np.array([row]), np.ones((1, len(row)), dtype=np.int64)) for row in ROWS])


@pytest.mark.parametrize("precision, floor", [("bfloat16", 0.999), ("fp8", 0.98)])
def test_cuda_engine_alone_and_batched_match_the_reference(
    model_dir: Path, reference: np.ndarray, precision: str, floor: float, tmp_path: Path
) -> None:
    """Packed passes (flash varlen) and graph replays, compiled: every row close to float32, and the same row
    alone (a graph replay) and inside the batch (a packed pass) closer still."""
    encoder = TorchEncoder(
        model_dir, "embed", precision=precision, compile_model=True, max_batch_tokens=600, precompiled_dir=tmp_path
    )
    batched = encoder.forward(*pad_rows(ROWS, 0))
    alone = np.concatenate([encoder.forward(np.array([row]), np.ones((1, len(row)), dtype=np.int64)) for row in ROWS])
    assert _cosines(batched, reference).min() >= floor
    assert _cosines(alone, reference).min() >= floor
    assert _cosines(alone, batched).min() >= 1 - (1 - floor) / 4
    assert encoder._graphs  # the short rows ran as graph replays


def test_a_saved_compiled_layer_is_loaded_and_answers_as_the_compiled_one(
    model_dir: Path, reference: np.ndarray, tmp_path: Path
) -> None:
    """The first load compiles the layer ahead of time into a package and saves it; the next load runs the package
    instead of tracing, and answers as the first did and as the float32 reference, alone (graph replays) and batched
    (packed passes), every layer through the package. A damaged file is compiled again; a 1-token packed pass, below
    the traced sizes, still answers (eagerly)."""
    logs: list[str] = []

    def load(**options: object) -> TorchEncoder:
        logs.clear()
        return TorchEncoder(
            model_dir, "embed", precision="fp8", compile_model=True, max_batch_tokens=600, precompiled_dir=tmp_path,
            log=logs.append, **options,  # type: ignore[arg-type]
        )  # fmt: skip

    def answers(encoder: TorchEncoder) -> tuple[np.ndarray, np.ndarray]:
        alone = [encoder.forward(np.array([row]), np.ones((1, len(row)), dtype=np.int64)) for row in ROWS]
        return encoder.forward(*pad_rows(ROWS, 0)), np.concatenate(alone)

    compiled = load()
    assert any("compiled ahead of time" in line for line in logs), logs
    (saved,) = tmp_path.glob("*.pt2")
    expected = answers(compiled)
    loaded = load()
    assert any(f"loaded from {saved.name}" in line for line in logs), logs
    for got, want in zip(answers(loaded), expected, strict=True):
        assert _cosines(got, want).min() >= 0.9999
        assert _cosines(got, reference).min() >= 0.98
    assert loaded._layer_call.eager_calls == 0  # type: ignore[attr-defined]  # every layer call ran the package

    saved.write_bytes(saved.read_bytes()[:1000])
    packed_only = load(use_graphs=False)
    assert any("unusable" in line for line in logs) and any("compiled ahead of time" in line for line in logs), logs
    one_token = next(index for index, row in enumerate(ROWS) if len(row) == 1)
    single = packed_only.forward(np.array([ROWS[one_token]]), np.ones((1, 1), dtype=np.int64))
    assert _cosines(single, reference[one_token : one_token + 1]).min() >= 0.98
    assert packed_only._layer_call.eager_calls > 0  # type: ignore[attr-defined]  # that pass ran eagerly


def test_the_checkpoint_read_through_pinned_buffers_equals_the_file(model_dir: Path) -> None:
    """Tensors spanning many staging buffers, copied asynchronously while the next buffer fills: every byte lands."""
    expected = load_file(str(model_dir / "model.safetensors"))
    received: dict[str, torch.Tensor] = {}
    keep = lambda stored, tensor: received.setdefault(stored.name, tensor)  # noqa: E731
    load_tensors(stored_tensors(model_dir), torch.device("cuda"), keep, staging_bytes=2**20)
    assert received.keys() == {stored.name for stored in stored_tensors(model_dir)}
    for stored_name, tensor in received.items():
        assert tensor.is_cuda and torch.equal(tensor.cpu(), expected[stored_name]), stored_name

"""The checkpoint reader (staged, multi-threaded reads of safetensors files) and our Qwen3 decoder's loading, against
the safetensors library and transformers on the same files. CPU here; the CUDA path (pinned buffers, asynchronous
copies) runs in tests/test_engine_cuda.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from triton_rag.engines.checkpoint import StoredTensor, _windows, load_tensors, read_rows, stored_tensors
from triton_rag.engines.fp8 import Fp8Embedding, Fp8Linear, convert_linears, quantize_rowwise
from triton_rag.engines.qwen3 import load_qwen3

CPU = torch.device("cpu")


def _layout(sizes_and_gaps: list[tuple[int, int]]) -> list[StoredTensor]:
    tensors, at = [], 100
    for index, (size, gap) in enumerate(sizes_and_gaps):
        at += gap
        tensors.append(StoredTensor(f"t{index}", Path("f"), torch.uint8, (size,), at, at + size))
        at += size
    return tensors


@given(
    st.lists(st.tuples(st.integers(0, 300), st.sampled_from([0, 0, 3, 2**20 + 1])), min_size=1, max_size=12),
    st.integers(1, 256),
)
def test_windows_cover_every_byte_once_in_order(sizes_and_gaps: list[tuple[int, int]], size: int) -> None:
    """Each tensor's bytes come in order, once, from the file offsets where they lie, into a buffer's bounds."""
    tensors = _layout(sizes_and_gaps)
    seen: dict[int, int] = {index: 0 for index in range(len(tensors))}
    finished = []
    for start, length, pieces in _windows(tensors, size):
        assert 0 <= length <= size
        for index, offset, at, count in pieces:
            assert offset == seen[index], "a tensor's bytes out of order or twice"
            assert 0 <= at and at + count <= length
            assert start + at == tensors[index].begin + offset, "a piece read from the wrong file offset"
            seen[index] += count
            if seen[index] == tensors[index].nbytes:
                finished.append(index)
    assert seen == {index: tensor.nbytes for index, tensor in enumerate(tensors)}
    assert finished == list(range(len(tensors))), "every tensor is handed over once, in file order"


def _checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    tensors = {
        "big": torch.randn(300, 129, dtype=torch.bfloat16),  # several staging buffers
        "small": torch.randn(3, dtype=torch.float32),
        "ids": torch.arange(10, dtype=torch.int64),
        "empty": torch.empty(0, 4, dtype=torch.float16),
        "fp8": torch.randn(17, 16).to(torch.float8_e4m3fn),
    }
    save_file(tensors, str(directory / "model.safetensors"))
    return tensors


def test_load_tensors_equals_the_safetensors_library(tmp_path: Path) -> None:
    _checkpoint(tmp_path)
    expected = load_file(str(tmp_path / "model.safetensors"))
    received: dict[str, torch.Tensor] = {}
    total = load_tensors(
        stored_tensors(tmp_path),
        CPU,
        lambda stored, tensor: received.setdefault(stored.name, tensor),
        staging_bytes=4096,
    )
    assert total == sum(tensor.numel() * tensor.element_size() for tensor in expected.values())
    assert received.keys() == expected.keys()
    for name, tensor in expected.items():
        assert received[name].dtype == tensor.dtype and received[name].shape == tensor.shape, name
        assert torch.equal(received[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_a_sharded_checkpoint_is_read_through_its_index(tmp_path: Path) -> None:
    save_file({"a": torch.ones(4)}, str(tmp_path / "one.safetensors"))
    save_file({"b": torch.zeros(2, 2)}, str(tmp_path / "two.safetensors"))
    index = {"weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert [(t.name, t.file.name, t.shape) for t in stored_tensors(tmp_path)] == [
        ("a", "one.safetensors", (4,)),
        ("b", "two.safetensors", (2, 2)),
    ]


def test_a_truncated_or_missing_checkpoint_fails_with_its_name(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        stored_tensors(tmp_path)
    _checkpoint(tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        stored_tensors(tmp_path)
    file.write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        stored_tensors(tmp_path)


def _copy_model(source: Path, destination: Path, change: dict[str, torch.Tensor | None]) -> Path:
    destination.mkdir()
    (destination / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(str(source / "model.safetensors")) | change
    save_file({name: t for name, t in tensors.items() if t is not None}, str(destination / "model.safetensors"))
    return destination


def test_a_checkpoint_that_does_not_fit_the_decoder_is_refused(tiny_embed_dir: Path, tmp_path: Path) -> None:
    extra = _copy_model(tiny_embed_dir, tmp_path / "extra", {"layers.0.mlp.extra.weight": torch.ones(2)})
    with pytest.raises(ValueError, match="not part of a Qwen3 decoder"):
        load_qwen3(extra, CPU, torch.float32, log=lambda _: None)
    missing = _copy_model(tiny_embed_dir, tmp_path / "missing", {"norm.weight": None})
    with pytest.raises(ValueError, match="lacks 1 decoder tensors, e.g. norm.weight"):
        load_qwen3(missing, CPU, torch.float32, log=lambda _: None)
    wider = _copy_model(tiny_embed_dir, tmp_path / "wider", {"norm.weight": torch.ones(7)})
    with pytest.raises(ValueError, match=r"norm.weight is \[7\], the config says"):
        load_qwen3(wider, CPU, torch.float32, log=lambda _: None)


def test_fp8_quantized_as_it_loads_equals_quantized_afterwards(tiny_rerank_dir: Path) -> None:
    """The loader quantizes each linear weight as it lands (the device never holds the bfloat16 model); the result
    is the same layers, bit for bit, as quantizing the loaded model (the emulated FP8 arithmetic on a CPU)."""
    quiet = lambda _: None  # noqa: E731
    at_load = load_qwen3(tiny_rerank_dir, CPU, torch.bfloat16, precision="fp8", log=quiet)
    afterwards = load_qwen3(tiny_rerank_dir, CPU, torch.bfloat16, log=quiet)
    assert convert_linears(afterwards) == 7 * afterwards.shape.layers
    table, table_scale = quantize_rowwise(afterwards.embed_tokens.weight)  # the table too, as it lands (in chunks)
    expected = dict(afterwards.state_dict()) | {"embed_tokens.weight": table, "embed_tokens.weight_scale": table_scale}
    loaded = at_load.state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in loaded.items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor.float(), expected[name].float()), name
    assert sum(isinstance(module, Fp8Linear) for module in at_load.modules()) == 7 * at_load.shape.layers
    assert isinstance(at_load.embed_tokens, Fp8Embedding)


def test_rows_are_read_alone_and_a_row_out_of_range_is_refused(tmp_path: Path) -> None:
    tensors = _checkpoint(tmp_path)
    (big,) = [stored for stored in stored_tensors(tmp_path) if stored.name == "big"]
    rows = read_rows(big, [299, 0, 7])
    assert rows.dtype == torch.bfloat16 and torch.equal(rows, tensors["big"][[299, 0, 7]])
    with pytest.raises(ValueError, match="has 300 rows, not a row 300"):
        read_rows(big, [300])

"""The host-RAM tier on a GPU: an engine's weights leave the device and come back at the same addresses, so its
compiled layers and CUDA graphs keep working. Deselected by default (no GPU on CI); on the GPU machine:

    pytest -m gpu tests/test_weight_arena_cuda.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen3Config, Qwen3Model

from triton_rag.build.offline import TINY_QWEN3
from triton_rag.core.batching import pad_rows
from triton_rag.engines.torch_encoder import TorchEncoder

pytestmark = pytest.mark.gpu

ROWS = [list(np.random.default_rng(n).integers(10, 150000, size=n)) for n in (5, 16, 300, 77, 512, 1)]


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


def _device_free() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


@pytest.mark.parametrize("precision", ["bfloat16", "fp8"])
def test_sleep_frees_the_weights_and_wake_restores_the_same_results(
    model_dir: Path, precision: str, tmp_path: Path
) -> None:
    encoder = TorchEncoder(
        model_dir, "embed", precision=precision, compile_model=True, max_batch_tokens=600, sleepable=True,
        precompiled_dir=tmp_path,
    )  # fmt: skip
    assert encoder.arena is not None
    batch, alone = pad_rows(ROWS, 0), (np.array([ROWS[1]]), np.ones((1, len(ROWS[1])), dtype=np.int64))
    before_batch, before_alone = encoder.forward(*batch), encoder.forward(*alone)  # a packed pass and a graph replay
    free_awake = _device_free()
    encoder.sleep()
    freed = _device_free() - free_awake
    assert freed >= 0.95 * encoder.arena.nbytes, (freed, encoder.arena.nbytes)
    assert encoder.residency()["host_bytes"] >= encoder.arena.nbytes
    encoder.wake()
    assert _device_free() >= free_awake - 4 * 2**20  # no more than before (sleep also emptied the cache)
    np.testing.assert_array_equal(encoder.forward(*alone), before_alone)  # the captured graph reads the new memory
    np.testing.assert_array_equal(encoder.forward(*batch), before_batch)


def test_many_cycles_keep_device_memory_flat(model_dir: Path, tmp_path: Path) -> None:
    encoder = TorchEncoder(
        model_dir, "embed", precision="fp8", compile_model=True, max_batch_tokens=600, sleepable=True,
        precompiled_dir=tmp_path,
    )  # fmt: skip
    row = (np.array([ROWS[0]]), np.ones((1, len(ROWS[0])), dtype=np.int64))
    expected = encoder.forward(*row)
    encoder.sleep()
    encoder.wake()
    baseline = _device_free()
    for _ in range(200):
        encoder.sleep()
        encoder.wake()
        encoder.forward(*row)
    assert abs(_device_free() - baseline) <= 64 * 2**20
    np.testing.assert_array_equal(encoder.forward(*row), expected)


def test_a_forward_while_asleep_wakes_the_engine(model_dir: Path) -> None:
    encoder = TorchEncoder(model_dir, "embed", precision="bfloat16", sleepable=True)
    row = (np.array([ROWS[2]]), np.ones((1, len(ROWS[2])), dtype=np.int64))
    expected = encoder.forward(*row)
    encoder.sleep()
    np.testing.assert_array_equal(encoder.forward(*row), expected)
    assert encoder.residency()["state"] == "awake"


def test_a_load_does_not_keep_the_weights_twice(model_dir: Path) -> None:
    """The originals go as their arena copies land: torch's allocator keeps no second copy of the weights cached
    (an 8B FP8 load once held 15.2 GB for 7.05 GB of weights, BENCHMARKS.md)."""
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    encoder = TorchEncoder(model_dir, "embed", precision="fp8", sleepable=True, use_graphs=False, max_batch_tokens=600)
    assert encoder.arena is not None
    held = torch.cuda.memory_reserved() - before
    assert held < encoder.arena.nbytes / 2, (held, encoder.arena.nbytes)


def _process_device_bytes() -> int:
    """This process's device memory as nvidia-smi lists it (0 when it is not listed: it holds none). Asked from
    another process: NVML in a checkpointed process waits for its restore, as every driver call does."""
    import os
    import subprocess

    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    lines = subprocess.run(query, capture_output=True, text=True, check=True, timeout=30).stdout.splitlines()
    return sum(int(used) * 2**20 for pid, used in (line.split(",") for line in lines) if int(pid) == os.getpid())


def test_a_released_context_leaves_nothing_on_the_device_and_wakes_to_the_same_results(
    model_dir: Path, tmp_path: Path
) -> None:
    """[router] sleep_releases_context: asleep, the process's CUDA context is checkpointed to host memory
    (engines/cuda_checkpoint.py), so NVML lists nothing for it; awake, its graphs, compiled layer and weights answer
    as before."""
    encoder = TorchEncoder(
        model_dir, "embed", precision="fp8", compile_model=True, max_batch_tokens=600, sleepable=True,
        precompiled_dir=tmp_path, release_context_asleep=True,
    )  # fmt: skip
    batch, alone = pad_rows(ROWS, 0), (np.array([ROWS[1]]), np.ones((1, len(ROWS[1])), dtype=np.int64))
    before_batch, before_alone = encoder.forward(*batch), encoder.forward(*alone)
    assert _process_device_bytes() > 0
    for _ in range(2):
        state = encoder.sleep()
        assert encoder.context is not None
        assert state["context"] == "released", encoder.context.unavailable
        assert _process_device_bytes() == 0
        awake = encoder.wake()
        assert awake["context"] == "resident"
        np.testing.assert_array_equal(encoder.forward(*alone), before_alone)
        np.testing.assert_array_equal(encoder.forward(*batch), before_batch)
    encoder.sleep()
    encoder.close()  # restored before the process ends
    assert encoder.context.released is False

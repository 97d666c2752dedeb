"""The CUDA context's stack reserve, trimmed (engines/cuda_context.py). The CPU case runs everywhere; the GPU case
(marker `gpu`) checks the limit the driver reports and that kernels needing a larger stack still run right."""

from __future__ import annotations

import ctypes

import pytest
import torch

from triton_rag.engines.cuda_context import TRIMMED_STACK_BYTES, trim_stack_reserve


def test_a_cpu_device_is_left_alone() -> None:
    assert trim_stack_reserve(torch.device("cpu")) is False


def _stack_limit() -> int:
    value = ctypes.c_size_t()
    assert ctypes.CDLL("libcuda.so.1").cuCtxGetLimit(ctypes.byref(value), 0) == 0
    return value.value


@pytest.mark.gpu
def test_the_stack_limit_is_lowered_and_kernels_still_run() -> None:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need CUDA")
    device = torch.device("cuda")
    a = torch.randn(512, 1024, device=device, dtype=torch.bfloat16)
    expected = (a.float() @ a.float().T).cpu()
    assert trim_stack_reserve(device) is True
    assert _stack_limit() == TRIMMED_STACK_BYTES
    # cuBLAS, a sort and attention after the trim: still correct
    torch.testing.assert_close((a @ a.T).float().cpu(), expected, rtol=2e-2, atol=2.0)
    values = torch.randn(1 << 20, device=device)
    assert torch.equal(values.sort().values.cpu(), values.cpu().sort().values)
    q = torch.randn(1, 8, 256, 128, device=device, dtype=torch.bfloat16)
    out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    reference = torch.nn.functional.scaled_dot_product_attention(q.float(), q.float(), q.float())
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)

"""The weight arena's build on the CPU path (the CUDA path shares `_fill`): originals are let go as their copies land,
so a load never holds the weights twice (tests/test_weight_arena_cuda.py checks the device memory itself)."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from triton_rag.engines import weight_arena
from triton_rag.engines.weight_arena import WeightArena


def test_each_original_is_released_once_its_copy_is_placed(monkeypatch) -> None:  # noqa: ANN001
    model = nn.Sequential(*(nn.Linear(32, 32) for _ in range(6)))
    with torch.no_grad():  # an autograd graph would keep the originals alive
        expected = [layer(torch.ones(1, 32)) for layer in model]
    originals = [weakref.ref(parameter) for parameter in model.parameters()]
    placed = 0
    alive_while_building: list[int] = []
    real_view = weight_arena._view

    def counting_view(arena: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
        nonlocal placed
        # every original placed before the one being placed now must be gone already
        alive_while_building.append(sum(ref() is not None for ref in originals[:placed]))
        placed += 1
        return real_view(arena, offset, like)

    monkeypatch.setattr(weight_arena, "_view", counting_view)
    WeightArena(model, torch.device("cpu"))
    assert placed == len(originals)
    assert alive_while_building == [0] * len(originals)
    assert all(ref() is None for ref in originals)
    for layer, before in zip(model, expected, strict=True):  # the copies are the weights
        with torch.no_grad():
            torch.testing.assert_close(layer(torch.ones(1, 32)), before)

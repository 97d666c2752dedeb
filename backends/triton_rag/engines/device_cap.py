"""A compute model's process limits its device memory to a smaller card's ([router] device_memory), so a large GPU
(an H100, an H200) can stand in for the 16 GB card the product targets: what fits on the card fits here, what does
not fails here too, at load or in the request that needs more.

The limit is torch's allocator's (`torch.cuda.set_per_process_memory_fraction`): a fraction of the GPU's memory.
Memory allocated outside that allocator is not counted by it: the encoder's weight arena maps its memory through
the CUDA driver (engines/weight_arena.py), so once that arena is built the engine sets the limit again with the
arena's bytes taken off (`held_outside`). The CUDA context (~0.5 GiB) is outside both and comes on top, as it
does on the card.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from triton_rag.core.units import format_bytes

_log = logging.getLogger(__name__)


def memory_fraction(cap: int, total: int, held_outside: int = 0) -> float | None:
    """The share of a GPU of `total` bytes torch's allocator may take so that it and `held_outside` bytes (allocated
    elsewhere) stay within `cap`; None where nothing is to be limited (no cap, or a cap the GPU does not exceed)."""
    if cap <= 0 or cap >= total:
        return None
    return max(cap - held_outside, 0) / total


def apply_device_cap(cap: int, held_outside: int = 0, log: Callable[[str], None] = _log.info) -> float | None:
    """Limit this process's torch allocations on its current GPU to `cap` bytes less `held_outside`; returns the
    fraction set, or None where nothing was set (no cap, no GPU, or a GPU no larger than the cap)."""
    if cap <= 0 or not torch.cuda.is_available():
        return None
    device = torch.cuda.current_device()
    total = int(torch.cuda.get_device_properties(device).total_memory)
    fraction = memory_fraction(cap, total, held_outside)
    if fraction is None:
        return None
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    outside = f" less {format_bytes(held_outside)} held outside torch's allocator" if held_outside else ""
    log(
        f"device memory capped at {format_bytes(cap)}{outside} (device_memory): torch may allocate "
        f"{format_bytes(int(fraction * total))} of this GPU's {format_bytes(total)}"
    )
    if fraction == 0:
        log(f"warning: {format_bytes(held_outside)} outside torch already exceed the cap: every allocation will fail")
    return fraction

"""Which numeric precision an engine runs in: the configured wish, narrowed by what the GPU and the engine can do.

A pure function over plain data (the device's compute capability, the engine's kernels), so the fallback chain
NVFP4 -> FP8 -> bfloat16 is unit-tested without a GPU; the engine logs the reasons it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Precision = Literal["nvfp4", "fp8", "bfloat16", "float32"]
#: From the most compressed to the safest; a precision that cannot run falls to the next one.
FALLBACK_CHAIN: tuple[Precision, ...] = ("nvfp4", "fp8", "bfloat16", "float32")


@dataclass(frozen=True)
class Device:
    """What decides precision support: None for a CPU, else the CUDA compute capability (major, minor)."""

    capability: tuple[int, int] | None

    @property
    def is_gpu(self) -> bool:
        return self.capability is not None


def hardware_supports(precision: Precision, device: Device) -> tuple[bool, str]:
    """(supported, why not) for the tensor cores of `device`."""
    if precision == "float32":
        return True, ""
    if not device.is_gpu:  # CPUs: float32 (bfloat16 matmuls are slow without AMX; `dtype` can still ask for them)
        return False, "no GPU"
    assert device.capability is not None
    capability = device.capability
    if precision == "bfloat16":
        return (capability >= (8, 0), "bfloat16 needs compute capability 8.0 (Ampere) or newer")
    if precision == "fp8":
        return (
            capability >= (8, 9),
            f"FP8 needs compute capability 8.9 (Ada/Hopper) or newer, this GPU is {capability}",
        )
    # NVFP4: Blackwell data-center (10.x) and consumer (12.x) parts only; Hopper (9.0) has no FP4 tensor cores
    return (
        capability[0] in (10, 12),
        f"NVFP4 needs a Blackwell GPU (compute capability 10.x or 12.x), this is {capability}",
    )


def choose_precision(
    requested: Precision | Literal["auto"], device: Device, engine_supports: frozenset[str]
) -> tuple[Precision, list[str]]:
    """The first precision from `requested` down the chain that both the hardware and the engine run, with the
    reason for every step down. "auto" starts at bfloat16 on a GPU and float32 on a CPU (the accurate choices)."""
    if requested == "auto":
        requested = "bfloat16" if device.is_gpu else "float32"
    reasons: list[str] = []
    for precision in FALLBACK_CHAIN[FALLBACK_CHAIN.index(requested) :]:
        supported, why = hardware_supports(precision, device)
        if supported and precision not in engine_supports:
            supported, why = False, f"this engine has no {precision} kernels"
        if supported:
            return precision, reasons
        reasons.append(f"{precision} unavailable ({why}): falling back")
    raise AssertionError("float32 always runs")  # pragma: no cover - the chain ends in float32

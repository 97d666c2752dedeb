"""Which numeric precision an engine runs in: the configured wish, narrowed by what the GPU and the engine can do.

A pure function over plain data (the device's compute capability, the engine's kernels), so the fallback chain
NVFP4 -> FP8 -> bfloat16 is unit-tested without a GPU; the engine logs the reasons it returns.

NVFP4 means two things. `hardware_supports` asks for FP4 tensor cores (Blackwell): what a TensorRT plan needs. An
engine with NVFP4 layers (`choose_precision`) also runs them where only FP8 tensor cores exist, keeping the weights
4-bit in memory and dequantizing them to FP8 for each GEMM (`nvfp4_mode`: "storage"), which saves memory, not time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Precision = Literal["nvfp4", "fp8", "bfloat16", "float32"]
#: How NVFP4 layers run: on FP4 tensor cores, or stored 4-bit and dequantized to FP8 for each GEMM.
Nvfp4Mode = Literal["native", "storage"]
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


def nvfp4_mode(device: Device) -> Nvfp4Mode | None:
    """How an engine's NVFP4 layers run on `device`: "native" on FP4 tensor cores (Blackwell, 10.x / 12.x), "storage"
    where FP8 GEMMs are the best there is (8.9+: Ada, Hopper), None where neither runs (a CPU, older GPUs)."""
    if hardware_supports("nvfp4", device)[0]:
        return "native"
    if hardware_supports("fp8", device)[0]:
        return "storage"
    return None


def _engine_hardware_supports(precision: Precision, device: Device) -> tuple[bool, str]:
    """`hardware_supports`, but NVFP4 layers also run in storage mode (`nvfp4_mode`)."""
    if precision != "nvfp4":
        return hardware_supports(precision, device)
    return (
        nvfp4_mode(device) is not None,
        "NVFP4 needs FP4 (Blackwell) or FP8 (compute capability 8.9+) tensor cores, "
        + ("there is no GPU" if device.capability is None else f"this GPU is {device.capability}"),
    )


def choose_precision(
    requested: Precision | Literal["auto"], device: Device, engine_supports: frozenset[str]
) -> tuple[Precision, list[str]]:
    """The first precision from `requested` down the chain that both the hardware and the engine run, with the
    reason for every step down. "auto" starts at bfloat16 on a GPU and float32 on a CPU (the accurate choices). An
    engine that lists "nvfp4" runs it natively or in storage mode, whichever `nvfp4_mode` says."""
    if requested == "auto":
        requested = "bfloat16" if device.is_gpu else "float32"
    reasons: list[str] = []
    for precision in FALLBACK_CHAIN[FALLBACK_CHAIN.index(requested) :]:
        supported, why = _engine_hardware_supports(precision, device)
        if supported and precision not in engine_supports:
            supported, why = False, f"this engine has no {precision} kernels"
        if supported:
            return precision, reasons
        reasons.append(f"{precision} unavailable ({why}): falling back")
    raise AssertionError("float32 always runs")  # pragma: no cover - the chain ends in float32

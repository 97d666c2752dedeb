"""Byte sizes as people write them ("12GiB") and as logs show them."""

from __future__ import annotations

import math

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class PolicyError(ValueError):
    """A budget or policy setting that cannot work; the message says which and why."""


def parse_bytes(text: str | int) -> int:
    """`"12GiB"`, `"1536 MiB"`, `"16e9"` or `17179869184` -> bytes (binary units are powers of 1024)."""
    if isinstance(text, int):
        value, unit = float(text), ""
    else:
        compact = text.strip().lower().replace(" ", "").replace("_", "")
        number = compact.rstrip("bgikmt")
        unit = compact[len(number) :]
        try:
            value = float(number)
        except ValueError:
            raise PolicyError(f"{text!r} is not a size (examples: 12GiB, 1536MiB, 16000000000)") from None
    if unit not in _UNITS:
        raise PolicyError(f"{text!r}: unknown unit {unit!r} (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    result = value * _UNITS[unit]
    if not math.isfinite(result) or result < 1:
        raise PolicyError(f"{text!r} must be a positive size")
    return int(result)


def format_bytes(value: int) -> str:
    return f"{value / 2**30:.2f} GiB" if abs(value) >= 2**30 else f"{value / 2**20:.1f} MiB"

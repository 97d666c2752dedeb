"""What the router measured and the machine's RAM: read by the router (triton/router) and by `triton-rag plan` and
`prepare` (build/fit.py), so both weigh a model by the same numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def ram_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemTotal")


class MeasurementFile:
    """Measured bytes kept across router reloads and server restarts, so a model's next first load makes room with
    what it really took instead of the estimate. A line counts only for the same device and the same estimate (the
    estimate changes with the model and its settings). Best effort: a read-only repository just keeps nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.data: dict[str, dict[str, Any]] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def get(self, name: str, device: str, estimate: int) -> int | None:
        line = self.data.get(name, {})
        if line.get("device") == device and line.get("estimate") == estimate:
            return int(line["measured"])
        return None

    def put(self, name: str, device: str, estimate: int, measured: int) -> None:
        line = {"device": device, "estimate": estimate, "measured": measured}
        if self.data.get(name) == line:
            return  # re-measured every few seconds: write only what changed
        self.data[name] = line
        try:
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(self.data, indent=2, sort_keys=True))
            temporary.replace(self.path)
        except OSError:
            pass

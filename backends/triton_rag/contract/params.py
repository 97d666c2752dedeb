"""Typed parameters of the models, as config.pbtxt carries them: one frozen dataclass per model kind, rendered into
config.pbtxt string parameters at build time and parsed back in `initialize` by the same code (`render` / `parse`),
so a default lives in one place and a typo fails where it is made.

Also the parser rag.toml's sections share (`build_dataclass`): the same conversions and checks for a value read from
TOML, from `--set section.key=value` or from config.pbtxt.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from triton_rag.core.units import PolicyError, parse_bytes


class SettingsError(ValueError):
    """A configuration value that cannot work; the message says which and why."""


@dataclass(frozen=True)
class RouterSettings:
    """The router's budget and policy (docs/ROUTER.md); rag.toml [router] and the router's config.pbtxt parameters."""

    #: false: every compute model loads at start-up and endpoints call it directly (no budget).
    enabled: bool = True
    #: Bytes ("12GiB", "16000000000") or "auto": GPU memory less `reserve`, or `cpu_budget_fraction` of the RAM.
    budget: str = "auto"
    #: GPU memory kept out of an automatic budget: tritonserver, the endpoints' processes, the desktop, other apps.
    reserve: str = "1536MiB"
    cpu_budget_fraction: float = 0.5
    #: Host RAM for evicted models' weight copies (the host tier: wake in a fraction of a second instead of a
    #: reload): bytes, "0" (off: every eviction unloads), or "auto": `host_budget_fraction` of the RAM where there is
    #: a GPU, off on a machine without one (there the copy would take the same RAM the model gave back).
    host_budget: str = "auto"
    host_budget_fraction: float = 0.5
    #: Above this fraction of the budget, idle models are evicted (least recently used first).
    high_watermark: float = 0.9
    #: A busy model stays open this long after its load before another model may displace it (bounds thrashing).
    min_residency_seconds: float = 3.0
    #: A request waiting this long for its model fails, with the reason it waited (never a hang).
    queue_timeout_seconds: float = 300.0
    #: A lease older than this is taken back (its holder is presumed gone), so a client that never releases blocks
    #: evictions for at most this long. An endpoint holds one for one compute call.
    lease_timeout_seconds: float = 30.0
    #: How long an unload may take before the memory it still holds is reported as unreleased.
    unload_timeout_seconds: float = 30.0
    #: How often the router re-reads the repository index and re-measures resident models.
    reconcile_seconds: float = 5.0
    #: A load that takes longer fails its waiting requests (a model stuck in LOADING must not hang them).
    load_timeout_seconds: float = 600.0
    #: Triton's gRPC endpoint for load/unload ("host:port"); empty: read from tritonserver's command line.
    repository_api: str = ""
    #: Measured sizes remembered across restarts (relative to the router's model directory).
    measurements_file: str = "measured.json"

    def __post_init__(self) -> None:
        try:
            if self.budget != "auto":
                parse_bytes(self.budget)
            parse_bytes(self.reserve)
            if self.host_budget not in ("auto", "0"):
                parse_bytes(self.host_budget)
        except PolicyError as exc:
            raise SettingsError(f"[router] {exc}") from None
        if not 0.0 < self.high_watermark <= 1.0:
            raise SettingsError(f"[router] high_watermark must be in (0, 1], got {self.high_watermark}")
        if not 0.0 < self.cpu_budget_fraction <= 1.0:
            raise SettingsError(f"[router] cpu_budget_fraction must be in (0, 1], got {self.cpu_budget_fraction}")
        if not 0.0 <= self.host_budget_fraction <= 1.0:
            raise SettingsError(f"[router] host_budget_fraction must be in [0, 1], got {self.host_budget_fraction}")

    def budget_bytes(self, device: str, total: int) -> int:
        """The budget in bytes on a device with `total` bytes of memory ("gpu" or "cpu")."""
        if self.budget != "auto":
            return parse_bytes(self.budget)
        if device == "gpu":
            budget = total - parse_bytes(self.reserve)
            if budget <= 0:
                raise SettingsError(f"[router] reserve {self.reserve} leaves no budget on a {total}-byte GPU")
            return budget
        return int(total * self.cpu_budget_fraction)

    def host_budget_bytes(self, device: str, ram: int) -> int:
        """Bytes of host RAM the host tier may hold; 0 turns it off."""
        if self.host_budget == "0":
            return 0
        if self.host_budget != "auto":
            return parse_bytes(self.host_budget)
        return int(ram * self.host_budget_fraction) if device == "gpu" else 0

    def parameters(self) -> dict[str, str]:
        """As config.pbtxt string parameters (read back by `router_settings`)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in values.items()}


_CHOICES: dict[str, tuple[str, ...]] = {
    "overflow": ("reject", "truncate"),
    "pooling": ("auto", "last_token", "mean"),
    "engine": ("torch", "tensorrt_plan", "tensorrt_rtx"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "precision": ("auto", "nvfp4", "fp8", "bfloat16", "float32"),
}

#: Narrower choices of one section: the VLM has no TensorRT-RTX variant (only its vision tower can be a plan).
_SECTION_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {("docling", "engine"): ("torch", "tensorrt_plan")}


def build_dataclass(cls: type, section: str, values: dict[str, Any]) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SettingsError(f"[{section}] has unknown keys {unknown}; known keys: {sorted(known)}")
    converted: dict[str, Any] = {}
    for key, value in values.items():
        default = known[key].default
        if isinstance(default, bool):
            if isinstance(value, str):
                value = value.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, float):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise SettingsError(f"[{section}] {key} must be a number, got {value!r}") from None
            if not value >= 0:
                raise SettingsError(f"[{section}] {key} must be zero or more, got {value}")
        elif isinstance(default, int):
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise SettingsError(f"[{section}] {key} must be an integer, got {value!r}") from None
            if value <= 0:
                raise SettingsError(f"[{section}] {key} must be positive, got {value}")
        choices = _SECTION_CHOICES.get((section, key), _CHOICES.get(key))
        if choices is not None and value not in choices:
            raise SettingsError(f"[{section}] {key} must be one of {choices}, got {value!r}")
        converted[key] = value
    return cls(**converted)


def router_settings(values: dict[str, Any]) -> RouterSettings:
    """From rag.toml's [router] table or the router's config.pbtxt parameters (all strings there)."""
    return build_dataclass(
        RouterSettings, "router", {key: str(value) if key in ("budget", "host_budget") else value for key, value in values.items()}
    )


@dataclass(frozen=True)
class ManagedModel:
    """A compute model under the router, as `prepare` found it: which endpoints use it, whether its engine can
    sleep, and what it is estimated to hold per device ("gpu", "cpu") before a load measures it."""

    name: str
    endpoints: tuple[str, ...]
    estimate_bytes: dict[str, int]
    #: Its weights alone (the host tier's copy when it sleeps); defaults to the whole estimate.
    weight_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    sleepable: bool = False

    def estimate(self, device: str) -> int:
        if device not in self.estimate_bytes:
            raise SettingsError(f"[router] model {self.name} has no size estimate for device {device!r}")
        return int(self.estimate_bytes[device])

    def weights(self, device: str) -> int:
        return int(self.weight_bytes.get(device, self.estimate(device)))


@dataclass(frozen=True)
class RouterParameters:
    """The `router` model's config.pbtxt parameters: its settings, and the compute models it manages (as JSON in
    the parameter `models`)."""

    settings: RouterSettings
    models: tuple[ManagedModel, ...] = ()

    def render(self) -> dict[str, str]:
        models = {
            m.name: {
                "endpoints": list(m.endpoints),
                "sleepable": m.sleepable,
                "estimate_bytes": dict(m.estimate_bytes),
                "weight_bytes": dict(m.weight_bytes),
            }
            for m in self.models
        }
        rendered = self.settings.parameters() | {"models": json.dumps(models, sort_keys=True)}
        rendered.pop("enabled")  # a router that exists is enabled
        return rendered

    @classmethod
    def parse(cls, parameters: dict[str, str]) -> RouterParameters:
        values = dict(parameters)
        try:
            raw = json.loads(values.pop("models", "{}"))
            models = tuple(
                ManagedModel(
                    name=name,
                    endpoints=tuple(info.get("endpoints", ())),
                    estimate_bytes={k: int(v) for k, v in info["estimate_bytes"].items()},
                    weight_bytes={k: int(v) for k, v in info.get("weight_bytes", {}).items()},
                    sleepable=bool(info.get("sleepable", False)),
                )
                for name, info in raw.items()
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SettingsError(f"[router] the parameter 'models' is not the JSON prepare writes: {exc!r}") from None
        return cls(router_settings(values), models)

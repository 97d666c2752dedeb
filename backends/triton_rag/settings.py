"""Deployment settings: which models serve each endpoint and how. Read from `rag.toml`, the one configuration place."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from triton_rag.contract import DEFAULT_EMBED_DIM
from triton_rag.residency import PolicyError, parse_bytes

Overflow = Literal["reject", "truncate"]
Pooling = Literal["auto", "last_token", "mean"]
Engine = Literal["torch", "tensorrt_plan", "tensorrt_rtx"]
DType = Literal["auto", "float32", "bfloat16", "float16"]

DEFAULT_RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


class SettingsError(ValueError):
    """A configuration value that cannot work; the message says which and why."""


@dataclass(frozen=True)
class EncoderSettings:
    #: Hub id (e.g. "Qwen/Qwen3-Embedding-8B") or a local directory in Hugging Face layout.
    model: str
    max_length: int = 8192
    overflow: Overflow = "reject"
    engine: Engine = "torch"
    dtype: DType = "auto"
    #: nvfp4 | fp8 | bfloat16 | float32 | auto (= `dtype`); a precision the GPU or engine cannot run falls back
    #: down that chain, with the reason in the log (triton_rag.precision).
    precision: str = "auto"
    #: Largest padded batch (rows x longest row) sent to the encoder at once; the engine packs the real tokens into
    #: passes of at most this many (its activation memory scales with it).
    max_batch_tokens: int = 32768
    #: torch.compile each decoder layer on CUDA (fuses norms, RoPE and FP8 activation quantization): FP8 needs it to
    #: beat bfloat16 (BENCHMARKS.md). Costs compilation time at each load (tens of seconds, less once cached).
    compile: bool = True


@dataclass(frozen=True)
class EmbedSettings(EncoderSettings):
    model: str = "Qwen/Qwen3-Embedding-0.6B"
    dim: int = DEFAULT_EMBED_DIM
    pooling: Pooling = "auto"


@dataclass(frozen=True)
class RerankSettings(EncoderSettings):
    model: str = "Qwen/Qwen3-Reranker-0.6B"
    default_instruction: str = DEFAULT_RERANK_INSTRUCTION


@dataclass(frozen=True)
class DoclingSettings:
    """The document-conversion VLM and the limits of what one request may ask for (docs/DOCLING.md)."""

    #: Hub id or a local directory: granite-docling-258M (or another Idefics3 DocTags model such as SmolDocling).
    model: str = "ibm-granite/granite-docling-258M"
    engine: Engine = "torch"
    dtype: DType = "auto"
    prompt: str = "Convert this page to docling."
    #: Per page; docling's own setting. A page that reaches it ends with an unclosed element (empty text).
    max_new_tokens: int = 8192
    #: PDF render resolution (docling renders at 144); the model sees at most 2048 px on the long edge anyway.
    dpi: float = 144.0
    max_pages: int = 200
    max_image_pixels: int = 40_000_000
    max_document_bytes: int = 64 * 2**20


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


@dataclass(frozen=True)
class Settings:
    embed: EmbedSettings = field(default_factory=EmbedSettings)
    rerank: RerankSettings = field(default_factory=RerankSettings)
    docling: DoclingSettings = field(default_factory=DoclingSettings)
    router: RouterSettings = field(default_factory=RouterSettings)
    #: Build tiny random-weight models of the real architecture when the hub cannot be reached.
    offline_fallback: bool = True


_CHOICES: dict[str, tuple[str, ...]] = {
    "overflow": ("reject", "truncate"),
    "pooling": ("auto", "last_token", "mean"),
    "engine": ("torch", "tensorrt_plan", "tensorrt_rtx"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "precision": ("auto", "nvfp4", "fp8", "bfloat16", "float32"),
}

#: Narrower choices of one section: the VLM has no TensorRT-RTX variant (only its vision tower can be a plan).
_SECTION_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {("docling", "engine"): ("torch", "tensorrt_plan")}


def _build(cls: type, section: str, values: dict[str, Any]) -> Any:
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


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, str]]:
    """`["embed.model=/models/x", ...]` -> `{"embed": {"model": "/models/x"}}`."""
    result: dict[str, dict[str, str]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise SettingsError(f"override {item!r} is not of the form section.key=value")
        result.setdefault(section.strip(), {})[name.strip()] = value.strip()
    return result


def settings_file(given: Path | None, default: Path) -> Path | None:
    """The settings file to read: the one asked for (a missing one is an error, not the defaults in silence), else
    the default file where there is one, else None (the built-in defaults)."""
    return given if given is not None else (default if default.is_file() else None)


def load_settings(path: Path | None, overrides: list[str] | None = None) -> Settings:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise SettingsError(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{path} is not valid TOML: {exc}") from None
    for section, values in parse_overrides(overrides or []).items():
        data.setdefault(section, {}).update(values)
    unknown = sorted(set(data) - {"embed", "rerank", "docling", "router", "offline"})
    if unknown:
        raise SettingsError(f"unknown sections {unknown}; known: embed, rerank, docling, router, offline")
    offline = data.get("offline", {})
    fallback = offline.get("fallback", True)
    if isinstance(fallback, str):
        fallback = fallback.lower() in ("1", "true", "yes", "on")
    return Settings(
        embed=_build(EmbedSettings, "embed", data.get("embed", {})),
        rerank=_build(RerankSettings, "rerank", data.get("rerank", {})),
        docling=_build(DoclingSettings, "docling", data.get("docling", {})),
        router=router_settings(data.get("router", {})),
        offline_fallback=bool(fallback),
    )


def router_settings(values: dict[str, Any]) -> RouterSettings:
    """From rag.toml's [router] table or the router's config.pbtxt parameters (all strings there)."""
    return _build(
        RouterSettings, "router", {key: str(value) if key in ("budget", "host_budget") else value for key, value in values.items()}
    )

"""Deployment settings: which models serve each endpoint and how. Read from `rag.toml`, the one configuration place."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from triton_rag.contract import BatchingPreset
from triton_rag.contract.params import (
    DEFAULT_RERANK_INSTRUCTION,
    DoclingPageParameters,
    DType,
    EmbeddingTable,
    EmbedEndpointParameters,
    EmbedOutputDtype,
    Overflow,
    Precision,
    RouterSettings,
    SettingsError,
    TextEndpointParameters,
    TorchEncoderOptions,
    VlmParameters,
    build_dataclass,
    router_settings,
)
from triton_rag.core.limits import Limits
from triton_rag.core.units import PolicyError, parse_bytes

#: "auto": the checkpoint's sentence-transformers config, else by architecture (build.encoders.detect_pooling).
PoolingChoice = Literal["auto", "last_token", "mean"]
Engine = Literal["torch", "tensorrt_plan", "tensorrt_rtx"]
#: The VLM has no TensorRT-RTX variant (only its vision tower can be a plan).
DoclingEngine = Literal["torch", "tensorrt_plan"]

# The defaults below are the typed parameters' (contract.params) and the document limits' (core.limits): one place.


@dataclass(frozen=True)
class EncoderSettings:
    #: Hub id (e.g. "Qwen/Qwen3-Embedding-8B") or a local directory in Hugging Face layout.
    model: str
    max_length: int = TextEndpointParameters.max_length
    overflow: Overflow = TextEndpointParameters.overflow
    engine: Engine = "torch"
    dtype: DType = TorchEncoderOptions.dtype
    #: nvfp4 | fp8 | bfloat16 | float32 | auto (= `dtype`); a precision the GPU or engine cannot run falls back
    #: down that chain, with the reason in the log (triton_rag.core.precision).
    precision: Precision = TorchEncoderOptions.precision
    #: Largest padded batch (rows x longest row) sent to the encoder at once; the engine packs the real tokens into
    #: passes of at most this many (its activation memory scales with it).
    max_batch_tokens: int = TorchEncoderOptions.max_batch_tokens
    #: torch.compile each decoder layer on CUDA (fuses norms, RoPE and FP8 activation quantization): FP8 needs it to
    #: beat bfloat16 (BENCHMARKS.md). Costs compilation time at each load (tens of seconds, less once cached).
    compile: bool = TorchEncoderOptions.compile
    #: "device", or "host": an FP8 table (fp8 / nvfp4) in pinned host memory, gathered over the bus per batch.
    embedding_table: EmbeddingTable = TorchEncoderOptions.embedding_table
    #: The endpoint's dynamic batcher: "project" or "design" (contract.BATCHING has both).
    batching: BatchingPreset = "project"


@dataclass(frozen=True)
class EmbedSettings(EncoderSettings):
    model: str = "Qwen/Qwen3-Embedding-0.6B"
    dim: int = EmbedEndpointParameters.dim
    pooling: PoolingChoice = "auto"
    #: EMBEDDING's type: "fp16" (half the bytes) or "fp32" (Triton's HTTP/JSON can return it: curl works).
    output_dtype: EmbedOutputDtype = EmbedEndpointParameters.output_dtype


@dataclass(frozen=True)
class RerankSettings(EncoderSettings):
    model: str = "Qwen/Qwen3-Reranker-0.6B"
    default_instruction: str = DEFAULT_RERANK_INSTRUCTION


@dataclass(frozen=True)
class DoclingSettings:
    """The document-conversion VLM and the limits of what one request may ask for (docs/DOCLING.md)."""

    #: Hub id or a local directory: granite-docling-258M (or another Idefics3 DocTags model such as SmolDocling).
    model: str = "ibm-granite/granite-docling-258M"
    engine: DoclingEngine = "torch"
    dtype: DType = VlmParameters.dtype
    prompt: str = DoclingPageParameters.prompt
    #: Per page; docling's own setting. A page that reaches it ends with an unclosed element (empty text).
    max_new_tokens: int = DoclingPageParameters.max_new_tokens
    #: PDF render resolution (docling renders at 144); the model sees at most 2048 px on the long edge anyway.
    dpi: float = Limits.dpi
    max_pages: int = Limits.max_pages
    max_image_pixels: int = Limits.max_image_pixels
    max_document_bytes: int = Limits.max_document_bytes
    #: The `docling` endpoint's dynamic batcher: "project" or "design" (contract.BATCHING; the same values today).
    batching: BatchingPreset = "project"


#: Where the gateway listens unless told otherwise: this machine only (the same default as tritonserver's).
GATEWAY_LOOPBACK = "127.0.0.1"
#: The most gateway processes `[gateway] workers = "auto"` starts (GatewaySettings.worker_count).
GATEWAY_AUTO_WORKERS = 4


@dataclass(frozen=True)
class GatewaySettings:
    """The RAG front door (triton_rag.gateway): OpenAI embeddings, Cohere/Jina rerank and docling-serve conversion
    over HTTP, a process beside tritonserver that `triton-rag serve` starts and stops with it (README, "Use it from
    your RAG stack")."""

    #: false: `serve` starts tritonserver alone (as `--no-gateway` does).
    enabled: bool = True
    host: str = GATEWAY_LOOPBACK
    port: int = 8080
    #: Keys a client sends as `Authorization: Bearer <key>`; none (and no key file): no key is asked for, which is
    #: allowed on loopback only unless `allow_insecure_public`.
    api_keys: tuple[str, ...] = ()
    #: A file of keys, one a line (blank lines and `#` comments skipped); read at start-up, beside `api_keys`.
    api_key_file: str = ""
    #: true: listen beyond loopback without API keys (anyone who reaches the port may use the models).
    allow_insecure_public: bool = False
    #: A request body over this is refused with 413 before it is read in full (bytes: "96MiB", "100000000").
    max_body_bytes: str = "96MiB"
    #: Texts in one embeddings request, documents in one rerank request.
    max_inputs: int = 2048
    #: How long a request may wait for Triton (a model's first load included) before it is answered with 503 and
    #: Retry-After.
    request_timeout_seconds: float = 120.0
    #: Retry-After's seconds on a 503.
    retry_after_seconds: int = 5
    #: docling-serve's `http` sources make the gateway fetch a URL a client names (a server-side request on its
    #: behalf): refused unless this is true.
    allow_http_sources: bool = False
    #: Processes serving the port (uvicorn workers; one Python process parses, validates and tokenizes on one core):
    #: a number, or "auto" (`worker_count`).
    workers: str = "auto"

    def __post_init__(self) -> None:
        try:
            parse_bytes(self.max_body_bytes)
        except PolicyError as exc:
            raise SettingsError(f"[gateway] max_body_bytes: {exc}") from None
        if self.workers != "auto" and not (self.workers.isascii() and self.workers.isdigit() and int(self.workers)):
            raise SettingsError(f'[gateway] workers must be "auto" or a number of at least 1, got {self.workers!r}')
        if not self.host.strip():
            raise SettingsError("[gateway] host is empty")
        if self.port > 65535:
            raise SettingsError(f"[gateway] port must be at most 65535, got {self.port}")
        if self.request_timeout_seconds <= 0:
            raise SettingsError("[gateway] request_timeout_seconds must be positive")

    def body_limit(self) -> int:
        """`max_body_bytes` in bytes."""
        return parse_bytes(self.max_body_bytes)

    def worker_count(self, cpus: int) -> int:
        """`workers` as a number. "auto": a quarter of the `cpus`, at most GATEWAY_AUTO_WORKERS, at least 1. The
        other cores stay with tritonserver and its python stubs, which spend 2.5-3.4 times the gateway's CPU on a
        small request (BENCHMARKS.md, "Gateway"); a worker uses one core at most, and 4 of them answer about twice
        what Triton served on 16 cores. A 2-core machine gets 1 (a second worker there measured slower)."""
        if self.workers == "auto":
            return max(1, min(GATEWAY_AUTO_WORKERS, cpus // 4))
        return int(self.workers)


@dataclass(frozen=True)
class Settings:
    embed: EmbedSettings = field(default_factory=EmbedSettings)
    rerank: RerankSettings = field(default_factory=RerankSettings)
    docling: DoclingSettings = field(default_factory=DoclingSettings)
    router: RouterSettings = field(default_factory=RouterSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    #: Build tiny random-weight models of the real architecture when the hub cannot be reached.
    offline_fallback: bool = True


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


def profile_file(name_or_path: str, profiles_dir: Path) -> Path:
    """A profile (a whole settings file for one deployment target): a path to a .toml file, or a name in
    `profiles_dir` (`rtx5070ti-16gb` -> `<profiles_dir>/rtx5070ti-16gb.toml`). A missing one is an error that lists
    the profiles there are."""
    given = Path(name_or_path).expanduser()
    if given.suffix == ".toml" or len(given.parts) > 1:
        if not given.is_file():
            raise SettingsError(f"profile {given} does not exist")
        return given
    path = profiles_dir / f"{name_or_path}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in profiles_dir.glob("*.toml"))
        there = ", ".join(known) if known else "none"
        raise SettingsError(
            f"no profile {name_or_path!r} ({path} does not exist); the profiles in {profiles_dir}: {there}"
        )
    return path


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
    unknown = sorted(set(data) - {"embed", "rerank", "docling", "router", "gateway", "offline"})
    if unknown:
        raise SettingsError(f"unknown sections {unknown}; known: embed, rerank, docling, router, gateway, offline")
    offline = data.get("offline", {})
    fallback = offline.get("fallback", True)
    if isinstance(fallback, str):
        fallback = fallback.lower() in ("1", "true", "yes", "on")
    return Settings(
        embed=build_dataclass(EmbedSettings, "embed", data.get("embed", {})),
        rerank=build_dataclass(RerankSettings, "rerank", data.get("rerank", {})),
        docling=build_dataclass(DoclingSettings, "docling", data.get("docling", {})),
        router=router_settings(data.get("router", {})),
        gateway=build_dataclass(GatewaySettings, "gateway", _gateway_values(data.get("gateway", {}))),
        offline_fallback=bool(fallback),
    )


def _gateway_values(values: dict[str, Any]) -> dict[str, Any]:
    """[gateway] as build_dataclass takes it: a size may be a TOML integer."""
    return {key: str(value) if key == "max_body_bytes" else value for key, value in values.items()}

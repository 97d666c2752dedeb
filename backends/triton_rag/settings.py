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

Overflow = Literal["reject", "truncate"]
Pooling = Literal["auto", "last_token", "mean"]
Engine = Literal["torch", "tensorrt_plan"]
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
    #: Largest padded batch (rows x longest row) sent to the encoder at once.
    max_batch_tokens: int = 32768


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
class Settings:
    embed: EmbedSettings = field(default_factory=EmbedSettings)
    rerank: RerankSettings = field(default_factory=RerankSettings)
    #: Build tiny random-weight models of the real architecture when the hub cannot be reached.
    offline_fallback: bool = True


_CHOICES: dict[str, tuple[str, ...]] = {
    "overflow": ("reject", "truncate"),
    "pooling": ("auto", "last_token", "mean"),
    "engine": ("torch", "tensorrt_plan"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
}


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
        elif isinstance(default, int):
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise SettingsError(f"[{section}] {key} must be an integer, got {value!r}") from None
            if value <= 0:
                raise SettingsError(f"[{section}] {key} must be positive, got {value}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise SettingsError(f"[{section}] {key} must be one of {_CHOICES[key]}, got {value!r}")
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
    unknown = sorted(set(data) - {"embed", "rerank", "offline"})
    if unknown:
        raise SettingsError(f"unknown sections {unknown}; known: embed, rerank, offline")
    offline = data.get("offline", {})
    fallback = offline.get("fallback", True)
    if isinstance(fallback, str):
        fallback = fallback.lower() in ("1", "true", "yes", "on")
    return Settings(
        embed=_build(EmbedSettings, "embed", data.get("embed", {})),
        rerank=_build(RerankSettings, "rerank", data.get("rerank", {})),
        offline_fallback=bool(fallback),
    )

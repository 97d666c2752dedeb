"""Typed parameters of the models, as config.pbtxt carries them: one frozen dataclass per model kind, rendered into
config.pbtxt string parameters at build time and parsed back in `initialize` by the same code (`render` / `parse`,
contract.fields), so a default lives in one place and a typo fails where it is made. The router's settings and
parameters too (`RouterSettings`, `RouterParameters`), and the parser of rag.toml's [router] (`router_settings`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from triton_rag.contract.fields import TOKEN_ID, Parameters, SettingsError, build_dataclass, render_parameters
from triton_rag.contract.tensors import (
    DEFAULT_EMBED_DIM,
    DOCLING_DOCUMENT_ENDPOINT,
    DOCLING_ENDPOINT,
    DOCLING_VLM,
    EMBED_ENCODER,
    EMBED_ENDPOINT,
    RERANK_ENCODER,
    RERANK_ENDPOINT,
    EmbedOutputDtype,
)
from triton_rag.core.limits import Limits
from triton_rag.core.units import PolicyError, parse_bytes


@dataclass(frozen=True)
class RouterSettings:
    """The router's budget and policy (docs/ROUTER.md); rag.toml [router] and the router's config.pbtxt parameters."""

    #: false: every compute model loads at start-up and endpoints call it directly (no budget).
    enabled: bool = True
    #: Bytes ("12GiB", "16000000000") or "auto": GPU memory less `reserve`, or `cpu_budget_fraction` of the RAM.
    budget: str = "auto"
    #: GPU memory kept out of an automatic budget: tritonserver, the endpoints' processes, the desktop, other apps.
    reserve: str = "1536MiB"
    #: The GPU's memory as the router and the compute models may use it: "auto" (all of it) or bytes ("16303MiB"),
    #: so a larger GPU stands in for a smaller card. The budget is computed against min(this, the GPU's memory) and
    #: each compute model's process limits its own allocations to it. A GPU only: on the CPU it is ignored (logged).
    device_memory: str = "auto"
    cpu_budget_fraction: float = 0.5
    #: Host RAM for evicted models' weight copies (the host tier: wake in a fraction of a second instead of a
    #: reload): bytes, "0" (off: every eviction unloads), or "auto": `host_budget_fraction` of the RAM where there is
    #: a GPU, off on a machine without one (there the copy would take the same RAM the model gave back).
    host_budget: str = "auto"
    host_budget_fraction: float = 0.5
    #: A sleeping encoder also gives back what its process still holds on the GPU (its CUDA context, loaded kernels,
    #: workspaces: ~0.8 GiB for an 8B encoder on an H200) by the driver's checkpoint API (Linux drivers 550+; where it
    #: is missing or refuses, logged, the context stays). Costs each wake the restore (0.4 s on the H200).
    sleep_releases_context: bool = False
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
            cap = self.device_memory_cap()
        except PolicyError as exc:
            raise SettingsError(f"[router] {exc}") from None
        if cap and self.budget != "auto" and parse_bytes(self.budget) > cap:
            raise SettingsError(
                f"[router] budget {self.budget} is more than device_memory {self.device_memory}: the budget is a "
                "share of the device memory"
            )
        if not 0.0 < self.high_watermark <= 1.0:
            raise SettingsError(f"[router] high_watermark must be in (0, 1], got {self.high_watermark}")
        if not 0.0 < self.cpu_budget_fraction <= 1.0:
            raise SettingsError(f"[router] cpu_budget_fraction must be in (0, 1], got {self.cpu_budget_fraction}")
        if not 0.0 <= self.host_budget_fraction <= 1.0:
            raise SettingsError(f"[router] host_budget_fraction must be in [0, 1], got {self.host_budget_fraction}")

    def device_memory_cap(self) -> int:
        """`device_memory` in bytes; 0: no cap ("auto")."""
        return 0 if self.device_memory == "auto" else parse_bytes(self.device_memory)

    def device_total(self, device: str, total: int) -> int:
        """The memory the budget is a share of, on a device with `total` bytes: a GPU's capped at `device_memory`;
        the RAM (device "cpu") is not capped."""
        cap = self.device_memory_cap()
        return min(total, cap) if device == "gpu" and cap else total

    def budget_bytes(self, device: str, total: int) -> int:
        """The budget in bytes on a device with `total` bytes of memory ("gpu" or "cpu"; a GPU's capped at
        `device_memory`)."""
        if self.budget != "auto":
            return parse_bytes(self.budget)
        total = self.device_total(device, total)
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
        return render_parameters(self)


def router_settings(values: dict[str, Any]) -> RouterSettings:
    """From rag.toml's [router] table or the router's config.pbtxt parameters (all strings there)."""
    sizes = ("budget", "host_budget", "device_memory")
    values = {key: str(value) if key in sizes else value for key, value in values.items()}
    return build_dataclass(RouterSettings, "router", values)


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


# --- the models' parameters ----------------------------------------------------------------------------------------

Overflow = Literal["reject", "truncate"]
#: How an embedder's token states become one row (rag.toml's "auto" is resolved at build time).
Pooling = Literal["last_token", "mean"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
#: auto (= dtype) or a precision that falls back where the GPU or engine cannot run it (triton_rag.core.precision).
Precision = Literal["auto", "nvfp4", "fp8", "bfloat16", "float32"]
Task = Literal["embed", "rerank"]
EmbeddingTable = Literal["device", "host"]

#: Field metadata of a size in bytes where 0 means none.
BYTES_OR_NONE: dict[str, Any] = {"minimum": 0}

DEFAULT_RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


@dataclass(frozen=True, kw_only=True)
class TextEndpointParameters(Parameters):
    """What `qwen_embed` and `qwen_rerank` share: their encoder, the router, and the limits of a request."""

    encoder: str
    #: The router model's name; empty: the encoder is called directly (no memory budget).
    router: str = ""
    #: Tokens per text, prompt included.
    max_length: int = 8192
    overflow: Overflow = "reject"
    #: Largest padded batch (rows x longest row) sent to the encoder at once; the engine packs the real tokens into
    #: passes of at most this many (its activation memory scales with it).
    max_batch_tokens: int = 32768


@dataclass(frozen=True, kw_only=True)
class EmbedEndpointParameters(TextEndpointParameters):
    """`qwen_embed` (triton_rag.triton.endpoints.EmbedEndpoint)."""

    SECTION: ClassVar[str] = EMBED_ENDPOINT

    encoder: str = EMBED_ENCODER
    #: The Matryoshka size returned (the encoder's pooled row cut to this and normalised).
    dim: int = DEFAULT_EMBED_DIM
    #: Appended to each text for last-token pooling (the end-of-text token); empty: the tokenizer's own specials.
    pool_token: str = ""
    #: The EMBEDDING tensor's type (contract.EMBED_OUTPUT_TYPES): "fp16", or "fp32" for Triton's HTTP/JSON.
    output_dtype: EmbedOutputDtype = "fp16"


@dataclass(frozen=True, kw_only=True)
class RerankEndpointParameters(TextEndpointParameters):
    """`qwen_rerank` (triton_rag.triton.endpoints.RerankEndpoint)."""

    SECTION: ClassVar[str] = RERANK_ENDPOINT

    encoder: str = RERANK_ENCODER
    #: The instruction of a pair whose request gives none.
    default_instruction: str = DEFAULT_RERANK_INSTRUCTION


@dataclass(frozen=True, kw_only=True)
class TorchEncoderOptions(Parameters):
    """How the PyTorch engine runs an encoder (triton_rag.engines.torch_encoder.TorchEncoder)."""

    SECTION: ClassVar[str] = "encoder"

    dtype: DType = "auto"
    precision: Precision = "auto"
    #: torch.compile each decoder layer on CUDA (fuses norms, RoPE and FP8 activation quantization): FP8 needs it to
    #: beat bfloat16 (BENCHMARKS.md). Costs compilation time at each load (tens of seconds, less once cached).
    compile: bool = True
    max_batch_tokens: int = TextEndpointParameters.max_batch_tokens
    #: Weights the engine can give back and take again (the router's host tier; the RESIDENCY output).
    sleepable: bool = False
    #: The process's device memory in bytes ([router] device_memory; 0: the whole GPU), applied before the engine
    #: loads (engines/device_cap.py).
    device_memory_cap: int = dataclasses.field(default=0, metadata=BYTES_OR_NONE)
    #: Where an FP8 embedding table (precision fp8 / nvfp4) lives: "device", or "host" (pinned host memory, its rows
    #: gathered over the bus by the lookup: ~0.58 GiB of an 8B encoder off the GPU). Other tables stay on the device.
    embedding_table: EmbeddingTable = "device"
    #: Asleep, also checkpoint the process's CUDA context to host memory ([router] sleep_releases_context).
    release_context_asleep: bool = False


@dataclass(frozen=True, kw_only=True)
class EncoderParameters(Parameters):
    """`qwen_embed_encoder` / `qwen_rerank_encoder` as a python model (triton_rag.triton.encoder.EncoderModel): the
    PyTorch engine (`pytorch`), or a built TensorRT-RTX engine (`engine_file`); exactly one of the two."""

    SECTION: ClassVar[str] = "encoder"

    task: Task
    #: embed on the PyTorch engine (a built engine has its pooling inside).
    pooling: Pooling | None = None
    #: rerank on the PyTorch engine: the token ids of "no" and "yes" (the two LM-head rows read).
    yes_no_ids: tuple[int, int] | None = dataclasses.field(default=None, metadata=TOKEN_ID)
    pytorch: TorchEncoderOptions | None = None
    #: The TensorRT-RTX engine, relative to the model's version directory.
    engine_file: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.pytorch is None) == (self.engine_file is None):
            raise SettingsError(
                f"[{self.SECTION}] needs either the PyTorch engine's parameters or engine_file "
                f"({'both' if self.pytorch is not None else 'neither'} given)"
            )
        if self.pytorch is not None and self.task == "embed" and self.pooling is None:
            raise SettingsError(f"[{self.SECTION}] pooling is missing: an embedder on the PyTorch engine needs it")
        if self.pytorch is not None and self.task == "rerank" and self.yes_no_ids is None:
            raise SettingsError(f"[{self.SECTION}] yes_no_ids is missing: a reranker on the PyTorch engine needs it")


@dataclass(frozen=True, kw_only=True)
class DoclingPageParameters(Parameters):
    """`docling`, one page image (triton_rag.triton.docling.DoclingEndpoint)."""

    SECTION: ClassVar[str] = DOCLING_ENDPOINT

    vlm: str = DOCLING_VLM
    router: str = ""
    prompt: str = "Convert this page to docling."
    #: Per page; docling's own setting. A page that reaches it ends with an unclosed element (empty text).
    max_new_tokens: int = 8192
    #: From the model's config; None: the tokenizer's.
    eos_token_id: int | None = dataclasses.field(default=None, metadata=TOKEN_ID)
    max_document_bytes: int = Limits.max_document_bytes
    max_image_pixels: int = Limits.max_image_pixels

    def limits(self) -> Limits:
        return Limits(max_document_bytes=self.max_document_bytes, max_image_pixels=self.max_image_pixels)


@dataclass(frozen=True, kw_only=True)
class DoclingDocumentParameters(Parameters):
    """`docling_document`, a PDF (triton_rag.triton.docling.DoclingDocumentEndpoint)."""

    SECTION: ClassVar[str] = DOCLING_DOCUMENT_ENDPOINT

    #: The model each rendered page is sent to.
    page_model: str = DOCLING_ENDPOINT
    max_document_bytes: int = Limits.max_document_bytes
    max_image_pixels: int = Limits.max_image_pixels
    max_pages: int = Limits.max_pages
    dpi: float = Limits.dpi

    def limits(self) -> Limits:
        return Limits(
            max_document_bytes=self.max_document_bytes,
            max_pages=self.max_pages,
            max_image_pixels=self.max_image_pixels,
            dpi=self.dpi,
        )


@dataclass(frozen=True, kw_only=True)
class VlmParameters(Parameters):
    """`docling_vlm` on the PyTorch engine (triton_rag.triton.docling.VlmModel)."""

    SECTION: ClassVar[str] = DOCLING_VLM

    dtype: DType = "auto"
    #: Token ids that end a page's generation.
    stop_ids: tuple[int, ...] = dataclasses.field(default=(), metadata=TOKEN_ID)
    #: A TensorRT plan of the vision tower computes the image embeddings; None: the tower runs here in PyTorch.
    vision_model: str | None = None
    #: As TorchEncoderOptions.device_memory_cap.
    device_memory_cap: int = dataclasses.field(default=0, metadata=BYTES_OR_NONE)

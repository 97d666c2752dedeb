"""Engine plans as data: the precision a target GPU gets, the optimization profiles a build is given, the manifest
written beside each plan, and the engine variant a model falls back to when a plan cannot load here.

Pure functions over plain data (compute capabilities, version strings, the model's batch and length limits), so the
choices are unit-tested without TensorRT or a GPU; the builds (tools/) and the repository generator act on them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from triton_rag import contract
from triton_rag.build.settings import Settings
from triton_rag.core.precision import Device, hardware_supports

PlanPrecision = Literal["nvfp4", "fp8", "float16"]
#: TensorRT plans fall from NVFP4 to FP8 to FP16 (the notes' FP16 fallback; plans carry no bfloat16 path here).
PLAN_CHAIN: tuple[PlanPrecision, ...] = ("nvfp4", "fp8", "float16")
Runtime = Literal["tensorrt", "tensorrt-rtx"]
#: Engine variants of one compute model, most preferred first; `torch` needs no plan and always loads.
Variant = Literal["tensorrt_plan", "python_trt_rtx", "torch"]
VARIANT_ORDER: tuple[Variant, ...] = ("tensorrt_plan", "python_trt_rtx", "torch")
VARIANT_RUNTIME: dict[Variant, Runtime] = {"tensorrt_plan": "tensorrt", "python_trt_rtx": "tensorrt-rtx"}


def plan_precision(requested: PlanPrecision, capability: tuple[int, int]) -> tuple[PlanPrecision, list[str]]:
    """The first precision from `requested` down NVFP4 -> FP8 -> FP16 that the target GPU's tensor cores run, with
    the reason for each step down. Used at build time for the target GPU, not the build machine's."""
    reasons: list[str] = []
    for precision in PLAN_CHAIN[PLAN_CHAIN.index(requested) :]:
        if precision == "float16":
            return precision, reasons
        supported, why = hardware_supports(precision, Device(capability))
        if supported:
            return precision, reasons
        reasons.append(f"{precision} unavailable ({why}): falling back")
    raise AssertionError("float16 always builds")  # pragma: no cover


@dataclass(frozen=True)
class Profile:
    """One input's optimization profile: shapes [rows, tokens] a plan is built for (min, opt, max)."""

    input: str
    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]

    def trtexec(self) -> tuple[str, str, str]:
        """The `--minShapes/--optShapes/--maxShapes` fragments for this input."""
        return tuple(f"{self.input}:{shape[0]}x{shape[1]}" for shape in (self.min, self.opt, self.max))  # type: ignore[return-value]


def configured_profiles(settings: Settings) -> dict[str, list[Profile]]:
    """Each encoder's profiles from rag.toml: its contract's max batch, its max_length and padded-token budget."""
    return {
        contract.EMBED_ENCODER: encoder_profiles(
            contract.embed_encoder(1).max_batch_size, settings.embed.max_length, settings.embed.max_batch_tokens
        ),
        contract.RERANK_ENCODER: encoder_profiles(
            contract.rerank_encoder().max_batch_size, settings.rerank.max_length, settings.rerank.max_batch_tokens
        ),
    }


def encoder_profiles(max_rows: int, max_length: int, max_batch_tokens: int) -> list[Profile]:
    """Profiles for INPUT_IDS and ATTENTION_MASK from the model configuration: any rows up to the encoder's max batch
    and any length up to max_length; tuned (opt) for the micro-batches the engine's planner sends most, a few
    hundred tokens per row with as many rows as the padded-token budget allows."""
    if max_rows < 1 or max_length < 1 or max_batch_tokens < 1:
        raise ValueError("max_rows, max_length and max_batch_tokens must be positive")
    opt_length = min(max_length, 512)
    opt_rows = max(1, min(max_rows, max_batch_tokens // opt_length))
    return [
        Profile(name, (1, 1), (opt_rows, opt_length), (max_rows, max_length))
        for name in ("INPUT_IDS", "ATTENTION_MASK")
    ]


@dataclass(frozen=True)
class Manifest:
    """Written beside each plan (`<plan>.manifest.json`): what it was built from and for."""

    source_model: str
    contract: str
    #: What the plan computes in: nvfp4 | fp8 | float16, or float32 for an unquantized export.
    precision: str
    runtime: Runtime
    runtime_version: str
    #: Compute capability the plan's kernels were built for, e.g. (12, 0) for RTX 50 (SM120), (9, 0) for H100.
    compute_capability: tuple[int, int]
    profiles: list[Profile] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        data["compute_capability"] = tuple(data["compute_capability"])
        data["profiles"] = [
            Profile(p["input"], tuple(p["min"]), tuple(p["opt"]), tuple(p["max"])) for p in data.get("profiles", [])
        ]
        return cls(**data)


@dataclass(frozen=True)
class Host:
    """What this server offers: the GPU's compute capability (None: no GPU) and the installed runtimes' versions."""

    capability: tuple[int, int] | None
    versions: dict[Runtime, str]


def engine_source(configured_model: str, offline_stand_in: bool) -> str:
    """What a built engine records as its source model, and what `prepare` compares it with: the configured model,
    marked when the offline random-weight stand-in was exported in its place (so that engine never serves the real
    model once the hub is reachable)."""
    return f"{configured_model} (offline random-weight stand-in)" if offline_stand_in else configured_model


def incompatibility(manifest: Manifest, here: Host, source_model: str | None = None) -> str | None:
    """Why this plan cannot load here, or None. A plan computes the model it was exported from (`source_model`, the
    configured model, when given); TensorRT plans load only under the exact TensorRT version that built them and on
    the compute capability they target; TensorRT-RTX engines need the same major.minor runtime."""
    if source_model is not None and manifest.source_model != source_model:
        return f"built from {manifest.source_model}, the configured model is {source_model}: rebuild it (make engines)"
    name = "TensorRT-RTX" if manifest.runtime == "tensorrt-rtx" else "TensorRT"
    version = here.versions.get(manifest.runtime)
    if version is None:
        return f"built for {name} {manifest.runtime_version}, which this server does not have"
    same = _release(version, manifest.runtime) == _release(manifest.runtime_version, manifest.runtime)
    if not same:
        return f"built with {name} {manifest.runtime_version}, this server runs {version}: rebuild it here"
    if here.capability is None:
        return "needs a GPU, this server has none"
    if here.capability != manifest.compute_capability:
        built, found = (".".join(map(str, c)) for c in (manifest.compute_capability, here.capability))
        return f"built for compute capability {built}, this GPU is {found}: rebuild it for this GPU"
    return None


def _release(version: str, runtime: Runtime) -> tuple[str, ...]:
    parts = tuple(version.split("."))
    return parts[:2] if runtime == "tensorrt-rtx" else parts[:3]


def choose_variant(
    available: Sequence[tuple[Variant, Manifest | None]],
    here: Host,
    first: Variant = VARIANT_ORDER[0],
    source_model: str | None = None,
) -> tuple[Variant, list[str]]:
    """The most preferred variant, from `first` down VARIANT_ORDER, that loads here (a plan variant needs to be built
    from `source_model`, with a compatible manifest; `torch` always loads), with the reason each better one was
    passed over."""
    reasons: list[str] = []
    by_variant = dict(available)
    for variant in VARIANT_ORDER[VARIANT_ORDER.index(first) :]:
        if variant not in by_variant:
            if variant != "torch":
                reasons.append(f"{variant}: no engine built (make engines, docs/ENGINES.md); falling back")
            continue
        if variant == "torch":
            return variant, reasons
        manifest = by_variant[variant]
        why = "no manifest beside the plan" if manifest is None else incompatibility(manifest, here, source_model)
        if manifest is not None and VARIANT_RUNTIME[variant] != manifest.runtime:
            why = f"the manifest says {manifest.runtime}, not {VARIANT_RUNTIME[variant]}"
        if why is None:
            return variant, reasons
        reasons.append(f"{variant}: {why}; falling back")
    raise ValueError("no engine variant loads here: " + "; ".join(reasons) if reasons else "no engine variant given")


#: Where `make engines` (and the documented trtexec command) put an encoder's built engines, under the engines dir.
PLAN_FILE = "model.plan"
RTX_ENGINE_GLOB = "model.sm*.engine"


def manifest_file(engine: Path) -> Path:
    return engine.with_name(engine.name + ".manifest.json")


def built_engines(directory: Path, here: Host) -> list[tuple[Variant, Manifest | None, Path]]:
    """The engines built for one model in `directory`: a TensorRT plan and/or TensorRT-RTX engines (the one for this
    GPU when there are several), each with its manifest (None when it has none or it cannot be read)."""
    found: list[tuple[Variant, Manifest | None, Path]] = []
    plan = directory / PLAN_FILE
    if plan.exists():
        found.append(("tensorrt_plan", _read_manifest(plan), plan))
    rtx = sorted(directory.glob(RTX_ENGINE_GLOB))
    if rtx:
        manifests = [(_read_manifest(path), path) for path in rtx]
        matching = [(m, p) for m, p in manifests if m is not None and m.compute_capability == here.capability]
        manifest, path = (matching or manifests)[0]
        found.append(("python_trt_rtx", manifest, path))
    return found


def _read_manifest(engine: Path) -> Manifest | None:
    try:
        return Manifest.from_json(manifest_file(engine).read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def detect_host() -> Host:
    """This machine: the first GPU's compute capability (torch, when it sees CUDA) and the TensorRT / TensorRT-RTX
    Python packages installed here (in the NGC Triton image, the server's own TensorRT)."""
    capability = None
    try:
        import torch

        if torch.cuda.is_available():
            capability = tuple(torch.cuda.get_device_capability(0))
    except ImportError:
        pass
    versions: dict[Runtime, str] = {}
    for runtime, module in (("tensorrt", "tensorrt"), ("tensorrt-rtx", "tensorrt_rtx")):
        try:
            versions[runtime] = str(__import__(module).__version__)  # type: ignore[index]
        except ImportError:
            continue
    return Host(capability, versions)  # type: ignore[arg-type]

"""Will the configured models fit? `triton-rag plan` answers before anything is downloaded, and `prepare` checks the
models it prepared, by the same numbers the router will use: each compute model's bytes part by part (core/fit.py,
from its shape: build/footprint.py), or what the router measured for it (measured.json) where it has, against the
budget the router will compute (device memory, capped at [router] device_memory, less the reserve).

A model larger than the whole budget is an error here (FitError), not an out-of-memory error in a request later.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from triton_rag import contract
from triton_rag.build.docling_repository import image_processing
from triton_rag.build.footprint import (
    encoder_footprints,
    encoder_shape,
    known_encoder_shape,
    known_vlm,
    vlm_footprints,
    vlm_shape,
)
from triton_rag.build.prepared import Prepared, RepositoryError
from triton_rag.build.settings import EncoderSettings, RouterSettings, Settings, SettingsError
from triton_rag.core.fit import (
    Device,
    EncoderShape,
    FitError,
    Footprint,
    Residency,
    Resident,
    VlmShape,
    check_alone,
    plan_residency,
    vlm_prompt_tokens,
)
from triton_rag.core.idefics3 import ImageProcessorConfig
from triton_rag.core.measurements import MeasurementFile
from triton_rag.core.units import format_bytes, parse_bytes

__all__ = ["FitError", "FitPlan", "Memory", "check_prepared", "detect_gpu_memory", "fit_plan", "render_plan"]


def detect_gpu_memory() -> int | None:
    """This machine's GPU memory as the router's probe reads it (NVML, the first of CUDA_VISIBLE_DEVICES, else GPU
    0); None without a GPU or its driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
    except Exception:  # no libnvidia-ml, no GPU, no driver
        return None


@dataclass(frozen=True)
class Memory:
    """The device a budget is a share of: "gpu" (its memory, capped at device_memory) or "cpu" (the RAM)."""

    device: Device
    total: int
    #: Where `total` comes from, for the plan and the errors.
    description: str

    @classmethod
    def serving(cls, router: RouterSettings, gpu_total: int | None, ram: int) -> Memory:
        """What the router will see on this machine: its GPU capped at device_memory, or the RAM without a GPU
        (where device_memory does not apply)."""
        if gpu_total is None:
            ignored = f"; device_memory {router.device_memory} caps a GPU only" if router.device_memory_cap() else ""
            return cls("cpu", ram, f"no GPU on this machine: its RAM{ignored}")
        total = router.device_total("gpu", gpu_total)
        if total < gpu_total:
            return cls("gpu", total, f"device_memory {router.device_memory} of this GPU's {format_bytes(gpu_total)}")
        return cls("gpu", total, f"this GPU's {format_bytes(gpu_total)}")

    @classmethod
    def planned(cls, router: RouterSettings, gpu_total: int | None, ram: int) -> Memory:
        """What a plan is for: as `serving`, except that on a machine without a GPU a device_memory stands for the
        GPU the settings were written for."""
        cap = router.device_memory_cap()
        if gpu_total is None and cap:
            return cls("gpu", cap, f"a GPU of device_memory {router.device_memory}; this machine has none")
        return cls.serving(router, gpu_total, ram)

    def budget(self, router: RouterSettings) -> tuple[int, str]:
        """The router's budget here, and how it is made."""
        try:
            budget = router.budget_bytes(self.device, self.total)
        except SettingsError as exc:  # a reserve larger than the device
            raise FitError(str(exc)) from None
        if router.budget != "auto":
            return budget, f"budget {router.budget} as set"
        if self.device == "gpu":
            return budget, f"device memory less reserve {format_bytes(parse_bytes(router.reserve))}"
        return budget, f"{router.cpu_budget_fraction} of the RAM"


@dataclass(frozen=True)
class PlannedModel:
    """One compute model in the plan."""

    name: str
    #: As configured: a hub id or a directory.
    configured: str
    footprint: Footprint
    #: What the router measured for it with these settings (measured.json); None before a measurement.
    measured: int | None
    sleepable: bool
    #: Where the shape came from.
    source: str

    @property
    def bytes(self) -> int:
        """What the router counts: the measurement where there is one, else the estimate."""
        return self.measured if self.measured is not None else self.footprint.total

    def resident(self) -> Resident:
        return Resident(self.name, self.bytes, self.footprint.weight_bytes, self.sleepable)


@dataclass(frozen=True)
class FitPlan:
    """What `triton-rag plan` prints: the memory and budgets, each compute model's bytes, the steady state."""

    memory: Memory
    budget: int
    #: How the budget is made ("device memory less reserve 1.50 GiB").
    budget_source: str
    high_watermark: float
    host_budget: int
    #: How the host budget is made.
    host_budget_source: str
    models: tuple[PlannedModel, ...]
    residency: Residency


def _model_dir(spec: str, cache_dir: Path) -> Path | None:
    """A configured model's files where they are already on disk: the directory itself, or the copy `prepare`
    downloaded earlier (<cache>/hub/<org>--<name>); None where there is none."""
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise FitError(f"{local} has no config.json: not a Hugging Face model directory")
        return local
    downloaded = cache_dir / "hub" / spec.replace("/", "--")
    return downloaded if (downloaded / "config.json").exists() else None


def _unknown(spec: str, what: str) -> FitError:
    return FitError(
        f"cannot size {spec} without its files: it is not on disk and not a known {what} shape; give a local "
        "directory, or run `triton-rag prepare` first to download it"
    )


def _encoder_shape(spec: str, cache_dir: Path) -> EncoderShape:
    directory = _model_dir(spec, cache_dir)
    if directory is not None:
        return encoder_shape(directory, json.loads((directory / "config.json").read_text()))
    shape = known_encoder_shape(spec)
    if shape is None:
        raise _unknown(spec, "Qwen3-Embedding / Qwen3-Reranker")
    return shape


def _vlm_shape(spec: str, cache_dir: Path) -> tuple[VlmShape, ImageProcessorConfig]:
    directory = _model_dir(spec, cache_dir)
    if directory is not None:
        try:
            _, image_config = image_processing(directory)
        except RepositoryError as exc:
            raise FitError(str(exc)) from None
        return vlm_shape(directory, json.loads((directory / "config.json").read_text())), image_config
    known = known_vlm(spec)
    if known is None:
        raise _unknown(spec, "docling VLM")
    shape, processing = known
    return shape, ImageProcessorConfig.from_preprocessor_config(processing)


def _encoder(
    name: str, settings: EncoderSettings, task: str, device: Device, cache_dir: Path, measured: MeasurementFile
) -> PlannedModel:
    shape = _encoder_shape(settings.model, cache_dir)
    footprints = encoder_footprints(
        shape, task, settings.precision, settings.dtype, settings.max_batch_tokens, settings.max_length,
        settings.embedding_table == "host",
    )  # fmt: skip
    footprint = footprints[device]
    sleepable = settings.engine == "torch"
    return PlannedModel(
        name, settings.model, footprint, measured.get(name, device, footprint.total), sleepable, shape.source
    )


def fit_plan(settings: Settings, repository: Path, cache_dir: Path, memory: Memory, ram: int) -> FitPlan:
    """The plan for `settings` on `memory` with `ram` bytes of host RAM (the host tier's automatic budget), from
    files already on disk and the known shapes (nothing is downloaded); FitError when a model's shape cannot be had
    or a model cannot fit the budget even alone."""
    router = settings.router
    measured = MeasurementFile(repository / contract.ROUTER / router.measurements_file)
    device = memory.device
    embed = _encoder(contract.EMBED_ENCODER, settings.embed, "embed", device, cache_dir, measured)
    rerank = _encoder(contract.RERANK_ENCODER, settings.rerank, "rerank", device, cache_dir, measured)
    docling = settings.docling
    shape, image = _vlm_shape(docling.model, cache_dir)
    prompt = vlm_prompt_tokens(image.longest_edge, image.tile_size, image.image_seq_len)
    pages = contract.docling_vlm().max_batch_size
    footprint = vlm_footprints(shape, docling.dtype, pages, prompt + docling.max_new_tokens)[device]
    vlm = PlannedModel(
        contract.DOCLING_VLM,
        docling.model,
        footprint,
        measured.get(contract.DOCLING_VLM, device, footprint.total),
        False,  # the VLM is unloaded when evicted (docs/ROUTER.md, Tiers)
        shape.source,
    )
    models = (embed, rerank, vlm)
    budget, source = memory.budget(router)
    residents = [model.resident() for model in models]
    check_alone(residents, budget, _where(memory, source))
    host_budget = router.host_budget_bytes(device, ram)
    if not host_budget:
        host_source = "off"
    elif router.host_budget == "auto":
        host_source = f"{router.host_budget_fraction} of this machine's {format_bytes(ram)} RAM"
    else:
        host_source = "as set"
    if router.enabled:
        residency = plan_residency(residents, budget, router.high_watermark, host_budget)
    else:
        residency = _without_router(residents, budget)
    return FitPlan(memory, budget, source, router.high_watermark, host_budget, host_source, models, residency)


def _without_router(models: list[Resident], budget: int) -> Residency:
    """[router] enabled = false: every model loads at start-up and stays."""
    total = sum(m.bytes for m in models)
    note = f"the router is disabled: every model loads at start-up, {format_bytes(total)} in all"
    if total > budget:
        note += f", more than the budget of {format_bytes(budget)}: expect the last to fail its load"
    return Residency("all resident", tuple(m.name for m in models), (), budget, (note,))


def _where(memory: Memory, source: str) -> str:
    return f"{source}; device memory {format_bytes(memory.total)}: {memory.description}"


def check_prepared(router: RouterSettings, prepared: Iterable[Prepared], repository: Path, memory: Memory) -> None:
    """FitError naming every prepared compute model larger than the budget the router will have on `memory`: by
    its estimate, or by what the router measured for it with the same estimate."""
    measured = MeasurementFile(repository / contract.ROUTER / router.measurements_file)
    budget, source = memory.budget(router)
    residents = []
    for record in prepared:
        estimate = record.estimate_bytes[memory.device]
        known = measured.get(record.compute_model, memory.device, estimate)
        residents.append(Resident(record.compute_model, known if known is not None else estimate, 0, False))
    check_alone(residents, budget, _where(memory, source))


# --- the plan as text ------------------------------------------------------------------------------------------

_COLUMNS = ("model", "precision", "weights", "embedding", "norms+head", "activations", "KV cache", "graphs",
            "context", "total", "measured")  # fmt: skip


def _size(value: int | None) -> str:
    return "-" if not value else format_bytes(value)


def render_plan(plan: FitPlan, title: str) -> str:
    """The plan as `triton-rag plan` prints it: the memory, then one row per model, part by part, then the steady
    state."""
    memory = plan.memory
    keep = plan.residency.keep_bytes
    lines = [
        title,
        f"device memory: {format_bytes(memory.total)} ({memory.description})",
        f"budget: {format_bytes(plan.budget)} ({plan.budget_source}); idle models stay resident up to "
        f"{format_bytes(keep)} (high watermark {plan.high_watermark})",
        f"host budget: {format_bytes(plan.host_budget)} ({plan.host_budget_source}): host RAM evicted encoders "
        "sleep in",
        "",
    ]
    rows = [list(_COLUMNS)]
    for model in plan.models:
        part = model.footprint
        rows.append(
            [
                model.name,
                part.precision,
                _size(part.weights),
                _size(part.embedding),
                _size(part.other),
                _size(part.activations),
                _size(part.kv_cache),
                _size(part.graphs),
                _size(part.runtime),
                _size(part.total),
                _size(model.measured),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    lines.append("")
    for model in plan.models:
        counted = "measured by the router" if model.measured is not None else "the estimate"
        lines.append(f"{model.name}: {model.configured}, {model.source}; the router counts {counted}")
    lines.append("")
    lines.append(f"steady state: {plan.residency.mode}")
    lines += [f"  - {note}" for note in plan.residency.notes]
    return "\n".join(lines)

"""The docling section of the repository: `docling` and `docling_document` (python) and their compute model
`docling_vlm` (python+torch); with engine `tensorrt_plan`, the vision tower as a plan (`docling_vision`) where one is
built and this host has a GPU and TensorRT."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from triton_rag import contract
from triton_rag.build.footprint import totals, vlm_footprints, vlm_shape
from triton_rag.build.prepared import (
    BuildContext,
    PreparedDocling,
    RepositoryError,
    copy_tokenizer,
    place_link,
    write_model,
)
from triton_rag.build.settings import DoclingSettings
from triton_rag.build.sources import resolve_model
from triton_rag.contract.params import DoclingDocumentParameters, DoclingPageParameters, VlmParameters
from triton_rag.core.fit import vlm_prompt_tokens
from triton_rag.core.idefics3 import ImageProcessorConfig

#: A random stand-in writes noise until the limit; more than this only costs time.
OFFLINE_MAX_NEW_TOKENS = 256


def image_processing(model_path: Path) -> tuple[dict[str, Any], ImageProcessorConfig]:
    """The model's image processing: preprocessor_config.json with image_seq_len (placeholder tokens per tile, from
    processor_config.json) merged in (the endpoint reads this one file), and as core.idefics3 reads it."""
    preprocessor = model_path / "preprocessor_config.json"
    if not preprocessor.exists():
        raise RepositoryError(f"{model_path} has no preprocessor_config.json: not an Idefics3 (granite-docling) model")
    processing = json.loads(preprocessor.read_text())
    processor_file = model_path / "processor_config.json"
    processor = json.loads(processor_file.read_text()) if processor_file.exists() else {}
    if "image_seq_len" in processor:
        processing["image_seq_len"] = processor["image_seq_len"]
    try:
        return processing, ImageProcessorConfig.from_preprocessor_config(processing)
    except ValueError as exc:
        raise RepositoryError(f"{preprocessor}: {exc}") from None


def prepare_docling(context: BuildContext, settings: DoclingSettings) -> PreparedDocling:
    """The page and document endpoints and the VLM; the vision tower as a plan from
    `<engines_dir>/docling_vision/model.plan` (or one linked there by hand) when asked for and loadable here."""
    from transformers import AutoTokenizer

    from triton_rag.core.docling_prompt import PagePrompts

    repository, log = context.repository, context.log
    model = resolve_model(settings.model, "docling", context.cache_dir, context.offline_fallback, log)
    max_new_tokens = settings.max_new_tokens
    if model.is_offline_stand_in and max_new_tokens > OFFLINE_MAX_NEW_TOKENS:
        log(f"docling.max_new_tokens {max_new_tokens} -> {OFFLINE_MAX_NEW_TOKENS} for the random stand-in model")
        max_new_tokens = OFFLINE_MAX_NEW_TOKENS
    processing, image_config = image_processing(model.path)
    eos = model.config.get("eos_token_id", model.config.get("text_config", {}).get("eos_token_id"))
    tokenizer = AutoTokenizer.from_pretrained(str(model.path))
    prompts = PagePrompts(tokenizer, settings.prompt, image_config, eos)

    page, document = contract.docling_endpoint(settings.batching), contract.docling_document_endpoint()
    vlm = contract.docling_vlm()
    page_params = DoclingPageParameters(
        vlm=vlm.name,
        router=context.router,
        prompt=settings.prompt,
        max_new_tokens=max_new_tokens,
        eos_token_id=None if eos is None else int(eos),
        max_document_bytes=settings.max_document_bytes,
        max_image_pixels=settings.max_image_pixels,
    )
    page_dir = write_model(repository, page, page_params, instance_count=2)
    copy_tokenizer(model.path, page_dir / "1" / "tokenizer")
    (page_dir / "1" / "tokenizer" / "preprocessor_config.json").write_text(json.dumps(processing, indent=1))
    document_params = DoclingDocumentParameters(
        page_model=page.name,
        max_document_bytes=settings.max_document_bytes,
        max_image_pixels=settings.max_image_pixels,
        max_pages=settings.max_pages,
        dpi=settings.dpi,
    )
    write_model(repository, document, document_params, instance_count=2)

    vision_dir = repository / contract.DOCLING_VISION
    plan_link = vision_dir / "1" / "model.plan"
    built_plan = context.engines_dir / contract.DOCLING_VISION / "model.plan"
    our_link = plan_link.is_symlink() and plan_link.resolve() == built_plan.resolve()
    placed_by_hand = plan_link.exists() and not our_link  # a file or a link the user put there: kept as it is
    use_plan = False
    if settings.engine == "tensorrt_plan":
        host = context.host
        if not (placed_by_hand or built_plan.is_file()):
            why = f"no {built_plan} (built separately, docs/DOCLING.md)"
        elif host.capability is None or "tensorrt" not in host.versions:
            why = "a plan needs a GPU and TensorRT, which this server does not have"
        else:
            why, use_plan = "", True
        if not use_plan:
            log(f"docling: engine tensorrt_plan, but {why}: the vision tower runs in PyTorch inside docling_vlm")
    vision_model: str | None = None
    if use_plan:  # the tower as a plan; decoding stays ours
        vision = contract.docling_vision(int(model.config["text_config"]["hidden_size"]), image_config.image_seq_len)
        write_model(repository, vision, backend=None, instance_kind="KIND_GPU")
        if not placed_by_hand:
            place_link(built_plan, plan_link)
        vision_model = vision.name  # loaded at start-up with the endpoints, not under the router
    else:
        (vision_dir / "config.pbtxt").unlink(missing_ok=True)
        if our_link:
            plan_link.unlink()
    vlm_params = VlmParameters(
        dtype=settings.dtype,
        stop_ids=tuple(prompts.stop_ids),
        vision_model=vision_model,
        device_memory_cap=context.device_memory_cap,
    )
    vlm_dir = write_model(repository, vlm, vlm_params)
    place_link(model.path, vlm_dir / "1" / "hf")
    prompt_tokens = vlm_prompt_tokens(image_config.longest_edge, image_config.tile_size, image_config.image_seq_len)
    shape = vlm_shape(model.path, model.config)
    footprints = vlm_footprints(shape, settings.dtype, vlm.max_batch_size, prompt_tokens + max_new_tokens)
    return PreparedDocling(
        model=settings.model,
        path=model.path,
        origin=model.origin,
        engine="tensorrt_plan" if use_plan else "torch",
        compute_model=vlm.name,
        endpoints=(page.name, document.name),
        estimate_bytes=totals(footprints),
        also_load=(vision_model,) if vision_model else (),
        max_new_tokens=max_new_tokens,
        stop_ids=tuple(prompts.stop_ids),
    )

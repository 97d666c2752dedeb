"""The embed and rerank sections of the repository: each a client-facing python endpoint (with the tokenizer) and its
encoder, in the engine variant that can run here (a TensorRT plan, a TensorRT-RTX engine run by a python model, or
python+torch with linked weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from triton_rag import contract
from triton_rag.build.footprint import encoder_footprints, encoder_shape, totals, weights
from triton_rag.build.plans import Host, Variant, built_engines, choose_variant, engine_source
from triton_rag.build.prepared import (
    BuildContext,
    Log,
    PreparedEmbed,
    PreparedRerank,
    RepositoryError,
    copy_tokenizer,
    place_link,
    write_model,
)
from triton_rag.build.settings import EmbedSettings, EncoderSettings, RerankSettings
from triton_rag.build.sources import ResolvedModel, resolve_model
from triton_rag.contract import MIN_EMBED_DIM, ModelContract
from triton_rag.contract.params import (
    EmbedEndpointParameters,
    EncoderParameters,
    Pooling,
    RerankEndpointParameters,
    TextEndpointParameters,
    TorchEncoderOptions,
)
from triton_rag.core.text import QWEN3_POOL_TOKEN

#: rag.toml's `engine` -> the first engine variant to try (plans.VARIANT_ORDER continues from there down to torch).
REQUESTED_VARIANT: dict[str, Variant] = {
    "tensorrt_plan": "tensorrt_plan",
    "tensorrt_rtx": "python_trt_rtx",
    "torch": "torch",
}


def detect_pooling(model: ResolvedModel) -> Pooling:
    """The sentence-transformers pooling config when the checkpoint has one, else by architecture."""
    pooling_config = model.path / "1_Pooling" / "config.json"
    if pooling_config.exists():
        modes = json.loads(pooling_config.read_text())
        if modes.get("pooling_mode_lasttoken"):
            return "last_token"
        if modes.get("pooling_mode_mean_tokens"):
            return "mean"
        raise RepositoryError(f"{pooling_config}: only last-token and mean pooling are supported, got {modes}")
    return "last_token" if model.config.get("model_type", "").startswith("qwen") else "mean"


def clamp_embed_dim(requested: int, hidden_size: int, log: Log) -> int:
    """Matryoshka sizes run from 32 to the model's hidden size; anything else is clamped, loudly."""
    if requested > hidden_size:
        log(f"embed.dim {requested} is larger than the model's hidden size {hidden_size}: using {hidden_size}")
        return hidden_size
    if requested < MIN_EMBED_DIM:
        log(f"embed.dim {requested} is below the Matryoshka minimum {MIN_EMBED_DIM}: using {MIN_EMBED_DIM}")
        return min(MIN_EMBED_DIM, hidden_size)
    return requested


def choose_encoder_variant(
    requested: str, engines_dir: Path, host: Host, log: Log, source_model: str | None = None
) -> tuple[Variant, Path | None, list[str]]:
    """The engine variant an encoder gets: the requested one if its engine is built here from the configured model
    and loads on this host (manifest), else the next one down to torch, each step logged with its reason."""
    built = {variant: (manifest, path) for variant, manifest, path in built_engines(engines_dir, host)}
    available = [(variant, manifest) for variant, (manifest, _) in built.items()] + [("torch", None)]
    variant, reasons = choose_variant(available, host, REQUESTED_VARIANT[requested], source_model)
    for reason in reasons:
        log(f"{engines_dir}: {reason}")
    return variant, (built[variant][1] if variant in built else None), reasons


def _torch_options(settings: EncoderSettings, context: BuildContext) -> TorchEncoderOptions:
    """How the PyTorch engine runs an encoder; it can give its weights' memory back and take it again (the router's
    host tier)."""
    return TorchEncoderOptions(
        dtype=settings.dtype,
        precision=settings.precision,
        compile=settings.compile,
        max_batch_tokens=settings.max_batch_tokens,
        sleepable=True,
        device_memory_cap=context.device_memory_cap,
        embedding_table=settings.embedding_table,
        release_context_asleep=context.release_context_asleep,
    )


def _write_endpoint_pair(
    context: BuildContext,
    model: ResolvedModel,
    settings: EncoderSettings,
    endpoint: ModelContract,
    endpoint_params: TextEndpointParameters,
    encoder: ModelContract,
    torch_params: EncoderParameters,
) -> Variant:
    """An endpoint (python, with the tokenizer) and its encoder: a TensorRT plan, a TensorRT-RTX engine run by a
    python model, or python+torch with linked weights (`torch_params`), whichever `choose_encoder_variant` picks."""
    repository = context.repository
    # Two instances: one tokenizes and answers while the other waits on the encoder. One instance gave larger
    # batches but lost more to that serialisation (8B FP8 end to end: 35.4k tokens/s against 44.7k; BENCHMARKS.md).
    endpoint_dir = write_model(repository, endpoint, endpoint_params, instance_count=2)
    copy_tokenizer(model.path, endpoint_dir / "1" / "tokenizer")
    source = engine_source(settings.model, model.is_offline_stand_in)
    engines = context.engines_dir / encoder.name
    variant, engine_file, _ = choose_encoder_variant(settings.engine, engines, context.host, context.log, source)
    encoder_dir = repository / encoder.name
    for stale in ("model.plan", "model.engine", "model.py"):
        (encoder_dir / "1" / stale).unlink(missing_ok=True)
    if variant == "tensorrt_plan":
        write_model(repository, encoder, backend=None, instance_kind="KIND_GPU")
    elif variant == "python_trt_rtx":
        write_model(repository, encoder, EncoderParameters(task=torch_params.task, engine_file="model.engine"))
    else:  # the PyTorch engine can sleep: its config has the residency output
        write_model(repository, contract.with_residency(encoder), torch_params)
    place_link(model.path, encoder_dir / "1" / "hf")
    if engine_file is not None:
        place_link(engine_file, encoder_dir / "1" / ("model.plan" if variant == "tensorrt_plan" else "model.engine"))
    return variant


def _prepared(
    model: ResolvedModel, settings: EncoderSettings, variant: Variant, endpoint: str, encoder: str, task: str
) -> Any:
    """What every endpoint pair's record has: the model, the variant, and what the router needs to know about the
    compute model before the first load (core/fit.py's estimate, the same `triton-rag plan` prints)."""
    shape = encoder_shape(model.path, model.config)
    footprints = encoder_footprints(
        shape, task, settings.precision, settings.dtype, settings.max_batch_tokens, settings.max_length,
        settings.embedding_table == "host",
    )  # fmt: skip
    return {
        "model": settings.model,
        "path": model.path,
        "origin": model.origin,
        "engine": variant,
        "compute_model": encoder,
        "endpoints": (endpoint,),
        "estimate_bytes": totals(footprints),
        "weight_bytes": weights(footprints),
        "sleepable": variant == "torch",
    }


def prepare_embed(context: BuildContext, settings: EmbedSettings) -> PreparedEmbed:
    model = resolve_model(settings.model, "embed", context.cache_dir, context.offline_fallback, context.log)
    hidden = int(model.config["hidden_size"])
    dim = clamp_embed_dim(settings.dim, hidden, context.log)
    pooling = detect_pooling(model) if settings.pooling == "auto" else settings.pooling
    endpoint_params = EmbedEndpointParameters(
        router=context.router,
        max_length=settings.max_length,
        overflow=settings.overflow,
        max_batch_tokens=settings.max_batch_tokens,
        dim=dim,
        # Last-token pooling reads the end-of-text token; mean pooling keeps the tokenizer's own specials.
        pool_token=QWEN3_POOL_TOKEN if pooling == "last_token" else "",
        output_dtype=settings.output_dtype,
    )
    options = _torch_options(settings, context)
    torch_params = EncoderParameters(task="embed", pooling=pooling, pytorch=options)
    endpoint = contract.embed_endpoint(dim, settings.batching, settings.output_dtype)
    encoder = contract.embed_encoder(hidden)
    variant = _write_endpoint_pair(context, model, settings, endpoint, endpoint_params, encoder, torch_params)
    record = _prepared(model, settings, variant, endpoint.name, encoder.name, "embed")
    return PreparedEmbed(**record, dim=dim, pooling=pooling)


def prepare_rerank(context: BuildContext, settings: RerankSettings) -> PreparedRerank:
    from transformers import AutoTokenizer

    model = resolve_model(settings.model, "rerank", context.cache_dir, context.offline_fallback, context.log)
    tokenizer = AutoTokenizer.from_pretrained(str(model.path))
    ids = [tokenizer.convert_tokens_to_ids(token) for token in ("no", "yes")]
    if any(token_id is None or token_id == tokenizer.unk_token_id for token_id in ids):
        raise RepositoryError(f"{model.path}: the tokenizer has no single tokens 'no' and 'yes'")
    yes_no = cast(tuple[int, int], tuple(ids))
    endpoint_params = RerankEndpointParameters(
        router=context.router,
        max_length=settings.max_length,
        overflow=settings.overflow,
        max_batch_tokens=settings.max_batch_tokens,
        default_instruction=settings.default_instruction,
    )
    options = _torch_options(settings, context)
    torch_params = EncoderParameters(task="rerank", yes_no_ids=yes_no, pytorch=options)
    endpoint, encoder = contract.rerank_endpoint(settings.batching), contract.rerank_encoder()
    variant = _write_endpoint_pair(context, model, settings, endpoint, endpoint_params, encoder, torch_params)
    record = _prepared(model, settings, variant, endpoint.name, encoder.name, "rerank")
    return PreparedRerank(**record, yes_no_ids=yes_no)

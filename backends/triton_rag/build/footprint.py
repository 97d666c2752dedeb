"""What a compute model is expected to hold before it has ever been loaded, from its shape: the router makes room
with this estimate on a model's first load and then replaces it with the measured bytes (triton/router/memory.py);
`triton-rag plan` prints the same numbers part by part. The arithmetic is core/fit.py's (one place, documented in
docs/ROUTER.md); this module finds the shapes:
- a model directory: its config.json and its safetensors headers (no tensor data is read);
- a hub id that was never downloaded: a table of known shapes (Qwen3-Embedding / Qwen3-Reranker 0.6B, 4B and 8B;
  granite-docling-258M), so a plan needs no download.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from triton_rag.build.offline import QWEN3_SHAPES
from triton_rag.build.offline_docling import GRANITE_DOCLING_TEXT, GRANITE_DOCLING_VISION, PREPROCESSOR_CONFIG
from triton_rag.core.fit import (
    OUR_DECODERS,
    Device,
    EncoderShape,
    Footprint,
    VlmShape,
    encoder_footprint,
    pass_tokens,
    qwen3_shape,
    serving_precision,
    vlm_footprint,
)

DEVICES: tuple[Device, ...] = ("gpu", "cpu")
#: The Qwen3 tokenizer's vocabulary (the embedding tables' rows of Qwen3-Embedding and Qwen3-Reranker).
QWEN3_VOCAB = 151669
KNOWN_SHAPE = "estimated from the known shape"
_QWEN3_HUB_ID = re.compile(r"qwen/qwen3-(embedding|reranker)-(0\.6b|4b|8b)")
#: Hub ids of the docling VLMs whose shape is known: (text config, vision config, scale factor, image_seq_len).
KNOWN_VLMS: dict[str, tuple[Mapping[str, Any], Mapping[str, Any], int, int]] = {
    "ibm-granite/granite-docling-258m": (GRANITE_DOCLING_TEXT, GRANITE_DOCLING_VISION, 4, 64),
}


def safetensors_shapes(model_dir: Path) -> dict[str, list[int]]:
    """Every tensor's shape, from the safetensors headers (no tensor data is read)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no .safetensors weights")
    shapes: dict[str, list[int]] = {}
    for path in files:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        shapes |= {name: list(info["shape"]) for name, info in header.items() if name != "__metadata__"}
    return shapes


def safetensors_parameters(model_dir: Path, skip_prefixes: tuple[str, ...] = ("lm_head.",)) -> int:
    """Parameter count from the safetensors headers."""
    shapes = safetensors_shapes(model_dir)
    return sum(math.prod(dims) for name, dims in shapes.items() if not name.startswith(skip_prefixes))


def encoder_shape(model_dir: Path, config: Mapping[str, Any]) -> EncoderShape:
    """An encoder's shape from its safetensors headers: the embedding table, the layers' 2-D weights (the linears),
    everything else (norms, biases, position tables); an LM head is left out (the reranker keeps two rows of it)."""
    linear_params = linear_rows = linears = embedding_params = embedding_rows = other = 0
    for name, dims in safetensors_shapes(model_dir).items():
        if name.startswith("lm_head."):
            continue
        size = math.prod(dims)
        if name.endswith(("embed_tokens.weight", "word_embeddings.weight")):
            embedding_params, embedding_rows = embedding_params + size, embedding_rows + dims[0]
        elif len(dims) == 2 and {"layers", "layer"} & set(name.split(".")):
            linear_params, linear_rows, linears = linear_params + size, linear_rows + dims[0], linears + 1
        else:
            other += size
    hidden = int(config["hidden_size"])
    return EncoderShape(
        hidden=hidden,
        intermediate=int(config.get("intermediate_size", 4 * hidden)),
        linear_params=linear_params,
        linear_rows=linear_rows,
        linears=linears,
        embedding_params=embedding_params,
        embedding_rows=embedding_rows,
        other_params=other,
        decoder=runs_our_decoder(config),
        source=f"config and safetensors headers of {model_dir}",
    )


def runs_our_decoder(config: Mapping[str, Any]) -> bool:
    """The engine runs this architecture on our decoder (as engines/torch_encoder.py decides)."""
    return config.get("model_type") in OUR_DECODERS and not config.get("use_sliding_window", False)


def known_encoder_shape(spec: str) -> EncoderShape | None:
    """The shape of a Qwen3-Embedding / Qwen3-Reranker hub id (0.6B, 4B, 8B) without its files; None for others."""
    match = _QWEN3_HUB_ID.fullmatch(spec.strip().lower())
    if match is None:
        return None
    return qwen3_shape(dict(QWEN3_SHAPES[match.group(2)], vocab_size=QWEN3_VOCAB), KNOWN_SHAPE)


def encoder_footprints(
    shape: EncoderShape,
    task: str,
    precision: str,
    dtype: str,
    max_batch_tokens: int,
    max_length: int,
    host_table: bool = False,
) -> dict[Device, Footprint]:
    """Per device, the encoder at the precision the engine would serve it in there, for its longest pass."""
    tokens = pass_tokens(max_batch_tokens, max_length)
    return {
        device: encoder_footprint(shape, task, device, serving_precision(device, precision, dtype), tokens, host_table)
        for device in DEVICES
    }


def idefics3_parameters(text: Mapping[str, Any], vision: Mapping[str, Any], scale_factor: int) -> int:
    """An Idefics3 model's parameters from its configs: the text decoder (Llama layout, tied head), the SigLIP
    vision tower (with biases and layer norms) and the connector's projection."""
    th, ti, layers = int(text["hidden_size"]), int(text["intermediate_size"]), int(text["num_hidden_layers"])
    heads = int(text["num_attention_heads"])
    head_dim = int(text.get("head_dim") or th // heads)
    kv = int(text.get("num_key_value_heads") or heads) * head_dim
    text_layer = 2 * th * heads * head_dim + 2 * th * kv + 3 * th * ti + 2 * th
    text_params = int(text["vocab_size"]) * th + layers * text_layer + th
    vh, vi, patch = int(vision["hidden_size"]), int(vision["intermediate_size"]), int(vision["patch_size"])
    patches = (int(vision["image_size"]) // patch) ** 2
    vision_layer = 4 * (vh * vh + vh) + 2 * vh * vi + vi + vh + 4 * vh
    vision_layers = int(vision["num_hidden_layers"]) * vision_layer
    vision_params = 3 * patch * patch * vh + vh + patches * vh + vision_layers + 2 * vh
    return text_params + vision_params + vh * scale_factor**2 * th


def known_vlm(spec: str) -> tuple[VlmShape, Mapping[str, Any]] | None:
    """A known docling VLM's shape and its image processing (preprocessor config with image_seq_len), without its
    files; None for others."""
    known = KNOWN_VLMS.get(spec.strip().lower())
    if known is None:
        return None
    text, vision, scale_factor, image_seq_len = known
    config = {"text_config": text, "vision_config": vision}
    shape = VlmShape.from_config(idefics3_parameters(text, vision, scale_factor), config, KNOWN_SHAPE)
    return shape, dict(PREPROCESSOR_CONFIG, image_seq_len=image_seq_len)


def vlm_shape(model_dir: Path, config: Mapping[str, Any]) -> VlmShape:
    """A docling VLM's shape from its config.json and safetensors headers."""
    source = f"config and safetensors headers of {model_dir}"
    return VlmShape.from_config(safetensors_parameters(model_dir), config, source)


def vlm_footprints(shape: VlmShape, dtype: str, pages: int, max_tokens: int) -> dict[Device, Footprint]:
    return {device: vlm_footprint(shape, device, dtype, pages, max_tokens) for device in DEVICES}


def totals(footprints: Mapping[Device, Footprint]) -> dict[str, int]:
    """{"gpu", "cpu"}: what the router counts for the model (ManagedModel.estimate_bytes)."""
    return {device: footprint.total for device, footprint in footprints.items()}


def weights(footprints: Mapping[Device, Footprint]) -> dict[str, int]:
    """{"gpu", "cpu"}: the weights alone, a sleeping engine's host copy (ManagedModel.weight_bytes)."""
    return {device: footprint.weight_bytes for device, footprint in footprints.items()}

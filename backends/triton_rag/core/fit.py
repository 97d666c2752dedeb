"""What a compute model holds on the device, part by part, and which models fit a budget together: the arithmetic
behind `triton-rag plan` and behind the router's first-load estimate (`build/footprint.py`), so the two agree.

Pure: shapes and settings in, typed records out. The memory layout it assumes is the engine's:
- fp8: every decoder linear 1 byte per parameter plus a float32 scale per output row; the embedding table FP8 too
  (1 byte per parameter, 4 bytes per row); norms in bfloat16.
- nvfp4: linears 0.5 byte per parameter, 1 byte per 16 parameters (the E4M3 block scales), a float32 per output
  row and one float32 scalar per linear; the embedding table FP8 as above.
- bfloat16 / float16: 2 bytes per parameter, float32 4; the reranker keeps 2 rows of its LM head ("no", "yes").
- activation pool: `tokens x (6 x hidden + 3 x intermediate)` values in the activation dtype (bfloat16 under fp8
  and nvfp4): one layer's transient peak for the longest packed pass, whose tokens are
  `max(max_batch_tokens, max_length)` (a text longer than max_batch_tokens runs in a pass of its own).
- graph pool: `GRAPH_POOL_BYTES` for the CUDA graphs of small batches (a stated constant, not yet measured).
- runtime: the CUDA context and torch's runtime of the stub process (`GPU_RUNTIME_BYTES`), or on the CPU its Python
  and torch (`CPU_RUNTIME_BYTES`).
- the docling VLM: its parameters at the serving dtype, the KV cache of a full batch of pages and the vision tower's
  activations for their tiles (`vlm_footprint`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from triton_rag.core.units import format_bytes

MIB = 2**20
#: The CUDA context and torch's runtime in one stub process (docs/ROUTER.md); BENCHMARKS.md has no better number.
GPU_RUNTIME_BYTES = 512 * MIB
#: A CPU stub's Python and torch (measured ~330 MiB with torch 2.13, rounded up).
CPU_RUNTIME_BYTES = 448 * MIB
#: The pool of an encoder's CUDA graphs (batches of up to 512 tokens): a stated constant until it is measured.
GRAPH_POOL_BYTES = 256 * MIB

#: Architectures the encoder engine runs on our own decoder (engines/torch_encoder.CAUSAL_DECODERS): it quantizes
#: their embedding table with the linears and captures CUDA graphs; others run in transformers.
OUR_DECODERS = frozenset({"qwen3"})

Device = Literal["gpu", "cpu"]
#: The numbers an engine serves in: the linears' format (nvfp4, fp8) or the dtype of everything.
Serving = Literal["nvfp4", "fp8", "bfloat16", "float16", "float32"]
#: Bytes of one activation value (and of every tensor that is not a quantized linear or table).
ACTIVATION_BYTES: dict[str, int] = {"nvfp4": 2, "fp8": 2, "bfloat16": 2, "float16": 2, "float32": 4}
#: Per output row of a quantized linear or table: its float32 scale.
ROW_SCALE_BYTES = 4
#: NVFP4's E4M3 block scales: one byte per this many parameters.
NVFP4_BLOCK = 16


class FitError(ValueError):
    """A model that cannot fit the budget even alone; the message has the numbers."""


def serving_precision(device: Device, precision: str, dtype: str) -> Serving:
    """What an encoder is planned to serve in on `device`, as the engine chooses it (core.precision): on a GPU the
    configured precision (a fallback on a GPU that lacks it, such as nvfp4 on Hopper, is not anticipated: the plan
    is for the card the settings were written for), else the dtype (auto: bfloat16); on a CPU float32, unless
    precision is auto and dtype names another."""
    if device == "cpu":
        return _serving("float32" if precision != "auto" or dtype == "auto" else dtype)
    if precision != "auto":
        return _serving(precision)
    return _serving("bfloat16" if dtype == "auto" else dtype)


def _serving(name: str) -> Serving:
    if name not in ACTIVATION_BYTES:
        raise ValueError(f"{name!r} is not a precision an engine serves in ({', '.join(ACTIVATION_BYTES)})")
    return cast(Serving, name)


@dataclass(frozen=True)
class EncoderShape:
    """The parameters of an encoder by what the engine does with them."""

    hidden: int
    intermediate: int
    #: Weights of the transformer layers' linear projections, and their output rows summed over all of them.
    linear_params: int
    linear_rows: int
    #: How many linear projections (nvfp4 keeps one float32 scalar each).
    linears: int
    #: The token embedding table: vocabulary rows x hidden.
    embedding_params: int
    embedding_rows: int
    #: Everything else the engine keeps at the activation dtype: norms, biases, position tables.
    other_params: int
    #: Our Qwen3 decoder quantizes the embedding table with the linears (and runs CUDA graphs); other
    #: architectures run in transformers and keep theirs.
    decoder: bool
    #: Where the shape came from, for the plan ("config and safetensors headers of <dir>", "the known shape").
    source: str

    @property
    def parameters(self) -> int:
        return self.linear_params + self.embedding_params + self.other_params


def qwen3_shape(config: Mapping[str, Any], source: str) -> EncoderShape:
    """A Qwen3 decoder's shape from its config alone (no weights): seven projections per layer, two RMS norms per
    layer plus the q/k norms, a final norm and the embedding table (an LM head is not counted: see `head_params`)."""
    hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    intermediate, vocab = int(config["intermediate_size"]), int(config["vocab_size"])
    q, kv = heads * head_dim, kv_heads * head_dim
    per_layer = hidden * q + 2 * hidden * kv + q * hidden + 3 * hidden * intermediate
    rows = q + 2 * kv + hidden + 2 * intermediate + hidden
    norms = 2 * hidden + 2 * head_dim
    return EncoderShape(
        hidden=hidden,
        intermediate=intermediate,
        linear_params=layers * per_layer,
        linear_rows=layers * rows,
        linears=layers * 7,
        embedding_params=vocab * hidden,
        embedding_rows=vocab,
        other_params=layers * norms + hidden,
        decoder=True,
        source=source,
    )


def head_params(task: str, hidden: int) -> int:
    """The reranker keeps two rows of its LM head (the "no" and "yes" logits); an embedder keeps none."""
    return 2 * hidden if task == "rerank" else 0


@dataclass(frozen=True)
class Footprint:
    """What a compute model holds on one device, part by part (bytes)."""

    device: Device
    precision: Serving
    #: The transformer layers' linears (with their scales); for the VLM every parameter.
    weights: int
    #: The token embedding table (with its row scales when quantized).
    embedding: int
    #: Norms, biases and the reranker's two head rows.
    other: int
    activations: int
    graphs: int
    runtime: int
    kv_cache: int = 0

    @property
    def weight_bytes(self) -> int:
        """The weights alone: what a sleeping engine copies to host RAM."""
        return self.weights + self.embedding + self.other

    @property
    def total(self) -> int:
        return self.weight_bytes + self.activations + self.graphs + self.runtime + self.kv_cache


def linear_bytes(precision: Serving, params: int, rows: int, linears: int) -> int:
    """Linear projections' weights with their scales (the layout in the module's docstring)."""
    if precision == "fp8":
        return params + rows * ROW_SCALE_BYTES
    if precision == "nvfp4":
        return params // 2 + -(-params // NVFP4_BLOCK) + rows * ROW_SCALE_BYTES + linears * 4
    return params * ACTIVATION_BYTES[precision]


def pass_tokens(max_batch_tokens: int, max_length: int) -> int:
    """The longest packed pass an encoder runs: `max_batch_tokens`, or one text of `max_length` tokens that is
    longer (core.batching: a row longer than the budget goes alone)."""
    return max(max_batch_tokens, max_length)


def encoder_footprint(
    shape: EncoderShape, task: str, device: Device, precision: Serving, tokens: int, host_table: bool = False
) -> Footprint:
    """An encoder on the PyTorch engine at `precision`, sized for packed passes of up to `tokens` tokens
    (`pass_tokens`). `host_table`: an FP8 table kept in host memory (`embedding_table = "host"`): on a GPU only its
    row scales count."""
    value = ACTIVATION_BYTES[precision]
    quantized_table = shape.decoder and precision in ("fp8", "nvfp4")
    if quantized_table and host_table and device == "gpu":
        embedding = shape.embedding_rows * ROW_SCALE_BYTES
    elif quantized_table:
        embedding = shape.embedding_params + shape.embedding_rows * ROW_SCALE_BYTES
    else:
        embedding = shape.embedding_params * value
    return Footprint(
        device=device,
        precision=precision,
        weights=linear_bytes(precision, shape.linear_params, shape.linear_rows, shape.linears),
        embedding=embedding,
        other=(shape.other_params + head_params(task, shape.hidden)) * value,
        activations=tokens * (6 * shape.hidden + 3 * shape.intermediate) * value,
        graphs=GRAPH_POOL_BYTES if device == "gpu" and shape.decoder else 0,
        runtime=GPU_RUNTIME_BYTES if device == "gpu" else CPU_RUNTIME_BYTES,
    )


@dataclass(frozen=True)
class VlmShape:
    """The docling VLM's parameters and the dimensions its KV cache and vision activations follow."""

    parameters: int
    text_layers: int
    kv_heads: int
    head_dim: int
    vision_hidden: int
    vision_intermediate: int
    #: Patches per tile: (image_size / patch_size)^2.
    patches_per_tile: int
    source: str

    @classmethod
    def from_config(cls, parameters: int, config: Mapping[str, Any], source: str) -> VlmShape:
        """From an Idefics3 config (`text_config`, `vision_config`)."""
        text, vision = config["text_config"], config["vision_config"]
        heads = int(text["num_attention_heads"])
        vision_hidden = int(vision["hidden_size"])
        return cls(
            parameters=parameters,
            text_layers=int(text["num_hidden_layers"]),
            kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or int(text["hidden_size"]) // heads),
            vision_hidden=vision_hidden,
            vision_intermediate=int(vision.get("intermediate_size", 4 * vision_hidden)),
            patches_per_tile=(int(vision["image_size"]) // int(vision["patch_size"])) ** 2,
            source=source,
        )


#: Tiles of one page at most (a 4 x 4 split of a 2048-pixel page plus the global image).
TILES_PER_PAGE = 17


def vlm_prompt_tokens(longest_edge: int, tile_size: int, image_seq_len: int) -> int:
    """The longest page prompt: every tile's placeholders (with their 3 wrapping tokens) and 64 tokens of text."""
    tiles_per_side = longest_edge // tile_size
    return (tiles_per_side * tiles_per_side + 1) * (image_seq_len + 3) + 64


def vlm_footprint(shape: VlmShape, device: Device, dtype: str, pages: int, max_tokens: int) -> Footprint:
    """The docling VLM: its weights, the KV cache of `pages` pages of `max_tokens` tokens (prompt plus generation)
    and the vision tower's activations for their tiles, all at the serving dtype (auto: bfloat16 on a GPU, float32
    on the CPU)."""
    precision = _serving(("bfloat16" if device == "gpu" else "float32") if dtype == "auto" else dtype)
    value = ACTIVATION_BYTES[precision]
    kv_values = 2 * shape.text_layers * shape.kv_heads * shape.head_dim * pages * max_tokens
    patches = pages * TILES_PER_PAGE * shape.patches_per_tile
    # One layer's q, k, v and MLP intermediate per patch, calibrated on the H200 (2026-12-03, BENCHMARKS.md): the
    # VLM held 1.89 GiB after pages 4 at a time, 256 new tokens a page; this term gives 1.80 GiB, the transformer
    # encoders' 6 x hidden + 3 x intermediate gave 2.90 (the tower runs one layer at a time, MLP after attention).
    vision_values = patches * (3 * shape.vision_hidden + shape.vision_intermediate)
    return Footprint(
        device=device,
        precision=precision,
        weights=shape.parameters * value,
        embedding=0,
        other=0,
        activations=vision_values * value,
        graphs=0,
        runtime=GPU_RUNTIME_BYTES if device == "gpu" else CPU_RUNTIME_BYTES,
        kv_cache=kv_values * value,
    )


# --- which models fit together ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resident:
    """A compute model as the plan weighs it: the bytes the router will count for it (measured where known)."""

    name: str
    bytes: int
    #: Its weights alone: the host copy it sleeps in, and what a sleep gives back on the device.
    weight_bytes: int
    sleepable: bool


@dataclass(frozen=True)
class Residency:
    """The steady state: the models that stay resident together, and how the others come and go."""

    #: "all resident": every model stays on the device; "swapping": `resident` stay, each of `swapped` displaces
    #: some of them when it is used.
    mode: Literal["all resident", "swapping"]
    resident: tuple[str, ...]
    swapped: tuple[str, ...]
    #: What the router keeps resident while idle: high watermark x budget.
    keep_bytes: int
    #: One sentence per point (the plan prints them).
    notes: tuple[str, ...]


def check_alone(models: Sequence[Resident], budget: int, memory: str) -> None:
    """FitError naming every model larger than the whole budget: it could not load even with the device to itself.
    `memory` says where the budget comes from (the device memory and the reserve)."""
    too_large = [m for m in models if m.bytes > budget]
    if too_large:
        lines = [
            f"{m.name} needs {format_bytes(m.bytes)}, more than the budget of {format_bytes(budget)} ({memory})"
            for m in too_large
        ]
        raise FitError(
            "; ".join(lines) + ": it cannot fit even alone. Quantize it (precision fp8 or nvfp4), lower "
            "max_batch_tokens and max_length, choose a smaller model, or give the router more memory (device_memory, "
            "reserve, budget)"
        )


def plan_residency(models: Sequence[Resident], budget: int, high_watermark: float, host_budget: int) -> Residency:
    """Which models co-reside and which swap, by the router's rules (core/residency.py): idle models stay only below
    `high_watermark x budget`; the group that stays is the largest one that fits under it, the first models listed
    preferred on a tie (the text encoders before docling: their requests are the latency-bound ones). A model
    outside the group evicts some of the group when it is used: sleepable ones sleep to host RAM while their copies
    fit `host_budget` (a wake is one copy), the others unload (the next use is a cold load). Every model must fit
    the budget alone (`check_alone`)."""
    keep = int(high_watermark * budget)
    total = sum(m.bytes for m in models)
    if total <= keep:
        note = f"all {len(models)} fit together: {format_bytes(total)} of the {format_bytes(keep)} kept resident"
        return Residency("all resident", tuple(m.name for m in models), (), keep, (note,))
    group: tuple[Resident, ...] = ()
    for size in range(len(models), 0, -1):  # largest group first; combinations come in the listed order
        fitting = [c for c in itertools.combinations(models, size) if sum(m.bytes for m in c) <= keep]
        if fitting:
            group = fitting[0]
            break
    swapped = [m for m in models if m not in group]
    group_bytes = sum(m.bytes for m in group)
    notes = [
        f"together they need {format_bytes(total)}, above the {format_bytes(keep)} the router keeps resident "
        f"(high watermark {high_watermark} x budget {format_bytes(budget)})",
        (
            f"stay resident: {' + '.join(m.name for m in group)} ({format_bytes(group_bytes)})"
            if group
            else "no model stays resident while idle: each use loads or wakes its model"
        ),
    ]
    sleepers = [m for m in group if m.sleepable]
    copies = sum(m.weight_bytes for m in sleepers)
    for model in swapped:
        notes.append(_swap_note(model, budget - group_bytes, sleepers, copies, host_budget))
    return Residency("swapping", tuple(m.name for m in group), tuple(m.name for m in swapped), keep, tuple(notes))


def _swap_note(model: Resident, room: int, sleepers: Sequence[Resident], copies: int, host_budget: int) -> str:
    """How `model` comes in when `room` bytes are free beside the resident group: what must leave the device, and
    whether the models it displaces sleep (host tier) or unload."""
    need = model.bytes - room
    note = f"{model.name} ({format_bytes(model.bytes)}) swaps in on use"
    if need <= 0:
        note += " beside them (evicted again above the high watermark while idle)"
    else:
        note += f": {format_bytes(need)} must leave the device first (idle models go, least recently used first)"
        if sleepers and copies <= host_budget and sum(m.weight_bytes for m in sleepers) >= need:
            frees = ", ".join(f"{m.name} {format_bytes(m.weight_bytes)}" for m in sleepers)
            note += (
                f"; a sleep frees a model's weights ({frees}) into the host tier (their copies "
                f"{format_bytes(copies)} of the {format_bytes(host_budget)} host budget), and a wake is one copy back"
            )
        else:
            note += "; the host tier cannot take them, so they unload and their next use is a cold load"
    evicted = "sleeps to host RAM" if model.sleepable else "unloads (it cannot sleep)"
    return note + f"; evicted in turn, {model.name} {evicted}"

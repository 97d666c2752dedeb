"""The tensor contract of every model in the repository: the one place where names, dtypes and dims live.

The config generator renders these into config.pbtxt files and `docs/CONTRACT.md` is generated from them (a test
keeps the two in sync), so clients, engines and docs cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

# Model names. The first three are client-facing; encoders are the compute engines behind them.
EMBED_ENDPOINT = "qwen_embed"
RERANK_ENDPOINT = "qwen_rerank"
EMBED_ENCODER = "qwen_embed_encoder"
RERANK_ENCODER = "qwen_rerank_encoder"
ENCODERS = (EMBED_ENCODER, RERANK_ENCODER)
DOCLING_ENDPOINT = "docling"
DOCLING_DOCUMENT_ENDPOINT = "docling_document"
DOCLING_VLM = "docling_vlm"

#: pgvector's HNSW/IVFFlat indexes stop at 2000 dimensions, hence the default embedding size.
DEFAULT_EMBED_DIM = 2000
MIN_EMBED_DIM = 32

#: Order of the reranker head's two logits.
RERANK_LOGIT_ORDER = ("no", "yes")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton config type, e.g. "TYPE_STRING"
    dims: tuple[int, ...]
    doc: str
    optional: bool = False


@dataclass(frozen=True)
class ModelContract:
    name: str
    doc: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: (preferred batch sizes, max queue delay in microseconds); None: no dynamic batcher.
    dynamic_batching: tuple[tuple[int, ...], int] | None = None
    client_facing: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Batching:
    """An endpoint's dynamic batcher: the most rows in one execute, the batch sizes it waits for, and how long a
    request may wait for more (microseconds)."""

    max_batch_size: int
    preferred: tuple[int, ...]
    max_queue_delay_us: int

    @property
    def dynamic_batching(self) -> tuple[tuple[int, ...], int]:
        """As ModelContract.dynamic_batching."""
        return self.preferred, self.max_queue_delay_us


#: rag.toml's `batching` in [embed], [rerank] and [docling]: "project", this project's choice (batch more, wait
#: 100 us: a lone query must not wait; README "What differs"), or "design", the design card's values (its tuning
#: notes: embed 2-5 ms, taken as 3 ms, though its example config has 5 ms; rerank ~5 ms; docling ~20 ms). The
#: default stays "project" until a benchmark of the two decides.
BatchingPreset = Literal["project", "design"]
BATCHING: dict[str, dict[BatchingPreset, Batching]] = {
    EMBED_ENDPOINT: {"project": Batching(64, (4, 8, 16, 32, 64), 100), "design": Batching(32, (4, 8, 16), 3000)},
    RERANK_ENDPOINT: {"project": Batching(16, (2, 4, 8, 16), 100), "design": Batching(16, (2, 4, 8), 5000)},
    DOCLING_ENDPOINT: {"project": Batching(4, (1, 2), 20000), "design": Batching(4, (1, 2), 20000)},
}


#: The embedding's wire type: FP16 (half the bytes, the default) or FP32, which Triton's HTTP/JSON can return (it has
#: no JSON form for FP16: a curl of the FP16 model needs the binary tensor extension).
EmbedOutputDtype = Literal["fp16", "fp32"]
EMBED_OUTPUT_TYPES: dict[str, str] = {"fp16": "TYPE_FP16", "fp32": "TYPE_FP32"}


def embed_endpoint(
    dim: int, preset: BatchingPreset = "project", output_dtype: EmbedOutputDtype = "fp16"
) -> ModelContract:
    return ModelContract(
        name=EMBED_ENDPOINT,
        doc="Text embeddings (Qwen3-Embedding recipe, or mean pooling for BERT-family embedders).",
        max_batch_size=BATCHING[EMBED_ENDPOINT][preset].max_batch_size,
        dynamic_batching=BATCHING[EMBED_ENDPOINT][preset].dynamic_batching,
        inputs=(
            TensorSpec("TEXT", "TYPE_STRING", (1,), "UTF-8 text to embed. Empty text is an error."),
            TensorSpec(
                "INSTRUCTION",
                "TYPE_STRING",
                (1,),
                "Task instruction. When non-empty the row is a query, formatted "
                "`Instruct: {INSTRUCTION}\\nQuery:{TEXT}`; empty or absent: a document, no prompt.",
                optional=True,
            ),
        ),
        outputs=(
            TensorSpec(
                "EMBEDDING",
                EMBED_OUTPUT_TYPES[output_dtype],
                (dim,),
                "Pooled, truncated to the first D dims (Matryoshka), then L2-normalised. FP16, or FP32 with "
                '`embed.output_dtype = "fp32"` (Triton\'s HTTP/JSON cannot return FP16).',
            ),
            TensorSpec(
                "TRUNCATED",
                "TYPE_BOOL",
                (1,),
                'True when the text was cut at max_length (only with overflow = "truncate").',
            ),
        ),
    )


def rerank_endpoint(preset: BatchingPreset = "project") -> ModelContract:
    return ModelContract(
        name=RERANK_ENDPOINT,
        doc='Relevance of a document to a query: P("yes") by the Qwen3-Reranker recipe, one pair per row.',
        max_batch_size=BATCHING[RERANK_ENDPOINT][preset].max_batch_size,
        dynamic_batching=BATCHING[RERANK_ENDPOINT][preset].dynamic_batching,
        inputs=(
            TensorSpec("QUERY", "TYPE_STRING", (1,), "UTF-8 query. Empty is an error."),
            TensorSpec("DOCUMENT", "TYPE_STRING", (1,), "UTF-8 document. Empty is an error."),
            TensorSpec(
                "INSTRUCTION",
                "TYPE_STRING",
                (1,),
                "Task instruction; empty or absent: the configured default instruction.",
                optional=True,
            ),
        ),
        outputs=(
            TensorSpec("SCORE", "TYPE_FP32", (1,), "softmax([no, yes])[yes] = sigmoid(yes - no), in [0, 1]."),
            TensorSpec(
                "TRUNCATED",
                "TYPE_BOOL",
                (1,),
                'True when the pair was cut at max_length (only with overflow = "truncate").',
            ),
        ),
    )


_ENCODER_INPUTS = (
    TensorSpec("INPUT_IDS", "TYPE_INT64", (-1,), "Token ids, one row per text, padded to the batch's longest row."),
    TensorSpec("ATTENTION_MASK", "TYPE_INT64", (-1,), "1 for real tokens, 0 for padding (either side)."),
)


def embed_encoder(hidden_size: int) -> ModelContract:
    return ModelContract(
        name=EMBED_ENCODER,
        doc="Compute engine of qwen_embed: transformer plus pooling, nothing per token leaves it.",
        max_batch_size=64,
        client_facing=False,
        inputs=_ENCODER_INPUTS,
        outputs=(
            TensorSpec(
                "POOLED",
                "TYPE_FP32",
                (hidden_size,),
                "Pooled final hidden state (last real token, or mean over real tokens); not normalised.",
            ),
        ),
    )


def rerank_encoder() -> ModelContract:
    return ModelContract(
        name=RERANK_ENCODER,
        doc='Compute engine of qwen_rerank: transformer plus the two LM-head rows for "no" and "yes".',
        max_batch_size=16,
        client_facing=False,
        inputs=_ENCODER_INPUTS,
        outputs=(
            TensorSpec(
                "LOGITS",
                "TYPE_FP32",
                (2,),
                'Logits of the tokens "no" and "yes" (in that order) at the last real position.',
            ),
        ),
    )


#: The python/torch encoders' extra output (not the TensorRT variants'): the engine's residency as JSON. A request
#: with the parameter `RESIDENCY_PARAMETER` = "sleep", "wake" or "status" (and any one-token INPUT_IDS and
#: ATTENTION_MASK) is a control request: it changes or reads residency and runs no forward pass (docs/ROUTER.md).
RESIDENCY_OUTPUT = TensorSpec(
    "RESIDENCY",
    "TYPE_STRING",
    (1,),
    'python/torch variant only: {"state": "awake"|"asleep", "weight_bytes", "host_bytes", "seconds"} as JSON, '
    "answered to control requests (request parameter `residency`) and to requests that ask for this output.",
)
RESIDENCY_PARAMETER = "residency"
RESIDENCY_ACTIONS = ("sleep", "wake", "status")


def with_residency(encoder: ModelContract) -> ModelContract:
    """The encoder contract as the python/torch variant serves it: the same tensors plus RESIDENCY."""
    return replace(encoder, outputs=encoder.outputs + (RESIDENCY_OUTPUT,))


ROUTER = "router"

#: What the router does with a request; see docs/ROUTER.md.
ROUTER_ACTIONS = ("ACQUIRE", "RELEASE", "STATUS", "PIN", "UNPIN", "PLAN", "RECONCILE", "STOP")


def router() -> ModelContract:
    return ModelContract(
        name=ROUTER,
        doc=(
            "Residency of the compute models under a memory budget (load on first use, evict idle models, LRU or "
            "the client's plan). Endpoints use ACQUIRE/RELEASE around each compute call; clients may use STATUS, "
            "PIN, UNPIN, PLAN and RECONCILE; `serve` sends STOP when it shuts down. Not batched: one request per "
            "action."
        ),
        max_batch_size=0,
        inputs=(
            TensorSpec(
                "ACTION",
                "TYPE_STRING",
                (1,),
                "One of " + ", ".join(f"`{a}`" for a in ROUTER_ACTIONS) + " (case-insensitive).",
            ),
            TensorSpec(
                "MODELS",
                "TYPE_STRING",
                (-1,),
                "Model names (compute models or their endpoints): one for ACQUIRE, PIN and UNPIN; the ordered "
                "list of upcoming uses for PLAN (empty clears the plan).",
                optional=True,
            ),
            TensorSpec("LEASE", "TYPE_INT64", (1,), "RELEASE: the lease ACQUIRE returned.", optional=True),
        ),
        outputs=(
            TensorSpec("LEASE", "TYPE_INT64", (1,), "ACQUIRE: the lease to RELEASE once the compute call is done."),
            TensorSpec(
                "STATUS",
                "TYPE_STRING",
                (1,),
                "STATUS, PIN, UNPIN, PLAN, RECONCILE: the ledger as JSON (budget, per-model state, bytes, "
                "in-flight and waiting requests, loads, evictions, unreleased bytes).",
            ),
        ),
        client_facing=False,
    )


#: Tiles travel as uint8 (4x smaller than float32); the engine rescales and normalises them on its device.
DOCLING_TILE = 512


def docling_endpoint(preset: BatchingPreset = "project") -> ModelContract:
    return ModelContract(
        name=DOCLING_ENDPOINT,
        doc=(
            "One page image to a DoclingDocument: Idefics3 tiling, the VLM (granite-docling) writes DocTags, "
            "docling-core turns them into a document. Boxes and the page size are in the image's pixels."
        ),
        max_batch_size=BATCHING[DOCLING_ENDPOINT][preset].max_batch_size,
        dynamic_batching=BATCHING[DOCLING_ENDPOINT][preset].dynamic_batching,
        inputs=(
            TensorSpec(
                "IMAGE",
                "TYPE_STRING",
                (1,),
                "One encoded page image (PNG, JPEG, TIFF, BMP, WebP: what Pillow reads); limits in docs/DOCLING.md.",
            ),
        ),
        outputs=(
            TensorSpec("STRUCTURED_JSON", "TYPE_STRING", (1,), "DoclingDocument JSON (docling-core schema), one page."),
            TensorSpec("DOCTAGS", "TYPE_STRING", (1,), "The DocTags the model generated, stop token removed."),
        ),
    )


def docling_document_endpoint() -> ModelContract:
    return ModelContract(
        name=DOCLING_DOCUMENT_ENDPOINT,
        doc=(
            "A whole PDF to one DoclingDocument: pages rendered (pypdfium2), sent to `docling` concurrently over "
            "BLS, merged in page order. Page numbers start at 1; page sizes and boxes are in PDF points."
        ),
        max_batch_size=0,
        inputs=(TensorSpec("DOCUMENT", "TYPE_STRING", (1,), "The PDF file's bytes."),),
        outputs=(
            TensorSpec(
                "STRUCTURED_JSON",
                "TYPE_STRING",
                (1,),
                "DoclingDocument JSON of the whole document; a page that failed is present with its size and no "
                "content, and is named in PAGE_ERRORS.",
            ),
            TensorSpec(
                "PAGE_ERRORS",
                "TYPE_STRING",
                (1,),
                'JSON object {"<page number>": "<reason>"} of the pages that failed; `{}` when none did.',
            ),
        ),
    )


def docling_vlm(max_batch_size: int = 4) -> ModelContract:
    tile = DOCLING_TILE
    return ModelContract(
        name=DOCLING_VLM,
        doc=(
            "Compute engine of docling: vision encoder, then greedy decoding with a KV cache until a stop token "
            "or MAX_NEW_TOKENS. One row per page."
        ),
        max_batch_size=max_batch_size,
        client_facing=False,
        inputs=(
            TensorSpec(
                "PIXELS",
                "TYPE_UINT8",
                (-1, 3, tile, tile),
                "RGB tiles before rescaling: the page's tiles row-major, then the global image; rows with fewer "
                "images are padded with zeros up to the batch's largest (NUM_IMAGES says how many are real).",
            ),
            TensorSpec("NUM_IMAGES", "TYPE_INT32", (1,), "Real images in the row's PIXELS."),
            TensorSpec(
                "INPUT_IDS",
                "TYPE_INT64",
                (-1,),
                "Prompt ids with each image expanded to its placeholder tokens; left-padded to the batch's longest.",
            ),
            TensorSpec("ATTENTION_MASK", "TYPE_INT64", (-1,), "1 for real prompt tokens, 0 for the left padding."),
            TensorSpec("MAX_NEW_TOKENS", "TYPE_INT32", (1,), "Most tokens to generate for the row."),
        ),
        outputs=(
            TensorSpec(
                "GENERATED_IDS",
                "TYPE_INT64",
                (-1,),
                "Generated ids up to and including the first stop token, padded with -1 to the batch's longest.",
            ),
        ),
    )


DOCLING_VISION = "docling_vision"


def docling_vision(hidden_size: int, image_seq_len: int = 64) -> ModelContract:
    tile = DOCLING_TILE
    return ModelContract(
        name=DOCLING_VISION,
        doc=(
            "The VLM's vision tower and connector alone, for a `tensorrt_plan` build (docling.engine = "
            '"tensorrt_plan"): docling_vlm then takes image embeddings from it instead of running its own tower. '
            "Loaded at start-up (86M parameters), not under the router."
        ),
        max_batch_size=0,
        client_facing=False,
        inputs=(
            TensorSpec("PIXELS", "TYPE_UINT8", (-1, 3, tile, tile), "One page's tiles, as docling_vlm's PIXELS row."),
        ),
        outputs=(
            TensorSpec(
                "IMAGE_EMBEDS",
                "TYPE_FP32",
                (-1, image_seq_len, hidden_size),
                "The embeddings that replace each tile's `<image>` tokens, in tile order.",
            ),
        ),
    )

"""PyTorch engine behind the docling VLM contract: page tiles and prompt ids in, greedily generated ids out.

granite-docling is Idefics3: a SigLIP vision tower and pixel-shuffle connector turn each 512x512 tile into 64
embeddings that replace the prompt's `<image>` tokens, then a Llama decoder writes DocTags. The modules (and so the
weights and numerics) are transformers' own; the generation loop is ours because `generate` spends most of its time
in Python per step (FACTS.md: 12.9 tokens/s for a 135M decoder). Ours keeps one preallocated KV cache per call,
prefills each page alone (no padding enters the numbers, so a page gives the same ids alone or in a batch), then
decodes all pages together, each at its own position, attending over its own cache slots only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from triton_rag.core.idefics3 import ImageProcessorConfig
from triton_rag.engines.cuda_context import trim_stack_reserve
from triton_rag.engines.device_cap import apply_device_cap
from triton_rag.engines.encoder_common import choose_device, choose_dtype

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PageInput:
    """One page: its uint8 tiles [images, 3, tile, tile] (tiles row-major, then the global image) and prompt ids;
    `image_embeds` [images, image_seq_len, hidden] when a separate vision model (a TensorRT plan) computed them."""

    pixels: np.ndarray
    input_ids: np.ndarray
    image_embeds: np.ndarray | None = None


class TorchVlm:
    def __init__(
        self,
        model_dir: Path,
        dtype: str = "auto",
        device: str = "auto",
        use_graphs: bool | None = None,
        device_memory_cap: int = 0,
        log: Callable[[str], None] = _log.info,
    ) -> None:
        """`device_memory_cap`: bytes this process may hold on the GPU ([router] device_memory; 0: none), applied
        before the weights load (engines/device_cap.py), its line to `log`."""
        import json

        from transformers import Idefics3ForConditionalGeneration

        self.device = choose_device(device)
        self.dtype = choose_dtype(dtype, self.device)
        if self.device.type == "cuda":
            apply_device_cap(device_memory_cap, log=log)
        model = Idefics3ForConditionalGeneration.from_pretrained(
            str(model_dir), dtype=self.dtype, attn_implementation="sdpa"
        )
        model = model.to(self.device).eval()  # type: ignore[arg-type]
        trim_stack_reserve(self.device)  # ~200 MiB of an H200 context's local memory (cuda_context)
        config = model.config
        self.vision = model.model.vision_model
        self.connector = model.model.connector
        self.text = model.model.text_model
        self.lm_head = model.lm_head
        text_config = config.text_config
        self.vocab_size = int(text_config.vocab_size)
        self.hidden_size = int(text_config.hidden_size)
        self.heads = int(text_config.num_attention_heads)
        self.kv_heads = int(text_config.num_key_value_heads)
        self.head_dim = int(getattr(text_config, "head_dim", None) or self.hidden_size // self.heads)
        self.layers = len(self.text.layers)
        self.image_token_id = int(config.image_token_id)
        vision_config = config.vision_config
        self.patches_per_side = int(vision_config.image_size) // int(vision_config.patch_size)
        self.image_seq_len = self.patches_per_side**2 // int(config.scale_factor) ** 2
        preprocessor = Path(model_dir) / "preprocessor_config.json"
        processor = ImageProcessorConfig.from_preprocessor_config(
            json.loads(preprocessor.read_text()) if preprocessor.exists() else {}
        )
        self.tile_size = processor.tile_size
        # x / (1 / rescale_factor) in float32 is bit-identical to transformers' float64 rescale for uint8 input
        self.divisor = torch.tensor(1.0 / processor.rescale_factor, dtype=torch.float32, device=self.device)
        self.mean = torch.tensor(processor.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        #: CUDA graph decode (default on CUDA); elsewhere True runs the same static-buffer path without capture.
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self._graphs: dict[tuple[int, int], _DecodeGraph] = {}

    def validate(self, page: PageInput) -> None:
        """Reject what would otherwise fail deep inside torch (or trip a device assert on CUDA)."""
        pixels, ids = page.pixels, page.input_ids
        tile = self.tile_size
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (3, tile, tile) or not len(pixels):
            raise ValueError(
                f"pixels must be uint8 [images, 3, {tile}, {tile}], got {pixels.dtype} {list(pixels.shape)}"
            )
        if ids.ndim != 1 or not len(ids):
            raise ValueError("input ids must be one non-empty row")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        embeds = page.image_embeds
        if embeds is not None and embeds.shape != (len(pixels), self.image_seq_len, self.hidden_size):
            expected = [len(pixels), self.image_seq_len, self.hidden_size]
            raise ValueError(f"image embeds must be {expected}, got {list(embeds.shape)}")
        placeholders = int((ids == self.image_token_id).sum())
        if placeholders != len(pixels) * self.image_seq_len:
            raise ValueError(
                f"the prompt has {placeholders} image tokens but {len(pixels)} images need "
                f"{len(pixels) * self.image_seq_len}"
            )

    @torch.inference_mode()
    def image_features(self, pixels: np.ndarray) -> torch.Tensor:
        """[images * image_seq_len, hidden]: the embeddings that replace the `<image>` tokens, in order."""
        tiles = torch.from_numpy(pixels).to(self.device).float()
        values = ((tiles / self.divisor - self.mean) / self.std).to(self.dtype)
        side = self.patches_per_side
        mask = torch.ones((len(values), side, side), dtype=torch.bool, device=self.device)
        hidden = self.vision(pixel_values=values, patch_attention_mask=mask).last_hidden_state
        return self.connector(hidden).reshape(-1, self.hidden_size)

    def _embed_prompt(self, page: PageInput) -> torch.Tensor:
        ids = torch.from_numpy(page.input_ids.astype(np.int64)).to(self.device)
        embeds = self.text.embed_tokens(ids)
        slots = ids == self.image_token_id
        if page.image_embeds is None:
            features = self.image_features(page.pixels)
        else:
            features = torch.from_numpy(page.image_embeds).to(self.device).reshape(-1, self.hidden_size)
        embeds[slots] = features.to(embeds.dtype)
        return embeds

    def _attention_layer(
        self,
        index: int,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        write: tuple[torch.Tensor, torch.Tensor],
        cache: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """One decoder layer. `hidden` is [rows, tokens, hidden]; `write` picks the cache slots for the new keys and
        values; attention reads `cache` (already sliced to the slots in use) under `mask` (None: causal prefill)."""
        layer = self.text.layers[index]
        attention = layer.self_attn
        rows, tokens, _ = hidden.shape
        x = layer.input_layernorm(hidden)
        q = attention.q_proj(x).view(rows, tokens, self.heads, self.head_dim).transpose(1, 2)
        k = attention.k_proj(x).view(rows, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attention.v_proj(x).view(rows, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys, values = cache
        row_index, slot_index = write
        keys[row_index, :, slot_index] = k.transpose(1, 2).reshape(-1, self.kv_heads, self.head_dim)
        values[row_index, :, slot_index] = v.transpose(1, 2).reshape(-1, self.kv_heads, self.head_dim)
        scale = attention.scaling
        if mask is None:  # prefill of one page: plain causal attention over its own tokens
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:  # decode: one query per row; group query heads by their key/value head (no copies of the cache)
            group = self.heads // self.kv_heads
            grouped = q.view(rows, self.kv_heads, group, self.head_dim)
            out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)
            out = out.reshape(rows, self.heads, 1, self.head_dim)
        out = attention.o_proj(out.transpose(1, 2).reshape(rows, tokens, self.heads * self.head_dim))
        hidden = hidden + out
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def _next_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.text.norm(hidden)).argmax(dim=-1)

    def _allocate(self, rows: int, slots: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (rows, self.kv_heads, slots, self.head_dim)
        zeros = lambda: torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        return [(zeros(), zeros()) for _ in range(self.layers)]

    def _prefill(self, pages: list[PageInput], caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Each page alone (no padding enters its numbers) into its own cache row; returns the first new ids."""
        first = []
        for row, page in enumerate(pages):
            hidden = self._embed_prompt(page)[None]
            positions = torch.arange(len(page.input_ids), device=self.device)[None]
            rotary = self.text.rotary_emb(hidden, positions)
            write = (torch.tensor([row], device=self.device), positions[0])
            for index in range(self.layers):
                hidden = self._attention_layer(index, hidden, rotary, write, caches[index], None)
            first.append(self._next_tokens(hidden[:, -1]))
        return torch.cat(first)

    def _step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        caches: list[tuple[torch.Tensor, torch.Tensor]],
        used: int,
        slot_numbers: torch.Tensor,
    ) -> torch.Tensor:
        """One decode step for every row: the next ids. Reads the first `used` cache slots of each row, masked to
        the row's own length; `slot_numbers` is arange(slots) (kept, so a captured graph allocates nothing)."""
        row_index = slot_numbers[: len(tokens)]
        mask = (slot_numbers[None, :used] <= positions[:, None])[:, None, None, :]
        hidden = self.text.embed_tokens(tokens)[:, None]
        rotary = self.text.rotary_emb(hidden, positions[:, None])
        for index in range(self.layers):
            keys, values = caches[index]
            cache = (keys[:, :, :used], values[:, :, :used])
            hidden = self._attention_layer(index, hidden, rotary, (row_index, positions), cache, mask)
        return self._next_tokens(hidden[:, -1])

    @torch.inference_mode()
    def generate(
        self, pages: list[PageInput], max_new_tokens: int | list[int], stop_ids: tuple[int, ...]
    ) -> list[list[int]]:
        """Greedy ids per page, each ending at its first stop id (included) or after its max_new_tokens."""
        limits = [max_new_tokens] * len(pages) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if not pages or len(limits) != len(pages) or min(limits) < 1:
            raise ValueError("max_new_tokens must be at least 1 for every page")
        for page in pages:
            self.validate(page)
        slots = max(len(page.input_ids) for page in pages) + max(limits)
        if self.use_graphs:
            ids = self._decode_with_graph(pages, limits, stop_ids, slots)
        else:
            ids = self._decode_eager(pages, limits, stop_ids, slots)
        return [_cut_at_stop(row[:limit], stop_ids) for row, limit in zip(ids, limits, strict=True)]

    def _decode_eager(
        self, pages: list[PageInput], limits: list[int], stop_ids: tuple[int, ...], slots: int
    ) -> list[list[int]]:
        """Attends over the slots in use only (cheapest without graphs; the CPU path)."""
        caches = self._allocate(len(pages), slots)
        tokens = self._prefill(pages, caches)
        positions = torch.tensor([len(page.input_ids) for page in pages], device=self.device)
        slot_numbers = torch.arange(max(slots, len(pages)), device=self.device)
        stops = torch.tensor(stop_ids or (-1,), device=self.device)
        budget = torch.tensor(limits, device=self.device)
        generated = [tokens]
        done = torch.isin(tokens, stops) | (budget <= 1)
        for _ in range(max(limits) - 1):
            if bool(done.all()):
                break
            tokens = self._step(tokens, positions, caches, int(positions.max()) + 1, slot_numbers)
            generated.append(tokens)
            done |= torch.isin(tokens, stops) | (budget <= len(generated))
            positions = positions + 1
        return torch.stack(generated, dim=1).cpu().tolist()

    def _decode_with_graph(
        self, pages: list[PageInput], limits: list[int], stop_ids: tuple[int, ...], slots: int
    ) -> list[list[int]]:
        """Replays one captured CUDA graph per step: a step is ~20 kernels per layer, and launching them one by one
        from Python costs more than running them (a 165M decoder is launch-bound)."""
        graph = self._graph_for(_bucket(len(pages)), -(-slots // GRAPH_SLOT_BUCKET) * GRAPH_SLOT_BUCKET)
        rows = len(pages)
        first = self._prefill(pages, graph.caches)
        graph.tokens.zero_()
        graph.positions.zero_()
        graph.tokens[:rows] = first
        graph.positions[:rows] = torch.tensor([len(page.input_ids) for page in pages], device=self.device)
        longest = max(limits)
        out = torch.empty((len(graph.tokens), longest), dtype=torch.long, device=self.device)
        out[:, 0] = graph.tokens
        stops = torch.tensor(stop_ids or (-1,), device=self.device)
        stopped = torch.isin(first, stops)
        budget = torch.tensor(limits, device=self.device)
        for step in range(1, longest):
            graph.replay()
            out[:, step] = graph.tokens
            stopped |= torch.isin(graph.tokens[:rows], stops)
            if step % GRAPH_SYNC_EVERY == 0 and bool((stopped | (budget <= step + 1)).all()):
                out = out[:, : step + 1]
                break
        return out[:rows].cpu().tolist()

    def _graph_for(self, rows: int, slots: int) -> _DecodeGraph:
        key = (rows, slots)
        if key not in self._graphs:
            while len(self._graphs) >= MAX_GRAPHS:  # each holds a KV cache: keep the recent ones only
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = _DecodeGraph(self, rows, slots)
        self._graphs[key] = self._graphs.pop(key)  # most recently used last
        return self._graphs[key]


#: Decode graphs are captured per (rows, slots) bucket; slots round up to this.
GRAPH_SLOT_BUCKET = 1024
MAX_GRAPHS = 2
#: The host checks for the end of generation every this many steps (a check is a device sync).
GRAPH_SYNC_EVERY = 8


def _bucket(rows: int) -> int:
    return 1 << (rows - 1).bit_length()


class _DecodeGraph:
    """A captured decode step with its own KV cache and input buffers: replay() advances every row by one token."""

    def __init__(self, engine: TorchVlm, rows: int, slots: int) -> None:
        self.caches = engine._allocate(rows, slots)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=engine.device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=engine.device)
        slot_numbers = torch.arange(max(slots, rows), device=engine.device)

        def step() -> None:
            self.tokens.copy_(engine._step(self.tokens, self.positions, self.caches, slots, slot_numbers))
            self.positions.add_(1)

        self._step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        if engine.device.type != "cuda":
            return  # same buffers and arithmetic, replayed eagerly: how tests run this path on a CPU
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up before capture, as CUDA graphs require
                step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            step()
        torch.cuda.synchronize()

    def replay(self) -> None:
        if self.graph is None:
            self._step()
        else:
            self.graph.replay()


def _cut_at_stop(ids: list[int], stop_ids: tuple[int, ...]) -> list[int]:
    for position, token in enumerate(ids):
        if token in stop_ids:
            return ids[: position + 1]
    return ids

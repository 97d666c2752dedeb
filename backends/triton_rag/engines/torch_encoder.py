"""PyTorch engine behind the encoder contract: token ids in, one small pooled row (or two logits) out.

Runs on CUDA when present, else on the CPU. Qwen3 runs on our own decoder (`qwen3.py`: transformers' arithmetic,
held to it by the tests, loaded straight from the checkpoint without importing transformers); other architectures
run transformers' own modules. What is ours besides is how the layers are driven, for speed:

- Qwen3 (a causal decoder): the rows' real tokens are packed end to end into one sequence per pass and each text
  attends causally to itself only (FlashAttention's variable-length kernel, `packed_attention`), so no compute is
  spent on padding; all passes are uploaded in one copy and queued before one copy back. A small batch (up to
  `GRAPH_MAX_TOKENS` once padded to a power-of-two shape) instead runs in a captured CUDA graph, padding after each
  row's real tokens, its rows as equal segments of one packed sequence: a replay costs no launches, which is what
  small batches are bound by. With `compile_model`, the decoder layers are compiled once for every shape and both
  paths (regional compilation: identical layers share the code), which fuses the norms, RoPE and FP8 activation
  quantization into their neighbours.
- Other architectures (a bidirectional encoder such as MiniLM in the tests) run transformers' forward with the mask.

Only pooling and the reranker head are fully ours, and they keep the output small: the reranker reads just the two
LM-head rows it needs instead of the whole vocabulary.

(~430 lines, over the package's ~400: one engine class whose load, graph captures and packed passes share its state;
the helpers it shares with the other engines are in encoder_common.py.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from triton_rag.contract.params import TextEndpointParameters
from triton_rag.core.batching import graph_shape, graph_shapes, plan_packed_passes
from triton_rag.core.precision import Device, choose_precision
from triton_rag.engines.checkpoint import read_lm_head_rows
from triton_rag.engines.cuda_checkpoint import ContextRelease
from triton_rag.engines.cuda_context import allocator_summary, trim_stack_reserve
from triton_rag.engines.device_cap import apply_device_cap
from triton_rag.engines.encoder_common import (
    DTYPES,
    Pooling,
    choose_device,
    choose_dtype,
    pool,
    real_spans,
    validate_encoder_inputs,
)
from triton_rag.engines.fp8 import convert_linears
from triton_rag.engines.precompiled import SUFFIX as PACKAGE_SUFFIX
from triton_rag.engines.precompiled import (
    artifact_key,
    compile_once,
    default_directory,
    import_compiler_in_background,
)
from triton_rag.engines.qwen3 import load_qwen3, read_config
from triton_rag.engines.weight_arena import WeightArena

_log = logging.getLogger(__name__)

#: What this engine has kernels for. NVFP4 layers are our Qwen3 decoder's (`nvfp4.py`: native on Blackwell, 4-bit
#: storage with FP8 GEMMs on Ada/Hopper); other architectures stop at FP8.
ENGINE_PRECISIONS = frozenset({"nvfp4", "fp8", "bfloat16", "float32"})

Task = Literal["embed", "rerank"]
#: Architectures driven by our causal loop (packed segments, mask-free causal attention); others use transformers'
#: forward with the mask.
CAUSAL_DECODERS = frozenset({"qwen3"})
#: Batches up to this many (padded) tokens run as CUDA graphs: launch-bound sizes, where a graph pays. Larger ones
#: keep the GPU busy without one (an 8B layer at 1000 tokens outlasts its launch), while the power-of-two padding of
#: a graph shape grows with the batch (up to ~2x the tokens). A reasoned choice: 512 and 2048 were not compared
#: in isolation on the GPU.
GRAPH_MAX_TOKENS = 512
#: Graphs are captured at load for up to this many rows (more rows in a small batch: captured when first seen).
GRAPH_MAX_ROWS = 32
#: What a precompiled layer's code depends on besides torch and the model (`precompiled.artifact_key`): our sources.
ENGINE_SOURCES = tuple(
    Path(__file__).parent / name
    for name in ("torch_encoder.py", "qwen3.py", "fp8.py", "nvfp4.py", "packed_attention.py")
)


def decoder_layer_call(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    bounds: torch.Tensor,
    length_probe: torch.Tensor,
) -> torch.Tensor:
    """One decoder layer over a packed sequence [tokens, hidden] (segments `bounds`, the longest no longer than
    `length_probe` is). The function every layer and shape is compiled through, the layer's weights its inputs, and
    the longest segment as a tensor's length, which stays symbolic where a plain int would be baked into the
    compiled code."""
    return layer(hidden, cos, sin, bounds, length_probe.shape[0])


@dataclass
class _Captured:
    """One static shape: its input buffers, its output, and (on CUDA) the graph that fills the output."""

    ids: torch.Tensor
    lengths: torch.Tensor
    bounds: torch.Tensor  # every row a segment of the full width: [0, width, 2 * width, ...]
    out: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None


class TorchEncoder:
    """One loaded encoder; `forward` maps INT64 ids and mask to float32 POOLED rows or [no, yes] LOGITS."""

    def __init__(
        self,
        model_dir: Path,
        task: Task,
        pooling: Pooling = "last_token",
        dtype: str = "auto",
        device: str = "auto",
        yes_no_ids: tuple[int, int] | None = None,
        precision: str = "auto",
        log: Callable[[str], None] = _log.info,
        compile_model: bool = False,
        use_graphs: bool | None = None,
        max_batch_tokens: int = TextEndpointParameters.max_batch_tokens,
        sleepable: bool = False,
        precompiled_dir: Path | None = None,
        device_memory_cap: int = 0,
        host_embeddings: bool = False,
        release_context_asleep: bool = False,
    ) -> None:
        """`use_graphs`: None = on CUDA; True on a CPU runs the same static-shape path eagerly (for tests).
        `sleepable`: weights in a `WeightArena`, so `sleep()`/`wake()` can free and restore their device memory.
        `precompiled_dir`: where compiled layers are saved for the next load (default: beside the inductor cache).
        `device_memory_cap`: bytes this process may hold on the GPU ([router] device_memory; 0: none), applied before
        the load and again right after the arena is built (its bytes are outside torch's allocator), so compilation
        and warm-up already run under the tighter limit.
        `host_embeddings`: an FP8 embedding table (precision fp8 / nvfp4) in pinned host memory, gathered over the
        bus (`fp8.Fp8Embedding`): its bytes off the GPU.
        `release_context_asleep`: asleep, the process's remaining GPU state (context, kernels, workspaces) is
        checkpointed to host memory too (`cuda_checkpoint.ContextRelease`; CUDA only): nothing left on the device,
        a wake costs the restore."""
        self.task = task
        self.pooling = pooling
        self.model_dir = Path(model_dir)
        self.device = choose_device(device)
        self.max_batch_tokens = max_batch_tokens
        cuda = self.device.type == "cuda"
        if cuda:  # before the engine takes any memory; again once the arena exists (below)
            apply_device_cap(device_memory_cap, log=log)
        config = read_config(self.model_dir)
        self.causal = config.get("model_type") in CAUSAL_DECODERS and not config.get("use_sliding_window", False)
        if cuda:  # the runtime's start and the context, timed apart from the weights' copy they would seem part of
            started = time.perf_counter()
            torch.empty(1, device=self.device)
            trim_stack_reserve(self.device)  # ~200 MiB of an H200 context's local memory (cuda_context)
            log(f"CUDA context ready in {time.perf_counter() - started:.1f} s")
        self.precision, reasons = choose_precision(
            precision,  # type: ignore[arg-type]
            Device(torch.cuda.get_device_capability(self.device) if cuda else None),
            ENGINE_PRECISIONS if self.causal else ENGINE_PRECISIONS - {"nvfp4"},
        )
        for reason in reasons:
            log(f"precision: {reason}")
        # FP8 and NVFP4 quantize bfloat16 weights; an explicit precision is the dtype; "auto" leaves it to `dtype`
        if self.precision in ("fp8", "nvfp4"):
            self.dtype = torch.bfloat16
        elif precision == "auto":
            self.dtype = choose_dtype(dtype, self.device)
        else:
            self.dtype = DTYPES[self.precision]
        compiler_imported: Callable[[], float] = lambda: 0.0  # noqa: E731
        package = self._package_file(precompiled_dir, log) if compile_model and cuda and self.causal else None

        def import_compiler() -> None:  # what compiling the layer imports (~2.4 s), while the checkpoint is read
            nonlocal compiler_imported
            compiler_imported = import_compiler_in_background()

        if self.causal:  # our decoder: each weight read once onto the device (and quantized there with FP8 or NVFP4)
            # our Qwen3 decoder, or transformers' model for other architectures: their attributes differ (Any)
            self.model: Any = load_qwen3(
                self.model_dir, self.device, self.dtype, self.precision, log,
                import_compiler if compile_model and cuda and not (package and package.exists()) else None,
                host_embeddings=host_embeddings,
            )  # fmt: skip
        else:
            self.model = self._transformers_model(log)
        self.arena = WeightArena(self.model, self.device, log) if sleepable else None
        self.context = ContextRelease(log) if release_context_asleep and cuda and sleepable else None
        if device_memory_cap and self.arena is not None:
            apply_device_cap(device_memory_cap, self.arena.nbytes, log)
        self.vocab_size = int(config["vocab_size"])
        self.hidden_size = int(config["hidden_size"])
        if self.causal:
            self._positions = torch.arange(int(config["max_position_embeddings"]), device=self.device)
            self._length_probe = torch.empty(self._positions.shape[0], dtype=torch.int8, device=self.device)
        self._layer_call: Callable[..., torch.Tensor] = decoder_layer_call
        if cuda:  # cuDNN's SDPA plans each new shape on the host (~0.9 ms a layer, BENCHMARKS.md); flash does not
            torch.backends.cuda.enable_cudnn_sdp(False)
        if compile_model and cuda:  # fuses FP8 activation quantization into its producers
            if self.causal:  # one compiled layer serves all of them (regional compilation: one layer's build)
                self._layer_call = self._compile_layers(package, log, compiler_imported())
            else:
                self.model = torch.compile(self.model, dynamic=True)
        self.use_graphs = self.causal and (cuda if use_graphs is None else use_graphs)
        self._graphs: dict[tuple[int, int], _Captured] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs and cuda else None
        self.head: torch.Tensor | None = None
        if task == "rerank":
            if yes_no_ids is None:
                raise ValueError("the reranker needs the token ids of 'no' and 'yes'")
            rows = read_lm_head_rows(self.model_dir, list(yes_no_ids))
            if rows is None:  # tied head: the rows are the input embeddings (looked up: an FP8 table dequantizes them)
                embeddings = self.model.embed_tokens if self.causal else self.model.get_input_embeddings()
                rows = embeddings(torch.tensor(yes_no_ids, device=self.device)).detach()
            self.head = rows.to(device=self.device, dtype=self.dtype)
        if cuda and self.causal:
            self.warm_up(log)

    def _transformers_model(self, log: Callable[[str], None]) -> torch.nn.Module:
        """A non-Qwen3 encoder (MiniLM in the tests): transformers' model, masked forward."""
        started = time.perf_counter()
        model = self._read_transformers_model()
        read = time.perf_counter()
        model = model.to(self.device).eval()
        log(f"weights read in {read - started:.1f} s, on {self.device.type} in {time.perf_counter() - read:.1f} s")
        if self.precision == "fp8":
            started = time.perf_counter()
            converted = convert_linears(model)
            log(f"precision: fp8, {converted} linear layers quantized rowwise in {time.perf_counter() - started:.1f} s")
        return model

    def transformers_model(self) -> torch.nn.Module:
        """The checkpoint as transformers' model on this engine's device and dtype, with its masked forward: what
        the ONNX export traces (our Qwen3 decoder only runs packed rows)."""
        if not self.causal:
            return self.model
        return self._read_transformers_model().to(self.device).eval()

    def _read_transformers_model(self) -> torch.nn.Module:
        from transformers import AutoModel

        return AutoModel.from_pretrained(str(self.model_dir), dtype=self.dtype, attn_implementation="sdpa")

    def _package_file(self, directory: Path | None, log: Callable[[str], None]) -> Path | None:
        """Where the compiled layer for this model, precision and code is kept (None: no key, compile unsaved). Known
        before the load starts: a load that finds it never imports the compiler."""
        try:
            key = artifact_key(
                [self.precision, str(self.dtype), (self.model_dir / "config.json").read_text()], ENGINE_SOURCES
            )
        except OSError as error:  # sources not on disk (a zipped install): compile, nothing to save or load
            log(f"compiled layer not saved: its key needs the engine's sources ({error})")
            return None
        return (directory or default_directory()) / f"{key}{PACKAGE_SUFFIX}"

    def _compile_layers(
        self, file: Path | None, log: Callable[[str], None], waited: float
    ) -> Callable[..., torch.Tensor]:
        """`decoder_layer_call` compiled once for every layer and shape (the layer's weights are inputs), read from
        `file` when an earlier load saved it. `waited`: seconds spent waiting for the compiler's imports (a load
        that compiles), counted in the phase's time."""
        if waited:
            log(f"compiler imports (in the background since the read began) waited for {waited:.1f} s")
        started = time.perf_counter() - waited
        tokens, segment = 160, 32  # distinct example sizes: equal ones would be traced as equal
        with torch.inference_mode():
            # small: the layer's output is then its attention and MLP, not the residual input, so the package's
            # answer checked against the eager layer's tells a wrong package
            hidden = torch.randn(tokens, self.hidden_size, dtype=self.dtype, device=self.device) * 0.01
            cos, sin = self.model.rotary_emb(self._positions[:tokens], self.dtype)
            bounds = torch.arange(0, tokens + 1, segment, dtype=torch.int32, device=self.device)
            probe = self._length_probe[:segment]
            example = (self.model.layers[0], hidden, cos, sin, bounds, probe)
            dynamic = [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0)]  # tokens, segments and the longest: every size
            return compile_once(decoder_layer_call, example, dynamic, file, log, started)

    def warm_up(self, log: Callable[[str], None]) -> None:
        """Do at load what would otherwise stall the first requests: the first launches of every kernel (and with
        `torch.compile` as the fallback, its compilation for one row and for any shape), every CUDA-graph shape's
        capture, and (on CUDA) one pass of `max_batch_tokens`, the largest the engine runs: the memory a load reports
        is then what the engine holds at its busiest."""
        started = time.perf_counter()
        for rows, width in ((1, 16), (3, 40), (5, 300), (4, 400)):  # two graphs, two packed passes
            self.forward(np.full((rows, width), 100, dtype=np.int64), np.ones((rows, width), dtype=np.int64))
        if self.device.type == "cuda":  # one full pass: the activation pool reaches its bound (max_batch_tokens)
            # now, where the router measures it and an out-of-memory fails the load, not a request later
            width = min(2048, self.max_batch_tokens, self._positions.shape[0])
            rows = max(1, self.max_batch_tokens // width)
            self.forward(np.full((rows, width), 100, dtype=np.int64), np.ones((rows, width), dtype=np.int64))
        first = time.perf_counter()
        if self.use_graphs:
            with torch.inference_mode():
                for shape in graph_shapes(GRAPH_MAX_TOKENS, GRAPH_MAX_ROWS):
                    if shape not in self._graphs:
                        self._capture(shape)
        done = time.perf_counter()
        log(
            f"warmed up in {done - started:.1f} s: first batches (compilation) {first - started:.1f} s, "
            f"the other CUDA graphs {done - first:.1f} s ({len(self._graphs)} graphs in all)"
            + (f"; {allocator_summary(self.device)}" if self.device.type == "cuda" else "")
        )

    def validate(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
        validate_encoder_inputs(
            input_ids, attention_mask, self.vocab_size, self._positions.shape[0] if self.causal else None
        )

    def sleep(self) -> dict[str, float | int | str]:
        """Free the weights' device memory; the engine keeps everything else (the router's host-RAM tier)."""
        if self.arena is None:
            raise ValueError("this engine was loaded without a weight arena (sleepable = false)")
        started = time.perf_counter()
        self.arena.sleep()
        trim_stack_reserve(self.device)  # kernels since the load may have raised the stack limit again
        if self.context is not None:
            self.context.release()
        return self.residency() | {"seconds": round(time.perf_counter() - started, 4)}

    def wake(self) -> dict[str, float | int | str]:
        if self.arena is None:
            raise ValueError("this engine was loaded without a weight arena (sleepable = false)")
        started = time.perf_counter()
        if self.context is not None:  # before any CUDA call
            self.context.restore()
        self.arena.wake()
        return self.residency() | {"seconds": round(time.perf_counter() - started, 4)}

    def residency(self) -> dict[str, float | int | str]:
        if self.arena is None:
            return {"state": "awake", "weight_bytes": 0, "host_bytes": 0}
        state = "asleep" if self.arena.asleep else "awake"
        released = self.context is not None and self.context.released  # no CUDA call here: it may be checkpointed
        return {
            "state": state,
            "weight_bytes": self.arena.nbytes,
            "host_bytes": self.arena.host_bytes,
            "context": "released" if released else "resident",
        }

    def close(self) -> None:
        """Before the process ends (the model's unload): a checkpointed context restored, so that what torch frees
        at exit does not wait on a locked driver."""
        if self.context is not None:
            self.context.restore()

    @torch.inference_mode()
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if self.arena is not None and self.arena.asleep:  # a caller that bypassed the router: correct, if slower
            self.wake()
        self.validate(input_ids, attention_mask)
        starts, lengths = real_spans(attention_mask)
        if not self.causal:
            return self._forward_masked(input_ids, attention_mask)
        shape = graph_shape(len(lengths), int(lengths.max()), GRAPH_MAX_TOKENS) if self.use_graphs else None
        if shape is not None:
            return self._forward_graph(input_ids, starts, lengths, shape)
        return self._forward_packed(input_ids, starts, lengths)

    def _forward_graph(
        self, input_ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray, shape: tuple[int, int]
    ) -> np.ndarray:
        """A small batch: its rows (real tokens first, padding after) in a captured power-of-two shape, one replay."""
        block = np.zeros(shape, dtype=np.int64)
        block_lengths = np.ones(shape[0], dtype=np.int64)  # padding rows: one token
        for row, (start, length) in enumerate(zip(starts, lengths, strict=True)):
            block[row, :length] = input_ids[row, start : start + length]
            block_lengths[row] = length
        flat = torch.from_numpy(np.concatenate([block.ravel(), block_lengths])).to(self.device)
        ids, row_lengths = flat[: block.size].view(shape), flat[block.size :]
        return self._run(ids, row_lengths)[: len(lengths)].float().cpu().numpy()

    def _forward_packed(self, input_ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Every row's real tokens end to end, in passes of up to `max_batch_tokens`: no padding computed. All
        passes go to the device in one copy and are queued before one copy back."""
        passes = plan_packed_passes(lengths.tolist(), self.max_batch_tokens)
        pieces: list[np.ndarray] = []
        for rows in passes:  # per pass: ids, positions, segment bounds
            pieces += [input_ids[row, starts[row] : starts[row] + lengths[row]] for row in rows]
            pieces += [np.arange(lengths[row]) for row in rows]
            pieces.append(np.concatenate([[0], np.cumsum(lengths[rows])]))
        flat = torch.from_numpy(np.concatenate(pieces).astype(np.int64)).to(self.device)
        results, at = [], 0
        for rows in passes:
            total = int(lengths[rows].sum())
            ids, positions = flat[at : at + total], flat[at + total : at + 2 * total]
            bounds = flat[at + 2 * total : at + 2 * total + len(rows) + 1].to(torch.int32)
            at += 2 * total + len(rows) + 1
            results.append(self._packed(ids, positions, bounds, int(lengths[rows].max())))
        values = torch.cat(results).float().cpu().numpy()
        out = np.empty_like(values)
        out[np.concatenate(passes)] = values
        return out

    def _packed(self, ids: torch.Tensor, positions: torch.Tensor, bounds: torch.Tensor, longest: int) -> torch.Tensor:
        """One packed sequence through the decoder (each segment attends causally to itself), pooled per segment."""
        hidden = self._decoder(ids, positions, bounds, longest)
        if self.task == "embed" and self.pooling == "mean":
            counts = bounds[1:] - bounds[:-1]
            segment = torch.repeat_interleave(
                torch.arange(len(counts), device=ids.device), counts, output_size=ids.shape[0]
            )
            sums = torch.zeros(len(counts), hidden.shape[1], dtype=torch.float32, device=ids.device)
            sums.index_add_(0, segment, hidden.float())
            return (sums / counts[:, None]).to(hidden.dtype)
        return self._output(hidden[bounds[1:].long() - 1])

    def _run(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        shape = (ids.shape[0], ids.shape[1])
        captured = self._graphs.get(shape) or self._capture(shape)
        captured.ids.copy_(ids)
        captured.lengths.copy_(lengths)
        if captured.graph is not None:
            captured.graph.replay()
        else:  # CPU: the same static buffers, run eagerly
            captured.out = self._pooled(captured.ids, captured.lengths, captured.bounds)
        assert captured.out is not None
        return captured.out.clone()  # the next replay overwrites the static output

    def _capture(self, shape: tuple[int, int]) -> _Captured:
        """A graph for `shape`. Only the first capture is preceded by a run outside capture: it does the lazy work no
        capture may do (the compiled kernels' first-launch tuning, cuBLAS workspaces); later shapes run the same
        kernels."""
        captured = _Captured(
            ids=torch.zeros(shape, dtype=torch.long, device=self.device),
            lengths=torch.ones(shape[0], dtype=torch.long, device=self.device),
            bounds=torch.arange(0, shape[0] * shape[1] + 1, shape[1], dtype=torch.int32, device=self.device),
        )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            if not self._graphs:
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    self._pooled(captured.ids, captured.lengths, captured.bounds)
                torch.cuda.current_stream(self.device).wait_stream(side)
            captured.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured.graph, pool=self._graph_pool, capture_error_mode="thread_local"):
                captured.out = self._pooled(captured.ids, captured.lengths, captured.bounds)
            torch.cuda.synchronize(self.device)
        self._graphs[shape] = captured
        return captured

    def _pooled(self, ids: torch.Tensor, lengths: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
        """Padded rows (real tokens first) through the decoder, then pooling (and the reranker head). The rows go
        through as one packed sequence of full-width segments, so the layers see the same call as in `_packed`: one
        compiled graph serves both paths and every shape (a [rows, width] call would compile again for one row and
        for many, ~3 s each at load). Causal attention keeps a row's padding, which follows its real tokens, out of
        them."""
        rows, width = ids.shape
        positions = self._positions[:width].repeat(rows)
        packed = self._decoder(ids.reshape(-1), positions, bounds, width)
        hidden = packed.view(rows, width, -1)
        if self.task == "embed" and self.pooling == "mean":
            mask = (self._positions[:width] < lengths[:, None]).to(hidden.dtype).unsqueeze(-1)
            return (hidden * mask).sum(dim=1) / lengths[:, None].to(hidden.dtype)
        return self._output(hidden[torch.arange(ids.shape[0], device=ids.device), lengths - 1])

    def _decoder(self, ids: torch.Tensor, positions: torch.Tensor, bounds: torch.Tensor, longest: int) -> torch.Tensor:
        """ids and positions [tokens] -> [tokens, hidden]: embeddings, the decoder layers with causal attention within
        the segments `bounds` (`longest` tokens at most), and the final norm."""
        hidden = self.model.embed_tokens(ids)
        cos, sin = self.model.rotary_emb(positions, hidden.dtype)
        # an upper bound is all FlashAttention needs; at least 16 keeps the length symbolic (no 0/1 specialisation)
        # and clear of the kernel's special case for a length of 1
        probe = self._length_probe[: max(longest, 16)]
        for layer in self.model.layers:
            hidden = self._layer_call(layer, hidden, cos, sin, bounds, probe)
        return self.model.norm(hidden)

    def _output(self, last: torch.Tensor) -> torch.Tensor:
        """Each text's last hidden state: the embedding, or the reranker's [no, yes] logits."""
        return last if self.task == "embed" else last @ self.head.T  # type: ignore[union-attr]

    def _forward_masked(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(np.ascontiguousarray(input_ids)).to(self.device)
        mask = torch.from_numpy(np.ascontiguousarray(attention_mask)).to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.task == "embed":
            out = pool(hidden, mask, self.pooling)
        else:
            assert self.head is not None
            out = pool(hidden, mask, "last_token") @ self.head.T
        return out.float().cpu().numpy()

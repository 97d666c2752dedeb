"""Qwen3's decoder in plain torch, for the engine's causal path, loaded straight from the checkpoint.

The arithmetic is transformers' Qwen3 (RMSNorm in float32, q/k norms per head, rotary embeddings, SwiGLU), and the
tests hold it to transformers on the same weights. It is ours for the cold load: a stub that imports transformers'
modeling stack spends ~2 s on it, and `from_pretrained` builds the model once with random weights and again from the
checkpoint. Here the modules are built without memory (the meta device) and each weight arrives once, read by
`checkpoint.load_tensors` and, with FP8 or NVFP4, quantized as it lands (the linear layers to that precision, the
embedding table to FP8 rows), so the device never holds the whole bfloat16 model.

Attention is over packed rows only (`packed_attention`): the engine lays every text end to end in one sequence,
[tokens, hidden], with the segment bounds. Weight names are the checkpoint's, with or without the `model.` prefix a
`Qwen3ForCausalLM` checkpoint has; its `lm_head` is not loaded (the reranker reads its two rows on its own).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from triton_rag.engines.checkpoint import StoredTensor, load_tensors, stored_tensors
from triton_rag.engines.fp8 import Fp8Embedding, Fp8Linear
from triton_rag.engines.nvfp4 import Nvfp4Linear, mode_for
from triton_rag.engines.packed_attention import attend_packed

_log = logging.getLogger(__name__)

#: Checkpoint tensors the decoder does not hold.
SKIPPED_PREFIXES = ("lm_head.",)
#: Precisions whose layers are quantized as their weights land (any other loads the weights in the given dtype).
QUANTIZED_PRECISIONS = ("fp8", "nvfp4")
#: Modules that quantize their weight in `load_weight`.
QUANTIZING_MODULES = (Fp8Linear, Nvfp4Linear, Fp8Embedding)


@dataclass(frozen=True)
class Qwen3Shape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_positions: int
    attention_bias: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Qwen3Shape:
        """From a `config.json` (transformers 4's `rope_theta` or 5's `rope_parameters`); ValueError for a variant
        this decoder does not implement, rather than numbers that silently differ."""
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope type {rope_type!r} is not implemented by the Qwen3 engine (only 'default')")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"activation {config['hidden_act']!r} is not implemented by the Qwen3 engine")
        heads = int(config["num_attention_heads"])
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            max_positions=int(config["max_position_embeddings"]),
            attention_bias=bool(config.get("attention_bias", False)),
        )


def read_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())


class Embedding(nn.Embedding):
    """`nn.Embedding` without its random init, which on the meta device imports dynamo and sympy (~1 s of a cold
    load) for values the checkpoint replaces anyway."""

    def reset_parameters(self) -> None:
        pass


class Linear(nn.Linear):
    """`nn.Linear` without its random init (as `Embedding`)."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.inv_freq: torch.Tensor
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponents), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [tokens, head_dim] for the positions [tokens]."""
        freqs = positions[:, None].float() * self.inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [tokens, heads, dim] rotated by cos/sin [tokens, dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, shape: Qwen3Shape, linear: Callable[[int, int, bool], nn.Module]) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = shape.heads, shape.kv_heads, shape.head_dim
        self.q_proj = linear(shape.hidden_size, shape.heads * shape.head_dim, shape.attention_bias)
        self.k_proj = linear(shape.hidden_size, shape.kv_heads * shape.head_dim, shape.attention_bias)
        self.v_proj = linear(shape.hidden_size, shape.kv_heads * shape.head_dim, shape.attention_bias)
        self.o_proj = linear(shape.heads * shape.head_dim, shape.hidden_size, shape.attention_bias)
        self.q_norm = RMSNorm(shape.head_dim, shape.rms_norm_eps)
        self.k_norm = RMSNorm(shape.head_dim, shape.rms_norm_eps)
        self.scaling = shape.head_dim**-0.5

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bounds: torch.Tensor, longest: int
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(tokens, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(tokens, self.kv_heads, self.head_dim))
        v = self.v_proj(x).view(tokens, self.kv_heads, self.head_dim)
        out = attend_packed(_rotate(q, cos, sin), _rotate(k, cos, sin), v, bounds, longest, self.scaling)
        return self.o_proj(out.reshape(tokens, self.heads * self.head_dim))


class Mlp(nn.Module):
    def __init__(self, shape: Qwen3Shape, linear: Callable[[int, int, bool], nn.Module]) -> None:
        super().__init__()
        self.gate_proj = linear(shape.hidden_size, shape.intermediate_size, False)
        self.up_proj = linear(shape.hidden_size, shape.intermediate_size, False)
        self.down_proj = linear(shape.intermediate_size, shape.hidden_size, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, shape: Qwen3Shape, linear: Callable[[int, int, bool], nn.Module]) -> None:
        super().__init__()
        self.self_attn = Attention(shape, linear)
        self.mlp = Mlp(shape, linear)
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bounds: torch.Tensor, longest: int
    ) -> torch.Tensor:
        """x [tokens, hidden]: a packed sequence whose segments `bounds` (the longest `longest` tokens at most)
        attend causally to themselves."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bounds, longest)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Decoder(nn.Module):
    """Embeddings, layers, final norm and rotary table; the engine drives the layers itself (`decoder_layer_call`)."""

    def __init__(
        self,
        shape: Qwen3Shape,
        linear: Callable[[int, int, bool], nn.Module],
        embedding: Callable[[int, int], nn.Module],
    ) -> None:
        super().__init__()
        self.shape = shape
        self.embed_tokens = embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(shape, linear) for _ in range(shape.layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(shape.head_dim, shape.rope_theta)


def load_qwen3(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    precision: str | None = None,
    log: Callable[[str], None] = _log.info,
    on_modules_built: Callable[[], None] | None = None,
    host_embeddings: bool = False,
) -> Qwen3Decoder:
    """The checkpoint's decoder on `device` in `dtype`. `precision` "fp8" or "nvfp4": every linear layer quantized
    to it as its weight lands (`Fp8Linear`, `Nvfp4Linear` in the mode this device runs), and the embedding table to
    FP8 rows (`Fp8Embedding`); any other value keeps the weights in `dtype`. ValueError when the checkpoint lacks a
    tensor the decoder needs or holds one it does not know.

    `host_embeddings`: with an FP8 table, keep it in pinned host memory, read by the lookup over the bus
    (`Fp8Embedding`'s host mode); ignored for an unquantized table.

    `on_modules_built`: called once the modules exist, before any weight is read (the engine starts importing the
    compiler then, so that its imports overlap the read and no other import)."""
    began = time.perf_counter()
    shape = Qwen3Shape.from_config(read_config(model_dir))
    model = _empty_decoder(shape, dtype, precision, device, log, host_embeddings)
    if on_modules_built is not None:
        on_modules_built()
    wanted = [t for t in stored_tensors(model_dir) if not t.name.removeprefix("model.").startswith(SKIPPED_PREFIXES)]
    _read(model, wanted, device, dtype, model_dir, began, log)
    return model.eval()


def _empty_decoder(
    shape: Qwen3Shape,
    dtype: torch.dtype,
    precision: str | None,
    device: torch.device,
    log: Callable[[str], None],
    host_embeddings: bool = False,
) -> Qwen3Decoder:
    linear: Callable[[int, int, bool], nn.Module] = Linear
    embedding: Callable[[int, int], nn.Module] = Embedding
    if precision == "fp8":
        linear = partial(Fp8Linear, out_dtype=dtype)
    elif precision == "nvfp4":
        linear = partial(Nvfp4Linear, out_dtype=dtype, mode=mode_for(device, log))
    if precision in QUANTIZED_PRECISIONS:
        embedding = partial(Fp8Embedding, out_dtype=dtype, host=host_embeddings)
    # On the meta device: no memory, and no init (a random init there imports the compiler's modules)
    with torch.device("meta"):
        model = Qwen3Decoder(shape, linear, embedding)
    model.rotary_emb.inv_freq = model.rotary_emb.inv_freq.to(device)  # computed on the CPU, as transformers does
    return model


def _place(model: Qwen3Decoder, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """One checkpoint tensor into the decoder: converted to `dtype`, quantized for an FP8 or NVFP4 module."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if isinstance(owner, QUANTIZING_MODULES) and leaf == "weight":
        owner.load_weight(tensor.to(dtype))
        return
    # a quantized layer's bias: its output dtype
    target = owner.out_dtype if isinstance(owner, QUANTIZING_MODULES) else dtype
    owner._parameters[leaf] = nn.Parameter(tensor.to(target), requires_grad=False)


def _stored_shape(owner: nn.Module, leaf: str, parameter: torch.Tensor) -> tuple[int, ...]:
    """The shape the checkpoint holds for a parameter: an NVFP4 weight is packed two values a byte."""
    if isinstance(owner, Nvfp4Linear) and leaf == "weight":
        return (owner.out_features, owner.in_features)
    return tuple(parameter.shape)


def _read(
    model: Qwen3Decoder,
    stored: list[StoredTensor],
    device: torch.device,
    dtype: torch.dtype,
    where: Path,
    began: float,
    log: Callable[[str], None],
) -> None:
    """`stored` into `model`; ValueError unless they are exactly the decoder's parameters (`model.` prefixes aside),
    each of its shape."""
    shapes = {
        f"{owner_name}.{leaf}" if owner_name else leaf: _stored_shape(owner, leaf, parameter)
        for owner_name, owner in model.named_modules()
        for leaf, parameter in owner._parameters.items()
        if parameter is not None
    }
    names = set()
    for tensor in stored:
        name = tensor.name.removeprefix("model.")
        if name not in shapes:
            raise ValueError(f"{where}: the checkpoint's {tensor.name} is not part of a Qwen3 decoder")
        if tensor.shape != shapes[name]:
            raise ValueError(
                f"{where}: the checkpoint's {tensor.name} is {list(tensor.shape)}, the config says {list(shapes[name])}"
            )
        names.add(name)
    if missing := sorted(shapes.keys() - names):
        raise ValueError(f"{where}: the checkpoint lacks {len(missing)} decoder tensors, e.g. {missing[0]}")
    set_up = time.perf_counter() - began
    started = time.perf_counter()
    total = load_tensors(stored, device, lambda t, tensor: _place(model, t.name.removeprefix("model."), tensor, dtype))
    seconds = time.perf_counter() - started
    log(
        f"checkpoint read onto {device.type}: {total / 2**30:.2f} GiB in {seconds:.1f} s "
        f"({total / 2**30 / max(seconds, 1e-9):.1f} GiB/s){_quantized(model)}; "
        f"modules set up before it in {set_up:.1f} s"
    )


def _quantized(model: Qwen3Decoder) -> str:
    """What the load quantized, for its log line ("" for none)."""
    fp8 = sum(isinstance(module, Fp8Linear) for module in model.modules())
    nvfp4 = [module.mode for module in model.modules() if isinstance(module, Nvfp4Linear)]
    parts = [f"{fp8} linear layers to FP8"] if fp8 else []
    if nvfp4:
        how = "on FP4 tensor cores" if nvfp4[0] == "native" else "kept 4-bit, decoded to FP8 for each GEMM"
        parts.append(f"{len(nvfp4)} linear layers to NVFP4 ({nvfp4[0]}: {how})")
    if isinstance(model.embed_tokens, Fp8Embedding):
        parts.append("the embedding table to FP8 rows" + (" in host memory" if model.embed_tokens.host else ""))
    return f", quantized as they landed: {', '.join(parts)}" if parts else ""

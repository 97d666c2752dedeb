"""FP8 (e4m3) linear layers with rowwise scales: weights quantized once at load (no bfloat16 copy kept), activations
quantized per token on the fly, the product on FP8 tensor cores (`torch._scaled_mm`, compute capability 8.9+).

Rowwise: one scale per output channel of the weight and one per token of the activation, so an outlier channel or
token does not flatten the others' resolution. Activation quantization is a few elementwise kernels per layer;
eager it costs more than FP8 saves (FACTS.md: 29.0k vs 30.4k tokens/s bf16 on an 8B encoder), compiled with
`torch.compile` it fuses into the producers (61.4k). On a CPU the same arithmetic is emulated in float32, which is
how the tests check the quantization.

`Fp8Embedding` keeps an embedding table the same way (one scale per row), for the FP8 and NVFP4 engines: the table is
an 8B Qwen3's largest tensor, and a lookup touches only a few of its rows.
"""

from __future__ import annotations

import torch
from torch import nn

from triton_rag.engines.weight_arena import CudaBytes

#: Largest finite float8_e4m3fn.
FP8_MAX = 448.0
#: `_scaled_mm` wants every dimension a multiple of 16; token counts are padded up to it.
ALIGN = 16


def quantize_rowwise(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn values, float32 scales [rows, 1]) with values ~= fp8 * scale, one scale per row."""
    amax = values.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    quantized = (values.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return quantized, scale


class Fp8Linear(nn.Module):
    """A linear layer with an FP8 weight. Built empty (on the meta device, say) and given its weight by
    `load_weight`, which quantizes it: a loader can drop each bfloat16 weight as soon as it lands."""

    def __init__(self, in_features: int, out_features: int, bias: bool, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.out_dtype = out_dtype if out_dtype != torch.float32 else torch.bfloat16
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn), False)
        self.weight_scale: torch.Tensor
        self.register_buffer("weight_scale", torch.empty(1, out_features))  # [1, out]
        self.bias = nn.Parameter(torch.empty(out_features, dtype=self.out_dtype), False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        weight = linear.weight.detach()
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.dtype)
        layer.load_weight(weight)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(layer.out_dtype), False)
        return layer

    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantize `weight` [out, in] rowwise into this layer (the caller may free it afterwards)."""
        quantized, scale = quantize_rowwise(weight)
        self.weight = nn.Parameter(quantized, requires_grad=False)  # [out, in], row-major
        self.weight_scale = scale.reshape(1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = rowwise_linear(x.reshape(-1, shape[-1]), self.weight, self.weight_scale, self.bias, self.out_dtype)
        return out.reshape(*shape[:-1], self.out_features)


def rowwise_linear(
    rows: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """rows [tokens, in] times an FP8 weight [out, in] (row scales `weight_scale` [1, out]): the rows quantized per
    token, one `_scaled_mm` on CUDA, the same quantized values multiplied in float32 on a CPU. Out: [tokens, out] in
    `out_dtype` on CUDA, in the rows' dtype on a CPU."""
    count = rows.shape[0]
    if rows.is_cuda:  # always padded (by 0 rows when aligned): a branch on the count would recompile the layer
        rows = torch.nn.functional.pad(rows, (0, 0, 0, (-count) % ALIGN))
    quantized, scale = quantize_rowwise(rows)
    if rows.is_cuda:
        return torch._scaled_mm(
            quantized,
            weight.t(),  # column-major view, as _scaled_mm wants its second operand
            scale_a=scale,
            scale_b=weight_scale,
            bias=bias,
            out_dtype=out_dtype,
        )[:count]
    # emulation: the same quantized values and scales, multiplied in float32
    out = (quantized.float() * scale) @ (weight.float() * weight_scale.t()).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(rows.dtype)


def host_mapped(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a host copy of `table`, a tensor on `table`'s device over that copy's memory). On CUDA the copy is pinned and
    the second a zero-copy CUDA view of it (with unified addressing a pinned buffer's address is valid on the device
    too, so a CUDA kernel, a gather inside a CUDA graph as well, reads it over the bus); on a CPU both are the copy."""
    if table.device.type != "cuda":
        host = table.clone()
        return host, host
    host = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
    host.copy_(table)
    view = torch.as_tensor(CudaBytes(host.data_ptr(), host.numel() * host.element_size()), device=table.device)
    return host, view.view(table.dtype).view(table.shape)


class Fp8Embedding(nn.Module):
    """An embedding table in FP8 (e4m3) with one float32 scale per row: half a bfloat16 table (Qwen3-8B's 151669 x
    4096: 0.62 GB instead of 1.24). A lookup gathers the rows, then dequantizes only them. Built empty and given its
    table by `load_weight`, as `Fp8Linear`.

    `host`: the table lives in pinned host memory instead (0 bytes of it on the GPU) and the lookup's gather reads
    its rows over the bus (a token's row is 4 KiB at 8B; 40 MB for a 10,000-token batch). It is then no parameter:
    the weight arena, the router's host tier and `.to()` leave it where it is. The row scales stay on the device."""

    #: Rows quantized at a time by `load_weight`: a whole table's float32 copy would be 2.5 GB for Qwen3-8B.
    CHUNK_ROWS = 8192

    def __init__(self, num_embeddings: int, embedding_dim: int, out_dtype: torch.dtype, host: bool = False) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.out_dtype = num_embeddings, embedding_dim, out_dtype
        self.host = host
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=torch.float8_e4m3fn), False)
        self.weight_scale: torch.Tensor
        self.register_buffer("weight_scale", torch.empty(num_embeddings, 1))
        #: host mode: the host copy of the table, and the view of it the lookup gathers from (on the device)
        self.host_table: torch.Tensor | None = None
        self.host_view: torch.Tensor | None = None

    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantize the table [rows, dim] rowwise into this module, a chunk of rows at a time (the caller may free
        `weight` afterwards)."""
        quantized = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)
        scale = torch.empty(weight.shape[0], 1, device=weight.device)
        for start in range(0, weight.shape[0], self.CHUNK_ROWS):
            chunk = slice(start, start + self.CHUNK_ROWS)
            quantized[chunk], scale[chunk] = quantize_rowwise(weight[chunk])
        self.weight_scale = scale
        if not self.host:
            self.weight = nn.Parameter(quantized, requires_grad=False)
            return
        self.host_table, self.host_view = host_mapped(quantized.view(torch.uint8))
        del self._parameters["weight"], quantized  # the device copy goes; the module's tensors no longer include it

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of `ids` (any shape), dequantized to `out_dtype`: the lookup, and the reranker's tied head rows."""
        # gathered as bytes: no float8 gather kernel needed
        table = self.host_view if self.host_view is not None else self.weight.view(torch.uint8)
        rows = table[ids].view(torch.float8_e4m3fn)
        return (rows.float() * self.weight_scale[ids]).to(self.out_dtype)


def convert_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every nn.Linear (but those named in `skip`) by an Fp8Linear in place; returns how many. The bfloat16
    weights are released as each layer is replaced, so peak memory stays near the bfloat16 model's."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(part in skip for part in name.split("."))
    ]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear.from_linear(linear))
        del linear
    return len(targets)

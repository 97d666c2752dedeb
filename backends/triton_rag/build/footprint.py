"""What a compute model is expected to hold before it has ever been loaded: weights plus workspace.

The router makes room with this estimate on a model's first load and then replaces it with the measured bytes
(memory.py). The estimate is deliberately simple and documented in docs/ROUTER.md:
- weights: parameters the engine keeps (the reranker keeps two LM-head rows, not the whole head) times the bytes per
  parameter of the serving dtype (auto: bfloat16 on a GPU, float32 on the CPU);
- activations: the largest padded batch (`max_batch_tokens`) times (6 x hidden + 3 x intermediate) values, the
  transient peak of one transformer layer's attention and MLP;
- runtime: the CUDA context and allocator slack on a GPU, the stub's Python and torch on the CPU.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

MIB = 2**20
GPU_RUNTIME_BYTES = 512 * MIB
CPU_RUNTIME_BYTES = 448 * MIB
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_AUTO_DTYPES = (("gpu", "bfloat16"), ("cpu", "float32"))


def safetensors_parameters(model_dir: Path, skip_prefixes: tuple[str, ...] = ("lm_head.",)) -> int:
    """Parameter count from the safetensors headers (no tensor data is read)."""
    total = 0
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no .safetensors weights")
    for path in files:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, info in header.items():
            if name == "__metadata__" or name.startswith(skip_prefixes):
                continue
            count = 1
            for dim in info["shape"]:
                count *= dim
            total += count
    return total


def estimate_bytes(model_dir: Path, config: dict, dtype: str, max_batch_tokens: int) -> dict[str, int]:
    """{"gpu": bytes, "cpu": bytes} for a transformer encoder served by the PyTorch engine."""
    parameters = safetensors_parameters(model_dir)
    hidden = int(config.get("hidden_size", 0))
    intermediate = int(config.get("intermediate_size", 4 * hidden))
    activation_values = max_batch_tokens * (6 * hidden + 3 * intermediate)
    return _per_device(parameters + activation_values, dtype)


def weight_bytes(model_dir: Path, dtype: str) -> dict[str, int]:
    """{"gpu", "cpu"}: the weights alone at the serving dtype: what a sleeping engine copies to host RAM."""
    parameters = safetensors_parameters(model_dir)
    return {device: parameters * _DTYPE_BYTES[auto if dtype == "auto" else dtype] for device, auto in _AUTO_DTYPES}


def _per_device(values: int, dtype: str) -> dict[str, int]:
    """{"gpu", "cpu"}: the runtime plus `values` numbers at the serving dtype (auto: bfloat16 on a GPU, float32 on
    the CPU)."""
    result = {}
    for device, runtime, auto_dtype in (("gpu", GPU_RUNTIME_BYTES, "bfloat16"), ("cpu", CPU_RUNTIME_BYTES, "float32")):
        result[device] = runtime + values * _DTYPE_BYTES[auto_dtype if dtype == "auto" else dtype]
    return result


def estimate_vlm_bytes(model_dir: Path, config: dict, dtype: str, pages: int, max_tokens: int) -> dict[str, int]:
    """{"gpu", "cpu"} for the docling VLM: weights, the KV cache of `pages` pages of `max_tokens` tokens (prompt plus
    generation), and the vision tower's activations for their tiles (17 per page at most, 1024 patches each)."""
    parameters = safetensors_parameters(model_dir)
    text, vision = config["text_config"], config["vision_config"]
    heads = int(text["num_attention_heads"])
    head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    kv_values = 2 * int(text["num_hidden_layers"]) * int(text["num_key_value_heads"]) * head_dim * pages * max_tokens
    patches = pages * 17 * (int(vision["image_size"]) // int(vision["patch_size"])) ** 2
    vision_hidden = int(vision["hidden_size"])
    vision_values = patches * (6 * vision_hidden + 3 * int(vision.get("intermediate_size", 4 * vision_hidden)))
    return _per_device(parameters + kv_values + vision_values, dtype)

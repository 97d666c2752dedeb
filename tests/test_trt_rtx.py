"""TensorRT-RTX engines for RTX 50 (SM120) built on this CPU-only machine from the exported tiny encoders. Built, not
run: running them needs an RTX 50 card, which neither this machine nor CI has."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from triton_rag import contract
from triton_rag.build.export.onnx_export import export_encoder
from triton_rag.build.export.trt_rtx import build_rtx_engine, load_tensorrt_rtx
from triton_rag.build.plans import Host, Manifest, choose_variant, encoder_profiles, incompatibility, manifest_file
from triton_rag.engines.torch_encoder import TorchEncoder


@pytest.mark.parametrize(("task", "precision"), [("embed", "float32"), ("rerank", "float32"), ("embed", "float16")])
def test_sm120_engine_is_built_on_a_cpu_with_its_manifest(
    task: str, precision: str, float32_encoder: Callable[[str], TorchEncoder], tiny_embed_dir: Path, tmp_path: Path
) -> None:
    """float16: the plan chain's last step, exported from the engine's float16 forward."""
    engine = float32_encoder(task)
    if precision == "float16":
        engine = TorchEncoder(tiny_embed_dir, "embed", dtype="float16", device="cpu")
    onnx_path = export_encoder(engine, tmp_path / "model.onnx", log=lambda _: None)
    name = contract.EMBED_ENCODER if task == "embed" else contract.RERANK_ENCODER
    profiles = encoder_profiles(max_rows=16, max_length=512, max_batch_tokens=4096)
    plan = tmp_path / "model.sm120.engine"
    manifest = build_rtx_engine(onnx_path, plan, profiles, f"tiny {task}", name, precision, log=lambda _: None)
    assert plan.stat().st_size > 1_000_000  # the tiny model's weights (~37 MiB in float32) are in it
    assert Manifest.from_json(manifest_file(plan).read_text()) == manifest
    assert manifest.runtime == "tensorrt-rtx" and manifest.runtime_version == load_tensorrt_rtx().__version__
    assert manifest.compute_capability == (12, 0) and manifest.contract == name
    assert [p.max for p in manifest.profiles] == [(16, 512), (16, 512)]
    # where it loads, and where the repository falls back instead
    rtx_5070_ti = Host((12, 0), {"tensorrt-rtx": manifest.runtime_version})
    assert incompatibility(manifest, rtx_5070_ti) is None
    h100 = Host((9, 0), {"tensorrt-rtx": manifest.runtime_version})
    assert choose_variant([("python_trt_rtx", manifest), ("torch", None)], h100)[0] == "torch"


def test_targets_tensorrt_rtx_cannot_build_are_refused(tiny_embed_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot target compute capability"):
        build_rtx_engine(tmp_path / "x.onnx", tmp_path / "x.engine", [], "m", "c", "float32", capability=(9, 0))


def test_the_engine_runner_says_it_needs_the_gpu(tiny_embed_dir: Path, tmp_path: Path) -> None:
    """The python_trt_rtx variant's runner on a machine without the GPU: a clear error at load, not a crash."""
    from triton_rag.engines.trt_rtx_encoder import TrtRtxEncoder

    engine_file = tmp_path / "model.engine"
    engine_file.write_bytes(b"not needed: the check comes first")
    with pytest.raises(RuntimeError, match="needs its GPU"):
        TrtRtxEncoder(engine_file, tiny_embed_dir, "POOLED")

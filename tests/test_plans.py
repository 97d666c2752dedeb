"""Plan decisions as pure functions: the precision chain for a target GPU, profiles from the model configuration,
manifests, and the fallback to the next engine variant when a plan cannot load here."""

from __future__ import annotations

from pathlib import Path

import pytest

from triton_rag.build.plans import (
    Host,
    Manifest,
    Profile,
    choose_variant,
    encoder_profiles,
    incompatibility,
    plan_precision,
)

RTX_5070_TI, H100, RTX_4090, A100 = (12, 0), (9, 0), (8, 9), (8, 0)


@pytest.mark.parametrize(
    ("requested", "target", "chosen", "steps"),
    [
        ("nvfp4", RTX_5070_TI, "nvfp4", 0),
        ("nvfp4", (10, 0), "nvfp4", 0),
        ("nvfp4", H100, "fp8", 1),
        ("nvfp4", RTX_4090, "fp8", 1),
        ("nvfp4", A100, "float16", 2),
        ("fp8", A100, "float16", 1),
        ("fp8", H100, "fp8", 0),
        ("float16", RTX_5070_TI, "float16", 0),
    ],
)
def test_plan_precision_falls_down_nvfp4_fp8_fp16_by_the_target_gpu(requested, target, chosen, steps) -> None:
    precision, reasons = plan_precision(requested, target)
    assert precision == chosen and len(reasons) == steps
    assert all("falling back" in reason for reason in reasons)


def test_profiles_cover_the_model_configuration() -> None:
    ids, mask = encoder_profiles(max_rows=64, max_length=8192, max_batch_tokens=32768)
    assert ids.input == "INPUT_IDS" and mask.input == "ATTENTION_MASK"
    assert ids.min == (1, 1) and ids.max == (64, 8192) and ids.opt == (64, 512) == mask.opt
    assert ids.trtexec() == ("INPUT_IDS:1x1", "INPUT_IDS:64x512", "INPUT_IDS:64x8192")
    short = encoder_profiles(max_rows=16, max_length=256, max_batch_tokens=1024)[0]
    assert short.opt == (4, 256) and short.max == (16, 256)
    with pytest.raises(ValueError):
        encoder_profiles(0, 10, 10)


def manifest(**changes: object) -> Manifest:
    values = dict(
        source_model="Qwen/Qwen3-Embedding-8B",
        contract="qwen_embed_encoder",
        precision="fp8",
        runtime="tensorrt",
        runtime_version="10.13.2.6",
        compute_capability=H100,
        profiles=encoder_profiles(64, 8192, 32768),
    )
    return Manifest(**(values | changes))  # type: ignore[arg-type]


def test_manifest_round_trips_through_json() -> None:
    original = manifest()
    again = Manifest.from_json(original.to_json())
    assert again == original and isinstance(again.profiles[0], Profile)


def test_a_plan_loads_only_on_its_gpu_and_runtime_version() -> None:
    here = Host(capability=H100, versions={"tensorrt": "10.13.2.6"})
    assert incompatibility(manifest(), here) is None
    assert "this GPU is 12.0" in str(incompatibility(manifest(), Host(RTX_5070_TI, {"tensorrt": "10.13.2.6"})))
    assert "this server runs 10.14.1.48" in str(incompatibility(manifest(), Host(H100, {"tensorrt": "10.14.1.48"})))
    assert "does not have" in str(incompatibility(manifest(), Host(H100, {})))
    assert "has none" in str(incompatibility(manifest(), Host(None, {"tensorrt": "10.13.2.6"})))
    rtx = manifest(runtime="tensorrt-rtx", runtime_version="1.7.1", compute_capability=RTX_5070_TI)
    assert incompatibility(rtx, Host(RTX_5070_TI, {"tensorrt-rtx": "1.7.3"})) is None  # same major.minor
    assert incompatibility(rtx, Host(RTX_5070_TI, {"tensorrt-rtx": "1.8.0"})) is not None


def test_a_plan_of_another_model_is_passed_over() -> None:
    """After `embed.model` changes, a plan exported from the old model must not serve the new one."""
    here = Host(capability=H100, versions={"tensorrt": "10.13.2.6"})
    assert incompatibility(manifest(), here, "Qwen/Qwen3-Embedding-8B") is None
    why = str(incompatibility(manifest(), here, "Qwen/Qwen3-Embedding-0.6B"))
    assert "built from Qwen/Qwen3-Embedding-8B, the configured model is Qwen/Qwen3-Embedding-0.6B" in why
    chosen, reasons = choose_variant([("tensorrt_plan", manifest()), ("torch", None)], here, "tensorrt_plan", "other")
    assert chosen == "torch" and "the configured model is other" in reasons[0]


def test_the_repository_falls_back_to_the_next_variant_with_reasons() -> None:
    plan = manifest()
    rtx = manifest(runtime="tensorrt-rtx", runtime_version="1.7.1", compute_capability=RTX_5070_TI)
    variants = [("tensorrt_plan", plan), ("python_trt_rtx", rtx), ("torch", None)]
    on_h100 = Host(H100, {"tensorrt": "10.13.2.6"})
    assert choose_variant(variants, on_h100) == ("tensorrt_plan", [])
    on_5070 = Host(RTX_5070_TI, {"tensorrt-rtx": "1.7.1"})
    chosen, reasons = choose_variant(variants, on_5070)
    assert chosen == "python_trt_rtx" and len(reasons) == 1 and "TensorRT 10.13.2.6" in reasons[0]
    chosen, reasons = choose_variant(variants, Host(None, {}))
    assert chosen == "torch" and len(reasons) == 2
    chosen, reasons = choose_variant([("tensorrt_plan", None), ("torch", None)], on_h100)
    assert chosen == "torch" and "no manifest" in reasons[0]
    mislabelled = [("tensorrt_plan", rtx), ("torch", None)]
    assert "not tensorrt" in choose_variant(mislabelled, Host(RTX_5070_TI, {"tensorrt-rtx": "1.7.1"}))[1][0]
    with pytest.raises(ValueError, match="no engine variant loads"):
        choose_variant([("tensorrt_plan", plan)], Host(None, {}))


def test_trtexec_shape_flags_come_from_the_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    from triton_rag.cli import main

    assert main(["plan-shapes", "--set", "embed.max_length=1024", "--set", "rerank.max_batch_tokens=4096"]) == 0
    embed, rerank = capsys.readouterr().out.strip().splitlines()
    assert embed.startswith("qwen_embed_encoder: --minShapes=INPUT_IDS:1x1,ATTENTION_MASK:1x1 ")
    assert "--maxShapes=INPUT_IDS:64x1024,ATTENTION_MASK:64x1024" in embed
    assert "--optShapes=INPUT_IDS:8x512,ATTENTION_MASK:8x512" in rerank and "16x8192" in rerank


def test_record_plan_needs_the_gpu_and_version_it_was_built_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from triton_rag.cli import main

    plan = tmp_path / "model.plan"
    plan.write_bytes(b"x")
    args = ["record-plan", "--engine", str(plan), "--encoder", "qwen_embed_encoder", "--precision", "fp8"]
    assert main([*args, "--source-model", "m"]) == 2
    assert "needs the GPU and the tensorrt package" in capsys.readouterr().err
    assert not (tmp_path / "model.plan.manifest.json").exists()
    told = ["--capability", "12.0", "--tensorrt-version", "10.13.3.9"]
    assert main([*args, "--source-model", "Qwen/Qwen3-Embedding-8B", *told]) == 0
    manifest = Manifest.from_json((tmp_path / "model.plan.manifest.json").read_text())
    assert manifest.compute_capability == (12, 0) and manifest.runtime_version == "10.13.3.9"
    assert manifest.runtime == "tensorrt" and manifest.profiles[0].max == (64, 8192)
    assert manifest.source_model == "Qwen/Qwen3-Embedding-8B"
    assert main([*args, *told, "--set", "embed.model=/models/my-embedder"]) == 0  # by default the configured model
    assert Manifest.from_json((tmp_path / "model.plan.manifest.json").read_text()).source_model == "/models/my-embedder"

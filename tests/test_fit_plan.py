"""The fit arithmetic (core/fit.py), the shapes it works from (build/footprint.py) and `triton-rag plan`: bytes per
model against hand-computed numbers, shapes from safetensors headers and from the known-shape table, which models
co-reside, the plan's output and its error for a model that cannot fit, and measured.json taking the estimate's
place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from triton_rag import cli
from triton_rag.build.fit import Memory, fit_plan
from triton_rag.build.footprint import (
    KNOWN_SHAPE,
    encoder_footprints,
    encoder_shape,
    idefics3_parameters,
    known_encoder_shape,
    known_vlm,
    safetensors_parameters,
)
from triton_rag.build.offline_docling import GRANITE_DOCLING_TEXT, GRANITE_DOCLING_VISION, TINY_TEXT, TINY_VISION
from triton_rag.build.settings import load_settings
from triton_rag.core.fit import (
    GPU_RUNTIME_BYTES,
    GRAPH_POOL_BYTES,
    OUR_DECODERS,
    FitError,
    Resident,
    check_alone,
    encoder_footprint,
    plan_residency,
    qwen3_shape,
    serving_precision,
)
from triton_rag.core.measurements import MeasurementFile

GIB, MIB = 2**30, 2**20

# Qwen3-8B, by hand: hidden 4096, 36 layers, 32 query heads and 8 KV heads of 128, MLP 12288, vocabulary 151669.
LINEAR_PARAMS = 36 * (4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096 + 3 * 4096 * 12288)  # q, k, v, o, gate, up, down
LINEAR_ROWS = 36 * (4096 + 1024 + 1024 + 4096 + 12288 + 12288 + 4096)
TABLE_PARAMS, TABLE_ROWS = 151669 * 4096, 151669
NORMS = 36 * (2 * 4096 + 2 * 128) + 4096  # two RMS norms and the q/k norms per layer, the final norm
PASS_8192 = 8192 * (6 * 4096 + 3 * 12288)  # activation values of one 8192-token pass


def test_the_8b_shape_by_hand() -> None:
    shape = known_encoder_shape("Qwen/Qwen3-Embedding-8B")
    assert shape is not None and shape.source == KNOWN_SHAPE and shape.decoder
    assert (shape.linear_params, shape.linear_rows, shape.linears) == (LINEAR_PARAMS, LINEAR_ROWS, 36 * 7)
    assert (shape.embedding_params, shape.embedding_rows, shape.other_params) == (TABLE_PARAMS, TABLE_ROWS, NORMS)
    assert LINEAR_PARAMS == 6_945_767_424 and shape.parameters == 7_567_311_872  # the "8B"
    assert known_encoder_shape("qwen/qwen3-reranker-0.6b") is not None  # hub ids are case-insensitive
    assert known_encoder_shape("Qwen/Qwen3-Embedding-7B") is None and known_encoder_shape("/models/x") is None


def test_fp8_footprint_against_hand_computed_bytes() -> None:
    shape = known_encoder_shape("Qwen/Qwen3-Embedding-8B")
    assert shape is not None
    fp8 = encoder_footprint(shape, "embed", "gpu", "fp8", 8192)
    assert fp8.weights == LINEAR_PARAMS + 4 * LINEAR_ROWS == 6_951_370_752  # a byte a weight, float32 row scales
    assert fp8.embedding == TABLE_PARAMS + 4 * TABLE_ROWS == 621_842_900  # the FP8 table and its row scales
    assert fp8.other == 2 * NORMS  # norms in bfloat16
    assert fp8.activations == 2 * PASS_8192 == 960 * MIB
    assert (fp8.graphs, fp8.runtime) == (256 * MIB, 512 * MIB)
    assert fp8.total == 6_951_370_752 + 621_842_900 + 2 * NORMS + 960 * MIB + 768 * MIB
    assert fp8.weight_bytes == 6_951_370_752 + 621_842_900 + 2 * NORMS  # the host copy when it sleeps


def test_nvfp4_footprint_against_hand_computed_bytes() -> None:
    shape = known_encoder_shape("Qwen/Qwen3-Reranker-8B")
    assert shape is not None
    nvfp4 = encoder_footprint(shape, "rerank", "gpu", "nvfp4", 4096)
    # half a byte a weight, an E4M3 scale per 16, a float32 per output row, a float32 scalar per linear
    assert nvfp4.weights == LINEAR_PARAMS // 2 + LINEAR_PARAMS // 16 + 4 * LINEAR_ROWS + 4 * 252 == 3_912_598_512
    assert nvfp4.embedding == 621_842_900  # FP8, as under fp8
    assert nvfp4.other == 2 * (NORMS + 2 * 4096)  # and the two LM-head rows ("no", "yes") in bfloat16
    assert nvfp4.activations == PASS_8192  # 4096 tokens in bfloat16: half of the 8192-token pass in bytes
    bf16 = encoder_footprint(shape, "rerank", "gpu", "bfloat16", 4096)
    assert bf16.weights == 2 * LINEAR_PARAMS and bf16.embedding == 2 * TABLE_PARAMS
    cpu = encoder_footprint(shape, "rerank", "cpu", "float32", 4096)
    assert cpu.weights == 4 * LINEAR_PARAMS and cpu.graphs == 0 and cpu.activations == 2 * PASS_8192


def test_a_host_embedding_table_leaves_only_its_row_scales_on_the_gpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shape = known_encoder_shape("Qwen/Qwen3-Embedding-8B")
    assert shape is not None
    on_host = encoder_footprint(shape, "embed", "gpu", "fp8", 8192, host_table=True)
    assert on_host.embedding == 4 * TABLE_ROWS  # the float32 row scales stay; the FP8 table is host memory
    assert encoder_footprint(shape, "embed", "cpu", "float32", 8192, host_table=True).embedding == 4 * TABLE_PARAMS
    assert encoder_footprint(shape, "embed", "gpu", "bfloat16", 8192, host_table=True).embedding == 2 * TABLE_PARAMS
    argv = ["plan", "--profile", "rtx5070ti-16gb", "--cache-dir", str(tmp_path)]
    assert cli.main([*argv, "--set", "embed.embedding_table=host"]) == 0
    row = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("qwen_embed_encoder"))
    assert row[4:6] == ["0.6", "MiB"]  # the embedding column (after the weights): 151669 row scales
    assert cli.main([*argv, "--set", "embed.embedding_table=gpu"]) == 2
    assert "embedding_table" in capsys.readouterr().err


def test_serving_precision_and_the_longest_pass() -> None:
    assert serving_precision("gpu", "nvfp4", "auto") == "nvfp4"  # planned for the card, not the fallback here
    assert serving_precision("gpu", "auto", "auto") == "bfloat16"
    assert serving_precision("gpu", "auto", "float16") == "float16"
    assert serving_precision("cpu", "fp8", "auto") == "float32"  # the chain ends in float32 without a GPU
    assert serving_precision("cpu", "auto", "bfloat16") == "bfloat16"
    shape = known_encoder_shape("Qwen/Qwen3-Embedding-8B")
    assert shape is not None
    # a text longer than max_batch_tokens runs in a pass of its own: the pool follows max(max_batch_tokens, max_length)
    long_texts = encoder_footprints(shape, "embed", "fp8", "auto", max_batch_tokens=4096, max_length=8192)
    assert long_texts["gpu"].activations == 2 * PASS_8192
    assert encoder_footprints(shape, "embed", "fp8", "auto", 8192, 512)["gpu"].activations == 2 * PASS_8192


def test_shapes_from_headers_and_from_the_config_agree(tiny_embed_dir: Path, tiny_rerank_dir: Path) -> None:
    """The two readings of a Qwen3 checkpoint (safetensors headers; config arithmetic) give one shape."""
    import triton_rag.engines.torch_encoder as torch_encoder

    assert OUR_DECODERS == torch_encoder.CAUSAL_DECODERS  # one list of what runs on our decoder
    for directory in (tiny_embed_dir, tiny_rerank_dir):
        config = json.loads((directory / "config.json").read_text())
        from_headers = encoder_shape(directory, config)
        from_config = qwen3_shape(config, "config")
        assert from_headers.decoder and from_headers.source.endswith(str(directory))
        fields = ("linear_params", "linear_rows", "linears", "embedding_params", "embedding_rows", "other_params")
        assert [getattr(from_headers, f) for f in fields] == [getattr(from_config, f) for f in fields]
        assert from_headers.parameters == safetensors_parameters(directory)  # the LM head left out


def test_idefics3_parameters_from_the_config_match_a_checkpoint(tiny_docling_dir: Path) -> None:
    assert idefics3_parameters(TINY_TEXT, TINY_VISION, scale_factor=4) == safetensors_parameters(tiny_docling_dir)
    # granite-docling-258M by the same formula: 164.0M text, 86.4M vision, 7.1M connector
    assert idefics3_parameters(GRANITE_DOCLING_TEXT, GRANITE_DOCLING_VISION, 4) == 257_517_120
    known = known_vlm("ibm-granite/granite-docling-258M")
    assert known is not None and known[0].parameters == 257_517_120 and known[1]["image_seq_len"] == 64


def resident(name: str, gib: float, weights: float = 0, sleepable: bool = True) -> Resident:
    return Resident(name, int(gib * GIB), int(weights * GIB), sleepable)


def test_which_models_co_reside() -> None:
    small = [resident("a", 4, 3), resident("b", 4, 3), resident("c", 2, sleepable=False)]
    assert plan_residency(small, 16 * GIB, 0.9, 8 * GIB).mode == "all resident"
    # 10 GiB fit 11, not under the high watermark (9.9): the largest group under it stays, the first listed; the
    # third comes in beside them while busy
    roomy = plan_residency(small, 11 * GIB, 0.9, 8 * GIB)
    assert (roomy.mode, roomy.resident, roomy.swapped) == ("swapping", ("a", "b"), ("c",))
    assert "c (2.00 GiB) swaps in on use beside them" in roomy.notes[-1]
    tight = plan_residency(small, int(9.5 * GIB), 0.9, 8 * GIB)
    assert (tight.resident, tight.swapped) == (("a", "b"), ("c",))
    assert "c (2.00 GiB) swaps in on use: 512.0 MiB must leave the device first" in tight.notes[-1]
    assert "a sleep frees a model's weights" in tight.notes[-1] and "c unloads (it cannot sleep)" in tight.notes[-1]
    no_host = plan_residency(small, int(9.5 * GIB), 0.9, 0)
    assert "the host tier cannot take them, so they unload" in no_host.notes[-1]
    with pytest.raises(FitError, match=r"b needs 12.00 GiB, more than the budget of 11.00 GiB \(a 12 GiB card\)"):
        check_alone([resident("a", 4), resident("b", 12)], 11 * GIB, "a 12 GiB card")


def no_gpu_here(monkeypatch: pytest.MonkeyPatch, ram: int = 64 * GIB) -> None:
    """`plan` as on a machine without a GPU and with `ram` bytes of RAM, whatever this one has."""
    monkeypatch.setattr(cli, "detect_gpu_memory", lambda: None)
    monkeypatch.setattr(cli, "ram_total", lambda: ram)


def test_plan_of_the_16gb_profile_without_a_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    no_gpu_here(monkeypatch)
    argv = ["plan", "--profile", "rtx5070ti-16gb", "--repository", str(tmp_path), "--cache-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "device memory: 15.92 GiB (a GPU of device_memory 16303MiB; this machine has none)" in out
    assert "budget: 14.42 GiB (device memory less reserve 1.50 GiB)" in out
    assert "host budget: 32.00 GiB (0.5 of this machine's 64.00 GiB RAM)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("qwen_", "docling_vlm "))}
    assert rows["qwen_embed_encoder"][1] == "fp8" and rows["qwen_rerank_encoder"][1] == "nvfp4"
    assert rows["docling_vlm"][1] == "bfloat16"
    assert "8.16 GiB" in " ".join(rows["qwen_embed_encoder"]) and "4.86 GiB" in " ".join(rows["qwen_rerank_encoder"])
    assert "qwen_embed_encoder: Qwen/Qwen3-Embedding-8B, estimated from the known shape" in out
    assert "docling_vlm: ibm-granite/granite-docling-258M, estimated from the known shape" in out
    assert "steady state: swapping" in out
    assert "stay resident: qwen_embed_encoder + qwen_rerank_encoder (13.03 GiB)" in out
    assert "docling_vlm (2.48 GiB) swaps in on use" in out
    assert not list(tmp_path.iterdir())  # nothing downloaded, nothing written
    # --set still overrides the profile: an FP8 reranker no longer fits beside the embedder
    assert cli.main([*argv, "--set", "rerank.precision=fp8"]) == 0
    assert "stay resident: qwen_embed_encoder + docling_vlm" in capsys.readouterr().out
    assert cli.main([*argv, "--set", "router.enabled=false"]) == 0
    out = capsys.readouterr().out
    assert "steady state: all resident" in out and "15.51 GiB in all, more than the budget of 14.42 GiB" in out


def test_plan_refuses_a_model_that_cannot_fit_even_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    no_gpu_here(monkeypatch)
    argv = ["plan", "--profile", "rtx5070ti-16gb", "--repository", str(tmp_path), "--cache-dir", str(tmp_path)]
    assert cli.main([*argv, "--device-memory", "8GiB"]) == 2
    captured = capsys.readouterr()
    message = captured.out + captured.err
    assert "qwen_embed_encoder needs 8.16 GiB, more than the budget of 6.50 GiB" in message
    assert "device memory 8.00 GiB" in message and "cannot fit even alone" in message
    assert "qwen_rerank_encoder" not in message  # 4.86 GiB fits the 6.50 GiB budget alone
    assert cli.main([*argv, "--set", "embed.model=someone/unknown-embedder"]) == 2
    assert "cannot size someone/unknown-embedder without its files" in capsys.readouterr().err


def test_plan_counts_what_the_router_measured(tmp_path: Path, tiny_embed_dir: Path) -> None:
    """A measurement in measured.json for the same device and estimate replaces the estimate, as in the router."""
    settings = load_settings(Path(cli.PROFILES_DIR / "rtx5070ti-16gb.toml"), [f"embed.model={tiny_embed_dir}"])
    memory = Memory.planned(settings.router, None, 64 * GIB)
    before = fit_plan(settings, tmp_path, tmp_path, memory, 64 * GIB)
    embed = before.models[0]
    assert embed.source == f"config and safetensors headers of {tiny_embed_dir}" and embed.measured is None
    assert embed.footprint.runtime == GPU_RUNTIME_BYTES and embed.footprint.graphs == GRAPH_POOL_BYTES
    (tmp_path / "router").mkdir()
    MeasurementFile(tmp_path / "router" / "measured.json").put(embed.name, "gpu", embed.footprint.total, 10 * GIB)
    after = fit_plan(settings, tmp_path, tmp_path, memory, 64 * GIB)
    assert after.models[0].measured == 10 * GIB and after.models[0].bytes == 10 * GIB
    assert before.residency.mode == "all resident"  # the tiny embedder beside the 8B reranker and docling
    assert after.residency.resident == ("qwen_embed_encoder", "docling_vlm")  # 10 + 4.86 GiB > the 14.42 budget
    stale = load_settings(Path(cli.PROFILES_DIR / "rtx5070ti-16gb.toml"), [f"embed.model={tiny_embed_dir}",
                                                                          "embed.max_batch_tokens=16384"])  # fmt: skip
    assert fit_plan(stale, tmp_path, tmp_path, memory, 64 * GIB).models[0].measured is None  # another estimate

"""The generated repository: configs valid against Triton's model_config proto, variants with one contract, the
committed files and docs in sync with their generators, settings errors, and docker-compose.yml."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from google.protobuf.text_format import ParseError
from tritonclient.grpc import model_config_pb2 as mc

from tests.harness import CACHE_DIR, PROJECT_ROOT
from triton_rag import contract
from triton_rag.build import contract_doc
from triton_rag.build.model_config import parse
from triton_rag.build.offline import OFFLINE_MARKER
from triton_rag.build.plans import (
    Host,
    Manifest,
    Runtime,
    detect_host,
    encoder_profiles,
    engine_source,
    manifest_file,
)
from triton_rag.build.prepared import PreparedDocling, PreparedEmbed, PreparedRerank
from triton_rag.build.repository import MODEL_PY, clamp_embed_dim, model_py_source, prepare_repository, startup_models
from triton_rag.build.settings import (
    DoclingSettings,
    EmbedSettings,
    RerankSettings,
    Settings,
    SettingsError,
    load_settings,
    settings_file,
)
from triton_rag.build.sources import HUB_RETRY_SECONDS, UNREACHABLE_FILE, ModelSourceError, resolve_model
from triton_rag.contract.params import (
    DoclingDocumentParameters,
    DoclingPageParameters,
    EmbedEndpointParameters,
    EncoderParameters,
    RerankEndpointParameters,
    RouterParameters,
    VlmParameters,
)
from triton_rag.core import admin
from triton_rag.server import RESTRICTED_APIS, access_flags

MODELS = (
    contract.EMBED_ENDPOINT,
    contract.EMBED_ENCODER,
    contract.RERANK_ENDPOINT,
    contract.RERANK_ENCODER,
    contract.DOCLING_ENDPOINT,
    contract.DOCLING_DOCUMENT_ENDPOINT,
    contract.DOCLING_VLM,
    contract.ROUTER,
)


@pytest.fixture(scope="module")
def model_dirs(tiny_embed_dir: Path, tiny_rerank_dir: Path, tiny_docling_dir: Path) -> tuple[Path, Path, Path]:
    return tiny_embed_dir, tiny_rerank_dir, tiny_docling_dir


NO_GPU = Host(None, {})
RTX_5070_TI = (12, 0)


def generate(
    tmp_path: Path,
    model_dirs: tuple[Path, Path, Path],
    engine: str,
    host: Host = NO_GPU,
    log: Callable[[str], None] = lambda _: None,
    name: str | None = None,
) -> Path:
    """A repository for `engine` (in tmp_path/`name`, by default one per engine and host), looking for built engines
    in tmp_path/engines (what `fake_engine` put there)."""
    embed_dir, rerank_dir, docling_dir = model_dirs
    docling_engine = "tensorrt_plan" if engine == "tensorrt_plan" else "torch"
    settings = Settings(
        embed=EmbedSettings(model=str(embed_dir), engine=engine),  # type: ignore[arg-type]
        rerank=RerankSettings(model=str(rerank_dir), engine=engine),  # type: ignore[arg-type]
        docling=DoclingSettings(model=str(docling_dir), engine=docling_engine),  # type: ignore[arg-type]
        offline_fallback=False,
    )
    repository = tmp_path / (name or f"{engine}-{host.capability}")
    prepare_repository(settings, repository, CACHE_DIR, log=log, host=host, engines_dir=tmp_path / "engines")
    return repository


def fake_engine(
    tmp_path: Path, model_dirs: tuple[Path, Path, Path], variant: str, capability: tuple[int, int], version: str
) -> None:
    """Stand-in engine files with real manifests, as if exported from `model_dirs` (the bytes are not an engine:
    nothing here loads them)."""
    runtime: Runtime = "tensorrt" if variant == "tensorrt_plan" else "tensorrt-rtx"
    for name, source in ((contract.EMBED_ENCODER, model_dirs[0]), (contract.RERANK_ENCODER, model_dirs[1])):
        file = tmp_path / "engines" / name / ("model.plan" if runtime == "tensorrt" else "model.sm120.engine")
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(b"stand-in engine bytes")
        exported_from = engine_source(str(source), (source / OFFLINE_MARKER).exists())  # as make engines records
        profiles = encoder_profiles(16, 512, 4096)
        manifest = Manifest(exported_from, name, "fp8", runtime, version, capability, profiles)
        manifest_file(file).write_text(manifest.to_json())


def test_generated_configs_parse_with_tritons_schema(tmp_path: Path, model_dirs: tuple[Path, Path, Path]) -> None:
    repository = generate(tmp_path, model_dirs, "torch")
    configs = {name: parse((repository / name / "config.pbtxt").read_text()) for name in MODELS}
    embed = configs[contract.EMBED_ENDPOINT]
    assert embed.max_batch_size == 64 and list(embed.dynamic_batching.preferred_batch_size) == [4, 8, 16, 32, 64]
    assert 100 <= embed.dynamic_batching.max_queue_delay_microseconds <= 1000
    assert [t.name for t in embed.output] == ["EMBEDDING", "TRUNCATED"] and list(embed.output[0].dims) == [64]
    rerank = configs[contract.RERANK_ENDPOINT]
    assert rerank.max_batch_size == 16 and list(rerank.dynamic_batching.preferred_batch_size) == [2, 4, 8, 16]
    encoder = configs[contract.EMBED_ENCODER]
    int64 = mc.DataType.Value("TYPE_INT64")
    assert [(t.name, t.data_type) for t in encoder.input] == [("INPUT_IDS", int64), ("ATTENTION_MASK", int64)]
    assert configs[contract.RERANK_ENCODER].parameters["yes_no_ids"].string_value == "2152,9693"
    with pytest.raises(ParseError):
        parse('name: "x"\ninput [{ name: "A", data_type: TYPE_BYTES, dims: [1] }]')  # the original notes' type
    page = configs[contract.DOCLING_ENDPOINT]
    assert page.max_batch_size == 4 and list(page.dynamic_batching.preferred_batch_size) == [1, 2]
    assert page.dynamic_batching.max_queue_delay_microseconds == 20000
    assert [t.name for t in page.output] == ["STRUCTURED_JSON", "DOCTAGS"]
    assert configs[contract.DOCLING_DOCUMENT_ENDPOINT].max_batch_size == 0
    vlm = configs[contract.DOCLING_VLM]
    assert vlm.parameters["stop_ids"].string_value == "100257,100328" and "vision_model" not in vlm.parameters
    assert [t.name for t in vlm.input][:2] == ["PIXELS", "NUM_IMAGES"] and list(vlm.input[0].dims) == [-1, 3, 512, 512]
    assert not (repository / contract.DOCLING_VISION / "config.pbtxt").exists()
    processing = json.loads(
        (repository / contract.DOCLING_ENDPOINT / "1" / "tokenizer" / "preprocessor_config.json").read_text()
    )
    assert processing["image_seq_len"] == 64 and processing["size"] == {"longest_edge": 2048}  # merged for the endpoint
    startup = startup_models(repository)
    assert contract.DOCLING_VLM not in startup and contract.DOCLING_DOCUMENT_ENDPOINT in startup
    router_models = configs[contract.ROUTER].parameters["models"].string_value
    assert '"docling_vlm"' in router_models and '"docling_document"' in router_models


def test_docling_vision_plan_falls_back_to_torch_until_one_is_built(
    tmp_path: Path, model_dirs: tuple[Path, Path, Path]
) -> None:
    messages: list[str] = []
    repository = generate(tmp_path, model_dirs, "tensorrt_plan", log=messages.append)
    assert not (repository / contract.DOCLING_VISION / "config.pbtxt").exists()
    vlm = parse((repository / contract.DOCLING_VLM / "config.pbtxt").read_text())
    assert "vision_model" not in vlm.parameters and contract.DOCLING_VISION not in startup_models(repository)
    assert any("docling_vision/model.plan" in m and "runs in PyTorch" in m for m in messages)
    plan = tmp_path / "engines" / contract.DOCLING_VISION / "model.plan"
    plan.parent.mkdir(parents=True)
    plan.write_bytes(b"stand-in plan bytes")
    messages.clear()
    repository = generate(tmp_path, model_dirs, "tensorrt_plan", NO_GPU, messages.append)  # a plan, but no GPU
    assert contract.DOCLING_VISION not in startup_models(repository)
    assert any("needs a GPU and TensorRT" in m for m in messages)
    with pytest.raises(SettingsError, match=r"\[docling\] engine must be one of \('torch', 'tensorrt_plan'\)"):
        load_settings(None, ["docling.engine=tensorrt_rtx"])


def test_tensorrt_plan_variant_of_the_docling_vision_tower(tmp_path: Path, model_dirs: tuple[Path, Path, Path]):
    plan = tmp_path / "engines" / contract.DOCLING_VISION / "model.plan"
    plan.parent.mkdir(parents=True)
    plan.write_bytes(b"stand-in plan bytes")  # nothing here loads it
    repository = generate(tmp_path, model_dirs, "tensorrt_plan", Host(RTX_5070_TI, {"tensorrt": "10.13.2.6"}))
    assert (repository / contract.DOCLING_VISION / "1" / "model.plan").read_bytes() == b"stand-in plan bytes"
    vision = parse((repository / contract.DOCLING_VISION / "config.pbtxt").read_text())
    assert vision.platform == "tensorrt_plan" and vision.instance_group[0].kind == vision.instance_group[0].KIND_GPU
    assert [(t.name, list(t.dims)) for t in vision.output] == [("IMAGE_EMBEDS", [-1, 64, 64])]  # tiny hidden size 64
    vlm = parse((repository / contract.DOCLING_VLM / "config.pbtxt").read_text())
    assert vlm.backend == "python" and vlm.parameters["vision_model"].string_value == contract.DOCLING_VISION
    assert contract.DOCLING_VISION in startup_models(repository)
    # a plan linked there by hand is the user's: used, and kept when the engine goes back to torch
    plan.unlink()
    mine = tmp_path / "my-vision.plan"
    mine.write_bytes(b"my plan")
    link = repository / contract.DOCLING_VISION / "1" / "model.plan"
    link.unlink()
    link.symlink_to(mine)
    generate(tmp_path, model_dirs, "tensorrt_plan", Host(RTX_5070_TI, {"tensorrt": "10.13.2.6"}))
    assert link.read_bytes() == b"my plan" and contract.DOCLING_VISION in startup_models(repository)
    generate(tmp_path, model_dirs, "torch", name=repository.name)
    assert link.is_symlink() and link.read_bytes() == b"my plan"
    assert not (repository / contract.DOCLING_VISION / "config.pbtxt").exists()


def test_each_engine_variant_keeps_the_encoder_contract(tmp_path: Path, model_dirs: tuple[Path, Path, Path]):
    """A config per variant (tensorrt_plan, python + TensorRT-RTX, python + torch), parsed with Triton's proto."""
    fake_engine(tmp_path, model_dirs, "tensorrt_plan", RTX_5070_TI, "10.13.2.6")
    fake_engine(tmp_path, model_dirs, "python_trt_rtx", RTX_5070_TI, "1.7.1.116")
    host = Host(RTX_5070_TI, {"tensorrt": "10.13.2.6", "tensorrt-rtx": "1.7.1.116"})
    torch_repo = generate(tmp_path, model_dirs, "torch", host)
    plan_repo = generate(tmp_path, model_dirs, "tensorrt_plan", host)
    rtx_repo = generate(tmp_path, model_dirs, "tensorrt_rtx", host)
    for name in (contract.EMBED_ENCODER, contract.RERANK_ENCODER):
        torch_config = parse((torch_repo / name / "config.pbtxt").read_text())
        plan_config = parse((plan_repo / name / "config.pbtxt").read_text())
        rtx_config = parse((rtx_repo / name / "config.pbtxt").read_text())
        assert plan_config.platform == "tensorrt_plan" and torch_config.backend == rtx_config.backend == "python"
        assert plan_config.instance_group[0].kind == plan_config.instance_group[0].KIND_GPU
        assert rtx_config.parameters["engine_file"].string_value == "model.engine"
        assert "engine_file" not in torch_config.parameters
        # the torch engine alone can sleep: its config adds the RESIDENCY output (control requests only)
        *compute_outputs, residency = torch_config.output
        assert residency.name == contract.RESIDENCY_OUTPUT.name
        for config in (plan_config, rtx_config):
            assert list(config.input) == list(torch_config.input)
            assert list(config.output) == compute_outputs
            assert config.max_batch_size == torch_config.max_batch_size
        assert not (plan_repo / name / "1" / "model.py").exists()
        assert (plan_repo / name / "1" / "model.plan").read_bytes() == b"stand-in engine bytes"
        assert (rtx_repo / name / "1" / "model.engine").exists() and (rtx_repo / name / "1" / "model.py").exists()
        assert not (torch_repo / name / "1" / "model.engine").exists()


def test_an_engine_that_cannot_load_here_falls_back_to_the_next_variant(
    tmp_path: Path, model_dirs: tuple[Path, Path, Path]
) -> None:
    fake_engine(tmp_path, model_dirs, "tensorrt_plan", (9, 0), "10.13.2.6")  # a plan built on an H100
    fake_engine(tmp_path, model_dirs, "python_trt_rtx", RTX_5070_TI, "1.7.1.116")
    messages: list[str] = []
    on_5070 = Host(RTX_5070_TI, {"tensorrt": "10.13.2.6", "tensorrt-rtx": "1.7.1.116"})
    repository = generate(tmp_path, model_dirs, "tensorrt_plan", on_5070, messages.append)
    config = parse((repository / contract.EMBED_ENCODER / "config.pbtxt").read_text())
    assert config.parameters["engine_file"].string_value == "model.engine"  # python + TensorRT-RTX
    assert any("built for compute capability 9.0, this GPU is 12.0" in m for m in messages)
    messages.clear()
    repository = generate(tmp_path, model_dirs, "tensorrt_plan", NO_GPU, messages.append)
    config = parse((repository / contract.EMBED_ENCODER / "config.pbtxt").read_text())
    assert config.backend == "python" and config.parameters["precision"].string_value == "auto"  # torch
    assert sum("falling back" in m and "_encoder" in m for m in messages) == 4  # two variants, for each encoder
    assert json.loads((repository / ".prepared.json").read_text())["endpoints"]["embed"]["engine"] == "torch"


def test_prepare_returns_typed_records_that_match_the_configs(
    tmp_path: Path, model_dirs: tuple[Path, Path, Path]
) -> None:
    """What prepare returns per section is what .prepared.json records, and what each config.pbtxt's typed
    parameters say."""
    embed_dir, rerank_dir, docling_dir = model_dirs
    settings = Settings(
        embed=EmbedSettings(model=str(embed_dir), dim=48),
        rerank=RerankSettings(model=str(rerank_dir), max_length=512),
        docling=DoclingSettings(model=str(docling_dir), max_pages=7),
        offline_fallback=False,
    )
    repository = tmp_path / "repository"
    prepared = prepare_repository(settings, repository, CACHE_DIR, lambda _: None, host=NO_GPU, engines_dir=tmp_path)
    embed, rerank, docling = prepared["embed"], prepared["rerank"], prepared["docling"]
    assert isinstance(embed, PreparedEmbed) and isinstance(rerank, PreparedRerank)
    assert isinstance(docling, PreparedDocling)
    recorded = json.loads((repository / ".prepared.json").read_text())["endpoints"]
    assert recorded == json.loads(json.dumps({name: record.to_json() for name, record in prepared.items()}))
    assert recorded["embed"]["endpoint"] == contract.EMBED_ENDPOINT and recorded["docling"]["path"] == str(docling_dir)

    def parameters(name: str) -> dict[str, str]:
        config = parse((repository / name / "config.pbtxt").read_text())
        return {key: value.string_value for key, value in config.parameters.items()}

    endpoint = EmbedEndpointParameters.parse(parameters(contract.EMBED_ENDPOINT))
    encoder = EncoderParameters.parse(parameters(contract.EMBED_ENCODER))
    assert endpoint.dim == embed.dim == 48 and endpoint.router == contract.ROUTER
    assert encoder.pooling == embed.pooling == "last_token" and encoder.pytorch is not None
    assert encoder.pytorch.sleepable and embed.sleepable and embed.engine == "torch"
    assert RerankEndpointParameters.parse(parameters(contract.RERANK_ENDPOINT)).max_length == 512
    assert EncoderParameters.parse(parameters(contract.RERANK_ENCODER)).yes_no_ids == rerank.yes_no_ids == (2152, 9693)
    page = DoclingPageParameters.parse(parameters(contract.DOCLING_ENDPOINT))
    document = DoclingDocumentParameters.parse(parameters(contract.DOCLING_DOCUMENT_ENDPOINT))
    vlm = VlmParameters.parse(parameters(contract.DOCLING_VLM))
    assert page.max_new_tokens == docling.max_new_tokens == 256  # the random stand-in's limit
    assert document.limits().max_pages == 7 and document.page_model == contract.DOCLING_ENDPOINT
    assert vlm.stop_ids == docling.stop_ids and vlm.vision_model is None and docling.also_load == ()
    assert docling.endpoints == (contract.DOCLING_ENDPOINT, contract.DOCLING_DOCUMENT_ENDPOINT)
    router = RouterParameters.parse(parameters(contract.ROUTER))
    managed = sorted((record.managed_model() for record in prepared.values()), key=lambda model: model.name)
    assert list(router.models) == managed  # by name, as the router's JSON has them


def test_an_engine_of_another_model_is_not_served(tmp_path: Path, model_dirs: tuple[Path, Path, Path]) -> None:
    embed_dir, rerank_dir, docling_dir = model_dirs
    fake_engine(tmp_path, (rerank_dir, embed_dir, docling_dir), "tensorrt_plan", RTX_5070_TI, "10.13.2.6")  # swapped
    messages: list[str] = []
    host = Host(RTX_5070_TI, {"tensorrt": "10.13.2.6"})
    repository = generate(tmp_path, model_dirs, "tensorrt_plan", host, messages.append)
    assert parse((repository / contract.EMBED_ENCODER / "config.pbtxt").read_text()).backend == "python"  # torch
    stand_in = " (offline random-weight stand-in)"  # the tiny models are marked as such
    assert any(
        f"built from {rerank_dir}{stand_in}, the configured model is {embed_dir}{stand_in}" in m for m in messages
    )


def test_without_built_engines_the_plan_variant_says_how_to_build_them(
    tmp_path: Path, model_dirs: tuple[Path, Path, Path]
) -> None:
    messages: list[str] = []
    generate(tmp_path, model_dirs, "tensorrt_rtx", NO_GPU, messages.append)
    assert any("no engine built" in m and "make engines" in m for m in messages)


def test_committed_model_py_files_are_what_the_generator_writes() -> None:
    for name in MODEL_PY:
        assert (PROJECT_ROOT / "model_repository" / name / "1" / "model.py").read_text() == model_py_source(name)


def test_contract_doc_is_in_sync() -> None:
    assert (PROJECT_ROOT / "docs" / "CONTRACT.md").read_text() == contract_doc.render(), (
        "run: python -m triton_rag.build.contract_doc > docs/CONTRACT.md"
    )


def test_embedding_size_is_clamped_loudly() -> None:
    messages: list[str] = []
    assert clamp_embed_dim(2000, 1024, messages.append) == 1024
    assert clamp_embed_dim(8, 1024, messages.append) == 32
    assert clamp_embed_dim(2000, 4096, messages.append) == 2000
    assert len(messages) == 2 and "1024" in messages[0] and "32" in messages[1]


def test_prepare_takes_the_tensorrt_version_where_the_python_package_is_missing(
    tmp_path: Path, model_dirs: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image with TensorRT's libraries but no `tensorrt` package: the version given stands in for it, so a plan is
    judged on what else it needs (here: a GPU) instead of on a missing TensorRT."""
    if "tensorrt" in detect_host().versions:
        pytest.skip("this machine has the tensorrt package: nothing to stand in for")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # no download, whatever the network
    embed_dir, rerank_dir, docling_dir = model_dirs
    fake_engine(tmp_path, model_dirs, "tensorrt_plan", RTX_5070_TI, "10.13.2.6")
    command = [sys.executable, "-m", "triton_rag", "prepare", "--repository", str(tmp_path / "repository")]
    command += ["--cache-dir", str(tmp_path), "--set", "embed.engine=tensorrt_plan"]  # engines: tmp_path/engines
    command += [
        f"--set=embed.model={embed_dir}",
        f"--set=rerank.model={rerank_dir}",
        f"--set=docling.model={docling_dir}",
    ]
    without = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert without.returncode == 0, without.stderr
    assert "tensorrt_plan: built for TensorRT 10.13.2.6, which this server does not have" in without.stderr
    given = subprocess.run([*command, "--tensorrt-version", "10.13.2.6"], capture_output=True, text=True, timeout=300)
    assert given.returncode == 0, given.stderr
    assert "TensorRT version 10.13.2.6 as given" in given.stderr and "does not have" not in given.stderr


def test_settings_file_and_overrides(tmp_path: Path) -> None:
    settings = load_settings(PROJECT_ROOT / "rag.toml", ["embed.model=/models/x", "rerank.max_length=1024"])
    assert settings.embed.model == "/models/x" and settings.embed.dim == 2000
    assert settings.rerank.max_length == 1024 and settings.offline_fallback
    bad = tmp_path / "bad.toml"
    bad.write_text('[embed]\noverflow = "drop"\n')
    with pytest.raises(SettingsError, match="overflow must be one of"):
        load_settings(bad)
    with pytest.raises(SettingsError, match="unknown keys"):
        load_settings(None, ["embed.modle=x"])
    with pytest.raises(SettingsError, match="must be an integer"):
        load_settings(None, ["embed.dim=big"])
    # a settings file asked for must exist (a typo is not the defaults in silence); none asked for: the default's
    assert settings_file(None, PROJECT_ROOT / "rag.toml") == PROJECT_ROOT / "rag.toml"
    assert settings_file(None, tmp_path / "absent.toml") is None
    command = [sys.executable, "-m", "triton_rag", "prepare", "--config", str(tmp_path / "typo.toml")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"configuration file {tmp_path / 'typo.toml'} does not exist" in result.stderr


def test_model_sources(tmp_path: Path, tiny_embed_dir: Path) -> None:
    local = resolve_model(str(tiny_embed_dir), "embed", tmp_path, offline_fallback=False)
    assert local.origin == "local" and local.is_offline_stand_in
    with pytest.raises(ModelSourceError, match="neither an existing directory nor a hub id"):
        resolve_model("./no/such/dir", "embed", tmp_path, offline_fallback=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"), "embed", tmp_path, offline_fallback=False)


def test_unreachable_hub_falls_back_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_embed_dir: Path, tiny_docling_dir: Path
) -> None:
    """(The two fixtures put the Qwen3 and cl100k tokenizers this test copies into the cache.)"""
    # Points the hub client at a closed loopback port: the same failure as a machine with no network.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    shutil.copytree(CACHE_DIR / "qwen3-tokenizer", tmp_path / "qwen3-tokenizer")
    messages: list[str] = []
    with pytest.raises(ModelSourceError, match="offline fallback is off"):
        resolve_model("Qwen/Qwen3-Embedding-0.6B", "embed", tmp_path, offline_fallback=False, log=messages.append)
    model = resolve_model("Qwen/Qwen3-Embedding-0.6B", "embed", tmp_path, offline_fallback=True, log=messages.append)
    assert model.origin == "offline" and model.is_offline_stand_in
    assert any("RANDOM-WEIGHT" in m for m in messages)
    shutil.copytree(CACHE_DIR / "cl100k-tokenizer", tmp_path / "cl100k-tokenizer")
    model = resolve_model("ibm-granite/granite-docling-258M", "docling", tmp_path, True, log=messages.append)
    assert model.origin == "offline" and model.config["model_type"] == "idefics3"
    assert any("RANDOM-WEIGHT granite-docling" in m for m in messages)
    # the first failure is remembered: the later models (and the next start) did not try the hub again
    assert sum(m.startswith("downloading ") for m in messages) == 1
    assert any(m.startswith("not trying the hub for ibm-granite/granite-docling-258M") for m in messages)
    assert (tmp_path / UNREACHABLE_FILE).exists()


def test_a_remembered_unreachable_hub_is_tried_again_after_its_time(
    tmp_path: Path, tiny_embed_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / UNREACHABLE_FILE
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"time": time.time() - HUB_RETRY_SECONDS - 1, "error": "old"}))
    earlier = tmp_path / "hub" / "Qwen--Qwen3-Embedding-0.6B"
    shutil.copytree(tiny_embed_dir, earlier)  # a copy downloaded before, so that no stand-in is built
    messages: list[str] = []
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    model = resolve_model("Qwen/Qwen3-Embedding-0.6B", "embed", tmp_path, offline_fallback=False, log=messages.append)
    assert model.path == earlier and messages[0].startswith("downloading ")  # tried again (then the earlier copy)


def test_docker_compose_file_is_valid(tmp_path: Path) -> None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        compose = ["docker", "compose"]
    else:
        assert shutil.which("docker-compose"), "install docker compose or docker-compose (make test-tools does)"
        compose = ["docker-compose"]
    environment = {k: v for k, v in os.environ.items() if k != admin.KEY_ENV}
    no_key, with_key = tmp_path / "empty.env", tmp_path / "key.env"  # instead of the project's .env, if any
    no_key.write_text("")
    with_key.write_text(f"{admin.KEY_ENV}=test-admin-key\n")

    def config(env_file: Path) -> subprocess.CompletedProcess[str]:
        command = [*compose, "--env-file", str(env_file), "config"]
        return subprocess.run(command, cwd=PROJECT_ROOT, env=environment, capture_output=True, text=True)

    refused = config(no_key)  # no admin key, no server
    assert refused.returncode != 0 and "make prepare writes it into .env" in refused.stderr, refused.stderr
    result = config(with_key)
    assert result.returncode == 0, result.stderr
    assert "Dockerfile.triton" in result.stdout and "8001" in result.stdout and "test-admin-key" in result.stdout
    assert result.stdout.count("127.0.0.1") == 4  # HTTP, gRPC, metrics and the gateway published on loopback only
    assert "triton-rag-cache:/var/cache/triton-rag" in (PROJECT_ROOT / "docker-compose.yml").read_text()
    dockerfile = (PROJECT_ROOT / "Dockerfile.triton").read_text()
    assert "tritonserver:25.10-py3" in dockerfile
    # the image's tritonserver: the same restrictions, readiness and configs as `triton-rag serve`'s
    restricted = f"{','.join(RESTRICTED_APIS)}:{admin.KEY_NAME}=$key"
    for flag in (f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"):
        assert flag in dockerfile and flag.replace("$key", "k") in access_flags("0.0.0.0", "k")
    assert "--strict-readiness=false --disable-auto-complete-config" in dockerfile
    assert "ENV TORCHINDUCTOR_CACHE_DIR=/var/cache/triton-rag/inductor" in dockerfile

"""Profiles (whole settings files for a deployment target, `--profile`), the device-memory cap ([router]
device_memory: the router's budget, each compute model's own limit, the typed parameter prepare renders), the
dynamic-batching presets in the generated configs, and prepare's refusal of a model that cannot fit."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from tests.harness import CACHE_DIR, PROJECT_ROOT
from triton_rag import cli, contract
from triton_rag.build.fit import FitError, Memory
from triton_rag.build.model_config import parse
from triton_rag.build.repository import prepare_repository
from triton_rag.build.settings import (
    DoclingSettings,
    EmbedSettings,
    RerankSettings,
    RouterSettings,
    Settings,
    SettingsError,
    load_settings,
    profile_file,
    router_settings,
)
from triton_rag.contract.params import EncoderParameters, VlmParameters
from triton_rag.engines import device_cap
from triton_rag.triton.router.memory import device_memory

GIB, MIB = 2**30, 2**20
CARD = 16303 * MIB
PROFILE = PROJECT_ROOT / "profiles" / "rtx5070ti-16gb.toml"


def test_the_16gb_profile_is_a_whole_settings_file() -> None:
    settings = load_settings(profile_file("rtx5070ti-16gb", PROJECT_ROOT / "profiles"))
    embed, rerank = settings.embed, settings.rerank
    assert (embed.model, embed.precision, embed.dim) == ("Qwen/Qwen3-Embedding-8B", "fp8", 2000)
    assert (rerank.model, rerank.precision) == ("Qwen/Qwen3-Reranker-8B", "nvfp4")
    assert settings.docling.model == "ibm-granite/granite-docling-258M"
    assert (embed.max_batch_tokens, rerank.max_batch_tokens) == (8192, 4096)
    assert settings.router.device_memory == "16303MiB" and settings.router.device_memory_cap() == CARD
    # not layered on rag.toml: every key rag.toml sets, the profile sets too
    profile, defaults = tomllib.loads(PROFILE.read_text()), tomllib.loads((PROJECT_ROOT / "rag.toml").read_text())
    for section, values in defaults.items():
        assert set(values) <= set(profile[section]), section


def test_a_profile_by_name_or_path_and_a_missing_one(tmp_path: Path) -> None:
    profiles = PROJECT_ROOT / "profiles"
    assert profile_file("rtx5070ti-16gb", profiles) == PROFILE
    assert profile_file(str(PROFILE), tmp_path) == PROFILE  # a path is taken as it is
    with pytest.raises(SettingsError, match=r"no profile 'rtx9090'.*the profiles in .*: rtx5070ti-16gb"):
        profile_file("rtx9090", profiles)
    with pytest.raises(SettingsError, match="profile .*elsewhere.toml does not exist"):
        profile_file(str(tmp_path / "elsewhere.toml"), profiles)
    (tmp_path / "a.toml").write_text("")
    with pytest.raises(SettingsError, match=r"the profiles in .*: a$"):
        profile_file("b", tmp_path)


def test_the_cli_takes_a_profile_or_a_config_not_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "detect_gpu_memory", lambda: None)
    common = ["--repository", str(tmp_path), "--cache-dir", str(tmp_path)]
    assert cli.main(["plan", "--profile", "rtx9090", *common]) == 2
    err = capsys.readouterr().err
    assert "no profile 'rtx9090'" in err and "the profiles in" in err and err.rstrip().endswith("rtx5070ti-16gb")
    with pytest.raises(SystemExit) as exited:
        cli.main(["prepare", "--profile", "rtx5070ti-16gb", "--config", str(PROFILE), *common])
    assert exited.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert cli.main(["plan", "--profile", str(PROFILE), *common]) == 0  # a path works as well as a name
    assert f"fit plan for {PROFILE}" in capsys.readouterr().out


def test_device_memory_settings() -> None:
    assert RouterSettings().device_memory_cap() == 0  # "auto": no cap
    capped = router_settings({"device_memory": "16303MiB"})
    assert capped.device_total("gpu", 141 * GIB) == CARD  # an H200 as the 16 GB card
    assert capped.device_total("gpu", 12 * GIB) == 12 * GIB  # a smaller GPU keeps its own
    assert capped.device_total("cpu", 64 * GIB) == 64 * GIB  # the RAM is not capped
    assert capped.budget_bytes("gpu", 141 * GIB) == CARD - 1536 * MIB  # auto: the cap less the reserve
    assert capped.budget_bytes("cpu", 64 * GIB) == 32 * GIB
    assert router_settings({"device_memory": 17094934528}).device_memory_cap() == CARD  # a TOML integer: bytes
    assert router_settings({"device_memory": "16303MiB", "budget": "12GiB"}).budget_bytes("gpu", 141 * GIB) == 12 * GIB
    with pytest.raises(SettingsError, match="budget 15GiB is more than device_memory 14GiB"):
        router_settings({"device_memory": "14GiB", "budget": "15GiB"})
    with pytest.raises(SettingsError, match=r"\[router\] 'lots' is not a size"):
        router_settings({"device_memory": "lots"})
    with pytest.raises(SettingsError, match="must be a positive size"):
        router_settings({"device_memory": "0"})
    with pytest.raises(SettingsError, match="leaves no budget"):
        router_settings({"device_memory": "1GiB", "reserve": "1GiB"}).budget_bytes("gpu", 141 * GIB)


def test_the_router_budgets_against_the_capped_gpu() -> None:
    """What the router model's initialize does with its probe: the ledger gets the capped total (STATUS memory
    says so); on the CPU the cap is ignored, and the log says why."""
    capped = router_settings({"device_memory": "16303MiB"})
    h200 = SimpleNamespace(device="gpu", total=141 * GIB, description="GPU 0 (H200): NVML")
    memory = device_memory(h200, capped)  # type: ignore[arg-type]
    assert memory.total == CARD and capped.budget_bytes("gpu", memory.total) == CARD - 1536 * MIB
    assert "15.92 GiB of the GPU's 141.00 GiB (device_memory 16303MiB)" in memory.description
    assert memory.note.startswith("device memory: 15.92 GiB")
    uncapped = device_memory(h200, RouterSettings())  # type: ignore[arg-type]
    assert (uncapped.total, uncapped.description, uncapped.note) == (141 * GIB, "GPU 0 (H200): NVML", "")
    cpu = SimpleNamespace(device="cpu", total=24 * GIB, description="RAM")
    on_cpu = device_memory(cpu, capped)  # type: ignore[arg-type]
    assert on_cpu.total == 24 * GIB and "device_memory 16303MiB ignored" in on_cpu.note


def test_each_process_caps_its_own_allocations(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fraction of the GPU torch's allocator may take: the cap, less what is held outside it (the arena)."""
    assert device_cap.memory_fraction(CARD, 141 * GIB) == pytest.approx(16303 / (141 * 1024))
    arena = 7 * GIB
    assert device_cap.memory_fraction(CARD, 141 * GIB, arena) == pytest.approx((CARD - arena) / (141 * GIB))
    assert device_cap.memory_fraction(CARD, CARD) is None  # the card itself: nothing to emulate
    assert device_cap.memory_fraction(CARD, 12 * GIB, arena) is None  # a GPU smaller than the cap
    assert device_cap.memory_fraction(0, 141 * GIB) is None  # no cap
    assert device_cap.memory_fraction(GIB, 141 * GIB, 2 * GIB) == 0.0  # the arena alone exceeds it
    monkeypatch.setattr(device_cap.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_cap.torch.cuda, "set_per_process_memory_fraction", pytest.fail)
    assert device_cap.apply_device_cap(CARD) is None  # no GPU: nothing to limit, nothing called


def configs(repository: Path) -> dict[str, object]:
    return {name: parse((repository / name / "config.pbtxt").read_text()) for name in (
        contract.EMBED_ENDPOINT, contract.RERANK_ENDPOINT, contract.DOCLING_ENDPOINT, contract.EMBED_ENCODER,
        contract.RERANK_ENCODER, contract.DOCLING_VLM)}  # fmt: skip


def tiny_settings(embed: Path, rerank: Path, docling: Path, router: RouterSettings, batching: str) -> Settings:
    return Settings(
        embed=EmbedSettings(model=str(embed), batching=batching),  # type: ignore[arg-type]
        rerank=RerankSettings(model=str(rerank), batching=batching),  # type: ignore[arg-type]
        docling=DoclingSettings(model=str(docling), batching=batching),  # type: ignore[arg-type]
        router=router,
        offline_fallback=False,
    )


def test_batching_presets_and_the_cap_in_the_generated_configs(
    tmp_path: Path, tiny_embed_dir: Path, tiny_rerank_dir: Path, tiny_docling_dir: Path
) -> None:
    dirs = (tiny_embed_dir, tiny_rerank_dir, tiny_docling_dir)
    design = tiny_settings(*dirs, router_settings({"device_memory": "16303MiB"}), "design")
    prepare_repository(design, tmp_path / "design", CACHE_DIR)
    found = configs(tmp_path / "design")

    def batcher(name: str) -> tuple[int, list[int], int]:
        config = found[name]
        batching = config.dynamic_batching  # type: ignore[attr-defined]
        return config.max_batch_size, list(batching.preferred_batch_size), batching.max_queue_delay_microseconds  # type: ignore[attr-defined]

    assert batcher(contract.EMBED_ENDPOINT) == (32, [4, 8, 16], 3000)
    assert batcher(contract.RERANK_ENDPOINT) == (16, [2, 4, 8], 5000)
    assert batcher(contract.DOCLING_ENDPOINT) == (4, [1, 2], 20000)

    def parameters(name: str) -> dict[str, str]:
        return {key: value.string_value for key, value in found[name].parameters.items()}  # type: ignore[attr-defined]

    for encoder in contract.ENCODERS:
        options = EncoderParameters.parse(parameters(encoder)).pytorch
        assert options is not None and options.device_memory_cap == CARD
    assert VlmParameters.parse(parameters(contract.DOCLING_VLM)).device_memory_cap == CARD
    project = tiny_settings(*dirs, RouterSettings(), "project")
    prepare_repository(project, tmp_path / "project", CACHE_DIR)
    found = configs(tmp_path / "project")
    assert batcher(contract.EMBED_ENDPOINT) == (64, [4, 8, 16, 32, 64], 100)
    assert batcher(contract.RERANK_ENDPOINT) == (16, [2, 4, 8, 16], 100)
    assert VlmParameters.parse(parameters(contract.DOCLING_VLM)).device_memory_cap == 0
    with pytest.raises(SettingsError, match="batching must be one of"):
        load_settings(None, ["embed.batching=fast"])


def test_prepare_refuses_a_model_that_cannot_fit_even_alone(
    tmp_path: Path, tiny_embed_dir: Path, tiny_rerank_dir: Path, tiny_docling_dir: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Each tiny model on a GPU holds its 512 MiB context at least (and an encoder 256 MiB of graphs): a 1 GiB GPU
    with a 512 MiB reserve leaves a budget of 512 MiB, which none fits."""
    router = RouterSettings(reserve="512MiB")
    settings = tiny_settings(tiny_embed_dir, tiny_rerank_dir, tiny_docling_dir, router, "project")
    small_gpu = Memory("gpu", GIB, "a 1 GiB test GPU")
    with pytest.raises(FitError) as refused:
        prepare_repository(settings, tmp_path / "small", CACHE_DIR, memory=small_gpu)
    message = str(refused.value)
    for model in (contract.EMBED_ENCODER, contract.RERANK_ENCODER, contract.DOCLING_VLM):
        assert f"{model} needs " in message
    assert "more than the budget of 512.0 MiB (device memory less reserve 512.0 MiB; device memory 1.00 GiB" in message
    assert "a 1 GiB test GPU" in message and "cannot fit even alone" in message
    assert not (tmp_path / "small" / contract.ROUTER / "config.pbtxt").exists()  # refused before the router's config
    # through the CLI: exit 2 and the numbers, before the server would start
    monkeypatch.setattr("triton_rag.build.repository.detect_gpu_memory", lambda: None)
    sets = [f"embed.model={tiny_embed_dir}", f"rerank.model={tiny_rerank_dir}", f"docling.model={tiny_docling_dir}"]
    argv = ["prepare", "--repository", str(tmp_path / "cli"), "--cache-dir", str(CACHE_DIR)]
    argv += [arg for item in [*sets, "router.budget=300MiB"] for arg in ("--set", item)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "qwen_embed_encoder needs " in err and "more than the budget of 300.0 MiB (budget 300MiB as set" in err
    assert "device memory " in err and "no GPU on this machine" in err

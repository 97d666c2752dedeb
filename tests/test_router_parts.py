"""The router's plain-data parts without a server: settings and budgets, the gRPC endpoint read from tritonserver's
command line, the footprint estimate, remembered measurements, finding a model's stub processes, and the workers that
carry out the ledger's blocking effects (against a fake repository API)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest

from triton_rag.build.footprint import encoder_footprints, encoder_shape, safetensors_parameters, totals
from triton_rag.build.model_config import parse
from triton_rag.build.repository import Prepared, prepare_router
from triton_rag.build.settings import RouterSettings, SettingsError, load_settings, router_settings
from triton_rag.contract.params import ManagedModel, RouterParameters
from triton_rag.core.fit import CPU_RUNTIME_BYTES, GPU_RUNTIME_BYTES, GRAPH_POOL_BYTES
from triton_rag.core.ledger_events import (
    Event,
    Held,
    Load,
    Loaded,
    LoadFailed,
    QueryRepository,
    QueryResidency,
    RepositoryStatus,
    ResidencyAnswer,
    ResidencyFailed,
    ResidencyStatus,
    Sleep,
    Slept,
    Unload,
    Unloaded,
    Wake,
    Work,
)
from triton_rag.core.measurements import MeasurementFile
from triton_rag.core.server_args import grpc_endpoint
from triton_rag.triton.router.memory import alive, rss_bytes, stub_pids
from triton_rag.triton.router.repository_api import RepositoryApi
from triton_rag.triton.router.workers import Workers

GIB = 2**30


def test_router_settings_from_toml_and_overrides(tmp_path: Path) -> None:
    config = tmp_path / "rag.toml"
    config.write_text('[router]\nbudget = "12GiB"\nhigh_watermark = 0.8\n')
    settings = load_settings(config, ["router.min_residency_seconds=1.5"])
    assert settings.router.budget_bytes("gpu", 80 * GIB) == 12 * GIB
    assert settings.router.high_watermark == 0.8 and settings.router.min_residency_seconds == 1.5


def test_byte_sizes_may_be_toml_integers(tmp_path: Path) -> None:
    """`host_budget = 0` (the tier off) and `budget = 12884901888` are natural TOML; both mean bytes."""
    config = tmp_path / "rag.toml"
    config.write_text("[router]\nbudget = 12884901888\nhost_budget = 0\n")
    router = load_settings(config, []).router
    assert router.budget_bytes("gpu", 80 * GIB) == 12 * GIB
    assert router.host_budget_bytes("gpu", 64 * GIB) == 0


def test_automatic_budget_is_gpu_memory_less_reserve_or_half_the_ram() -> None:
    auto = RouterSettings()
    assert auto.budget_bytes("gpu", 16 * GIB) == 16 * GIB - 1536 * 2**20
    assert auto.budget_bytes("cpu", 24 * GIB) == 12 * GIB
    with pytest.raises(SettingsError, match="leaves no budget"):
        RouterSettings(reserve="20GiB").budget_bytes("gpu", 16 * GIB)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("budget", "a lot", "not a size"),
        ("high_watermark", "1.5", "high_watermark"),
        ("min_residency_seconds", "-1", "zero or more"),
        ("reserve", "12 parsecs", "not a size"),
        ("colour", "blue", "unknown keys"),
    ],
)
def test_bad_router_settings_are_refused_with_the_reason(key: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        router_settings({key: value})


def test_router_settings_round_trip_through_config_parameters(tmp_path: Path) -> None:
    settings = RouterSettings(budget="15000MB", high_watermark=0.85, min_residency_seconds=2.0)
    prepared = Prepared(
        model="m", path=tmp_path, origin="local", engine="torch", compute_model="enc", endpoints=("ep",),
        estimate_bytes={"gpu": 5, "cpu": 7},
    )  # fmt: skip
    prepare_router(settings, tmp_path, [prepared])
    config = parse((tmp_path / "router" / "config.pbtxt").read_text())
    params = {key: value.string_value for key, value in config.parameters.items()}
    parsed = RouterParameters.parse(params)
    assert parsed.settings == RouterSettings(**{**settings.__dict__, "enabled": True})
    assert parsed.models == (ManagedModel("enc", ("ep",), {"gpu": 5, "cpu": 7}),)
    assert parsed.models[0].estimate("gpu") == 5 and parsed.models[0].weights("cpu") == 7
    assert RouterParameters.parse(parsed.render()) == parsed
    assert config.max_batch_size == 0 and [i.name for i in config.input] == ["ACTION", "MODELS", "LEASE"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["tritonserver", "--model-repository=/m"], "127.0.0.1:8001"),
        (["tritonserver", "--grpc-port=9001", "--http-port=9000"], "127.0.0.1:9001"),
        (["tritonserver", "--grpc-port", "7001", "--grpc-address", "10.0.0.5"], "10.0.0.5:7001"),
        (["tritonserver", "--grpc-address=0.0.0.0", "--grpc-port=8101", ""], "127.0.0.1:8101"),
    ],
)
def test_grpc_endpoint_from_the_server_command_line(argv: list[str], expected: str) -> None:
    assert grpc_endpoint(argv) == expected


def test_grpc_endpoint_refuses_a_server_without_grpc() -> None:
    with pytest.raises(RuntimeError, match="allow-grpc=false"):
        grpc_endpoint(["tritonserver", "--allow-grpc=false"])


def test_footprint_counts_kept_parameters(tiny_embed_dir: Path, tiny_rerank_dir: Path) -> None:
    import json

    embed_params = safetensors_parameters(tiny_embed_dir)
    rerank_all = safetensors_parameters(tiny_rerank_dir, skip_prefixes=())
    rerank_kept = safetensors_parameters(tiny_rerank_dir)
    config = json.loads((tiny_rerank_dir / "config.json").read_text())
    assert rerank_all - rerank_kept == config["vocab_size"] * config["hidden_size"]  # the LM head is not kept
    assert embed_params == rerank_kept  # same body, same shapes
    shape = encoder_shape(tiny_embed_dir, config)
    estimate = totals(encoder_footprints(shape, "embed", "auto", "auto", max_batch_tokens=1000, max_length=512))
    activations = 1000 * (6 * 64 + 3 * 128)
    assert estimate["gpu"] == GPU_RUNTIME_BYTES + GRAPH_POOL_BYTES + embed_params * 2 + activations * 2
    assert estimate["cpu"] == CPU_RUNTIME_BYTES + embed_params * 4 + activations * 4


def test_measurements_are_remembered_for_the_same_device_and_estimate(tmp_path: Path) -> None:
    path = tmp_path / "measured.json"
    MeasurementFile(path).put("enc", "gpu", 100, 80)
    again = MeasurementFile(path)
    assert again.get("enc", "gpu", 100) == 80
    assert again.get("enc", "cpu", 100) is None  # another device
    assert again.get("enc", "gpu", 101) is None  # another model or settings
    path.write_text("{not json")
    assert MeasurementFile(path).get("enc", "gpu", 100) is None
    read_only = MeasurementFile(tmp_path / "missing-dir" / "measured.json")
    read_only.put("enc", "gpu", 1, 1)  # cannot write: keeps nothing, raises nothing


def test_stub_discovery_matches_model_and_parent(tmp_path: Path) -> None:
    """A process with a stub's command line (`<stub> <repo>/<model>/1/model.py <shm region>`, here Python running
    that model.py under the stub's name) is found for its model only, and only under its own parent."""
    model_py = tmp_path / "repo" / "my_model" / "1" / "model.py"
    model_py.parent.mkdir(parents=True)
    model_py.write_text("import time\nprint('running', flush=True)\ntime.sleep(30)\n")
    stub_name = str(tmp_path / "triton_python_backend_stub")
    command = [stub_name, str(model_py), "shm-region"]
    process = subprocess.Popen(command, executable=sys.executable, stdout=subprocess.PIPE, text=True)
    try:
        # Popen returns when exec has begun, before the kernel has set the new command line; the child's first line
        # says it is running (CI once read an empty command line here).
        assert process.stdout is not None and process.stdout.readline() == "running\n"
        assert stub_pids("my_model", os.getpid()) == [process.pid]
        assert stub_pids("other_model", os.getpid()) == []
        assert stub_pids("my_model", os.getpid() + 100000) == []
        assert alive([process.pid]) == [process.pid] and rss_bytes([process.pid]) > 0
    finally:
        process.kill()
        process.communicate()  # waits and closes the pipe
    assert alive([process.pid]) == []


def test_load_flags_name_the_light_models_only(qwen_repository: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "triton_rag", "load-flags", "--repository"]
    result = subprocess.run([*command, str(qwen_repository)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["--load-model=qwen_embed", "--load-model=qwen_rerank", "--load-model=router"]
    missing = subprocess.run([*command, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "make prepare" in missing.stderr


class FakeApi:
    """The repository API as the router's workers see it, without a server: `fail` makes every call raise."""

    def __init__(self, ready: frozenset[str] = frozenset(), fail: bool = False) -> None:
        self.ready_models, self.fail = set(ready), fail

    def _check(self) -> None:
        if self.fail:
            raise RuntimeError("server gone")

    def ready(self, names: list[str]) -> dict[str, bool] | None:
        return None if self.fail else {name: name in self.ready_models for name in names}

    def load(self, name: str) -> None:
        self._check()
        self.ready_models.add(name)

    def unload(self, name: str) -> None:
        self._check()
        self.ready_models.discard(name)

    def residency(self, name: str, action: str) -> dict[str, object]:
        self._check()
        return {"state": "asleep" if action == "sleep" else "awake", "weight_bytes": 10, "host_bytes": 10}


class FakeProbe:
    """7 bytes per process; the device's use never changes."""

    device, total, description = "cpu", 100 * GIB, "fake"

    def process_bytes(self, pids: list[int]) -> int | None:
        return 7 * len(pids)

    def device_used(self) -> int:
        return 0


def run_workers(api: FakeApi, effects: list[Work], unload_timeout: float = 0.2) -> list[Event]:
    """Each effect carried out on this thread (the router starts a thread per effect); the events they posted."""
    events: list[Event] = []
    log = logging.getLogger("test")
    pool = Workers(cast(RepositoryApi, api), FakeProbe(), os.getpid(), unload_timeout, events.append, log)
    for effect in effects:
        pool._run(effect)
    return events


def test_router_workers_answer_every_effect_even_when_the_server_fails() -> None:
    """Each blocking effect ends in an event: the ledger never waits for an answer that does not come."""
    query = QueryRepository(1, (("enc", 0),), adopt=("enc",))
    effects: list[Work] = [Load("enc"), Sleep("enc", ()), Wake("enc"), QueryResidency("enc", ()), query]
    load, sleep, wake, status, repository = run_workers(FakeApi(fail=True), effects)
    assert isinstance(load, LoadFailed) and load.error == "server gone" and load.model == "enc"
    assert isinstance(sleep, ResidencyFailed) and sleep.action == "sleep" and sleep.error == "server gone"
    assert isinstance(wake, ResidencyFailed) and wake.action == "wake"
    assert isinstance(status, ResidencyStatus) and status.answer is None and status.error == "server gone"
    assert isinstance(repository, RepositoryStatus) and repository.ready is None and repository.query is query
    (unloaded,) = run_workers(FakeApi(fail=True), [Unload("enc", (), True, 123)])
    assert isinstance(unloaded, Unloaded) and unloaded.error == "server gone"  # kept, and no longer evicted


def test_router_workers_load_sleep_and_look_at_the_repository() -> None:
    query = QueryRepository(2, (("enc", 1), ("outside", 1)), measure=(("enc", (5,)),), unreleased=(("gone", (2**22,)),))
    # "outside" is READY before its load is sent: adopted, not loaded again
    effects: list[Work] = [Load("outside"), Load("enc"), Sleep("enc", (1, 2)), query]
    adopted, loaded, slept, repository = run_workers(FakeApi(ready=frozenset({"outside"})), effects)
    assert isinstance(adopted, Loaded) and adopted.adopted and adopted.model == "outside"
    assert isinstance(loaded, Loaded) and not loaded.adopted and loaded.device_delta == 0
    assert isinstance(slept, Slept) and slept.answer == ResidencyAnswer(True, 10, 10) and slept.held == 14
    assert isinstance(repository, RepositoryStatus) and repository.ready == {"enc": True, "outside": True}
    assert repository.found == {"enc": Held((5,), 7)} and repository.unreleased == {"gone": Held((), 0)}


def test_router_worker_unload_reports_what_processes_still_hold_after_the_timeout() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        api = FakeApi(ready=frozenset({"enc"}))
        (unloaded,) = run_workers(api, [Unload("enc", (process.pid,), True, 123)], unload_timeout=0.3)
        assert isinstance(unloaded, Unloaded) and unloaded.error == "" and unloaded.remaining == (process.pid,)
        assert unloaded.unreleased == 7 and unloaded.seconds >= 0.3 and api.ready_models == set()
    finally:
        process.kill()
        process.communicate()

"""Safe by default (issue 13): tritonserver listens on loopback only, the APIs that change the server need the admin
key (over HTTP and gRPC), and the server stays ready while the router's kind of load is under way."""

from __future__ import annotations

import ipaddress
import stat
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.harness import RunningServer, wait_until
from triton_rag import contract
from triton_rag.build.repository import startup_models
from triton_rag.client import AdminHeader, RouterControl, default_key
from triton_rag.core import admin
from triton_rag.server import (
    CPU_ONLY_FLAGS,
    GRPC_KEY_HEADER,
    LOOPBACK,
    STUB_ALLOCATOR,
    Ports,
    access_flags,
    resolve_admin_key,
    server_command,
    server_environment,
)

RESTRICTED = "model-repository,shared-memory,trace,logging:triton-rag-key="
HTTP_REFUSAL = "This API is restricted, expecting header 'triton-rag-key'"
GRPC_REFUSAL = f"This protocol is restricted, expecting header '{GRPC_KEY_HEADER}'"
ENCODER = contract.EMBED_ENCODER


# --- flags, key and environment (pure) ------------------------------------------------------------------------


def test_access_flags_bind_every_endpoint_to_the_host_and_restrict_the_apis_that_change_the_server() -> None:
    assert access_flags(LOOPBACK, "k3y_-.") == [
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
        f"--http-restricted-api={RESTRICTED}k3y_-.",
        f"--grpc-restricted-protocol={RESTRICTED}k3y_-.",
    ]
    everywhere = ["--http-address=0.0.0.0", "--grpc-address=0.0.0.0", "--metrics-address=0.0.0.0"]
    assert access_flags("0.0.0.0", "k")[:3] == everywhere


@pytest.mark.parametrize("key", ["", "two words", "tab\there", "clé"])
def test_access_flags_refuse_a_key_that_cannot_be_a_header_value(key: str) -> None:
    with pytest.raises(ValueError, match="printable ASCII"):
        access_flags(LOOPBACK, key)


def test_server_command_is_not_strictly_ready_and_keeps_the_generated_configs(tmp_path: Path) -> None:
    command = server_command(tmp_path, tmp_path, Ports(1, 2, 3), "the-key", ["router"])
    assert "--strict-readiness=false" in command and "--strict-readiness=true" not in command
    assert "--disable-auto-complete-config" in command
    assert set(access_flags(LOOPBACK, "the-key")) <= set(command)
    assert command[-1] == "--load-model=router"
    assert "--http-address=0.0.0.0" in server_command(tmp_path, tmp_path, Ports(), "k", host="0.0.0.0")


def test_tritonserver_makes_no_gpu_pools_of_its_own(tmp_path: Path) -> None:
    """With GPUs the server gets no pinned pool and a zero CUDA pool on each (its own CUDA context otherwise);
    without one, the CPU-only flags instead; a caller's extra flag comes last, so it wins."""
    two = server_command(tmp_path, tmp_path, Ports(), "k", gpus=2)
    assert "--pinned-memory-pool-byte-size=0" in two
    assert {"--cuda-memory-pool-byte-size=0:0", "--cuda-memory-pool-byte-size=1:0"} <= set(two)
    assert "--allow-gpu-metrics=false" not in two
    cpu = server_command(tmp_path, tmp_path, Ports(), "k", gpus=0)
    assert set(CPU_ONLY_FLAGS) <= set(cpu) and not any(flag.startswith("--cuda-memory-pool") for flag in cpu)
    mine = server_command(tmp_path, tmp_path, Ports(), "k", extra_args=["--cuda-memory-pool-byte-size=0:67108864"])
    assert mine[-1] == "--cuda-memory-pool-byte-size=0:67108864"


def test_server_environment_carries_the_key_and_a_persistent_inductor_cache(tmp_path: Path) -> None:
    env = server_environment(tmp_path, "the-key", {admin.KEY_ENV: "another", "PATH": "/bin"})
    assert env[admin.KEY_ENV] == "the-key"  # the stubs check control requests against the server's own key
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path.resolve() / "inductor")
    assert server_environment(tmp_path, "k", {"TORCHINDUCTOR_CACHE_DIR": "/mine"})["TORCHINDUCTOR_CACHE_DIR"] == "/mine"
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == STUB_ALLOCATOR  # the stubs' torch: segments that grow in place
    assert server_environment(tmp_path, "k", {"PYTORCH_CUDA_ALLOC_CONF": "x"})["PYTORCH_CUDA_ALLOC_CONF"] == "x"


def test_admin_key_from_the_environment_else_a_private_file_made_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(admin.KEY_ENV, " from-env ")
    assert resolve_admin_key(tmp_path / "cache") == "from-env"
    assert not (tmp_path / "cache").exists()
    monkeypatch.delenv(admin.KEY_ENV)
    key = resolve_admin_key(tmp_path / "cache")
    path = tmp_path / "cache" / "admin.key"
    assert len(key) >= 32 and path.read_text().strip() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert resolve_admin_key(tmp_path / "cache") == key  # kept across restarts
    assert list(path.parent.iterdir()) == [path]  # no draft left behind
    path.write_text("\n")
    with pytest.raises(RuntimeError, match="is empty"):
        resolve_admin_key(tmp_path / "cache")


def test_clients_find_the_key_where_serve_keeps_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import triton_rag.client

    monkeypatch.setattr(triton_rag.client, "PROJECT_CACHE", tmp_path)
    monkeypatch.delenv(admin.KEY_ENV, raising=False)
    assert default_key() is None
    assert RouterControl("127.0.0.1:1").client.plugin() is None  # no key: nothing to send
    (tmp_path / "admin.key").write_text("from-file\n")
    assert default_key() == "from-file"
    monkeypatch.setenv(admin.KEY_ENV, "from-env")
    assert default_key() == "from-env"
    assert RouterControl("127.0.0.1:1", key="given").key == "given"


# --- on the real tritonserver ---------------------------------------------------------------------------------


def listening_addresses(port: int) -> list[str]:
    """The local addresses of the TCP sockets listening on `port` (this network namespace, IPv4 and IPv6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, local_port = local.split(":")
            if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # 32-bit words, little-endian
                ip = ipaddress.ip_address(packed)
                mapped = getattr(ip, "ipv4_mapped", None)  # gRPC listens on an IPv6 socket bound to ::ffff:127.0.0.1
                found.append(str(mapped or ip))
    return found


@pytest.mark.server
def test_the_server_listens_on_loopback_only(qwen_server: RunningServer) -> None:
    ports = qwen_server.server.ports
    for port in (ports.http, ports.grpc, ports.metrics):
        assert wait_until(lambda: listening_addresses(port), 30), f"nothing listens on {port}"  # noqa: B023
        assert listening_addresses(port) == [LOOPBACK], (port, listening_addresses(port))


@pytest.mark.server
def test_startup_models_are_loaded_before_the_server_listens(qwen_server: RunningServer) -> None:
    """Why wait_ready needs no strict readiness: tritonserver opens HTTP only once its --load-model models are in."""
    log = qwen_server.log_path.read_text(errors="replace").splitlines()
    started = next(i for i, line in enumerate(log) if "Started HTTPService" in line)
    for name in startup_models(qwen_server.repository):
        loaded = next(i for i, line in enumerate(log) if f"successfully loaded '{name}'" in line)
        assert loaded < started, name


def http_client(server: RunningServer) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.server.http_url)


def grpc_client(server: RunningServer) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.server.grpc_url)


def model_ready(server: RunningServer, name: str) -> bool:
    return bool(http_client(server).is_model_ready(name))


def refused(call: object, message: str) -> bool:
    try:
        call()  # type: ignore[operator]
    except InferenceServerException as exc:
        assert message in str(exc.message()), exc.message()
        return True
    return False


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_repository_api_needs_the_admin_key(qwen_server: RunningServer, protocol: str) -> None:
    key = qwen_server.server.admin_key
    if protocol == "http":
        client, message = http_client(qwen_server), HTTP_REFUSAL
        with_key, wrong_key = {admin.KEY_NAME: key}, {admin.KEY_NAME: key + "x"}
    else:
        client, message = grpc_client(qwen_server), GRPC_REFUSAL
        with_key, wrong_key = {GRPC_KEY_HEADER: key}, {GRPC_KEY_HEADER: key + "x"}
        # the name Triton checks on HTTP is not the gRPC header: tritonserver prefixes it
        assert refused(lambda: client.get_model_repository_index(headers={admin.KEY_NAME: key}), message)
    assert refused(lambda: client.unload_model(contract.ROUTER), message)
    assert refused(lambda: client.unload_model(contract.ROUTER, headers=wrong_key), message)
    assert model_ready(qwen_server, contract.ROUTER)
    assert refused(lambda: client.load_model(ENCODER), message)
    assert refused(lambda: client.get_model_repository_index(), message)
    # what stays open: health, metadata, config (perf_analyzer reads it), statistics
    assert client.is_server_ready()
    client.get_model_metadata(contract.EMBED_ENDPOINT)
    client.get_model_config(contract.EMBED_ENDPOINT)
    client.get_inference_statistics()

    client.unload_model(ENCODER, headers=with_key)  # from any state: loaded by another test, or not
    assert wait_until(lambda: not model_ready(qwen_server, ENCODER), 60)
    client.load_model(ENCODER, headers=with_key)
    assert model_ready(qwen_server, ENCODER)
    client.unload_model(ENCODER, headers=with_key)
    assert wait_until(lambda: not model_ready(qwen_server, ENCODER), 60)


@pytest.mark.server
def test_the_project_clients_send_the_key(qwen_server: RunningServer) -> None:
    key = qwen_server.server.admin_key
    assert {m["name"] for m in qwen_server.client().get_model_repository_index(as_json=True)["models"]} >= {ENCODER}
    assert RouterControl(qwen_server.server.grpc_url, key=key).client.get_model_repository_index()
    wrong = RouterControl(qwen_server.server.grpc_url, key=key + "x")
    assert refused(lambda: wrong.client.get_model_repository_index(), GRPC_REFUSAL)
    assert isinstance(wrong.client.plugin(), AdminHeader)


@pytest.mark.server
def test_the_server_stays_ready_while_a_model_loads(qwen_server: RunningServer) -> None:
    """The router swaps compute models at run time: /v2/health/ready must not flap while one loads."""
    admin_client = qwen_server.client()
    admin_client.unload_model(ENCODER)
    assert wait_until(lambda: not model_ready(qwen_server, ENCODER), 60)

    def state() -> str | None:
        index = admin_client.get_model_repository_index(as_json=True)["models"]
        return next((m.get("state") for m in index if m["name"] == ENCODER), None)

    def server_ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://{qwen_server.server.http_url}/v2/health/ready", timeout=5) as reply:
                return reply.status == 200
        except urllib.error.HTTPError:
            return False

    errors: list[BaseException] = []

    def load() -> None:
        try:
            qwen_server.client().load_model(ENCODER)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    loader = threading.Thread(target=load)
    loader.start()
    during_load: list[bool] = []  # server readiness, sampled between two index reads that both said LOADING
    while loader.is_alive():
        before, ready, after = state(), server_ready(), state()
        if before == after == "LOADING":
            during_load.append(ready)
    loader.join()
    assert not errors, errors
    assert during_load, "the load was never observed under way"
    assert all(during_load), f"/v2/health/ready failed {during_load.count(False)} of {len(during_load)} times"
    assert model_ready(qwen_server, ENCODER)  # per-model readiness still tells
    admin_client.unload_model(ENCODER)
    assert wait_until(lambda: not model_ready(qwen_server, ENCODER), 60)

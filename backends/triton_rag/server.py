"""Run the real tritonserver bundled in the nvidia-pytriton wheel (the embedded default; no Docker).

Two details make the bundled server usable from a virtual environment:
- the python backend stub must match the running Python: we copy the wheel's stub for this Python into a backend
  directory of our own, and put the wheel's private libraries (libcudart, ...) on LD_LIBRARY_PATH;
- the stub starts an *isolated* interpreter (PYTHONPATH is ignored) that finds its prefix by looking up `python3` on
  PATH, so the environment's bin directory goes first on PATH and the stub then sees this environment's packages.

The server runs in its own process group; stopping it (SIGTERM, then SIGKILL after a grace period) always takes the
whole group down, so no python stub outlives it.

Safe by default: it listens on loopback only, and the APIs that change the server (repository, shared memory, trace,
logging) need the admin key (triton_rag.core.admin) in a header; see `access_flags`.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from triton_rag import contract
from triton_rag.core import admin
from triton_rag.core.admin import GRPC_KEY_HEADER  # noqa: F401  (re-exported for the launcher's callers)

_log = logging.getLogger(__name__)

#: Where tritonserver listens unless told otherwise: only processes of this machine can reach it.
LOOPBACK = "127.0.0.1"
#: The Triton API categories that need the admin key: a repository load can bring a model.py of the caller's (code
#: run by the server), a shared-memory region can be any shm object the server may open (the python backend's own
#: among them), trace and logging settings name files the server writes. Health, metadata, inference, statistics
#: and model-config (read-only; perf_analyzer reads it) stay open.
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
#: Seconds tritonserver waits for its models to unload after SIGTERM (`--exit-timeout-secs`) before it exits anyway.
EXIT_TIMEOUT_SECONDS = 20
#: Seconds the gateway gets to answer its requests in flight when serve stops (uvicorn's graceful shutdown is 10 s).
GATEWAY_GRACE_SECONDS = 15.0
#: tritonserver's flags on a machine without a GPU (gpu_present() False), where its defaults only log alarming lines:
#: GPU metrics (DCGM: "Error: Failed to initialize NVML", "DCGM unable to start") and a pinned memory pool for GPU
#: copies (CUDA: "Unable to allocate pinned system memory ... CUDA driver version is insufficient").
CPU_ONLY_FLAGS = ("--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0")
#: How the stubs' torch allocates GPU memory: segments that grow and shrink in place, so passes of changing sizes reuse
#: one range instead of caching a block per size (BENCHMARKS.md: the encoders grew 0.7-1.0 GiB past their warm-up
#: under real traffic with torch's default). A value in the caller's environment wins.
STUB_ALLOCATOR = "expandable_segments:True"
#: The one error line no flag of tritonserver 2.51 turns off on such a machine: its CUDA block manager starts
#: unconditionally and logs that the CUDA driver is missing. Harmless (the server runs on the CPU); dropped from its
#: log there (TritonServer.start), the launcher says instead, once, that no GPU was found.
HARMLESS_WITHOUT_GPU = re.compile(
    rb'^E\d{4} [\d:.]+ +\d+ server\.cc:\d+\] "?CudaDriverHelper has not been initialized\."?\s*$'
)


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def free_ports() -> Ports:
    """Three ports the OS reports free on loopback (for tests that run beside a live server)."""
    sockets = [socket.socket() for _ in range(3)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        http, grpc, metrics = (sock.getsockname()[1] for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()
    return Ports(http, grpc, metrics)


def pytriton_root() -> Path:
    """Where the nvidia-pytriton wheel lies, found without importing it: its __init__ pulls in gevent, which the
    server never needs."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed: the embedded tritonserver comes from that wheel")
    return Path(next(iter(spec.submodule_search_locations)))


def tritonserver_binary() -> Path:
    return pytriton_root() / "tritonserver" / "bin" / "tritonserver"


def prepare_backends(cache_dir: Path) -> Path:
    """A backend directory whose python backend uses the stub built for the running Python version."""
    source = pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        available = sorted(p.name for p in (source / "python_backend_stubs").iterdir())
        raise RuntimeError(f"nvidia-pytriton has no python backend stub for Python {version} (it has {available})")
    backends = cache_dir / "triton-backends" / version
    python_backend = backends / "python"
    python_backend.mkdir(parents=True, exist_ok=True)
    for file in (*(source / "backends" / "python").glob("*.*"), stub):
        if file.is_file():
            target = python_backend / file.name
            if not target.exists() or target.stat().st_mtime < file.stat().st_mtime:
                shutil.copy2(file, target)
    return backends


def admin_key_file(cache_dir: Path) -> Path:
    return cache_dir / "admin.key"


def resolve_admin_key(cache_dir: Path) -> str:
    """`TRITON_RAG_ADMIN_KEY`, else the key in `<cache_dir>/admin.key`, created (mode 0600) on first use: a restart
    keeps the key that clients on this machine already read from that file."""
    configured = os.environ.get(admin.KEY_ENV, "").strip()
    if configured:
        return configured
    path = admin_key_file(cache_dir)
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(admin.new_key() + "\n")
        try:
            os.link(draft, path)  # atomic and exclusive: of two servers starting at once, both use the first key
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    key = path.read_text().strip()
    if not key:
        raise RuntimeError(f"{path} is empty; delete it (a new key is made) or set {admin.KEY_ENV}")
    return key


def access_flags(host: str, key: str) -> list[str]:
    """tritonserver's flags for where it listens (HTTP, gRPC and metrics on `host`) and which APIs need the admin key
    `key` (RESTRICTED_APIS): in the header `admin.KEY_NAME` on HTTP, `GRPC_KEY_HEADER` on gRPC."""
    if not re.fullmatch(r"[!-~]+", key):  # a header value: visible ASCII, no spaces
        raise ValueError(f"the admin key ({admin.KEY_ENV} or admin.key) must be printable ASCII without spaces")
    restricted = f"{','.join(RESTRICTED_APIS)}:{admin.KEY_NAME}={key}"
    return [
        f"--http-address={host}",
        f"--grpc-address={host}",
        f"--metrics-address={host}",
        f"--http-restricted-api={restricted}",
        f"--grpc-restricted-protocol={restricted}",  # tritonserver 2.51's name for the gRPC flag
    ]


def gpu_count() -> int:
    """The GPUs tritonserver will find here: what the CUDA driver counts once it loads and initializes
    (CUDA_VISIBLE_DEVICES honoured), as tritonserver's own probe does; 0 without a driver. No CUDA context is made."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    try:
        return count.value if driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0
    except AttributeError:  # not a CUDA driver
        return 0


def gpu_present() -> bool:
    return gpu_count() > 0


def gpu_memory_flags(gpus: int) -> list[str]:
    """tritonserver's flags with `gpus` GPUs: no pinned host pool (256 MiB of page-locked RAM) and no CUDA pool (64 MiB
    of each GPU). The server itself moves no tensor to or from a GPU (every model's inputs and outputs are host
    tensors; the python stubs do their own GPU work), so neither pool is ever used. Its CUDA context stays (~0.5 GiB
    of an H200 with or without these flags, BENCHMARKS.md): only hiding the GPU from it would remove that."""
    return ["--pinned-memory-pool-byte-size=0", *(f"--cuda-memory-pool-byte-size={gpu}:0" for gpu in range(gpus))]


def server_environment(cache_dir: Path, admin_key: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """tritonserver's environment, which its python stubs inherit: this virtual environment, the admin key (the
    router and the endpoints check control requests against it) and a persistent inductor cache."""
    env = dict(os.environ if base is None else base)
    env_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([env_bin, env.get("PATH", "")])
    libs = [str(sysconfig.get_config_var("LIBDIR")), str(pytriton_root().parent / "nvidia_pytriton.libs")]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    # an endpoint tokenizes a whole dynamic batch in one call, which the fast tokenizer spreads over its threads
    # (BENCHMARKS.md: 33 -> 25 ms for 25 texts on 2 cores); "true" also keeps its fork warning quiet
    env.setdefault("TOKENIZERS_PARALLELISM", "true")
    env[admin.KEY_ENV] = admin_key
    # compiled layers (`compile = true`) reuse their kernels across loads and restarts instead of compiling anew
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir.resolve() / "inductor"))
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", STUB_ALLOCATOR)
    return env


def server_command(
    repository: Path,
    backends: Path,
    ports: Ports,
    admin_key: str,
    load_models: Sequence[str] = ("*",),
    host: str = LOOPBACK,
    extra_args: Sequence[str] = (),
    gpus: int = 1,
) -> list[str]:
    """Explicit model control; the server reports ready while the router loads and unloads compute models
    (`--strict-readiness=false`; each model's readiness is /v2/models/<name>/ready); configs are used as `prepare`
    wrote them (`--disable-auto-complete-config`). With `gpus` GPUs: gpu_memory_flags; without (0): CPU_ONLY_FLAGS;
    both before `extra_args` (which can override them)."""
    command = [
        str(tritonserver_binary()),
        f"--model-repository={repository.resolve()}",
        f"--backend-directory={backends.resolve()}",
        "--model-control-mode=explicit",
        f"--http-port={ports.http}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-port={ports.metrics}",
        "--allow-metrics=true",
        f"--exit-timeout-secs={EXIT_TIMEOUT_SECONDS}",
        "--strict-readiness=false",
        "--disable-auto-complete-config",
        *access_flags(host, admin_key),
    ]
    command += gpu_memory_flags(gpus) if gpus else CPU_ONLY_FLAGS
    command += [f"--load-model={name}" for name in load_models]
    return command + list(extra_args)


def _copy_log(source: IO[bytes], target: IO[bytes]) -> None:
    """tritonserver's output (its stubs' included) line by line to `target`, without the HARMLESS_WITHOUT_GPU line;
    until the pipe closes (the server's process group has exited)."""
    with source:
        for line in iter(source.readline, b""):
            if HARMLESS_WITHOUT_GPU.match(line):
                continue
            try:
                target.write(line)
                target.flush()
            except (OSError, ValueError):  # the log was closed under us: keep draining, so the server never blocks
                pass


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the launcher dies, so a killed launcher leaves no server behind."""
    os.setsid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def drain_order(startup_models: Sequence[str]) -> list[list[str]]:
    """The models `serve` unloads itself before it stops tritonserver, stage by stage: callers before the models they
    call (docling_document calls docling; every endpoint calls the router and its compute model). What is left
    (the router and the compute models it loaded) then has no caller when tritonserver unloads it. Unloading all at
    once, as tritonserver's own shutdown does, let endpoint requests call a router or encoder that was already gone:
    INTERNAL errors to clients and, in tritonserver 2.51, an abort (boost lock_exception) that left the python
    backend's /dev/shm regions behind."""
    callers = [name for name in startup_models if name == contract.DOCLING_DOCUMENT_ENDPOINT]
    endpoints = [name for name in startup_models if name not in callers and name != contract.ROUTER]
    return [stage for stage in (callers, endpoints) if stage]


def terminate_group(process: subprocess.Popen[bytes], grace: float) -> int:
    """SIGTERM `process` (started with `_die_with_parent`: it leads its own process group), wait up to `grace`
    seconds, then SIGKILL whatever is left of its group (a tritonserver's stubs, a process past its grace period);
    its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return process.wait()


#: How often `serve` asks the router whether tritonserver has a model it cannot load again, and how many clean
#: restarts of tritonserver that may cause in an hour.
WEDGE_CHECK_SECONDS = 5.0
MAX_RESTARTS = 3


class GatewayProcess:
    """The gateway (triton_rag.gateway) as a process of its own beside tritonserver: started once tritonserver is,
    stopped before it (so no client is let in while Triton stops). Its own process group; it gets SIGTERM if the
    launcher dies."""

    def __init__(self, command: Sequence[str], log: IO[bytes] | None = None) -> None:
        self.command = list(command)
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.reported_exit = False

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command,
            stdout=self.log,
            stderr=subprocess.STDOUT if self.log is not None else None,
            preexec_fn=_die_with_parent,
        )

    def exited(self) -> int | None:
        """The exit code once it has ended on its own (reported once), else None."""
        if self.process is None or self.reported_exit or self.process.poll() is None:
            return None
        self.reported_exit = True
        return self.process.returncode

    def stop(self, grace: float = 15.0) -> None:
        if self.process is not None:
            terminate_group(self.process, grace)


def gateway_command(
    repository: Path, triton_url: str, host: str, port: int, config: Path | None, overrides: Sequence[str] = ()
) -> list[str]:
    """`python -m triton_rag.gateway ...` for this environment's Python."""
    command = [sys.executable, "-m", "triton_rag.gateway", "--repository", str(repository.resolve()),
               "--triton-url", triton_url, "--host", host, "--port", str(port)]
    if config is not None:
        command += ["--config", str(config.resolve())]
    for item in overrides:
        command += ["--set", item]
    return command


class TritonServer:
    def __init__(
        self,
        repository: Path,
        cache_dir: Path,
        ports: Ports = Ports(),
        load_models: Sequence[str] | None = None,
        extra_args: Sequence[str] = (),
        log: IO[bytes] | None = None,
        host: str = LOOPBACK,
        admin_key: str | None = None,
    ) -> None:
        """`load_models`: what to load at start-up; by default the prepared repository's light models (the router
        loads compute models on first use). `host`: the address to listen on (`0.0.0.0`: every interface).
        `admin_key`: by default `resolve_admin_key(cache_dir)`."""
        from triton_rag.build.repository import startup_models

        if load_models is None:
            load_models = startup_models(repository)
        self.repository = repository
        self.startup_models = [name for name in load_models if name != "*"]  # what `drain` unloads, in its order
        self.cache_dir = cache_dir
        self.ports = ports
        self.host = host
        self.admin_key = admin_key or resolve_admin_key(cache_dir)
        gpus = gpu_count()
        self.gpu = gpus > 0
        if not self.gpu:
            _log.info("no GPU found (no CUDA driver or device): tritonserver runs on the CPU only")
        self.command = server_command(
            repository, prepare_backends(cache_dir), ports, self.admin_key, load_models, host, extra_args, gpus
        )
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self._log_copier: threading.Thread | None = None

    @property
    def _connect_host(self) -> str:
        """Where this machine reaches the server: loopback when it listens on every interface."""
        if self.host in ("0.0.0.0", "::", ""):
            return LOOPBACK
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def http_url(self) -> str:
        return f"{self._connect_host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self._connect_host}:{self.ports.grpc}"

    def start(self) -> None:
        """Start tritonserver. With a GPU its output goes straight to `log` (else this process's stdout and stderr);
        without one it passes through a thread that drops the HARMLESS_WITHOUT_GPU line on its way there."""
        filtered = not self.gpu
        self.process = subprocess.Popen(
            self.command,
            env=server_environment(self.cache_dir, self.admin_key),
            stdout=subprocess.PIPE if filtered else self.log,
            stderr=subprocess.STDOUT if filtered or self.log is not None else None,
            preexec_fn=_die_with_parent,
        )
        if filtered:
            assert self.process.stdout is not None
            target = self.log if self.log is not None else sys.stderr.buffer
            self._log_copier = threading.Thread(
                target=_copy_log, args=(self.process.stdout, target), name="tritonserver-log", daemon=True
            )
            self._log_copier.start()

    def _finish_log(self, timeout: float = 5.0) -> None:
        """Wait (briefly) for the log copier to write what the stopped server left in its pipe."""
        if self._log_copier is not None:
            self._log_copier.join(timeout)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_ready(self, timeout: float) -> None:
        """Block until every model asked for is loaded; raise if the server exits or the time runs out.

        /v2/health/ready says so even without strict readiness: tritonserver opens its ports only once the
        --load-model models are loaded, and exits when one fails (--exit-on-error, its default)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode} before it was ready")
            if self.is_ready():
                return
            time.sleep(0.25)
        raise TimeoutError(f"tritonserver was not ready after {timeout:.0f} s")

    def stop(self, grace: float = 30.0) -> int:
        """SIGTERM the server, wait up to `grace` seconds, then SIGKILL its process group (stubs included)."""
        if self.process is None:
            return 0
        code = terminate_group(self.process, grace)
        self._finish_log()
        return code

    def restart_wedged(self, wedged: Callable[[], dict[str, str]], restarts: list[float], grace: float) -> bool:
        """Restart tritonserver when `wedged()` names a model it cannot load again, unless MAX_RESTARTS happened in
        the last hour (a model that wedges at every load would restart it forever: then it says so once and leaves
        the server serving its other models). True when it restarted."""
        try:
            stuck = wedged() if self.is_ready() else {}
        except Exception as exc:  # the check must never take the server down: it is only a check
            _log.debug("the wedged-model check failed: %s", exc)
            return False
        if not stuck:
            return False
        now = time.monotonic()
        restarts[:] = [t for t in restarts if now - t < 3600.0]
        reasons = "; ".join(f"{name}: {reason}" for name, reason in stuck.items())
        if len(restarts) >= MAX_RESTARTS:
            if len(restarts) == MAX_RESTARTS:
                restarts.append(now)  # said once an hour
                _log.error("not restarting tritonserver again (%d restarts this hour): %s", MAX_RESTARTS, reasons)
            return False
        restarts.append(now)
        _log.warning("restarting tritonserver: it cannot load a model again until it restarts (%s)", reasons)
        self.stop(grace)
        self.start()
        try:
            self.wait_ready(600)
        except (RuntimeError, TimeoutError) as exc:  # serve_forever's loop sees an exit and ends with its code
            _log.error("tritonserver restarted but is not ready: %s", exc)
            return True
        _log.info("tritonserver restarted and ready")
        return True

    def drain(self, seconds: float) -> bool:
        """Unload the endpoints (`drain_order`, stage by stage) through the repository API within `seconds`: each
        answers what it has in flight (its router and compute model are still there) and takes no new request.
        True when every stage finished in time; False (logged) otherwise, or when the server is not up."""
        deadline = time.monotonic() + seconds
        for stage in drain_order(self.startup_models):
            for name in stage:
                if self._repository_call(f"models/{name}/unload", deadline) is None:
                    return False
            while any(state not in ("UNAVAILABLE", None) for state in self._model_states(stage, deadline)):
                if time.monotonic() >= deadline:
                    _log.warning("stopping: %s still had requests in flight after %.0f s", ", ".join(stage), seconds)
                    return False
                time.sleep(0.1)
        return True

    def _repository_call(self, path: str, deadline: float) -> bytes | None:
        """A POST to /v2/repository/<path> with the admin key, or None (logged at debug) when the server does not
        answer before `deadline`."""
        request = urllib.request.Request(
            f"http://{self.http_url}/v2/repository/{path}", data=b"{}", method="POST",
            headers={admin.KEY_NAME: self.admin_key, "Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=max(0.5, deadline - time.monotonic())) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as exc:  # answered, with an error (a model already unloading, say)
            _log.debug("repository API %s: %s", path, exc)
            return b""
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            _log.debug("repository API %s: %s", path, exc)
            return None

    def _model_states(self, names: Sequence[str], deadline: float) -> list[str | None]:
        """Each of `names`' state in one read of the repository index (READY, UNLOADING, UNAVAILABLE, ...; None when
        it is not there; UNKNOWN for all when the index cannot be read)."""
        index = self._repository_call("index", deadline)
        entries = json.loads(index) if index else None
        if not isinstance(entries, list):
            return ["UNKNOWN"] * len(names)
        states = {entry["name"]: entry.get("state") for entry in entries}
        return [states.get(name) for name in names]

    def _kill_group(self) -> None:
        """SIGKILL what is left of the server's process group (it leads its own): stubs of a server that did not
        clean up, or the server itself past its grace period."""
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def serve_forever(
        self,
        grace: float = 30.0,
        gateway: GatewayProcess | None = None,
        wedged: Callable[[], dict[str, str]] | None = None,
        stop_router: Callable[[], object] | None = None,
    ) -> int:
        """Run in the foreground until the server exits or SIGINT/SIGTERM arrives; then stop in order (`_stop_in_order`:
        the gateway, the endpoints' requests in flight, tritonserver). `wedged`: asked every WEDGE_CHECK_SECONDS
        while the server is up, the models it cannot load again (the router's STATUS); any there makes a clean
        restart of tritonserver (`restart_wedged`), at most MAX_RESTARTS an hour. `stop_router`: tells the router
        the server is stopping (RouterControl.stop), for requests still waiting halfway through the grace period.

        The signal handler only records the request: the stopping and waiting happen here, in one place, so the
        handler can never deadlock against a wait that it interrupted."""
        stop_requested: list[float] = []

        def on_signal(signum: int, _frame: object) -> None:
            if not stop_requested:
                stop_requested.append(time.monotonic())
                _log.info("received %s: stopping", signal.Signals(signum).name)

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        self.start()
        assert self.process is not None
        if gateway is not None:
            gateway.start()
        restarts: list[float] = []
        next_check = time.monotonic() + WEDGE_CHECK_SECONDS
        kill_at: float | None = None
        try:
            while True:
                try:
                    code = self.process.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if stop_requested and kill_at is None:
                        self._stop_in_order(gateway, grace, stop_router)
                        kill_at = time.monotonic() + EXIT_TIMEOUT_SECONDS + 5
                    if kill_at is not None and time.monotonic() > kill_at:
                        _log.warning("tritonserver did not exit in time: killing what is left of it")
                        self._kill_group()
                    if wedged is not None and not stop_requested and time.monotonic() >= next_check:
                        self.restart_wedged(wedged, restarts, grace)
                        next_check = time.monotonic() + WEDGE_CHECK_SECONDS
                    if gateway is not None and not stop_requested:
                        exited = gateway.exited()
                        if exited is not None:
                            _log.error("the gateway exited (code %s); tritonserver keeps serving", exited)
        finally:
            if gateway is not None:
                gateway.stop()
            self._kill_group()
            self._finish_log()
        return 0 if stop_requested else code

    def _stop_in_order(
        self, gateway: GatewayProcess | None, grace: float, stop_router: Callable[[], object] | None
    ) -> None:
        """First the gateway (no client let in while Triton stops; it finishes its own requests). Then the endpoints
        are unloaded (`drain`): for half of `grace` their requests in flight get their answers, the router and the
        compute models still being there; then the router is told to stop (`stop_router`), which ends what still
        waits for a model with UNAVAILABLE ("the router is stopping"), for the other half. Last SIGTERM to
        tritonserver, which unloads the router and the compute models, by now without callers."""
        if gateway is not None:
            gateway.stop(GATEWAY_GRACE_SECONDS)
        started = time.monotonic()
        drained = self.drain(grace / 2)
        if not drained and stop_router is not None:
            _log.info("stopping: telling the router to refuse what still waits for a model")
            stop_router()
            drained = self.drain(grace / 2)
        _log.info(
            "endpoints stopped in %.1f s%s; stopping tritonserver",
            time.monotonic() - started,
            "" if drained else " (not all: see above)",
        )
        assert self.process is not None
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)

"""Several gateway processes on one port (rag.toml `[gateway] workers`): uvicorn's workers, each with its own event
loop, gRPC channel and tokenizers, so that parsing, validating and tokenizing the requests of many clients uses
several cores (one Python process uses one at most).

The parent process (`python -m triton_rag.gateway`) resolves and checks everything once (settings, keys, catalog),
then keeps it in a private directory (mode 0700: it holds the API keys) that it removes when it stops:
`config.pickle`, which each worker loads in `worker_app` (uvicorn's app factory), and `metrics/`, prometheus_client's
multiprocess directory, where every worker writes its samples and from which any worker's /metrics adds them all up.
The workers are the parent's children, in its process group (which `serve` stops as a whole); each gets SIGTERM if
the parent dies.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import multiprocessing
import os
import pickle
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from triton_rag.core import logs

if TYPE_CHECKING:  # the application (FastAPI, prometheus_client) is imported once the environment is set
    from starlette.types import ASGIApp

    from triton_rag.gateway.app import GatewayConfig

#: The parent's and the workers' log lines.
LOG_FORMAT = "[triton-rag gateway] %(message)s"
#: prometheus_client reads it once, when it is imported: set, it keeps its samples in files there (multiprocess
#: mode). The gateway sets it for its workers, and clears one it inherits before it serves alone.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Names the private directory in the workers' environment.
STATE_ENV = "TRITON_RAG_GATEWAY_STATE"
CONFIG_FILE = "config.pickle"
METRICS_DIR = "metrics"
#: uvicorn's import string of the app factory each worker calls.
FACTORY = "triton_rag.gateway.workers:worker_app"
_PR_SET_PDEATHSIG = 1


def available_cpus() -> int:
    """The cores this process may use: those it may run on (which `taskset` or a container's cpuset narrows), at most
    its cgroup's CPU quota rounded up (`docker run --cpus 2` on a larger machine: 2)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 here
        pass
    return cpus


@contextmanager
def shared_state(config: GatewayConfig) -> Iterator[Path]:
    """The private directory of the workers about to start (their config, their metrics), named in this process's
    environment, which they inherit; removed, with whatever the workers wrote there, on the way out."""
    state = Path(tempfile.mkdtemp(prefix="triton-rag-gateway-"))
    try:
        metrics = state / METRICS_DIR
        metrics.mkdir()
        (state / CONFIG_FILE).write_bytes(pickle.dumps(dataclasses.replace(config, metrics_dir=str(metrics))))
        os.environ[STATE_ENV] = str(state)
        os.environ[MULTIPROCESS_ENV] = str(metrics)
        yield state
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _die_with_parent() -> None:
    """SIGTERM to this worker when the parent process ends, even killed: no worker outlives it on the port."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # pragma: no cover - not Linux
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it ended before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def worker_app() -> ASGIApp:
    """uvicorn's app factory, in each worker process: the application of the config the parent resolved."""
    from triton_rag.gateway.app import create_app

    _die_with_parent()
    logs.configure("stderr", fmt=LOG_FORMAT)
    config: GatewayConfig = pickle.loads((Path(os.environ[STATE_ENV]) / CONFIG_FILE).read_bytes())
    return create_app(config)

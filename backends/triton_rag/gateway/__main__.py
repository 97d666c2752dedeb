"""The gateway process: `python -m triton_rag.gateway --repository R --triton-url HOST:PORT [--config F] [--set
gateway.KEY=VALUE ...]`. `triton-rag serve` starts it after tritonserver and stops it with tritonserver; it can run
on its own beside any tritonserver that serves a prepared repository. With `[gateway] workers` above 1 it is the
parent of that many worker processes (gateway.workers)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path
from typing import Any

from triton_rag.build.settings import GatewaySettings, SettingsError, load_settings
from triton_rag.core import logs
from triton_rag.gateway.catalog import CatalogError, load_catalog
from triton_rag.gateway.workers import FACTORY, LOG_FORMAT, MULTIPROCESS_ENV, available_cpus, shared_state

_log = logging.getLogger("triton_rag.gateway")

#: Extra keys from the environment (comma-separated), beside rag.toml's: how docker compose passes them.
KEYS_ENV = "TRITON_RAG_API_KEYS"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def api_keys(settings: GatewaySettings, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """The keys a client may send: rag.toml's `api_keys`, the lines of `api_key_file` (blank and `#` lines skipped)
    and $TRITON_RAG_API_KEYS (comma-separated)."""
    keys = [key.strip() for key in settings.api_keys]
    if settings.api_key_file:
        path = Path(settings.api_key_file).expanduser()
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise SettingsError(f"[gateway] api_key_file {path} cannot be read: {exc.strerror}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    keys += [key.strip() for key in (environ if environ is not None else os.environ).get(KEYS_ENV, "").split(",")]
    for key in keys:
        if key and not all(33 <= ord(c) <= 126 for c in key):
            raise SettingsError("[gateway] an API key must be printable ASCII without spaces")
    return tuple(dict.fromkeys(key for key in keys if key))


def exposure_problem(host: str, keys: tuple[str, ...], allow_insecure_public: bool) -> str | None:
    """Why the gateway must not start this way, or None: beyond loopback it wants API keys, unless told otherwise."""
    if is_loopback(host) or keys or allow_insecure_public:
        return None
    return (
        f"the gateway would listen on {host} (beyond this machine) with no API key: set [gateway] api_keys or "
        f"api_key_file (or ${KEYS_ENV}), or accept an open gateway with [gateway] allow_insecure_public = true"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m triton_rag.gateway", description=__doc__)
    parser.add_argument("--repository", type=Path, required=True, help="the prepared model repository Triton serves")
    parser.add_argument("--triton-url", default="127.0.0.1:8001", help="Triton's gRPC endpoint (host:port)")
    parser.add_argument("--config", type=Path, help="settings file (rag.toml or a profile); default: built-in")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--host", help="overrides [gateway] host")
    parser.add_argument("--port", type=int, help="overrides [gateway] port")
    args = parser.parse_args(argv)
    logs.configure("stderr", fmt=LOG_FORMAT)
    overrides = list(args.overrides)
    if args.host:
        overrides.append(f"gateway.host={args.host}")
    if args.port:
        overrides.append(f"gateway.port={args.port}")
    try:
        settings = load_settings(args.config, overrides).gateway
        keys = api_keys(settings)
        problem = exposure_problem(settings.host, keys, settings.allow_insecure_public)
        if problem:
            raise SettingsError(problem)
        catalog = load_catalog(args.repository)
    except (SettingsError, CatalogError) as exc:
        _log.error("error: %s", exc)
        return 2

    workers = settings.worker_count(available_cpus())
    if workers == 1:
        os.environ.pop(MULTIPROCESS_ENV, None)  # serving alone: the samples stay in this process's registry

    import uvicorn

    from triton_rag.gateway.app import GatewayConfig, create_app

    config = GatewayConfig(settings, keys, catalog, args.triton_url)
    served = ", ".join(f"{model.endpoint} as {model.id!r}" for model in catalog.models())
    _log.info(
        "listening on http://%s:%d (Triton gRPC %s; %s; %s; %d worker process%s)",
        settings.host,
        settings.port,
        args.triton_url,
        served,
        f"{len(keys)} API key(s)" if keys else "no API key asked for",
        workers,
        "" if workers == 1 else "es",
    )
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": "warning",
        "access_log": False,
        "timeout_graceful_shutdown": 10,
    }
    if workers == 1:
        uvicorn.run(create_app(config), **options)
        return 0
    with shared_state(config):
        uvicorn.run(FACTORY, factory=True, workers=workers, **options)
    return 0


if __name__ == "__main__":
    sys.exit(main())

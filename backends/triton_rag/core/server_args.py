"""What a running tritonserver's command line says about where it listens (read by the router inside Triton)."""

from __future__ import annotations

from collections.abc import Sequence


def grpc_endpoint(argv: Sequence[str]) -> str:
    """Where a running tritonserver answers gRPC, from its command line (Triton's defaults where a flag is absent).

    The router uses it to drive the repository API: pb_utils.load_model/unload_model/is_model_ready abort
    tritonserver 2.51 when they fail on a thread other than the stub's main thread."""
    flags: dict[str, str] = {}
    items = list(argv[1:])
    for index, item in enumerate(items):
        if item.startswith("--"):
            key, sep, value = item[2:].partition("=")
            if not sep and index + 1 < len(items) and not items[index + 1].startswith("--"):
                value = items[index + 1]
            flags[key] = value
    if flags.get("allow-grpc", "true").lower() in ("false", "0", "no"):
        raise RuntimeError("tritonserver runs with --allow-grpc=false; the router needs its gRPC endpoint")
    address = flags.get("grpc-address", "0.0.0.0")
    host = "127.0.0.1" if address in ("0.0.0.0", "", "::", "[::]") else address
    return f"{host}:{flags.get('grpc-port', '8001')}"

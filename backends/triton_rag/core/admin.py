"""The admin key: what lets a caller change residency (router control actions) or the repository (Triton's
repository API), so that a client of the public ports cannot load its own model.py or pin models at will.

One key per server:
- `TRITON_RAG_ADMIN_KEY` in tritonserver's environment: the python stubs inherit it, and the same value goes into
  Triton's `--*-restricted-api` flags. `triton-rag serve` always sets it, from the variable or else from the
  project's `.cache/admin.key` (created 0600 on first use, kept across restarts; `triton-rag admin-key` prints it);
  `make prepare` writes it into `.env` for the compose file, and `Dockerfile.triton` refuses to start without it.
- Only where tritonserver was started without it (the repository mounted into someone else's deployment), the
  first stub that needs one creates a random key in a file only this user can read, named after the tritonserver
  process (`<runtime dir>/triton-rag-<server pid>.key`). The endpoints and the router of that server share it;
  clients do not see it, so control actions stay closed until an operator sets the variable.

The key travels as the request parameter (and, for the repository API, the header) named `KEY_NAME`.
"""

from __future__ import annotations

import hmac
import os
import secrets
import tempfile
from pathlib import Path

KEY_ENV = "TRITON_RAG_ADMIN_KEY"
#: Request parameter (router control) and HTTP/gRPC header (Triton's restricted APIs) that carries the key.
KEY_NAME = "triton-rag-key"
#: The header a restricted gRPC call must carry: tritonserver prefixes the configured name with this fixed
#: "triton-grpc-protocol-" (HTTP checks KEY_NAME as given).
GRPC_KEY_HEADER = f"triton-grpc-protocol-{KEY_NAME}"


def runtime_dir() -> Path:
    return Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())


def server_key(server_pid: int | None = None, directory: Path | None = None) -> str:
    """The key of the tritonserver `server_pid` (default: this stub's parent), from the environment or its file."""
    configured = os.environ.get(KEY_ENV, "").strip()
    if configured:
        return configured
    path = (directory or runtime_dir()) / f"triton-rag-{server_pid or os.getppid()}.key"
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    draft = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_urlsafe(32))
    try:
        os.link(draft, path)  # atomic and exclusive: whoever links first wins, the others read theirs
    except FileExistsError:
        pass
    finally:
        draft.unlink()
    return _read(path)


def _read(path: Path) -> str:
    key = path.read_text().strip()
    if not key:
        raise RuntimeError(f"{path} is empty; delete it and retry")
    return key


def key_matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def new_key() -> str:
    return secrets.token_urlsafe(32)

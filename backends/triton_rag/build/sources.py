"""Where a configured model comes from: a local directory, the Hugging Face hub, or (loudly) the offline set."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from triton_rag.build.offline import OFFLINE_MARKER, build_tiny_qwen3
from triton_rag.build.offline_docling import build_random_granite_docling

_log = logging.getLogger(__name__)

Origin = Literal["local", "hub", "offline"]
Log = Callable[[str], None]

#: Where a failed attempt to reach the hub is remembered (under the cache directory), and for how long: the next
#: starts within that time skip the hub (a firewalled machine can take tens of seconds per model to time out) and
#: say so. Deleting the file makes the next start try again at once.
UNREACHABLE_FILE = Path("hub") / ".unreachable.json"
HUB_RETRY_SECONDS = 3600.0


class ModelSourceError(RuntimeError):
    """The configured model cannot be found; the message says what was tried."""


@dataclass(frozen=True)
class ResolvedModel:
    requested: str
    path: Path
    origin: Origin

    @property
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    @property
    def is_offline_stand_in(self) -> bool:
        return (self.path / OFFLINE_MARKER).exists()


def _banner(lines: list[str], log: Log) -> None:
    width = max(len(line) for line in lines) + 4
    log("!" * width)
    for line in lines:
        log(f"! {line.ljust(width - 4)} !")
    log("!" * width)


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _download(repo_id: str, dest: Path, log: Log) -> Path:
    """Download a hub snapshot into `dest`; raises ConnectionError when the hub cannot be reached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    log(f"downloading {repo_id} from the Hugging Face hub into {dest}")
    try:
        snapshot_download(
            repo_id,
            local_dir=str(dest),
            allow_patterns=["*.json", "*.jinja", "*.safetensors", "*.txt", "*.model", "1_Pooling/*", "2_Normalize/*"],
        )
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise ModelSourceError(f"{repo_id}: {exc}") from exc
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise ConnectionError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
    return dest


def _download_unless_unreachable(repo_id: str, dest: Path, cache_dir: Path, log: Log) -> Path:
    """`_download`, unless the hub was found unreachable less than HUB_RETRY_SECONDS ago (then ConnectionError at
    once, with when and why). A failure is remembered, a success forgets it."""
    marker = cache_dir / UNREACHABLE_FILE
    try:
        seen = json.loads(marker.read_text())
        since = time.time() - float(seen["time"])
    except (OSError, ValueError, KeyError, TypeError):
        seen, since = None, None
    if seen is not None and since is not None and 0 <= since < HUB_RETRY_SECONDS:
        retry = time.strftime("%H:%M", time.localtime(float(seen["time"]) + HUB_RETRY_SECONDS))
        log(f"not trying the hub for {repo_id}: it was unreachable {since / 60:.0f} min ago; it is tried again from "
            f"{retry} (delete {marker} to try now)")  # fmt: skip
        raise ConnectionError(str(seen.get("error", "unreachable")))
    try:
        path = _download(repo_id, dest, log)
    except ConnectionError as exc:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"time": time.time(), "error": str(exc)}))
        raise
    marker.unlink(missing_ok=True)
    return path


def resolve_model(
    spec: str,
    kind: Literal["embed", "rerank", "docling"],
    cache_dir: Path,
    offline_fallback: bool,
    log: Log = _log.info,
) -> ResolvedModel:
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelSourceError(f"{local} has no config.json: not a Hugging Face model directory")
        return ResolvedModel(spec, local.resolve(), "local")
    if not _looks_like_hub_id(spec):
        raise ModelSourceError(f"{spec!r} is neither an existing directory nor a hub id of the form org/name")
    dest = cache_dir / "hub" / spec.replace("/", "--")
    try:
        return ResolvedModel(spec, _download_unless_unreachable(spec, dest, cache_dir, log), "hub")
    except ConnectionError as exc:
        if (dest / "config.json").exists():
            log(f"the hub is unreachable ({exc}); using the copy of {spec} downloaded earlier at {dest}")
            return ResolvedModel(spec, dest, "hub")
        if not offline_fallback:
            raise ModelSourceError(f"cannot download {spec}: {exc}; offline fallback is off") from exc
        stand_in = "granite-docling (Idefics3)" if kind == "docling" else f"Qwen3 {kind}"
        _banner(
            [
                f"The Hugging Face hub cannot be reached ({exc}).",
                f"{spec} is NOT available: falling back to a tiny RANDOM-WEIGHT {stand_in} model.",
                "Its outputs are noise. Set a local model directory in rag.toml for real results.",
            ],
            log,
        )
        if kind == "docling":
            path = build_random_granite_docling(cache_dir / "offline" / "tiny-granite-docling", cache_dir, log=log)
        else:
            path = build_tiny_qwen3(kind, cache_dir / "offline" / f"tiny-qwen3-{kind}", cache_dir, log)
        return ResolvedModel(spec, path, "offline")

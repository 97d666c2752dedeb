"""Logging with the model's name on each line, the way every process of ours writes its log.

Inside Triton a python model's stdout is tritonserver's log, so lines go to stdout as `<model>: <message>`
(core/load_phases.py reads cold loads back from them; tools/bench_router.py prints the phases). Elsewhere (the
launcher, `prepare`, tools) the same loggers write plain messages to stderr.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

ROOT = "triton_rag"
_configured = False


class _ModelPrefix(logging.LoggerAdapter):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{self.extra['model'] if self.extra else ''}: {msg}", kwargs


#: What the helpers of a stub or a command take to write their lines with (a model_logger, or a module's logger).
Logger = logging.Logger | logging.LoggerAdapter


class _StandardStream(logging.StreamHandler):
    """Writes to sys.stdout or sys.stderr as they are at each line (a redirect or a test's capture made later)."""

    def __init__(self, name: str) -> None:
        self._stream_name = name
        super().__init__()

    @property
    def stream(self) -> Any:
        return getattr(sys, self._stream_name)

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure(stream: Any = "stderr", level: int = logging.INFO, fmt: str = "%(message)s") -> None:
    """One handler on the package's root logger (idempotent): plain messages (`fmt`), flushed per line, to `stream`
    ("stdout", "stderr": whatever sys.stdout or sys.stderr is when a line is written; or a file object). The
    launcher calls it once (cli.main: stderr, `[triton-rag] ` before each line); a stub through model_logger
    (stdout)."""
    global _configured
    if _configured:
        return
    handler = _StandardStream(stream) if isinstance(stream, str) else logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger(ROOT)
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    _configured = True


def model_logger(model_name: str, module: str = ROOT) -> logging.LoggerAdapter:
    """A logger whose lines start with `<model_name>: ` and go to stdout: inside a Triton stub, the server log."""
    configure("stdout")
    return _ModelPrefix(logging.getLogger(module), {"model": model_name})

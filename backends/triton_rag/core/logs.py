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


class _ModelPrefix(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{self.extra['model'] if self.extra else ''}: {msg}", kwargs


def configure(stream: Any = None, level: int = logging.INFO) -> None:
    """One handler on the package's root logger (idempotent): plain messages, flushed per line."""
    global _configured
    if _configured:
        return
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger(ROOT)
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    _configured = True


def model_logger(model_name: str, module: str = ROOT) -> logging.LoggerAdapter:  # type: ignore[type-arg]
    """A logger whose lines start with `<model_name>: ` and go to stdout: inside a Triton stub, the server log."""
    configure(sys.stdout)
    return _ModelPrefix(logging.getLogger(module), {"model": model_name})

"""Generate the model repository from the settings: resolve models, place artifacts, write every config.pbtxt.

The layout (docs/CONTRACT.md has the tensors):

    model_repository/
      qwen_embed/            python, client-facing: tokenize, BLS to the encoder, Matryoshka + normalise
        1/model.py 1/tokenizer/
      qwen_embed_encoder/    compute: python+torch (1/model.py, 1/hf/) or tensorrt_plan (1/model.plan)
      qwen_rerank/           python, client-facing: reranker prompt, BLS to the encoder, P(yes)
      qwen_rerank_encoder/   compute: as above, with the 2-row yes/no head
      docling/ docling_document/ docling_vlm/ (docling_vision/)   document conversion (build.docling_repository)
      router/                python: loads compute models on first use under the memory budget (docs/ROUTER.md)

Each section is prepared by its own module (build.encoders, build.docling_repository) from one `BuildContext` and
returns a typed record (build.prepared); the parameters in each config.pbtxt are rendered from contract.params.
Start-up loads the light models only (endpoints and router, `startup_models()`); the router loads compute models.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from triton_rag import contract
from triton_rag.build.docling_repository import prepare_docling
from triton_rag.build.encoders import clamp_embed_dim, prepare_embed, prepare_rerank
from triton_rag.build.fit import Memory, check_prepared, detect_gpu_memory
from triton_rag.build.plans import Host, detect_host
from triton_rag.build.prepared import (
    MODEL_PY,
    BuildContext,
    Log,
    Prepared,
    RepositoryError,
    model_py_source,
    write_model,
)
from triton_rag.build.settings import RouterSettings, Settings
from triton_rag.contract.params import RouterParameters
from triton_rag.core.measurements import ram_total

__all__ = [
    "ENGINES_DIR",
    "MODEL_PY",
    "PREPARED_FILE",
    "BuildContext",
    "Prepared",
    "RepositoryError",
    "clamp_embed_dim",
    "model_py_source",
    "prepare_docling",
    "prepare_embed",
    "prepare_repository",
    "prepare_rerank",
    "prepare_router",
    "startup_models",
]

_log = logging.getLogger(__name__)

PREPARED_FILE = ".prepared.json"
#: Built engines, one folder per compute model (tools/export_onnx.py writes here; docs/ENGINES.md).
ENGINES_DIR = "engines"


def prepare_router(settings: RouterSettings, repository: Path, prepared: Iterable[Prepared]) -> None:
    """The router, managing the compute model of each record."""
    parameters = RouterParameters(settings, tuple(record.managed_model() for record in prepared))
    write_model(repository, contract.router(), parameters)


def prepare_repository(
    settings: Settings,
    repository: Path,
    cache_dir: Path,
    log: Log = _log.info,
    endpoints: tuple[str, ...] = ("embed", "rerank", "docling"),
    host: Host | None = None,
    engines_dir: Path | None = None,
    memory: Memory | None = None,
) -> dict[str, Prepared]:
    """Make `repository` servable for `settings`; returns what was prepared per section ("embed", "rerank",
    "docling"), also written as JSON with the models to load at start-up. Built engines are looked for in
    `engines_dir` (default `<cache>/engines`) and checked against `host` (default: this machine). FitError when a
    compute model cannot fit the budget the router will have on `memory` (default: this machine's) even alone."""
    repository.mkdir(parents=True, exist_ok=True)
    context = BuildContext(
        repository=repository,
        cache_dir=cache_dir,
        offline_fallback=settings.offline_fallback,
        log=log,
        router=contract.ROUTER if settings.router.enabled else "",
        host=host or detect_host(),  # which built engines can load here: decided once for every section
        engines_dir=engines_dir or cache_dir / ENGINES_DIR,
        device_memory_cap=settings.router.device_memory_cap(),
        release_context_asleep=settings.router.enabled and settings.router.sleep_releases_context,
    )
    prepared: dict[str, Prepared] = {}
    if "embed" in endpoints:
        prepared["embed"] = prepare_embed(context, settings.embed)
    if "rerank" in endpoints:
        prepared["rerank"] = prepare_rerank(context, settings.rerank)
    if "docling" in endpoints:
        prepared["docling"] = prepare_docling(context, settings.docling)
    memory = memory or Memory.serving(settings.router, detect_gpu_memory(), ram_total())
    check_prepared(settings.router, prepared.values(), repository, memory)
    startup = [name for record in prepared.values() for name in (*record.endpoints, *record.also_load)]
    if context.router:
        prepare_router(settings.router, repository, prepared.values())
        startup.append(contract.ROUTER)
    else:
        shutil.rmtree(repository / contract.ROUTER / "1" / "__pycache__", ignore_errors=True)
        (repository / contract.ROUTER / "config.pbtxt").unlink(missing_ok=True)
        startup += [record.compute_model for record in prepared.values()]
    summary = {"endpoints": {name: record.to_json() for name, record in prepared.items()}, "startup_models": startup}
    (repository / PREPARED_FILE).write_text(json.dumps(summary, indent=2))
    return prepared


def startup_models(repository: Path) -> list[str]:
    """The models to load when the server starts: light ones only when the router manages the compute models."""
    path = repository / PREPARED_FILE
    if not path.exists():
        raise RepositoryError(f"{repository} has not been prepared (no {PREPARED_FILE}): run `make prepare`")
    return list(json.loads(path.read_text())["startup_models"])

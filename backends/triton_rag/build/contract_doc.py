"""Render docs/CONTRACT.md from contract/tensors.py, so the documented tensor contract is the one the configs use."""

from __future__ import annotations

import sys

from triton_rag import contract
from triton_rag.contract import ModelContract, TensorSpec

HEADER = """# Tensor contract

Generated from `backends/triton_rag/contract/tensors.py` by `python -m triton_rag.build.contract_doc > docs/CONTRACT.md`
(a test fails when the two differ). Dims exclude the batch dimension wherever `max_batch_size > 0`, so a request
carries `[rows, *dims]`; the router is not batched. String tensors are `TYPE_STRING` in config.pbtxt and `BYTES`
on the wire.

`H` is the encoder's hidden size and `D` the configured embedding size (`embed.dim`, default 2000, clamped to
32..H). Client-facing endpoints are python models with a dynamic batcher; encoders are compute engines with the
same contract whatever runs them (python + PyTorch, python + TensorRT-RTX for RTX 50, or `tensorrt_plan` where
TensorRT plans are built; docs/ENGINES.md).
"""


def _dims(spec: TensorSpec, names: dict[int, str]) -> str:
    return "[" + ", ".join(names.get(d, str(d)) for d in spec.dims) + "]"


def _table(specs: tuple[TensorSpec, ...], names: dict[int, str]) -> list[str]:
    rows = ["| tensor | type | dims | meaning |", "| --- | --- | --- | --- |"]
    for spec in specs:
        optional = " (optional)" if spec.optional else ""
        rows.append(f"| `{spec.name}`{optional} | {spec.data_type} | {_dims(spec, names)} | {spec.doc} |")
    return rows


def _section(model: ModelContract, names: dict[int, str]) -> list[str]:
    role = "client-facing" if model.client_facing else "compute engine"
    if model.name == contract.ROUTER:
        role = "control, see docs/ROUTER.md"
    batching = f"max_batch_size {model.max_batch_size}"
    if model.max_batch_size == 0:
        batching += " (not batched: dims are the whole shape)"
    if model.dynamic_batching:
        preferred, delay = model.dynamic_batching
        batching += f"; dynamic batching: preferred {list(preferred)}, max queue delay {delay} us"
    presets = contract.BATCHING.get(model.name)
    if presets:  # the contract above is the default preset's; rag.toml's `batching` picks another
        others = [
            f'`batching = "{name}"`: max_batch_size {chosen.max_batch_size}, preferred {list(chosen.preferred)}, '
            f"max queue delay {chosen.max_queue_delay_us} us"
            for name, chosen in presets.items()
            if name != "project"
        ]
        batching += ' (`batching = "project"`, the default; ' + "; ".join(others) + ")"
    lines = [f"## `{model.name}` ({role})", "", model.doc, "", batching]
    lines += ["", "Inputs:", "", *_table(model.inputs, names), "", "Outputs:", "", *_table(model.outputs, names), ""]
    return lines


def render() -> str:
    dim_marker, hidden_marker = 2**31 - 1, 2**31 - 2  # placeholders that no real dim takes
    names = {dim_marker: "D", hidden_marker: "H"}
    models = [
        contract.embed_endpoint(dim_marker),
        contract.rerank_endpoint(),
        contract.with_residency(contract.embed_encoder(hidden_marker)),  # RESIDENCY: python/torch variant only
        contract.with_residency(contract.rerank_encoder()),
        contract.router(),
        contract.docling_endpoint(),
        contract.docling_document_endpoint(),
        contract.docling_vlm(),
        contract.docling_vision(hidden_marker),
    ]
    lines = [HEADER]
    for model in models:
        lines += _section(model, names)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())  # the document itself: `python -m triton_rag.build.contract_doc > docs/CONTRACT.md`

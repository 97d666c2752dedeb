"""Render a `ModelContract` into Triton's model configuration, built as the real `ModelConfig` protobuf so that a
config that Triton would reject cannot be written."""

from __future__ import annotations

from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from triton_rag.contract import ModelContract, TensorSpec

InstanceKind = Literal["KIND_CPU", "KIND_GPU"]


def _tensor(spec: TensorSpec, message: type) -> object:
    tensor = message(name=spec.name, data_type=mc.DataType.Value(spec.data_type), dims=list(spec.dims))
    if spec.optional:
        tensor.optional = True
    return tensor


def build_config(
    contract: ModelContract,
    *,
    backend: str | None = None,
    platform: str | None = None,
    instance_kind: InstanceKind = "KIND_CPU",
    instance_count: int = 1,
    parameters: dict[str, str] | None = None,
) -> mc.ModelConfig:
    if (backend is None) == (platform is None):
        raise ValueError("give exactly one of backend or platform")
    config = mc.ModelConfig(name=contract.name, max_batch_size=contract.max_batch_size)
    if backend is not None:
        config.backend = backend
    else:
        config.platform = platform
    config.input.extend(_tensor(spec, mc.ModelInput) for spec in contract.inputs)
    config.output.extend(_tensor(spec, mc.ModelOutput) for spec in contract.outputs)
    config.instance_group.append(
        mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.Kind.Value(instance_kind), count=instance_count)
    )
    if contract.dynamic_batching is not None:
        preferred, delay_us = contract.dynamic_batching
        config.dynamic_batching.preferred_batch_size.extend(preferred)
        config.dynamic_batching.max_queue_delay_microseconds = delay_us
    for key, value in sorted((parameters or {}).items()):
        config.parameters[key].string_value = value
    return config


def render(config: mc.ModelConfig, header: str) -> str:
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + text_format.MessageToString(config)


def parse(text: str) -> mc.ModelConfig:
    """Parse config.pbtxt text with Triton's own schema (raises on unknown fields or bad values)."""
    return text_format.Parse(text, mc.ModelConfig())

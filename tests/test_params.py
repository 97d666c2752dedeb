"""The models' typed parameters (contract.params): each kind survives render -> parse unchanged, a bad value is
refused with its parameter's name (in config.pbtxt and in rag.toml alike), and each default has one source that
rag.toml's settings, the parameters and core's document limits share."""

from __future__ import annotations

import dataclasses
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import pytest
from hypothesis import given
from hypothesis import strategies as st

from triton_rag.build.settings import DoclingSettings, EmbedSettings, RerankSettings, load_settings
from triton_rag.contract import DEFAULT_EMBED_DIM
from triton_rag.contract.fields import parameter_names
from triton_rag.contract.params import (
    TOKEN_ID,
    DoclingDocumentParameters,
    DoclingPageParameters,
    EmbedEndpointParameters,
    EncoderParameters,
    Parameters,
    Pooling,
    RerankEndpointParameters,
    SettingsError,
    Task,
    TorchEncoderOptions,
    VlmParameters,
)
from triton_rag.core import limits, pdf

TOKEN_IDS = st.integers(0, 2**31 - 1)


def _values(hint: Any, field: dataclasses.Field) -> st.SearchStrategy[Any]:
    """Any valid value of a field, from its type (positive ints, token ids from 0, floats from 0)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        (inner,) = [arg for arg in args if arg is not type(None)]
        return st.none() | _values(inner, field)
    if origin is Literal:
        return st.sampled_from(args)
    if dataclasses.is_dataclass(hint):
        return parameters(hint)  # type: ignore[arg-type]
    if origin is tuple:
        item = _values(args[0], field)
        return st.lists(item, max_size=6).map(tuple) if args[-1] is Ellipsis else st.tuples(*[item] * len(args))
    if hint is bool:
        return st.booleans()
    if hint is int:
        return TOKEN_IDS if field.metadata == TOKEN_ID else st.integers(1, 2**62)
    if hint is float:
        return st.floats(min_value=0, allow_nan=False, allow_infinity=False)
    assert hint is str, hint
    return st.text()


def parameters(cls: type, **fixed: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    hints = get_type_hints(cls)
    return st.builds(cls, **{f.name: _values(hints[f.name], f) for f in dataclasses.fields(cls)} | fixed)


TORCH = parameters(TorchEncoderOptions)
TASKS = st.sampled_from(get_args(Task))
POOLINGS = st.sampled_from(get_args(Pooling))
#: The three forms: an embedder or a reranker on the PyTorch engine, or a built TensorRT-RTX engine.
ENCODERS = st.one_of(
    parameters(EncoderParameters, task=st.just("embed"), pooling=POOLINGS, pytorch=TORCH, engine_file=st.none()),
    parameters(EncoderParameters, task=st.just("rerank"), yes_no_ids=st.tuples(TOKEN_IDS, TOKEN_IDS), pytorch=TORCH,
               engine_file=st.none()),
    parameters(EncoderParameters, task=TASKS, pooling=st.none(), yes_no_ids=st.none(), pytorch=st.none(),
               engine_file=st.text()),
)  # fmt: skip
STRATEGIES: dict[type, st.SearchStrategy[Any]] = {
    EmbedEndpointParameters: parameters(EmbedEndpointParameters),
    RerankEndpointParameters: parameters(RerankEndpointParameters),
    EncoderParameters: ENCODERS,
    TorchEncoderOptions: TORCH,
    DoclingPageParameters: parameters(DoclingPageParameters),
    DoclingDocumentParameters: parameters(DoclingDocumentParameters),
    VlmParameters: parameters(VlmParameters),
}


def test_every_parameters_class_has_a_strategy() -> None:
    import triton_rag.contract.params as module

    classes = {
        value
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, Parameters) and dataclasses.is_dataclass(value)
    }
    assert classes - {module.TextEndpointParameters} == set(STRATEGIES)


@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda cls: cls.__name__)
@given(data=st.data())
def test_parameters_round_trip_through_config_strings(cls: type[Parameters], data: st.DataObject) -> None:
    value = data.draw(STRATEGIES[cls])
    rendered = value.render()
    assert all(isinstance(text, str) for text in rendered.values())
    assert set(rendered) <= parameter_names(cls)
    assert cls.parse(rendered) == value


def test_the_encoder_variants_carry_their_own_parameters_only() -> None:
    rtx = EncoderParameters(task="embed", engine_file="model.engine")
    assert rtx.render() == {"task": "embed", "engine_file": "model.engine"}
    assert EncoderParameters.parse(rtx.render()).pytorch is None
    torch = EncoderParameters(task="rerank", yes_no_ids=(2152, 9693), pytorch=TorchEncoderOptions(sleepable=True))
    assert torch.render() == {
        "task": "rerank",
        "yes_no_ids": "2152,9693",
        "dtype": "auto",
        "precision": "auto",
        "compile": "true",
        "max_batch_tokens": "32768",
        "sleepable": "true",
        "device_memory_cap": "0",
        "embedding_table": "device",
        "release_context_asleep": "false",
    }
    assert EncoderParameters.parse({**torch.render(), "embedding_table": "host"}).pytorch == TorchEncoderOptions(
        sleepable=True, embedding_table="host"
    )
    # a nested field left out takes its default; Triton's own parameters are passed over; "" is no token id
    parsed = EncoderParameters.parse(
        {"task": "embed", "pooling": "mean", "dtype": "float32", "EXECUTION_ENV_PATH": "x"}
    )
    assert parsed.pytorch == TorchEncoderOptions(dtype="float32")
    assert DoclingPageParameters.parse({"eos_token_id": ""}).eos_token_id is None
    assert VlmParameters.parse({"stop_ids": ""}).stop_ids == ()


@pytest.mark.parametrize(
    ("cls", "parameters", "message"),
    [
        (EmbedEndpointParameters, {"max_length": "many"}, r"\[qwen_embed\] max_length must be an integer, got 'many'"),
        (EmbedEndpointParameters, {"dim": "0"}, r"\[qwen_embed\] dim must be positive, got 0"),
        (EmbedEndpointParameters, {"overflow": "drop"}, r"overflow must be one of \('reject', 'truncate'\)"),
        (EmbedEndpointParameters, {"colour": "blue"}, r"\[qwen_embed\] unknown parameters \['colour'\]"),
        (RerankEndpointParameters, {"max_batch_tokens": "1.5"}, "max_batch_tokens must be an integer"),
        (EncoderParameters, {}, r"\[encoder\] the parameter task is missing"),
        (EncoderParameters, {"task": "classify"}, r"task must be one of \('embed', 'rerank'\)"),
        (EncoderParameters, {"task": "embed", "pooling": "max", "dtype": "auto"}, "pooling must be one of"),
        (EncoderParameters, {"task": "embed", "pooling": "mean", "compile": "maybe"}, "compile must be true or false"),
        (EncoderParameters, {"task": "embed", "pooling": "mean", "precision": "int4"}, "precision must be one of"),
        (EncoderParameters, {"task": "embed", "dtype": "auto"}, "pooling is missing"),
        (EncoderParameters, {"task": "rerank", "dtype": "auto"}, "yes_no_ids is missing"),
        (
            EncoderParameters,
            {"task": "rerank", "yes_no_ids": "1,2,3", "dtype": "auto"},
            "yes_no_ids must have 2 values",
        ),
        (EncoderParameters, {"task": "rerank", "yes_no_ids": "-1,2", "dtype": "auto"}, "yes_no_ids must be zero or"),
        (EncoderParameters, {"task": "embed"}, "engine_file .neither given"),
        (EncoderParameters, {"task": "embed", "engine_file": "e", "sleepable": "true"}, "engine_file .both given"),
        (DoclingPageParameters, {"eos_token_id": "end"}, r"\[docling\] eos_token_id must be an integer"),
        (DoclingPageParameters, {"max_new_tokens": "-5"}, "max_new_tokens must be positive, got -5"),
        (DoclingDocumentParameters, {"dpi": "fast"}, r"\[docling_document\] dpi must be a number, got 'fast'"),
        (DoclingDocumentParameters, {"dpi": "-1"}, "dpi must be zero or more"),
        (DoclingDocumentParameters, {"max_pages": "0"}, "max_pages must be positive"),
        (VlmParameters, {"stop_ids": "1,a"}, r"\[docling_vlm\] stop_ids must be an integer, got 'a'"),
        (VlmParameters, {"dtype": "int8"}, "dtype must be one of"),
        (VlmParameters, {"device_memory_cap": "-1"}, "device_memory_cap must be zero or more"),
        (EncoderParameters, {"task": "embed", "pooling": "mean", "device_memory_cap": "16GiB"}, "must be an integer"),
    ],
)
def test_bad_parameters_are_refused_with_their_name(
    cls: type[Parameters], parameters: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        cls.parse(parameters)


def test_bad_values_are_refused_on_construction_and_in_rag_toml() -> None:
    with pytest.raises(SettingsError, match=r"\[qwen_embed\] max_length must be positive"):
        EmbedEndpointParameters(max_length=0)
    with pytest.raises(SettingsError, match=r"\[docling_vlm\] dtype must be one of"):
        VlmParameters(dtype="int8")  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match=r"\[embed\] compile must be true or false, got 'maybe'"):
        load_settings(None, ["embed.compile=maybe"])
    with pytest.raises(SettingsError, match=r"\[rerank\] precision must be one of"):
        load_settings(None, ["rerank.precision=int4"])
    assert load_settings(None, ["embed.compile=off", "docling.dpi=72"]).embed.compile is False


def test_defaults_have_one_source() -> None:
    """rag.toml's settings, the models' parameters and core's document limits agree, each default written once."""
    torch = TorchEncoderOptions()
    for settings, endpoint in (
        (EmbedSettings(), EmbedEndpointParameters()),
        (RerankSettings(), RerankEndpointParameters()),
    ):
        assert (settings.max_length, settings.overflow) == (endpoint.max_length, endpoint.overflow)
        assert settings.max_batch_tokens == endpoint.max_batch_tokens == torch.max_batch_tokens
        assert (settings.dtype, settings.precision, settings.compile) == (torch.dtype, torch.precision, torch.compile)
    assert EmbedSettings().dim == EmbedEndpointParameters().dim == DEFAULT_EMBED_DIM
    assert RerankSettings().default_instruction == RerankEndpointParameters().default_instruction
    docling, page, document = DoclingSettings(), DoclingPageParameters(), DoclingDocumentParameters()
    assert pdf.Limits is limits.Limits  # core.pdf's Limits are core.limits'
    default = limits.Limits()
    settings_limits = limits.Limits(
        docling.max_document_bytes, docling.max_pages, docling.max_image_pixels, docling.dpi
    )  # fmt: skip
    assert settings_limits == document.limits() == page.limits() == default
    assert (docling.prompt, docling.max_new_tokens) == (page.prompt, page.max_new_tokens)
    assert docling.dtype == VlmParameters().dtype
    # the resolved pooling of the parameters is one of the settings' choices ("auto" is resolved at build time)
    assert set(get_args(Pooling)) < set(get_args(get_type_hints(EmbedSettings)["pooling"]))

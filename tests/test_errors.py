"""Status codes end to end (core/errors.py, triton/common.py): the client's mistake is INVALID_ARG with a message
that names it, a model that cannot be had is UNAVAILABLE, our own failure is INTERNAL with a reference into the
server log; no Python repr or traceback ever reaches the client.

The mapping itself is checked without a server; then one real tritonserver (CPU, the tiny Qwen3 embedder) with the
router (reconciling only when asked, so the endpoint's retry is what notices a vanished encoder), a copy of the
embed endpoint without the router (what a deployment without it runs), and a fault-injecting model that fails
inside the endpoints' own execute path (`execute_jointly`) the way a bug would.
"""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.harness import CACHE_DIR, RunningServer, embed, start_server, strings, wait_for
from triton_rag import contract
from triton_rag.build.repository import prepare_repository
from triton_rag.build.settings import EmbedSettings, RouterSettings, Settings
from triton_rag.core.errors import (
    BadInput,
    Forbidden,
    Internal,
    RequestError,
    TimedOut,
    TooLarge,
    Unavailable,
    client_message,
    from_model,
)
from triton_rag.core.pdf import Limits, open_image, render_pdf
from triton_rag.core.text import InputError

ENCODER = contract.EMBED_ENCODER
ENDPOINT = contract.EMBED_ENDPOINT
DIRECT = "qwen_embed_direct"  # the embed endpoint without the router
BROKEN = "broken"
MAX_LENGTH = 64
#: What must never reach a client: a traceback, an exception's repr, an object's address.
LEAKS = re.compile(r"Traceback|File \"|\b\w+(Error|Exception)\(|object at 0x|0x[0-9a-f]{8,}")
REFERENCE = re.compile(r"^internal error \(server log reference ([0-9a-f]{8})\); the server log has the details$")
SECRET = "the engine lost its state"
#: Fault injection, not a mock of what is tested: the endpoints' execute path (parse, compute, respond) with a
#: compute step that fails the way a bug does, with an exception whose text carries a repr.
BROKEN_PY = textwrap.dedent(
    f"""
    import numpy as np
    import triton_python_backend_utils as pb_utils
    from triton_rag.triton.common import execute_jointly, read_strings, stub_logger

    class TritonPythonModel:
        def initialize(self, args):
            self.log = stub_logger(args)

        def execute(self, requests):
            return execute_jointly(requests, self.parse, self.compute, self.respond, log=self.log)

        def parse(self, request):
            return read_strings(request, "TEXT")

        def compute(self, rows):
            raise RuntimeError(f"{SECRET}: {{object()!r}}")

        def respond(self, rows, results):
            out = np.array([[row.encode()] for row in rows], dtype=np.object_)
            return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUT", out)])
    """
)
BROKEN_CONFIG = f"""name: "{BROKEN}"
backend: "python"
max_batch_size: 0
input [ {{ name: "TEXT" data_type: TYPE_STRING dims: [ -1, 1 ] }} ]
output [ {{ name: "OUT" data_type: TYPE_STRING dims: [ -1, 1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""


# --- the mapping, without a server ----------------------------------------------------------------------------


def test_each_error_carries_its_triton_code() -> None:
    assert InputError is BadInput
    assert issubclass(TooLarge, BadInput) and issubclass(Forbidden, BadInput) and issubclass(BadInput, ValueError)
    assert issubclass(TimedOut, Unavailable)
    expected: dict[type[RequestError], str] = {BadInput: "INVALID_ARG", TooLarge: "INVALID_ARG"}
    expected |= {Forbidden: "INVALID_ARG"}
    expected |= {Unavailable: "UNAVAILABLE", TimedOut: "UNAVAILABLE", Internal: "INTERNAL"}
    for kind, status in expected.items():
        assert issubclass(kind, RequestError) and kind.status == status, kind


def test_the_client_is_told_a_request_errors_message_and_never_a_repr() -> None:
    assert client_message(TooLarge("DOCUMENT has 9 pages, more than the limit of 4")) == (
        "DOCUMENT has 9 pages, more than the limit of 4"
    )
    bug = KeyError(f"{SECRET}: {object()!r}")
    message = client_message(bug, "0123abcd")
    assert message == "internal error (server log reference 0123abcd); the server log has the details"
    assert not LEAKS.search(message) and SECRET not in message


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("INVALID_ARG", BadInput),
        ("NOT_FOUND", Unavailable),
        ("UNAVAILABLE", Unavailable),
        ("CANCELLED", Unavailable),
        ("INTERNAL", Internal),
        ("UNKNOWN", Internal),
    ],
)
def test_a_bls_answer_keeps_its_code(code: str, kind: type[RequestError]) -> None:
    error = from_model(ENCODER, code, "what the model said")
    assert type(error) is kind and str(error) == f"{ENCODER}: what the model said"
    assert (error.model, error.code) == (ENCODER, code)


def test_limits_are_too_large_and_other_mistakes_bad_input(tmp_path: Path) -> None:
    limits = Limits(max_document_bytes=10_000, max_pages=1, max_image_pixels=1_000)
    image = tmp_path / "page.png"
    Image.new("RGB", (50, 40), "white").save(image)
    with pytest.raises(TooLarge, match="2000 pixels, more than the limit of 1000"):
        open_image(image.read_bytes(), limits)
    with pytest.raises(TooLarge, match="bytes, more than the limit of 10000"):
        render_pdf(b"%PDF" + b" " * 10_000, limits)
    with pytest.raises(BadInput) as raised:
        render_pdf(b"", limits)
    assert not isinstance(raised.value, TooLarge)


# --- end to end -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def errors_server(tmp_path_factory: pytest.TempPathFactory, tiny_embed_dir: Path) -> Iterator[RunningServer]:
    repository = tmp_path_factory.mktemp("errors_repository")
    settings = Settings(
        embed=EmbedSettings(model=str(tiny_embed_dir), max_length=MAX_LENGTH),
        router=RouterSettings(reconcile_seconds=3600.0),  # reconciles only when asked: on an endpoint's retry
        offline_fallback=False,
    )
    prepare_repository(settings, repository, CACHE_DIR, endpoints=("embed",))
    config = (repository / ENDPOINT / "config.pbtxt").read_text()
    config = config.replace(f'name: "{ENDPOINT}"', f'name: "{DIRECT}"')
    direct, count = re.subn(r'(key: "router"\s*value \{\s*string_value: )"router"', r'\1""', config)
    assert count == 1, config
    shutil.copytree(repository / ENDPOINT / "1", repository / DIRECT / "1")
    (repository / DIRECT / "config.pbtxt").write_text(direct)
    (repository / BROKEN / "1").mkdir(parents=True)
    (repository / BROKEN / "config.pbtxt").write_text(BROKEN_CONFIG)
    (repository / BROKEN / "1" / "model.py").write_text(BROKEN_PY)
    prepared = json.loads((repository / ".prepared.json").read_text())
    prepared["startup_models"] += [DIRECT, BROKEN]
    (repository / ".prepared.json").write_text(json.dumps(prepared))
    yield from start_server(repository, tmp_path_factory.mktemp("logs") / "errors_server.log")


def rejected(
    server: RunningServer, model: str, inputs: list[grpcclient.InferInput], **kwargs: object
) -> tuple[str, str]:
    """(gRPC status, message) of a request that must fail; the message must hold no repr or traceback."""
    with pytest.raises(InferenceServerException) as raised:
        server.client().infer(model, inputs, **kwargs)
    status, message = str(raised.value.status()), str(raised.value.message())
    assert not LEAKS.search(message), message
    return status, message


def wait_unloaded(server: RunningServer, model: str) -> None:
    client = server.client()
    if client.is_model_ready(model):
        client.unload_model(model)
    wait_for(lambda: not client.is_model_ready(model), 60, f"{model} unloaded")


@pytest.mark.parametrize(
    ("texts", "instructions", "pattern"),
    [
        (["fine", "  "], None, r"^TEXT row 1 is empty$"),
        ([b"\xff\xfe bad"], None, r"^TEXT row 0 is not valid UTF-8 \(invalid start byte at byte 0\)$"),
        (None, ["an instruction"], r"^missing input TEXT$"),
        (
            ["fine", "word " * (2 * MAX_LENGTH)],
            None,
            rf"^row 1: input is \d+ tokens, more than max_length {MAX_LENGTH};",
        ),
    ],
)
def test_bad_input_is_invalid_arg_and_names_the_problem(
    errors_server: RunningServer, texts: list[str | bytes] | None, instructions: list[str] | None, pattern: str
) -> None:
    inputs = [] if texts is None else [strings("TEXT", texts)]  # type: ignore[arg-type]
    if instructions is not None:
        inputs.append(strings("INSTRUCTION", instructions))
    status, message = rejected(errors_server, ENDPOINT, inputs)
    assert status == "StatusCode.INVALID_ARGUMENT", (status, message)
    assert re.search(pattern, message), message


def test_a_control_request_without_the_admin_key_is_invalid_arg(errors_server: RunningServer) -> None:
    embed(errors_server, ["load the encoder"])  # through the router
    inputs = [grpcclient.InferInput(name, [1, 1], "INT64") for name in ("INPUT_IDS", "ATTENTION_MASK")]
    for tensor in inputs:
        tensor.set_data_from_numpy(np.ones((1, 1), dtype=np.int64))
    outputs = [grpcclient.InferRequestedOutput(contract.RESIDENCY_OUTPUT.name)]
    parameters = {contract.RESIDENCY_PARAMETER: "sleep"}
    status, message = rejected(errors_server, ENCODER, inputs, outputs=outputs, parameters=parameters)
    assert status == "StatusCode.INVALID_ARGUMENT" and "residency 'sleep' needs the admin key" in message


def test_a_compute_model_that_cannot_be_had_is_unavailable(errors_server: RunningServer) -> None:
    wait_unloaded(errors_server, ENCODER)
    status, message = rejected(errors_server, DIRECT, [strings("TEXT", ["no encoder"])])
    assert status == "StatusCode.UNAVAILABLE", (status, message)
    assert message.startswith(f"{ENCODER}: ") and "is not ready" in message, message
    # A retry once the model is back succeeds (here the router loads it for the endpoint that has one).
    embed(errors_server, ["the router loads it"])
    result = errors_server.client().infer(DIRECT, [strings("TEXT", ["now it is there"])])
    assert result.as_numpy("EMBEDDING").shape[0] == 1


def test_an_encoder_unloaded_behind_the_routers_back_is_loaded_again(errors_server: RunningServer) -> None:
    """The BLS call finds the encoder gone (Triton 2.51 answers INTERNAL, and the model is not ready: UNAVAILABLE);
    the endpoint has the router reconcile and load it, and the request succeeds."""
    embed(errors_server, ["resident"])
    lines_before = len(errors_server.log_path.read_text(errors="replace").splitlines())
    wait_unloaded(errors_server, ENCODER)  # the router's ledger still says ready: it reconciles hourly here
    assert embed(errors_server, ["after the unload"]).shape[0] == 1
    log = "\n".join(errors_server.log_path.read_text(errors="replace").splitlines()[lines_before:])
    assert f"{ENDPOINT}: {ENCODER} was not loaded (UNAVAILABLE); the router reconciles and loads it again" in log


def test_an_internal_failure_is_internal_with_a_reference_into_the_log(errors_server: RunningServer) -> None:
    status, message = rejected(errors_server, BROKEN, [strings("TEXT", ["anything"])])
    assert status == "StatusCode.INTERNAL", (status, message)
    match = REFERENCE.match(message)
    assert match is not None and SECRET not in message, message
    line = f"{BROKEN}: internal error {match.group(1)}: RuntimeError"
    wait_for(lambda: line in errors_server.log_path.read_text(errors="replace"), 10, "the reference in the log")
    after = errors_server.log_path.read_text(errors="replace").split(line, 1)[1]
    assert "Traceback (most recent call last)" in after and SECRET in after  # the details: in the log only
    # the model keeps serving: a request with bad input still gets its own code
    assert rejected(errors_server, BROKEN, [strings("TEXT", [b"\xff"])])[0] == "StatusCode.INVALID_ARGUMENT"

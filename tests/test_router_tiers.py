"""The router's host-RAM tier and its safety rules on the real tritonserver (CPU): evicted encoders sleep (weights to a
host copy, process kept) and wake to the same results; control actions need the admin key; a lease nobody releases
expires; a stub killed while asleep or while loading does not wedge its model; the server stays ready during swaps.

The encoders here have a 768-wide embedding table (~470 MB of float32 weights each), so that on this CPU machine the
weights, not the stub's Python and torch runtime, are most of what a model holds: sleeping frees a measurable share.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from tests.harness import (
    CACHE_DIR,
    RunningServer,
    assert_same_results,
    embed,
    rerank,
    router_metrics,
    start_server,
    wait_for,
)
from triton_rag import contract
from triton_rag.build.offline import TINY_QWEN3, build_random_qwen3
from triton_rag.build.repository import prepare_repository
from triton_rag.build.settings import EmbedSettings, RerankSettings, RouterSettings, Settings
from triton_rag.client import RouterControl
from triton_rag.core.load_phases import cold_loads
from triton_rag.triton.router.memory import STUB_NAME, stub_pids

pytestmark = pytest.mark.server

EMBED, RERANK = contract.EMBED_ENCODER, contract.RERANK_ENCODER
TEXTS = ["the host tier keeps the process", "weights go to host memory and come back"]
PAIRS = [("what does a sleeping model keep?", "its process and compiled code"), ("wake", "one copy back")]
WIDE = TINY_QWEN3 | {"hidden_size": 768}
LEASE_SECONDS = 4.0


@pytest.fixture(scope="module")
def tier_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    offline = CACHE_DIR / "offline"
    embed_dir = build_random_qwen3("embed", offline / "wide-qwen3-embed", CACHE_DIR, WIDE)
    rerank_dir = build_random_qwen3("rerank", offline / "wide-qwen3-rerank", CACHE_DIR, WIDE)
    router = RouterSettings(
        host_budget="4GiB",
        min_residency_seconds=0.5,
        reconcile_seconds=1.0,
        unload_timeout_seconds=6.0,
        lease_timeout_seconds=LEASE_SECONDS,
        queue_timeout_seconds=120.0,
    )
    settings = Settings(
        embed=EmbedSettings(model=str(embed_dir), max_length=128),
        rerank=RerankSettings(model=str(rerank_dir), max_length=128),
        router=router,
        offline_fallback=False,
    )
    repository = tmp_path_factory.mktemp("tier_repository")
    prepare_repository(settings, repository, CACHE_DIR, endpoints=("embed", "rerank"))
    yield from start_server(repository, tmp_path_factory.mktemp("logs") / "tier_server.log")


def control(server: RunningServer, key: str | None = None) -> RouterControl:
    return RouterControl(server.server.grpc_url, key=server.server.admin_key if key is None else key)


def status(server: RunningServer) -> dict[str, Any]:
    return control(server).status()


def model_state(server: RunningServer, name: str) -> str:
    return str(status(server)["models"][name]["state"])


class ReadinessWatcher:
    """Polls /v2/health/ready in the background; records every answer that was not 200."""

    def __init__(self, server: RunningServer) -> None:
        self.url = f"http://127.0.0.1:{server.server.ports.http}/v2/health/ready"
        self.samples = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if response.status != 200:
                        self.failures.append(str(response.status))
            except Exception as exc:
                self.failures.append(repr(exc))
            self.samples += 1
            time.sleep(0.02)

    def __enter__(self) -> ReadinessWatcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def references(tier_server: RunningServer) -> dict[str, np.ndarray]:
    """Both encoders loaded and awake under the automatic budget: every later result must equal these."""
    return {"embed": embed(tier_server, TEXTS), "rerank": rerank(tier_server, PAIRS)}


@pytest.fixture(scope="module")
def one_awake_budget(tier_server: RunningServer, references: dict[str, np.ndarray]) -> int:
    """Room for one encoder awake and the other asleep, not for both awake: the larger measured size, plus what
    the other holds without its weights, plus a quarter of its weights as margin."""
    models = status(tier_server)["models"]
    sizes = {name: models[name]["bytes"] for name in (EMBED, RERANK)}
    weights = {name: models[name]["weight_bytes"] for name in (EMBED, RERANK)}
    large = max(sizes, key=lambda name: sizes[name])
    (small,) = {EMBED, RERANK} - {large}
    budget = sizes[large] + (sizes[small] - weights[small]) + weights[small] // 4
    assert budget < sizes[large] + sizes[small]
    control(tier_server).set_budget(str(budget))
    wait_for(lambda: "asleep" in {model_state(tier_server, n) for n in (EMBED, RERANK)}, 60, "an encoder to sleep")
    return budget


def test_swaps_go_through_the_host_tier_and_give_the_same_results(
    tier_server: RunningServer, references: dict[str, np.ndarray], one_awake_budget: int
) -> None:
    server_pid = tier_server.server.process.pid  # type: ignore[union-attr]
    pids = {name: stub_pids(name, server_pid) for name in (EMBED, RERANK)}
    assert all(pids.values()), pids
    with ReadinessWatcher(tier_server) as readiness:
        for _ in range(2):
            assert_same_results(embed(tier_server, TEXTS), references["embed"])
            assert model_state(tier_server, EMBED) == "ready"
            assert_same_results(rerank(tier_server, PAIRS), references["rerank"])
            wait_for(lambda: model_state(tier_server, EMBED) == "asleep", 30, "the embedder to sleep")
    assert readiness.samples > 20 and readiness.failures == [], readiness.failures[:5]
    ledger = status(tier_server)
    embedder = ledger["models"][EMBED]
    assert embedder["tier"] == "host" and embedder["sleeps"] >= 2 and embedder["wakes"] >= 2
    assert embedder["host_bytes"] >= embedder["weight_bytes"] * 0.9 and embedder["last_wake_seconds"] is not None
    assert ledger["models"][RERANK]["tier"] == "gpu"
    assert ledger["occupied_bytes"] <= one_awake_budget
    assert 0 < ledger["host_occupied_bytes"] <= ledger["host_budget_bytes"]
    assert {name: stub_pids(name, server_pid) for name in (EMBED, RERANK)} == pids, "a swap reloaded a model"
    values = router_metrics(tier_server)
    assert values[f'rag_router_tier{{model="{EMBED}",tier="host"}}'] == 1.0
    assert values[f'rag_router_tier{{model="{RERANK}",tier="gpu"}}'] == 1.0
    assert values[f'rag_router_host_bytes{{model="{EMBED}"}}'] == embedder["host_bytes"]
    assert values[f'rag_router_wakes_total{{model="{EMBED}"}}'] >= 2


def test_the_log_shows_each_cold_load_phase_by_phase(
    tier_server: RunningServer, references: dict[str, np.ndarray]
) -> None:
    """What a benchmark tabulates (tools/bench_router.py): every router load in the server log with its stub's start,
    the checkpoint's read onto the device, the end of `initialize`, and the router's total, which covers them all."""
    loads = {load.model: load for load in cold_loads(tier_server.log_path.read_text(errors="replace"))}
    assert set(loads) >= {EMBED, RERANK}
    for load in (loads[EMBED], loads[RERANK]):
        phases = load.phases
        assert {"stub_start_s", "checkpoint_s", "initialized_at_s"} <= set(phases), phases
        assert load.total_s is not None and load.total_s + 0.1 >= phases["initialized_at_s"] > phases["stub_start_s"]
        assert load.unaccounted_s is not None and load.unaccounted_s >= -0.3  # phases fit inside initialize


def test_control_actions_need_the_admin_key(tier_server: RunningServer, one_awake_budget: int) -> None:
    stranger = control(tier_server, key="")
    for action, models in (("PIN", [EMBED]), ("ACQUIRE", [EMBED]), ("PLAN", [EMBED]), ("RECONCILE", None)):
        with pytest.raises(InferenceServerException, match=f"{action} needs the admin key"):
            stranger.call(action, models)
    with pytest.raises(InferenceServerException, match="needs the admin key"):
        control(tier_server, key="not-the-key").pin(EMBED)
    assert stranger.status()["budget_bytes"] == one_awake_budget  # reading the ledger stays open
    with pytest.raises(InferenceServerException):  # Triton's restricted repository API: no key, no load
        stranger.client.load_model(EMBED)
    for action in ("sleep", "wake"):  # nor may a client sleep an encoder behind the router's back
        with pytest.raises(InferenceServerException, match=f"residency '{action}' needs the admin key"):
            encoder_residency(tier_server, RERANK, action)
    assert encoder_residency(tier_server, RERANK, "status")["state"] == "awake"


def encoder_residency(server: RunningServer, name: str, action: str) -> dict[str, Any]:
    """A control request sent straight to an encoder, without the key, as any client of the port could."""
    import tritonclient.grpc as grpcclient

    inputs = [grpcclient.InferInput(tensor, [1, 1], "INT64") for tensor in ("INPUT_IDS", "ATTENTION_MASK")]
    for tensor in inputs:
        tensor.set_data_from_numpy(np.ones((1, 1), dtype=np.int64))
    result = grpcclient.InferenceServerClient(server.server.grpc_url).infer(
        name,
        inputs,
        outputs=[grpcclient.InferRequestedOutput(contract.RESIDENCY_OUTPUT.name)],
        parameters={contract.RESIDENCY_PARAMETER: action},
    )
    return dict(json.loads(result.as_numpy(contract.RESIDENCY_OUTPUT.name).reshape(-1)[0]))


def test_a_lease_nobody_releases_expires(
    tier_server: RunningServer, references: dict[str, np.ndarray], one_awake_budget: int
) -> None:
    embed(tier_server, TEXTS)
    control(tier_server).acquire(EMBED)  # never released: the embedder stays in flight
    started = time.monotonic()
    assert_same_results(rerank(tier_server, PAIRS), references["rerank"])
    waited = time.monotonic() - started
    assert LEASE_SECONDS - 1.5 <= waited <= LEASE_SECONDS + 20, waited
    assert status(tier_server)["models"][EMBED]["in_flight"] == 0


def test_a_stub_killed_while_asleep_is_reloaded_on_the_next_request(
    tier_server: RunningServer, references: dict[str, np.ndarray], one_awake_budget: int
) -> None:
    rerank(tier_server, PAIRS)
    wait_for(lambda: model_state(tier_server, EMBED) == "asleep", 30, "the embedder to sleep")
    server_pid = tier_server.server.process.pid  # type: ignore[union-attr]
    for pid in stub_pids(EMBED, server_pid):
        os.kill(pid, signal.SIGKILL)
    assert_same_results(embed(tier_server, TEXTS), references["embed"])
    assert model_state(tier_server, EMBED) == "ready"


def _kill_stubs_of(server: RunningServer, model: str, after: float) -> tuple[threading.Thread, list[int]]:
    """A thread that SIGKILLs the model's next stub `after` seconds after it appears."""
    server_pid = server.server.process.pid  # type: ignore[union-attr]
    killed: list[int] = []

    def run() -> None:
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            pids = stub_pids(model, server_pid)
            if pids:
                time.sleep(after)
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.005)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, killed


def _unload_embedder(server: RunningServer) -> None:
    server.client().unload_model(EMBED)
    wait_for(lambda: model_state(server, EMBED) == "unloaded", 60, "the embedder unloaded")


def test_a_stub_killed_while_loading_fails_that_load_and_the_next_request_loads_it(
    tier_server: RunningServer, references: dict[str, np.ndarray], one_awake_budget: int
) -> None:
    """Killed inside the model's initialize (a second into the stub's life: the window a GPU load spends reading
    weights): Triton fails the load, the router fails the waiting request with the reason, the next one loads."""
    _unload_embedder(tier_server)
    killer, killed = _kill_stubs_of(tier_server, EMBED, after=1.0)
    with pytest.raises(InferenceServerException, match=f"loading {EMBED} failed.*not healthy"):
        embed(tier_server, TEXTS)
    killer.join()
    assert killed, "no stub of the embedder appeared to kill"
    assert_same_results(embed(tier_server, TEXTS), references["embed"])
    assert model_state(tier_server, EMBED) == "ready"


def test_a_stub_killed_before_it_starts_fails_fast_with_the_reason(
    tier_server: RunningServer, references: dict[str, np.ndarray], one_awake_budget: int
) -> None:
    """Dead before its first message to tritonserver, a stub leaves tritonserver 2.51 waiting for it without a
    timeout (later versions give up after 10 s, python_backend #408): the model stays LOADING until a restart. The
    router notices the dead stub, fails the waiting request within seconds instead of its queue timeout, and refuses
    later requests for that model at once with the reason; the other models keep serving, loads included. (Last in
    this module: the embedder cannot load again in this server.)"""
    _unload_embedder(tier_server)
    # The python backend runs a model's own `triton_python_backend_stub` where its directory has one: this one dies
    # at once, before any message, every time (a watcher killing the real stub could lose the race to its first one)
    stub = tier_server.repository / EMBED / STUB_NAME
    stub.write_text('#!/bin/sh\nkill -KILL $$\n')
    stub.chmod(0o755)
    started = time.monotonic()
    with pytest.raises(InferenceServerException, match="died while loading"):
        embed(tier_server, TEXTS)
    assert time.monotonic() - started < 60
    started = time.monotonic()
    stuck = "cannot load again until that load ends or tritonserver restarts"
    with pytest.raises(InferenceServerException, match=stuck):
        embed(tier_server, TEXTS)
    assert time.monotonic() - started < 5
    assert "died while loading" in status(tier_server)["models"][EMBED]["last_error"]
    assert_same_results(rerank(tier_server, PAIRS), references["rerank"])
    tier_server.client().unload_model(RERANK)  # a fresh load of another model is not held up by the stuck one
    wait_for(lambda: model_state(tier_server, RERANK) == "unloaded", 60, "the reranker unloaded")
    assert_same_results(rerank(tier_server, PAIRS), references["rerank"])
    assert model_state(tier_server, RERANK) == "ready"

"""The router on the real tritonserver: load on first use, a budget that fits one compute model, concurrency, PIN,
PLAN (prefetch and Belady eviction), reconciliation with Triton's repository API, faults and metrics.

The budget that fits one model is derived from what the router measured for each model (RSS of its stub process on
this CPU machine), then set at run time by loading the router with a config override, the way an operator would.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
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
from triton_rag.build.repository import Prepared, prepare_repository, prepare_router, startup_models
from triton_rag.build.settings import EmbedSettings, RerankSettings, RouterSettings, Settings
from triton_rag.client import RouterControl
from triton_rag.core.ledger import COUNTERS
from triton_rag.core.measurements import ram_total

pytestmark = pytest.mark.server

EMBED, RERANK = contract.EMBED_ENCODER, contract.RERANK_ENCODER
ENCODERS = (EMBED, RERANK)
TEXTS = ["routing keeps one model resident", "the budget fits one encoder"]
PAIRS = [("which model is resident?", "the router decides"), ("budget", "bytes of memory")]
#: Below half this machine's RAM (the automatic CPU budget), above every budget the tests set at run time.
DEVICE_MEMORY = "4GiB"

#: A compute model whose finalize outlives the router's unload timeout, so its memory is reported as unreleased.
STUBBORN = "stubborn"
STUBBORN_SECONDS = 30  # leaves ~20 s between the router's unload timeout and the stub's exit to observe
STUBBORN_MODEL_PY = f"""
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.ballast = np.ones(32 * 2**20, dtype=np.uint8)  # 32 MiB that the process really holds

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", np.zeros(1, np.float32))]) for _ in requests]

    def finalize(self):
        time.sleep({STUBBORN_SECONDS})
"""
STUBBORN_CONFIG = f"""
name: "{STUBBORN}"
backend: "python"
max_batch_size: 0
input [{{ name: "X" data_type: TYPE_FP32 dims: [1] }}]
output [{{ name: "Y" data_type: TYPE_FP32 dims: [1] }}]
instance_group [{{ kind: KIND_CPU count: 1 }}]
"""


@pytest.fixture(scope="module")
def embed_copy(tmp_path_factory: pytest.TempPathFactory, tiny_embed_dir: Path) -> Path:
    """A private copy of the tiny embedder whose weights the fault test may corrupt."""
    destination = tmp_path_factory.mktemp("weights") / "tiny-embed"
    shutil.copytree(tiny_embed_dir, destination)
    return destination


@pytest.fixture(scope="module")
def router_server(
    tmp_path_factory: pytest.TempPathFactory, embed_copy: Path, tiny_rerank_dir: Path
) -> Iterator[RunningServer]:
    repository = tmp_path_factory.mktemp("router_repository")
    # device_memory caps a GPU only: on this CPU machine the router must ignore it (and say so), the budget staying
    # half the RAM; the stubs get it too (a no-op without CUDA)
    router = RouterSettings(
        min_residency_seconds=0.5, reconcile_seconds=1.0, unload_timeout_seconds=6.0, device_memory=DEVICE_MEMORY
    )
    settings = Settings(
        embed=EmbedSettings(model=str(embed_copy), max_length=128),
        rerank=RerankSettings(model=str(tiny_rerank_dir), max_length=128),
        router=router,
        offline_fallback=False,
    )
    summary = prepare_repository(settings, repository, CACHE_DIR, endpoints=("embed", "rerank"))
    (repository / STUBBORN / "1").mkdir(parents=True)
    (repository / STUBBORN / "config.pbtxt").write_text(STUBBORN_CONFIG)
    (repository / STUBBORN / "1" / "model.py").write_text(STUBBORN_MODEL_PY)
    stubborn = Prepared(
        model=STUBBORN,
        path=repository / STUBBORN,
        origin="local",
        engine="python",
        compute_model=STUBBORN,
        endpoints=(STUBBORN,),
        estimate_bytes={"cpu": 2**28, "gpu": 2**28},
    )
    prepare_router(router, repository, [*summary.values(), stubborn])
    yield from start_server(repository, tmp_path_factory.mktemp("logs") / "router_server.log")


# --- helpers ------------------------------------------------------------------------------------------------


def router(server: RunningServer) -> RouterControl:
    return RouterControl(server.server.grpc_url, key=server.server.admin_key)


def control(server: RunningServer, action: str, models: list[str] | None = None, lease: int | None = None) -> Any:
    return router(server).call(action, models, lease)


def status(server: RunningServer) -> dict[str, Any]:
    return router(server).status()


def ready_in_index(server: RunningServer) -> set[str]:
    index = server.client().get_model_repository_index(as_json=True).get("models", [])
    return {m["name"] for m in index if m.get("state") == "READY"}


def set_budget(server: RunningServer, budget: str) -> None:
    router(server).set_budget(budget)
    assert status(server)["budget_bytes"] == int(budget)


class IndexWatcher:
    """Polls the repository index in the background and records the largest set of encoders READY at once."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.most: set[str] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            ready = ready_in_index(self.server) & set(ENCODERS)
            self.samples += 1
            if len(ready) > len(self.most):
                self.most = ready
            time.sleep(0.02)

    def __enter__(self) -> IndexWatcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


# --- tests, in the order a deployment meets them ---------------------------------------------------------------


def test_start_up_loads_only_light_models(router_server: RunningServer) -> None:
    ready = ready_in_index(router_server)
    assert ready == {contract.EMBED_ENDPOINT, contract.RERANK_ENDPOINT, contract.ROUTER}
    assert set(startup_models(router_server.repository)) == ready
    ledger = status(router_server)
    states = {name: m["state"] for name, m in ledger["models"].items()}
    assert states == dict.fromkeys([*ENCODERS, STUBBORN], "unloaded")


def test_the_device_memory_cap_applies_to_a_gpu_only(router_server: RunningServer) -> None:
    """On a GPU the cap lowers the budget (device memory capped, less the reserve: test_profiles); the router here
    budgets the RAM, which the cap does not limit: it is ignored, with a log line that says why."""
    ledger = status(router_server)
    assert ledger["budget_bytes"] == int(ram_total() * RouterSettings().cpu_budget_fraction) > 4 * 2**30
    assert ledger["memory"].startswith("RAM") and "device_memory" not in ledger["memory"]
    log = router_server.log_path.read_text(errors="replace")
    assert f"router: device_memory {DEVICE_MEMORY} ignored: it caps a GPU's memory" in log


@pytest.fixture(scope="module")
def reference_outputs(router_server: RunningServer) -> dict[str, np.ndarray]:
    """Results with both encoders resident under the default budget; every later result must equal them."""
    return {"embed": embed(router_server, TEXTS), "rerank": rerank(router_server, PAIRS)}


def test_first_use_loads_and_measures(router_server: RunningServer, reference_outputs: dict[str, np.ndarray]) -> None:
    ledger = status(router_server)
    for name in ENCODERS:
        model = ledger["models"][name]
        assert model["state"] == "ready" and model["loads"] == 1
        assert model["measured_bytes"] > 50 * 2**20, "RSS of a stub with torch is hundreds of MiB"
        assert model["measured_by"].startswith("cpu: stub processes")
    assert ledger["occupied_bytes"] == sum(ledger["models"][n]["measured_bytes"] for n in ENCODERS)


@pytest.fixture(scope="module")
def one_model_budget(router_server: RunningServer, reference_outputs: dict[str, np.ndarray]) -> int:
    sizes = [status(router_server)["models"][name]["measured_bytes"] for name in ENCODERS]
    budget = max(sizes) + min(sizes) // 2  # either fits, both do not
    set_budget(router_server, str(budget))
    wait_for(lambda: len(ready_in_index(router_server) & set(ENCODERS)) <= 1, 60, "the new budget to evict a model")
    return budget


def test_embed_rerank_embed_with_a_budget_that_fits_one(
    router_server: RunningServer, reference_outputs: dict[str, np.ndarray], one_model_budget: int
) -> None:
    before = router_metrics(router_server)
    with IndexWatcher(router_server) as watcher:
        assert_same_results(embed(router_server, TEXTS), reference_outputs["embed"])
        assert_same_results(rerank(router_server, PAIRS), reference_outputs["rerank"])
        assert_same_results(embed(router_server, TEXTS), reference_outputs["embed"])
    assert watcher.samples > 10 and len(watcher.most) <= 1, f"two encoders READY at once: {watcher.most}"
    after = router_metrics(router_server)
    evictions = sum(after[f'rag_router_evictions_total{{model="{n}"}}'] for n in ENCODERS)
    evictions -= sum(before[f'rag_router_evictions_total{{model="{n}"}}'] for n in ENCODERS)
    assert evictions >= 2
    assert after["rag_router_budget_bytes"] == one_model_budget
    ledger = status(router_server)
    assert ledger["occupied_bytes"] <= one_model_budget
    assert ledger["models"][EMBED]["state"] == "ready" and ledger["models"][RERANK]["state"] == "unloaded"


def test_status_and_metrics_agree_after_a_router_reload(
    router_server: RunningServer, reference_outputs: dict[str, np.ndarray], one_model_budget: int
) -> None:
    """The budget change reloaded the router (issue 23: STATUS restarted at 0 while the counters kept counting):
    STATUS goes on from the metrics, and both move together after it."""
    embed(router_server, TEXTS)
    rerank(router_server, PAIRS)
    ledger, metrics = status(router_server), router_metrics(router_server)
    for name in ENCODERS:
        for counter in COUNTERS:
            series = f'rag_router_{counter}_total{{model="{name}"}}'
            assert ledger["models"][name][counter] == metrics[series], (name, counter)
    assert ledger["models"][EMBED]["loads"] >= 2  # the load before the reload is counted


def test_concurrent_requests_for_both_models_all_complete(
    router_server: RunningServer, reference_outputs: dict[str, np.ndarray], one_model_budget: int
) -> None:
    def work(index: int) -> None:
        order = [embed, rerank] if index % 2 else [rerank, embed]
        for call in order:
            # concurrent requests may share a dynamic batch, so float rounding may differ from the 2-row reference
            if call is embed:
                np.testing.assert_allclose(embed(router_server, TEXTS), reference_outputs["embed"], atol=2e-3)
            else:
                np.testing.assert_allclose(rerank(router_server, PAIRS), reference_outputs["rerank"], atol=1e-4)

    with IndexWatcher(router_server) as watcher, concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(work, i) for i in range(8)]
        done, pending = concurrent.futures.wait(futures, timeout=400)
        assert not pending, "requests did not complete: deadlock or starvation"
        for future in done:
            future.result()
    assert len(watcher.most) <= 1, f"two encoders READY at once: {watcher.most}"
    ledger = status(router_server)
    assert ledger["occupied_bytes"] <= one_model_budget
    assert all(m["in_flight"] == 0 and m["waiting"] == 0 for m in ledger["models"].values())


def test_pinned_model_stays_and_the_other_gets_a_clear_error(
    router_server: RunningServer, reference_outputs: dict[str, np.ndarray], one_model_budget: int
) -> None:
    pinned = json.loads(control(router_server, "PIN", [contract.EMBED_ENDPOINT]).as_numpy("STATUS")[0])
    assert pinned["models"][EMBED]["pinned"] and pinned["models"][EMBED]["state"] == "ready"
    with pytest.raises(InferenceServerException, match=f"pinned.*{EMBED}") as refused:
        rerank(router_server, PAIRS)
    assert str(refused.value.status()) == "StatusCode.UNAVAILABLE"  # the router's answer, through the endpoint
    assert_same_results(embed(router_server, TEXTS), reference_outputs["embed"])
    control(router_server, "UNPIN", [EMBED])
    assert_same_results(rerank(router_server, PAIRS), reference_outputs["rerank"])


def test_plan_prefetches_and_evicts_the_model_used_furthest_ahead(
    router_server: RunningServer, reference_outputs: dict[str, np.ndarray], one_model_budget: int
) -> None:
    embed(router_server, TEXTS)  # embed resident and idle, rerank not
    ledger = json.loads(
        control(router_server, "PLAN", [contract.RERANK_ENDPOINT, contract.EMBED_ENDPOINT]).as_numpy("STATUS")[0]
    )
    assert ledger["plan"] == [RERANK, EMBED]
    # Nobody asked for rerank: the router makes room (embed is used after rerank) and prefetches it.
    wait_for(lambda: status(router_server)["models"][RERANK]["state"] == "ready", 120, "the prefetch of rerank")
    assert_same_results(rerank(router_server, PAIRS), reference_outputs["rerank"])
    wait_for(lambda: status(router_server)["models"][EMBED]["state"] == "ready", 120, "the prefetch of embed")
    assert status(router_server)["plan"] == [EMBED]
    assert_same_results(embed(router_server, TEXTS), reference_outputs["embed"])
    assert status(router_server)["plan"] == []


def test_a_model_larger_than_the_budget_is_served_alone_with_a_warning(
    router_server: RunningServer, reference_outputs: dict[str, np.ndarray], one_model_budget: int
) -> None:
    """Its measured size (kept in measured.json) exceeds the budget: it is not refused forever, everything else is
    evicted and it runs alone; the log says so."""
    rerank_bytes = status(router_server)["models"][RERANK]["bytes"]
    set_budget(router_server, str(rerank_bytes // 2))
    try:
        assert_same_results(embed(router_server, TEXTS), reference_outputs["embed"])
        assert_same_results(rerank(router_server, PAIRS), reference_outputs["rerank"])
        models = status(router_server)["models"]
        assert models[RERANK]["state"] == "ready" and models[EMBED]["state"] == "unloaded"
        assert f"WARNING: {RERANK} holds" in router_server.log_path.read_text(errors="replace")
    finally:
        set_budget(router_server, str(one_model_budget))
    assert_same_results(embed(router_server, TEXTS), reference_outputs["embed"])


def test_bad_control_requests_get_clear_errors(router_server: RunningServer) -> None:
    with pytest.raises(InferenceServerException, match="unknown ACTION 'FLY'"):
        control(router_server, "FLY")
    with pytest.raises(InferenceServerException, match="'gpt-5' is not a model the router manages"):
        control(router_server, "PIN", ["gpt-5"])
    with pytest.raises(InferenceServerException, match="ACQUIRE needs exactly one model"):
        control(router_server, "ACQUIRE")
    with pytest.raises(InferenceServerException, match="RELEASE needs the LEASE"):
        control(router_server, "RELEASE")
    assert status(router_server)["budget_bytes"] > 0


def test_router_follows_loads_and_unloads_through_the_repository_api(
    router_server: RunningServer, reference_outputs: dict[str, np.ndarray], one_model_budget: int
) -> None:
    client = router_server.client()
    resident = {n for n in ENCODERS if status(router_server)["models"][n]["state"] == "ready"}
    (other,) = set(ENCODERS) - resident
    (current,) = resident
    client.unload_model(current)
    wait_for(lambda: status(router_server)["models"][current]["state"] == "unloaded", 60, f"{current} unloaded")
    client.load_model(other)  # outside the router
    control(router_server, "RECONCILE")
    model = status(router_server)["models"][other]
    assert model["state"] == "ready" and model["measured_bytes"] > 0
    # Requests for the other model now find it resident (no load by the router).
    loads_before = model["loads"]
    if other == RERANK:
        rerank(router_server, PAIRS)
    else:
        embed(router_server, TEXTS)
    assert status(router_server)["models"][other]["loads"] == loads_before


def test_failed_load_reports_and_the_next_request_retries(
    router_server: RunningServer, reference_outputs: dict[str, np.ndarray], embed_copy: Path, one_model_budget: int
) -> None:
    if status(router_server)["models"][EMBED]["state"] == "ready":
        router_server.client().unload_model(EMBED)
        wait_for(lambda: status(router_server)["models"][EMBED]["state"] == "unloaded", 60, "embed unloaded")
    weights = embed_copy / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(b"this is not a safetensors file")
    try:
        for attempt in (1, 2):
            with pytest.raises(InferenceServerException, match=f"loading {EMBED} failed") as failed:
                embed(router_server, TEXTS)
            assert str(failed.value.status()) == "StatusCode.UNAVAILABLE"
            model = status(router_server)["models"][EMBED]
            assert model["state"] == "unloaded" and model["last_error"], f"attempt {attempt}: {model}"
            assert model["in_flight"] == 0 and model["waiting"] == 0
        assert_same_results(rerank(router_server, PAIRS), reference_outputs["rerank"])
    finally:
        weights.write_bytes(original)
    assert_same_results(embed(router_server, TEXTS), reference_outputs["embed"])
    assert status(router_server)["models"][EMBED]["last_error"] == ""


def test_memory_an_unload_keeps_is_reported_until_it_is_freed(router_server: RunningServer) -> None:
    lease = int(control(router_server, "ACQUIRE", [STUBBORN]).as_numpy("LEASE")[0])
    control(router_server, "RELEASE", lease=lease)
    assert status(router_server)["models"][STUBBORN]["measured_bytes"] > 32 * 2**20
    router_server.client().unload_model(STUBBORN)  # its finalize takes STUBBORN_SECONDS
    control(router_server, "RECONCILE")
    key = f'rag_router_unreleased_bytes{{model="{STUBBORN}"}}'
    wait_for(lambda: status(router_server)["models"][STUBBORN]["unreleased_bytes"] > 32 * 2**20, 30, "unreleased")
    assert router_metrics(router_server)[key] > 32 * 2**20
    wait_for(lambda: status(router_server)["models"][STUBBORN]["unreleased_bytes"] == 0, 60, "the memory back")
    wait_for(lambda: router_metrics(router_server)[key] == 0, 10, "the metric to follow")

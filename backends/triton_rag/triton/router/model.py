"""The `router` python model: loads compute models on first use, under a memory budget, and evicts idle ones.

Endpoints ask it for a lease on their compute model (ACQUIRE), call the model over BLS, and give the lease back
(RELEASE); clients can read the ledger (STATUS), pin models (PIN/UNPIN), announce what they will use next (PLAN) and
make it re-read the repository index (RECONCILE). Every action but STATUS and RELEASE needs the admin key (request
parameter `triton-rag-key`; admin.py). Evicted PyTorch engines go to sleep (host-RAM tier) where the host budget
allows, else they are unloaded. docs/ROUTER.md describes the tensors and the policy.

Threads: execute() only parses requests and queues them; one scheduler thread owns the ledger, asks
`residency.decide()` what to do after every event and does it; loads and unloads run on worker threads and report
back as events. Every request gets exactly one final response, through its response sender, when its turn comes.
"""

from __future__ import annotations

import json
import math
import os
import queue
import secrets
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_rag import contract
from triton_rag.contract.params import RouterParameters
from triton_rag.core.admin import GRPC_KEY_HEADER, KEY_NAME, key_matches, server_key
from triton_rag.core.residency import ModelView, Policy, decide, host_occupied_bytes, occupied_bytes
from triton_rag.core.server_args import grpc_endpoint
from triton_rag.core.units import format_bytes
from triton_rag.triton.common import error_response, model_parameters, read_strings
from triton_rag.triton.router.memory import (
    MeasurementFile,
    MemoryProbe,
    alive,
    dead_stubs,
    open_probe,
    ram_total,
    stub_pids,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
LOAD_BUCKETS = [0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128]
WAKE_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 4]
#: A load whose stub processes have all been gone this long has lost them (they do not come back by themselves).
STUB_GONE_SECONDS = 5.0
#: Actions anyone may send: reading the ledger, and returning a lease (whose id only its holder knows).
OPEN_ACTIONS = ("STATUS", "RELEASE")
#: Where each state keeps a model's weights (STATUS "tier", the rag_router_tier metric).
TIERS = {"ready": "gpu", "loading": "gpu", "waking": "gpu", "sleeping": "host", "asleep": "host"}


@dataclass
class Waiter:
    action: str  # ACQUIRE or PIN
    sender: Any
    arrived: float


@dataclass
class Entry:
    """The ledger line of one compute model."""

    name: str
    estimate: int
    endpoints: list[str]
    state: str = "unloaded"
    measured: int | None = None
    measured_by: str = ""
    leases: set[int] = field(default_factory=set)
    waiters: deque[Waiter] = field(default_factory=deque)
    last_access: float = -math.inf
    loaded_at: float = -math.inf
    pinned: bool = False
    unreleased: int = 0
    evictable: bool = True
    loads: int = 0
    evictions: int = 0
    last_load_seconds: float | None = None
    last_unload_seconds: float | None = None
    last_error: str = ""
    pids: list[int] = field(default_factory=list)
    sleepable: bool = False
    #: Estimated host copy of the weights; replaced by what the engine reports after its first sleep.
    host_bytes: int = 0
    host_held: bool = False
    #: What it holds on the device while asleep: estimated until measured after a sleep.
    asleep_estimate: int = 0
    asleep_measured: int | None = None
    unloading_asleep: bool = False
    sleeps: int = 0
    wakes: int = 0
    last_sleep_seconds: float | None = None
    last_wake_seconds: float | None = None
    #: Why Triton cannot load it again (a stub that died before its first message); requests fail at once.
    wedged: str = ""

    @property
    def bytes(self) -> int:
        return self.measured if self.measured is not None else self.estimate

    @property
    def asleep_bytes(self) -> int:
        return self.asleep_measured if self.asleep_measured is not None else self.asleep_estimate

    @property
    def tier(self) -> str:
        if self.state == "unloading":
            return "cold"
        return TIERS.get(self.state, "cold")

    def view(self) -> ModelView:
        return ModelView(
            name=self.name,
            bytes=self.bytes,
            state=self.state,  # type: ignore[arg-type]
            in_flight=len(self.leases),
            waiting=len(self.waiters),
            oldest_wait=self.waiters[0].arrived if self.waiters else math.inf,
            last_access=self.last_access,
            loaded_at=self.loaded_at,
            pinned=self.pinned,
            unreleased=self.unreleased,
            evictable=self.evictable,
            sleepable=self.sleepable,
            asleep_bytes=self.asleep_bytes,
            host_bytes=self.host_bytes,
            host_held=self.host_held,
            unloading_asleep=self.unloading_asleep,
        )


class Metrics:
    """The `rag_router_*` families on Triton's /metrics endpoint (names are part of the documented interface)."""

    def __init__(self, names: list[str]) -> None:
        family = pb_utils.MetricFamily
        resident = family("rag_router_resident_bytes", "Bytes the router's ledger holds per model", family.GAUGE)
        loads = family("rag_router_loads_total", "Loads started by the router per model", family.COUNTER)
        evictions = family("rag_router_evictions_total", "Models the router moved off the GPU to make room (slept to host RAM or unloaded)", family.COUNTER)
        unreleased = family("rag_router_unreleased_bytes", "Bytes an unload did not give back", family.GAUGE)
        seconds = family("rag_router_load_seconds", "Time to load a model (load_model until ready)", family.HISTOGRAM)
        budget = family("rag_router_budget_bytes", "The router's memory budget", family.GAUGE)
        host_budget = family("rag_router_host_budget_bytes", "Host RAM the host tier may hold", family.GAUGE)
        host = family("rag_router_host_bytes", "Host RAM a model's weight copy holds (host tier)", family.GAUGE)
        tier = family("rag_router_tier", "1 for the tier (gpu, host, cold) a model is in, 0 for the others", family.GAUGE)
        sleeps = family("rag_router_sleeps_total", "Evictions to the host tier per model", family.COUNTER)
        wakes = family("rag_router_wakes_total", "Wakes from the host tier per model", family.COUNTER)
        wake_seconds = family("rag_router_wake_seconds", "Time to wake a model from the host tier", family.HISTOGRAM)
        self.budget = budget.Metric(labels={})
        self.host_budget = host_budget.Metric(labels={})
        self.host = {n: host.Metric(labels={"model": n}) for n in names}
        self.tier = {(n, t): tier.Metric(labels={"model": n, "tier": t}) for n in names for t in ("gpu", "host", "cold")}
        self.sleeps = {n: sleeps.Metric(labels={"model": n}) for n in names}
        self.wakes = {n: wakes.Metric(labels={"model": n}) for n in names}
        self.wake_seconds = {n: wake_seconds.Metric(labels={"model": n}, buckets=WAKE_BUCKETS) for n in names}
        self.resident = {n: resident.Metric(labels={"model": n}) for n in names}
        self.loads = {n: loads.Metric(labels={"model": n}) for n in names}
        self.evictions = {n: evictions.Metric(labels={"model": n}) for n in names}
        self.unreleased = {n: unreleased.Metric(labels={"model": n}) for n in names}
        self.load_seconds = {n: seconds.Metric(labels={"model": n}, buckets=LOAD_BUCKETS) for n in names}
        # A family must outlive its metrics (Triton refuses to update a metric whose family was collected).
        self._families = [budget, resident, loads, evictions, unreleased, seconds, host_budget, host, tier, sleeps]
        self._families += [wakes, wake_seconds]


def _reject(waiter: Waiter, message: str) -> None:
    """The one final response of a waiting request that will not get its model."""
    waiter.sender.send(error_response(message, invalid_input=False), flags=FINAL)


class RepositoryApi:
    """Triton's repository API over gRPC on localhost, from the router's worker threads.

    Not pb_utils.load_model & co: on Triton 2.51 a failing call of those on any thread but the stub's main thread
    aborts tritonserver (found while testing a load of corrupt weights), and the main thread must stay free."""

    def __init__(self, url: str, load_timeout: float, key: str) -> None:
        self.url = url
        self.load_timeout = load_timeout
        self._headers = {GRPC_KEY_HEADER: key}  # Triton's restricted repository API (server.py) wants it
        self._key = key  # and the encoders' sleep and wake

    def _client(self) -> Any:
        """A fresh client per call: a channel opened before tritonserver listened keeps failing for a while (gRPC
        reconnect backoff), and these calls are rare and slow next to a channel's set-up."""
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.url)

    def load(self, name: str) -> None:
        self._client().load_model(name, headers=self._headers, client_timeout=self.load_timeout)

    def unload(self, name: str) -> None:
        self._client().unload_model(name, headers=self._headers, client_timeout=60)

    def residency(self, name: str, action: str) -> dict[str, Any]:
        """A control request to a PyTorch encoder (contract.RESIDENCY_OUTPUT): sleep, wake or status."""
        import tritonclient.grpc as grpcclient

        inputs = []
        for tensor_name, value in (("INPUT_IDS", 0), ("ATTENTION_MASK", 1)):
            tensor = grpcclient.InferInput(tensor_name, [1, 1], "INT64")
            tensor.set_data_from_numpy(np.full((1, 1), value, dtype=np.int64))
            inputs.append(tensor)
        result = self._client().infer(
            name,
            inputs,
            outputs=[grpcclient.InferRequestedOutput(contract.RESIDENCY_OUTPUT.name)],
            parameters={contract.RESIDENCY_PARAMETER: action, KEY_NAME: self._key},
            client_timeout=self.load_timeout,
        )
        return dict(json.loads(result.as_numpy(contract.RESIDENCY_OUTPUT.name).reshape(-1)[0]))

    def ready(self, names: list[str]) -> dict[str, bool] | None:
        """Which of `names` are READY in the repository index; None while the server cannot say."""
        try:
            index = self._client().get_model_repository_index(as_json=True, headers=self._headers, client_timeout=10)
            index = index.get("models", [])
        except Exception:
            return None
        ready = {m["name"] for m in index if m.get("state") == "READY"}
        return {name: name in ready for name in names}


class RouterModel:
    def initialize(self, args: dict[str, str]) -> None:
        parameters = RouterParameters.parse(model_parameters(args))
        self.settings = parameters.settings
        self.probe: MemoryProbe = open_probe()
        self.policy = Policy(
            self.settings.budget_bytes(self.probe.device, self.probe.total),
            high_watermark=self.settings.high_watermark,
            min_residency=self.settings.min_residency_seconds,
            host_budget=self.settings.host_budget_bytes(self.probe.device, ram_total()),
        )
        self.entries: dict[str, Entry] = {}
        self.aliases: dict[str, str] = {}
        self.measurements = MeasurementFile(Path(args["model_repository"]) / self.settings.measurements_file)
        for model in parameters.models:
            name, estimate = model.name, model.estimate(self.probe.device)
            weights = model.weights(self.probe.device)
            self.entries[name] = Entry(
                name,
                estimate,
                list(model.endpoints),
                sleepable=model.sleepable,
                host_bytes=weights,
                asleep_estimate=max(estimate - weights, 0),
            )
            remembered = self.measurements.get(name, self.probe.device, estimate)
            if remembered is not None:
                self.entries[name].measured, self.entries[name].measured_by = remembered, "remembered from a load"
            self.aliases[name] = name
            for endpoint in model.endpoints:
                self.aliases[endpoint] = name
        self.server_pid = os.getppid()
        self.key = server_key(self.server_pid)
        argv = Path(f"/proc/{self.server_pid}/cmdline").read_bytes().decode().split("\0")
        api_url = self.settings.repository_api or grpc_endpoint(argv)
        self.api = RepositoryApi(api_url, self.settings.load_timeout_seconds, self.key)
        self.plan: list[str] = []
        self.leases: dict[int, tuple[str, float]] = {}
        self.events: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.device_used_before_load = 0
        self.metrics = Metrics(list(self.entries))
        self.metrics.budget.set(float(self.policy.budget))
        self.metrics.host_budget.set(float(self.policy.host_budget))
        self.reasons: dict[str, str] = {}
        self.reconciled = False
        self.scheduler = threading.Thread(target=self._run, name="router-scheduler", daemon=True)
        self.scheduler.start()
        print(
            f"router: repository API at {api_url}; budget {format_bytes(self.policy.budget)} "
            f"({self.probe.description}), host budget {format_bytes(self.policy.host_budget)}, high watermark "
            f"{self.policy.high_watermark}, min residency {self.policy.min_residency}s, models "
            + ", ".join(f"{e.name} (estimate {format_bytes(e.estimate)})" for e in self.entries.values()),
            flush=True,
        )

    # --- requests -------------------------------------------------------------------------------------------

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                action, models, lease = self._parse(request)
            except ValueError as exc:
                sender.send(error_response(str(exc)), flags=FINAL)
                continue
            arrived = time.monotonic()
            self.events.put(
                lambda a=action, m=models, ls=lease, s=sender, t=arrived: self._on_request(a, m, ls, s, t)  # type: ignore[misc]
            )
        return None

    def _parse(self, request: Any) -> tuple[str, list[str], int | None]:
        action_values = read_strings(request, "ACTION")
        if not action_values or len(action_values) != 1:
            raise ValueError("ACTION must hold exactly one value")
        action = action_values[0].strip().upper()
        if action not in contract.ROUTER_ACTIONS:
            raise ValueError(f"unknown ACTION {action!r}; one of {', '.join(contract.ROUTER_ACTIONS)}")
        if action not in OPEN_ACTIONS:
            given = json.loads(request.parameters() or "{}").get(KEY_NAME)
            if not key_matches(given if isinstance(given, str) else None, self.key):
                raise ValueError(
                    f"{action} needs the admin key: the request parameter {KEY_NAME!r} must hold the value of "
                    f"TRITON_RAG_ADMIN_KEY (docs/ROUTER.md, Access control); only STATUS and RELEASE are open"
                )
        names = read_strings(request, "MODELS", optional=True) or []
        models = []
        for name in names:
            if name not in self.aliases:
                raise ValueError(f"{name!r} is not a model the router manages ({', '.join(sorted(self.aliases))})")
            models.append(self.aliases[name])
        lease_tensor = pb_utils.get_input_tensor_by_name(request, "LEASE")
        lease = int(lease_tensor.as_numpy().reshape(-1)[0]) if lease_tensor is not None else None
        if action in ("ACQUIRE", "PIN", "UNPIN") and len(models) != 1:
            raise ValueError(f"{action} needs exactly one model in MODELS")
        if action == "RELEASE" and lease is None:
            raise ValueError("RELEASE needs the LEASE that ACQUIRE returned")
        return action, models, lease

    def _on_request(self, action: str, models: list[str], lease: int | None, sender: Any, arrived: float) -> None:
        if not self.reconciled:  # the first request: align with models loaded before the router (or a reload of it)
            self.reconciled = True
            self._reconcile()
        if action in ("ACQUIRE", "PIN"):
            if self.entries[models[0]].wedged:
                _reject(Waiter(action, sender, arrived), f"{models[0]}: {self.entries[models[0]].wedged}")
                return
            self.entries[models[0]].waiters.append(Waiter(action, sender, arrived))
            if action == "ACQUIRE" and models[0] in self.plan:
                del self.plan[: self.plan.index(models[0]) + 1]  # the plan advances past this use
            return
        if action == "RELEASE":
            held = self.leases.pop(lease or 0, None)
            if held is not None:
                entry = self.entries[held[0]]
                entry.leases.discard(lease or 0)
                entry.last_access = time.monotonic()
            sender.send(pb_utils.InferenceResponse(output_tensors=[]), flags=FINAL)
            return
        if action == "UNPIN":
            self.entries[models[0]].pinned = False
        elif action == "PLAN":
            self.plan = list(models)
        elif action == "RECONCILE":
            self._reconcile()
        self._send_status(sender)

    def _send_status(self, sender: Any) -> None:
        status = np.array([json.dumps(self.status()).encode()], dtype=np.object_)
        sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("STATUS", status)]), flags=FINAL)

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        views = [e.view() for e in self.entries.values()]
        return {
            "budget_bytes": self.policy.budget,
            "high_watermark": self.policy.high_watermark,
            "min_residency_seconds": self.policy.min_residency,
            "memory": self.probe.description,
            "occupied_bytes": occupied_bytes(views),
            "host_budget_bytes": self.policy.host_budget,
            "host_occupied_bytes": host_occupied_bytes(views),
            "plan": list(self.plan),
            "models": {
                e.name: {
                    "state": e.state,
                    "tier": e.tier,
                    "bytes": e.bytes,
                    "estimate_bytes": e.estimate,
                    "measured_bytes": e.measured,
                    "measured_by": e.measured_by,
                    "in_flight": len(e.leases),
                    "waiting": len(e.waiters),
                    "pinned": e.pinned,
                    "idle_seconds": None if e.last_access == -math.inf else round(now - e.last_access, 3),
                    "loads": e.loads,
                    "evictions": e.evictions,
                    "last_load_seconds": e.last_load_seconds,
                    "last_unload_seconds": e.last_unload_seconds,
                    "sleepable": e.sleepable,
                    "weight_bytes": e.host_bytes,
                    "asleep_bytes": e.asleep_bytes,
                    "host_bytes": e.host_bytes if e.host_held else 0,
                    "sleeps": e.sleeps,
                    "wakes": e.wakes,
                    "last_sleep_seconds": e.last_sleep_seconds,
                    "last_wake_seconds": e.last_wake_seconds,
                    "unreleased_bytes": e.unreleased,
                    "last_error": e.last_error,
                    "waiting_because": self.reasons.get(e.name, ""),
                    "endpoints": e.endpoints,
                }
                for e in self.entries.values()
            },
        }

    # --- the scheduler ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        wake_at: float | None = None
        next_housekeeping = time.monotonic() + self.settings.reconcile_seconds
        while True:
            now = time.monotonic()
            deadline = min(t for t in (wake_at, next_housekeeping) if t is not None)
            try:
                event = self.events.get(timeout=max(0.0, deadline - now))
            except queue.Empty:
                event = None
            else:
                if event is None:  # finalize: nobody may be left waiting for an answer
                    for entry in self.entries.values():
                        self._fail_waiters(entry, "the router is stopping (server shutdown or router reload); retry")
                    return
            try:
                if event is not None:
                    event()
                if time.monotonic() >= next_housekeeping:
                    self._housekeeping()
                    next_housekeeping = time.monotonic() + self.settings.reconcile_seconds
                wake_at = self._decide()
            except Exception:  # the scheduler must outlive any one bad event
                traceback.print_exc()

    def _decide(self) -> float | None:
        now = time.monotonic()
        decision = decide([e.view() for e in self.entries.values()], self.policy, self.plan, now)
        self.reasons = decision.reasons
        for name, message in decision.fail:
            self._fail_waiters(self.entries[name], message)
        for name in decision.grant:
            self._grant(self.entries[name], now)
        for name in decision.sleep:
            entry = self.entries[name]
            entry.state = "sleeping"
            entry.evictions += 1
            self.metrics.evictions[name].increment(1)
            threading.Thread(target=self._residency, args=(entry, "sleep"), daemon=True).start()
        if decision.wake is not None:
            entry = self.entries[decision.wake]
            entry.state = "waking"
            threading.Thread(target=self._residency, args=(entry, "wake"), daemon=True).start()
        for name in decision.unload:
            entry = self.entries[name]
            entry.unloading_asleep = entry.state == "asleep"
            entry.state = "unloading"
            entry.evictions += 1
            self.metrics.evictions[name].increment(1)
            threading.Thread(target=self._unload, args=(entry, True), daemon=True).start()
        if decision.load is not None:
            entry = self.entries[decision.load]
            if (self.api.ready([entry.name]) or {}).get(entry.name):  # loaded from outside since the last look
                self._reconcile()
                return self._decide()
            entry.state = "loading"
            entry.loads += 1
            if entry.bytes > self.policy.budget:
                print(
                    f"router: WARNING: {entry.name} holds {format_bytes(entry.bytes)}, more than the budget of "
                    f"{format_bytes(self.policy.budget)}; it is served alone (everything else was evicted)",
                    flush=True,
                )
            self.metrics.loads[entry.name].increment(1)
            self.device_used_before_load = self.probe.device_used()
            threading.Thread(target=self._load, args=(entry,), daemon=True).start()
        self._publish()
        return decision.wake_at

    def _grant(self, entry: Entry, now: float) -> None:
        entry.last_access = now
        while entry.waiters:
            waiter = entry.waiters.popleft()
            if waiter.action == "PIN":
                entry.pinned = True
                self._send_status(waiter.sender)
                continue
            lease = secrets.randbits(62) + 1  # only its holder can release it
            entry.leases.add(lease)
            self.leases[lease] = (entry.name, now)
            out = pb_utils.Tensor("LEASE", np.array([lease], dtype=np.int64))
            waiter.sender.send(pb_utils.InferenceResponse(output_tensors=[out]), flags=FINAL)

    def _fail_waiters(self, entry: Entry, message: str) -> None:
        while entry.waiters:
            _reject(entry.waiters.popleft(), message)

    def _publish(self) -> None:
        for entry in self.entries.values():
            self.metrics.resident[entry.name].set(float(entry.view().occupies))
            self.metrics.unreleased[entry.name].set(float(entry.unreleased))
            self.metrics.host[entry.name].set(float(entry.host_bytes if entry.host_held else 0))
            for tier in ("gpu", "host", "cold"):
                self.metrics.tier[entry.name, tier].set(1.0 if entry.tier == tier else 0.0)

    def _housekeeping(self) -> None:
        """Take back leases whose holder vanished, re-read the repository index, re-measure residents."""
        now = time.monotonic()
        for lease, (name, granted) in list(self.leases.items()):
            if now - granted > self.settings.lease_timeout_seconds:
                print(
                    f"router: lease {lease} on {name} expired after {now - granted:.0f} s; taking it back", flush=True
                )
                self.leases.pop(lease)
                self.entries[name].leases.discard(lease)
        for entry in self.entries.values():
            while entry.waiters and now - entry.waiters[0].arrived > self.settings.queue_timeout_seconds:
                waiter = entry.waiters.popleft()
                reason = self.reasons.get(entry.name) or entry.state
                _reject(waiter, f"waited {now - waiter.arrived:.0f} s for {entry.name} ({reason}); giving up")
        for entry in self.entries.values():
            if entry.unreleased and entry.state == "unloaded":  # a slow stub may give its memory back later
                remaining = alive(entry.pids)
                held = self.probe.process_bytes(remaining) if remaining else 0
                entry.unreleased = held if held is not None else entry.unreleased
                entry.pids = remaining if entry.unreleased else []
        self._reconcile()

    def _reconcile(self) -> None:
        """Align the ledger with Triton: models loaded or unloaded through the repository API, re-measured bytes."""
        states = self.api.ready(list(self.entries))
        if states is None:
            return
        for entry in self.entries.values():
            if entry.state == "asleep" and not states[entry.name]:
                print(f"router: {entry.name} was unloaded outside the router while asleep", flush=True)
                entry.state, entry.unloading_asleep = "unloading", True
                threading.Thread(target=self._unload, args=(entry, False), daemon=True).start()
                continue
            if entry.state == "asleep" and entry.pids:
                self._measure_asleep(entry)
            if entry.state not in ("ready", "unloaded"):
                continue
            ready = states[entry.name]
            if ready and entry.wedged:
                entry.wedged = ""
            if ready and entry.state == "unloaded":
                entry.state, entry.loaded_at = "ready", time.monotonic()
                entry.pids = stub_pids(entry.name, self.server_pid)
                print(f"router: {entry.name} was loaded outside the router; now in the ledger", flush=True)
                if entry.sleepable:  # it may be asleep (adopted by a reloaded router): ask before measuring it
                    threading.Thread(target=self._residency, args=(entry, "status"), daemon=True).start()
                else:
                    self._measure(entry, device_delta=None)
            elif not ready and entry.state == "ready":
                print(f"router: {entry.name} was unloaded outside the router", flush=True)
                entry.state = "unloading"
                threading.Thread(target=self._unload, args=(entry, False), daemon=True).start()
            elif ready and entry.pids:
                self._measure(entry, device_delta=None)

    def _host_copy_in(self, entry: Entry) -> int:
        """The part of a CPU measurement that is the host tier's: on the CPU the "device" is the RAM, where the
        engine's host copy of its weights lives too (kept after the first sleep, awake or not)."""
        return entry.host_bytes if self.probe.device == "cpu" and entry.host_held else 0

    def _measure(self, entry: Entry, device_delta: int | None) -> None:
        measured = self.probe.process_bytes(entry.pids) if entry.pids else None
        if measured is not None:
            measured = max(measured - self._host_copy_in(entry), 0)
            entry.measured, entry.measured_by = measured, f"{self.probe.device}: stub processes {entry.pids}"
        elif device_delta is not None:
            entry.measured, entry.measured_by = max(device_delta, 0), f"{self.probe.device}: device delta across load"
        else:
            return
        self.measurements.put(entry.name, self.probe.device, entry.estimate, entry.bytes)

    def _measure_asleep(self, entry: Entry) -> None:
        """What an asleep model still holds on the device (its runtime, CUDA-graph pools)."""
        held = self.probe.process_bytes(entry.pids) if entry.pids else None
        if held is not None:
            entry.asleep_measured = max(held - self._host_copy_in(entry), 0)

    # --- workers: they only report back through the event queue -----------------------------------------------

    def _residency(self, entry: Entry, action: str) -> None:
        started = time.monotonic()
        error, state = "", {}
        try:
            state = self.api.residency(entry.name, action)
        except Exception as exc:
            error = str(exc) or repr(exc)
        seconds = time.monotonic() - started
        self.events.put(lambda: self._residency_done(entry, action, state, error, seconds))

    def _residency_done(self, entry: Entry, action: str, state: dict[str, Any], error: str, seconds: float) -> None:
        if error and action == "status":
            print(f"router: could not read the residency of {entry.name}: {error}", flush=True)
            return
        if error:
            # The engine may be gone (killed, unloaded outside) or may not sleep: unload it, which reloads it fresh
            # on the next request; its waiting requests wait for that.
            print(f"router: {action} of {entry.name} failed ({error}); unloading it instead", flush=True)
            entry.last_error = f"{action} failed: {error}"
            entry.unloading_asleep = False
            entry.state = "unloading"
            threading.Thread(target=self._unload, args=(entry, True), daemon=True).start()
            return
        if action == "status" and entry.state not in ("ready", "asleep"):
            return  # a late answer: the model moved on (unloading, unloaded, sleeping) since it was asked
        # the engine knows its weights exactly (prepare's estimate assumed bfloat16; FP8 halves them)
        weights = int(state.get("host_bytes") or state.get("weight_bytes") or 0)
        if weights:
            entry.host_bytes = weights
            if entry.measured is not None and entry.asleep_measured is None:
                entry.asleep_estimate = max(entry.measured - weights, 0)
        entry.host_held = int(state.get("host_bytes") or 0) > 0
        if action == "status":
            if state.get("state") == "asleep" and entry.state == "ready" and not entry.leases:
                entry.state = "asleep"
                self._measure_asleep(entry)
            elif entry.state == "ready":
                self._measure(entry, device_delta=None)
            return
        if action == "sleep":
            entry.state, entry.sleeps, entry.last_sleep_seconds = "asleep", entry.sleeps + 1, seconds
            self.metrics.sleeps[entry.name].increment(1)
            self._measure_asleep(entry)
            print(
                f"router: {entry.name} asleep in {seconds:.3f} s (host copy {format_bytes(entry.host_bytes)}, "
                f"holds {format_bytes(entry.asleep_bytes)} on the device)",
                flush=True,
            )
        else:
            entry.state, entry.wakes, entry.last_wake_seconds = "ready", entry.wakes + 1, seconds
            entry.loaded_at = time.monotonic()
            self.metrics.wakes[entry.name].increment(1)
            self.metrics.wake_seconds[entry.name].observe(seconds)
            print(f"router: {entry.name} woken in {seconds:.3f} s", flush=True)

    def _load(self, entry: Entry) -> None:
        started = time.monotonic()
        outcome: list[str] = []
        given_up = threading.Lock()  # held by whichever side finishes first: the load call, or the watch below
        abandoned: list[bool] = []

        def call() -> None:
            timed_out = False
            try:
                self.api.load(entry.name)
                result = ""
            except Exception as exc:
                result = str(exc) or repr(exc)
                # our own client timeout (router.load_timeout_seconds), not an answer from tritonserver
                timed_out = str(getattr(exc, "status", lambda: None)()) == "StatusCode.DEADLINE_EXCEEDED"
            with given_up:
                outcome.append(result)
                if abandoned:  # the router gave up on this load: its end frees the model for the next load
                    self.events.put(lambda: self._abandoned_load_ended(entry, result, timed_out))

        caller = threading.Thread(target=call, daemon=True)
        dead_before = dead_stubs(self.server_pid)
        caller.start()
        seen: set[int] = set()
        last_alive = time.monotonic()
        while caller.is_alive():
            caller.join(0.25)
            pids = stub_pids(entry.name, self.server_pid)
            if pids:
                seen.update(pids)
                last_alive = time.monotonic()
                continue
            died = bool(seen) or bool(dead_stubs(self.server_pid) - dead_before)
            if died and time.monotonic() - last_alive > STUB_GONE_SECONDS:
                with given_up:
                    if outcome:  # the load call ended meanwhile: its result stands
                        break
                    # tritonserver before 25.08 (python_backend #408) waits without a timeout for a new stub's
                    # first message: a stub that dies before sending it leaves the model LOADING (ROUTER.md, Faults)
                    abandoned.append(True)
                    which = f" (pid {', '.join(map(str, sorted(seen)))})" if seen else ""
                    wedged = (
                        f"its python stub{which} died while loading and tritonserver still waits for it; "
                        f"{entry.name} cannot load again until that load ends or tritonserver restarts"
                    )
                    # posted under the lock: before the load call's own end, whenever that comes
                    self._post_loaded(entry, wedged, started, wedged)
                return
        self._post_loaded(entry, outcome[0] if outcome else "the load ended without a result", started)

    def _post_loaded(self, entry: Entry, error: str, started: float, wedged: str = "") -> None:
        seconds = time.monotonic() - started
        delta = self.probe.device_used() - self.device_used_before_load
        pids = stub_pids(entry.name, self.server_pid)
        self.events.put(lambda: self._loaded(entry, error, seconds, delta, pids, wedged))

    def _abandoned_load_ended(self, entry: Entry, result: str, timed_out: bool) -> None:
        if timed_out:  # our own client timeout, not tritonserver's: it still waits for the dead stub
            entry.wedged = (
                f"its python stub died while loading and tritonserver has not ended that load in "
                f"{self.api.load_timeout:.0f} s (router.load_timeout_seconds); restart tritonserver to load "
                f"{entry.name} again (docs/ROUTER.md, Faults)"
            )
            print(f"router: {entry.name}: {entry.wedged}", flush=True)
            return
        entry.wedged = ""
        print(
            f"router: the load of {entry.name} it gave up on ended ({result or 'loaded'}); it can load again",
            flush=True,
        )
        if not result:  # loaded after all: the next reconcile takes it into the ledger
            self._reconcile()

    def _loaded(
        self, entry: Entry, error: str, seconds: float, delta: int, pids: list[int], wedged: str = ""
    ) -> None:
        entry.last_load_seconds = seconds
        entry.wedged = wedged
        if error or not (self.api.ready([entry.name]) or {}).get(entry.name):
            entry.state = "unloaded"
            entry.last_error = error or "the model did not become ready"
            message = f"loading {entry.name} failed: {entry.last_error}"
            print(f"router: {message}", flush=True)
            self._fail_waiters(entry, message)
            if pids:  # a stub that failed to initialise may still hold memory
                entry.pids = pids
                entry.state = "unloading"
                threading.Thread(target=self._unload, args=(entry, True), daemon=True).start()
            return
        entry.state, entry.loaded_at, entry.pids, entry.last_error = "ready", time.monotonic(), pids, ""
        self.metrics.load_seconds[entry.name].observe(seconds)
        self._measure(entry, device_delta=delta)
        print(f"router: loaded {entry.name} in {seconds:.2f} s, holds {format_bytes(entry.bytes)}", flush=True)
        if entry.sleepable:  # learn its exact weight bytes (its host copy's size) before the policy needs them
            threading.Thread(target=self._residency, args=(entry, "status"), daemon=True).start()

    def _unload(self, entry: Entry, ask_triton: bool) -> None:
        started = time.monotonic()
        pids = list(entry.pids)
        error = ""
        if ask_triton:
            try:
                self.api.unload(entry.name)
            except Exception as exc:
                error = str(exc) or repr(exc)
        remaining = alive(pids)
        deadline = started + self.settings.unload_timeout_seconds
        while remaining and not error and time.monotonic() < deadline:
            time.sleep(0.05)
            remaining = alive(remaining)
        unreleased = 0
        if remaining:
            held = self.probe.process_bytes(remaining)
            unreleased = held if held is not None else entry.bytes
        self.events.put(lambda: self._unloaded(entry, error, unreleased, time.monotonic() - started))

    def _unloaded(self, entry: Entry, error: str, unreleased: int, seconds: float) -> None:
        if error:  # e.g. a server without explicit model control: keep the model, stop trying to evict it
            print(f"router: could not unload {entry.name}: {error}; it is no longer evicted", flush=True)
            entry.state, entry.evictable, entry.last_error = "ready", False, error
            return
        entry.state, entry.unreleased, entry.last_unload_seconds = "unloaded", unreleased, seconds
        entry.host_held, entry.unloading_asleep = False, False
        if unreleased:
            print(
                f"router: {entry.name} unloaded but {format_bytes(unreleased)} were not given back after "
                f"{seconds:.1f} s (processes {alive(entry.pids)})",
                flush=True,
            )
        else:
            entry.pids = []
        print(f"router: unloaded {entry.name} in {seconds:.2f} s", flush=True)

    def finalize(self) -> None:
        self.events.put(None)
        self.scheduler.join(timeout=5)

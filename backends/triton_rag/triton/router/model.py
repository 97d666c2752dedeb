"""The `router` python model: loads compute models on first use, under a memory budget, and evicts idle ones.

Endpoints ask it for a lease on their compute model (ACQUIRE), call the model over BLS, and give the lease back
(RELEASE); clients can read the ledger (STATUS), pin models (PIN/UNPIN), announce what they will use next (PLAN) and
make it re-read the repository index (RECONCILE). Every action but STATUS and RELEASE needs the admin key (request
parameter `triton-rag-key`; admin.py). Evicted PyTorch engines go to sleep (host-RAM tier) where the host budget
allows, else they are unloaded. docs/ROUTER.md describes the tensors and the policy.

This is the shell around core/ledger.py, which holds every decision and every state change. Threads: execute() only
parses a request into an event and queues it; one scheduler thread feeds events to the ledger and carries out the
effects it returns (replies, metrics, log lines at once; loads, unloads, sleep, wake and looks at the repository on
worker threads, workers.py, which report back as events). Every request gets exactly one final response, through
its response sender, when the ledger answers it.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_rag.contract.params import RouterParameters
from triton_rag.core.admin import KEY_NAME, server_key
from triton_rag.core.errors import BadInput, RequestError
from triton_rag.core.ledger import Ledger
from triton_rag.core.ledger_entry import LedgerConfig, ModelSpec
from triton_rag.core.ledger_events import (
    Count,
    Effect,
    Event,
    GrantLease,
    Log,
    Observe,
    Remember,
    Request,
    SendEmpty,
    SendError,
    SendStatus,
    SetGauge,
    Stop,
    Tick,
    parse_action,
    parse_request,
)
from triton_rag.core.logs import model_logger
from triton_rag.core.measurements import MeasurementFile, ram_total
from triton_rag.core.residency import Policy
from triton_rag.core.server_args import grpc_endpoint
from triton_rag.core.units import format_bytes
from triton_rag.triton.common import failure_response, model_parameters, read_strings
from triton_rag.triton.router.memory import MemoryProbe, device_memory, open_probe
from triton_rag.triton.router.metrics import Metrics
from triton_rag.triton.router.repository_api import RepositoryApi
from triton_rag.triton.router.workers import Workers

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
#: How long finalize() waits for the scheduler to answer everyone and stop.
STOP_SECONDS = 5.0


class RouterModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.log = model_logger("router")
        parameters = RouterParameters.parse(model_parameters(args))
        settings = parameters.settings
        self.probe: MemoryProbe = open_probe()
        device = self.probe.device
        memory = device_memory(self.probe, settings)  # capped at device_memory on a GPU: the ledger sees the cap
        if memory.note:
            self.log.info(memory.note)
        policy = Policy(
            settings.budget_bytes(device, memory.total),
            high_watermark=settings.high_watermark,
            min_residency=settings.min_residency_seconds,
            host_budget=settings.host_budget_bytes(device, ram_total()),
        )
        self.measurements = MeasurementFile(Path(args["model_repository"]) / settings.measurements_file)
        specs = []
        for model in parameters.models:
            estimate = model.estimate(device)
            remembered = self.measurements.get(model.name, device, estimate)
            weights = model.weights(device)
            specs.append(ModelSpec(model.name, estimate, tuple(model.endpoints), model.sleepable, weights, remembered))
        server_pid = os.getppid()
        self.key = server_key(server_pid)
        argv = Path(f"/proc/{server_pid}/cmdline").read_bytes().decode().split("\0")
        api_url = settings.repository_api or grpc_endpoint(argv)
        api = RepositoryApi(api_url, settings.load_timeout_seconds, self.key)
        config = LedgerConfig(
            policy,
            device=device,
            memory=memory.description,
            lease_timeout=settings.lease_timeout_seconds,
            queue_timeout=settings.queue_timeout_seconds,
            reconcile_every=settings.reconcile_seconds,
            load_timeout=settings.load_timeout_seconds,
        )
        # lease ids are random (62 bits): only its holder can release a lease
        self.ledger = Ledger(specs, config, lambda: secrets.randbits(62) + 1, now=time.monotonic())
        self.events: queue.Queue[Event] = queue.Queue()
        self.workers = Workers(api, self.probe, server_pid, settings.unload_timeout_seconds, self.events.put, self.log)
        self.metrics = Metrics([spec.name for spec in specs])
        self.request_ids = itertools.count(1)
        self.senders: dict[int, Any] = {}  # request id -> its response sender, until its one final response
        self.senders_lock = threading.Lock()
        self._carry_out(self.ledger.start(carried=self.metrics.counters()))  # STATUS goes on where a reload left it
        self.scheduler = threading.Thread(target=self._run, name="router-scheduler", daemon=True)
        self.scheduler.start()
        self.log.info(
            f"repository API at {api_url}; budget {format_bytes(policy.budget)} "
            f"({memory.description}), host budget {format_bytes(policy.host_budget)}, high watermark "
            f"{policy.high_watermark}, min residency {policy.min_residency}s, models "
            + ", ".join(f"{s.name} (estimate {format_bytes(s.estimate)})" for s in specs)
        )

    # --- requests -------------------------------------------------------------------------------------------

    def execute(self, requests: list[Any]) -> None:
        """Parse and queue; the answer comes from the scheduler thread (decoupled: Triton's thread stays free)."""
        for request in requests:
            sender = request.get_response_sender()
            try:
                event = self._parse(request)
            except Exception as exc:  # missing key -> Forbidden, malformed -> BadInput
                error = BadInput(str(exc)) if isinstance(exc, ValueError) and not isinstance(exc, RequestError) else exc
                sender.send(failure_response(error, self.log), flags=FINAL)
                continue
            with self.senders_lock:
                self.senders[event.request] = sender
            self.events.put(event)
        return None

    def _parse(self, request: Any) -> Request:
        given = json.loads(request.parameters() or "{}").get(KEY_NAME)
        action = parse_action(read_strings(request, "ACTION"), given, self.key)
        names = read_strings(request, "MODELS", optional=True) or []
        lease_tensor = pb_utils.get_input_tensor_by_name(request, "LEASE")
        lease = int(lease_tensor.as_numpy().reshape(-1)[0]) if lease_tensor is not None else None
        return parse_request(next(self.request_ids), action, names, lease, self.ledger.aliases, time.monotonic())

    def _send(self, request: int, response: Any) -> None:
        with self.senders_lock:
            sender = self.senders.pop(request, None)
        if sender is None:
            self.log.error(f"request {request} was answered twice; the second answer is dropped")
            return
        sender.send(response, flags=FINAL)

    # --- the scheduler ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        """The one thread that owns the ledger: an event, or a Tick when the ledger's deadline passes."""
        while True:
            try:
                event = self.events.get(timeout=max(0.0, self.ledger.deadline - time.monotonic()))
            except queue.Empty:
                event = Tick(now=time.monotonic())
            self._carry_out(self.ledger.handle(event))
            if isinstance(event, Stop):
                break
        while True:  # requests queued behind the stop still get their answer (the ledger refuses them)
            try:
                self._carry_out(self.ledger.handle(self.events.get_nowait()))
            except queue.Empty:
                return

    def _carry_out(self, effects: list[Effect]) -> None:
        for effect in effects:
            try:
                self._do(effect)
            except Exception:  # the scheduler must outlive any one bad effect
                self.log.exception(f"could not carry out {effect}")

    def _do(self, effect: Effect) -> None:
        if isinstance(effect, GrantLease):
            lease = pb_utils.Tensor("LEASE", np.array([effect.lease], dtype=np.int64))
            self._send(effect.request, pb_utils.InferenceResponse(output_tensors=[lease]))
        elif isinstance(effect, SendStatus):
            status = pb_utils.Tensor("STATUS", np.array([effect.status_json.encode()], dtype=np.object_))
            self._send(effect.request, pb_utils.InferenceResponse(output_tensors=[status]))
        elif isinstance(effect, SendEmpty):
            self._send(effect.request, pb_utils.InferenceResponse(output_tensors=[]))
        elif isinstance(effect, SendError):
            self._send(effect.request, failure_response(effect.error, self.log))
        elif isinstance(effect, (Count, Observe, SetGauge)):
            self.metrics.apply(effect)
        elif isinstance(effect, Log):
            self.log.log(effect.level, "%s", effect.text)
        elif isinstance(effect, Remember):
            self.measurements.put(effect.model, effect.device, effect.estimate, effect.bytes)
        else:
            self.workers.start(effect)

    def finalize(self) -> None:
        """Nobody may be left waiting for an answer: the ledger fails every waiting request, then the scheduler
        ends."""
        self.events.put(Stop(now=time.monotonic()))
        self.scheduler.join(timeout=STOP_SECONDS)

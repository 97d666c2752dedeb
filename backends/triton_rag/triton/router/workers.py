"""The ledger's blocking effects, each on its own daemon thread, each reporting back as events (never on the
scheduler thread, which only feeds the ledger): loads watched for a stub that dies before its first message, unloads
awaited and measured, sleep / wake / status requests to the encoders, and looks at the repository index with the
measurements that go with them (NVML, /proc). Every effect ends in at least one event, even when a worker fails.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from triton_rag.core.ledger_events import (
    AbandonedLoadEnded,
    Event,
    Held,
    Load,
    Loaded,
    LoadFailed,
    QueryRepository,
    QueryResidency,
    RepositoryStatus,
    ResidencyAnswer,
    ResidencyFailed,
    ResidencyStatus,
    Sleep,
    Slept,
    Unload,
    Unloaded,
    Wake,
    Woke,
    Work,
)
from triton_rag.triton.router.memory import MemoryProbe, alive, dead_stubs, stub_pids
from triton_rag.triton.router.repository_api import RepositoryApi

#: A load whose stub processes have all been gone this long has lost them (they do not come back by themselves).
STUB_GONE_SECONDS = 5.0
RESIDENCY_ACTIONS = {Sleep: "sleep", Wake: "wake", QueryResidency: "status"}


def _message(exc: BaseException) -> str:
    return str(exc) or repr(exc)


class Workers:
    def __init__(
        self,
        api: RepositoryApi,
        probe: MemoryProbe,
        server_pid: int,
        unload_timeout: float,
        post: Callable[[Event], None],
        log: Any,
    ) -> None:
        self.api, self.probe, self.server_pid = api, probe, server_pid
        self.unload_timeout = unload_timeout
        self.post = post
        self.log = log

    def start(self, effect: Work) -> None:
        name = f"router-{type(effect).__name__.lower()}"
        threading.Thread(target=self._run, args=(effect,), name=name, daemon=True).start()

    def _run(self, effect: Work) -> None:
        """Carry out `effect` and post its event; a worker's own failure still answers the ledger."""
        try:
            event = self._work(effect)
        except Exception as exc:
            self.log.exception("%s failed", effect)
            event = self._fallback(effect, _message(exc))
        if event is not None:
            self.post(event)

    def _work(self, effect: Work) -> Event | None:
        if isinstance(effect, Load):
            return self.load(effect.model)
        if isinstance(effect, Unload):
            return self.unload(effect)
        if isinstance(effect, QueryRepository):
            return self.query(effect)
        return self.residency(effect)

    def _fallback(self, effect: Work, error: str) -> Event:
        now = time.monotonic()
        if isinstance(effect, Load):
            return LoadFailed(model=effect.model, now=now, error=error, seconds=0.0)
        if isinstance(effect, Unload):  # Triton's answer is in; what failed is the look at the processes
            return Unloaded(model=effect.model, now=now, seconds=0.0)
        if isinstance(effect, QueryRepository):
            return RepositoryStatus(now=now, query=effect, ready=None)
        if isinstance(effect, QueryResidency):
            return ResidencyStatus(model=effect.model, now=now, answer=None, error=error)
        return ResidencyFailed(model=effect.model, now=now, action=RESIDENCY_ACTIONS[type(effect)], error=error)

    def _bytes(self, pids: tuple[int, ...]) -> int | None:
        return self.probe.process_bytes(list(pids)) if pids else None

    def _stubs(self, model: str) -> tuple[int, ...]:
        return tuple(stub_pids(model, self.server_pid))

    # --- loads --------------------------------------------------------------------------------------------------

    def load(self, model: str) -> Event | None:
        """Load through the repository API while watching the model's stub: a stub that dies before its first
        message leaves tritonserver < 25.08 waiting for it without a timeout (python_backend #408; docs/ROUTER.md,
        Faults), so after STUB_GONE_SECONDS without one the load is given up on (LoadFailed with `wedged`) and its
        end, whenever it comes, is reported as AbandonedLoadEnded."""
        states = self.api.ready([model])
        if states and states.get(model):  # loaded from outside since the ledger's last look
            pids = self._stubs(model)
            now = time.monotonic()
            return Loaded(model=model, now=now, seconds=0.0, pids=pids, process_bytes=self._bytes(pids), adopted=True)
        started = time.monotonic()
        before = self.probe.device_used()
        outcome: list[str] = []
        given_up = threading.Lock()  # held by whichever side finishes first: the load call, or the watch below
        abandoned: list[bool] = []

        def call() -> None:
            timed_out = False
            try:
                self.api.load(model)
                result = ""
            except Exception as exc:
                result = _message(exc)
                # our own client timeout (router.load_timeout_seconds), not an answer from tritonserver
                timed_out = str(getattr(exc, "status", lambda: None)()) == "StatusCode.DEADLINE_EXCEEDED"
            with given_up:
                outcome.append(result)
                if abandoned:  # the router gave up on this load: its end frees the model for the next load
                    self.post(AbandonedLoadEnded(model=model, now=time.monotonic(), error=result, timed_out=timed_out))

        caller = threading.Thread(target=call, name="router-load-call", daemon=True)
        dead_before = dead_stubs(self.server_pid)
        caller.start()
        seen: set[int] = set()
        last_alive = time.monotonic()
        while caller.is_alive():
            caller.join(0.25)
            alive_pids = stub_pids(model, self.server_pid)
            if alive_pids:
                seen.update(alive_pids)
                last_alive = time.monotonic()
                continue
            died = bool(seen) or bool(dead_stubs(self.server_pid) - dead_before)
            if died and time.monotonic() - last_alive > STUB_GONE_SECONDS:
                with given_up:
                    if outcome:  # the load call ended meanwhile: its result stands
                        break
                    abandoned.append(True)
                    which = f" (pid {', '.join(map(str, sorted(seen)))})" if seen else ""
                    wedged = (
                        f"its python stub{which} died while loading and tritonserver still waits for it; "
                        f"{model} cannot load again until that load ends or tritonserver restarts"
                    )
                    # posted under the lock: before the load call's own end, whenever that comes
                    self.post(self._load_result(model, wedged, started, before, wedged))
                return None
        return self._load_result(model, outcome[0] if outcome else "the load ended without a result", started, before)

    def _load_result(self, model: str, error: str, started: float, before: int, wedged: str = "") -> Event:
        seconds = time.monotonic() - started
        delta = self.probe.device_used() - before
        pids = self._stubs(model)
        if not error and (self.api.ready([model]) or {}).get(model):
            now = time.monotonic()
            return Loaded(
                model=model, now=now, seconds=seconds, pids=pids, process_bytes=self._bytes(pids), device_delta=delta
            )
        # error "" and not READY: the ledger says "the model did not become ready"
        return LoadFailed(model=model, now=time.monotonic(), error=error, seconds=seconds, pids=pids, wedged=wedged)

    # --- unloads, sleep and wake ----------------------------------------------------------------------------------

    def unload(self, effect: Unload) -> Unloaded:
        """Unload (unless Triton has already), then wait up to the unload timeout for its processes to exit; what
        they still hold then is reported as unreleased."""
        started = time.monotonic()
        error = ""
        if effect.ask_triton:
            try:
                self.api.unload(effect.model)
            except Exception as exc:
                error = _message(exc)
        remaining = alive(effect.pids)
        deadline = started + self.unload_timeout
        while remaining and not error and time.monotonic() < deadline:
            time.sleep(0.05)
            remaining = alive(remaining)
        unreleased = 0
        if remaining:
            held = self.probe.process_bytes(remaining)
            unreleased = held if held is not None else effect.bytes
        seconds = time.monotonic() - started
        return Unloaded(
            model=effect.model,
            now=time.monotonic(),
            seconds=seconds,
            error=error,
            unreleased=unreleased,
            remaining=tuple(remaining),
        )

    def residency(self, effect: Sleep | Wake | QueryResidency) -> Event:
        """A sleep, wake or status request to the encoder; after a sleep or a status, what its processes hold."""
        action = RESIDENCY_ACTIONS[type(effect)]
        started = time.monotonic()
        try:
            answer = ResidencyAnswer.parse(self.api.residency(effect.model, action))
        except Exception as exc:
            return self._fallback(effect, _message(exc))
        seconds = time.monotonic() - started
        if isinstance(effect, Wake):
            return Woke(model=effect.model, now=time.monotonic(), seconds=seconds, answer=answer)
        # a checkpointed process is not in NVML's list at all (None there means "not measured"): it holds nothing
        held = 0 if answer.context_released else self._bytes(effect.pids)
        if isinstance(effect, Sleep):
            return Slept(model=effect.model, now=time.monotonic(), seconds=seconds, answer=answer, held=held)
        return ResidencyStatus(model=effect.model, now=time.monotonic(), answer=answer, held=held)

    # --- the repository ---------------------------------------------------------------------------------------------

    def query(self, effect: QueryRepository) -> RepositoryStatus:
        """Triton's index, the stubs of models loaded from outside, what resident models and leftover processes
        hold."""
        unreleased = {}
        for name, pids in effect.unreleased:  # a slow stub may give its memory back later
            remaining = tuple(alive(pids))
            unreleased[name] = Held(remaining, self.probe.process_bytes(list(remaining)) if remaining else 0)
        ready = self.api.ready([name for name, _ in effect.epochs])
        found = {}
        if ready is not None:
            for name, pids in effect.measure:
                found[name] = Held(pids, self._bytes(pids))
            for name in effect.adopt:
                if ready.get(name):
                    pids = self._stubs(name)
                    found[name] = Held(pids, self._bytes(pids))
        return RepositoryStatus(now=time.monotonic(), query=effect, ready=ready, found=found, unreleased=unreleased)

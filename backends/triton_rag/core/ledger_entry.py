"""The ledger's lines: what the router's configuration says of each compute model (ModelSpec), the settings the
ledger keeps (LedgerConfig), and one compute model's line (Entry): its state machine, that is what a finished load,
unload, sleep, wake or measurement does to it, with the effects that follow (into the ledger's `sink`), its view for
the policy and its STATUS row. What spans models (requests, leases, the plan, the policy) is core/ledger.py's."""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from triton_rag.core.errors import RequestError, Unavailable
from triton_rag.core.ledger_events import (
    AbandonedLoadEnded,
    Action,
    Count,
    Effect,
    Held,
    Loaded,
    LoadFailed,
    Log,
    Observe,
    QueryResidency,
    Remember,
    ResidencyAnswer,
    ResidencyStatus,
    SendError,
    Slept,
    Unload,
    Unloaded,
    Woke,
)
from triton_rag.core.residency import ModelState, ModelView, Policy
from triton_rag.core.units import format_bytes

S = ModelState
#: Where each state keeps a model's weights (STATUS "tier", the rag_router_tier metric); the rest is "cold".
TIERS = {S.READY: "gpu", S.LOADING: "gpu", S.WAKING: "gpu", S.SLEEPING: "host", S.ASLEEP: "host"}
#: Every tier, in the order STATUS and the metric list them.
TIER_NAMES = ("gpu", "host", "cold")


@dataclass(frozen=True)
class ModelSpec:
    """A compute model as the router's configuration describes it."""

    name: str
    estimate: int
    endpoints: tuple[str, ...] = ()
    sleepable: bool = False
    weight_bytes: int = 0  # its host copy's estimate
    remembered: int | None = None  # measured by an earlier run (measurements file)


@dataclass(frozen=True)
class LedgerConfig:
    policy: Policy
    device: str = "gpu"  # what the budget is of: "gpu" or "cpu" (the RAM)
    memory: str = ""  # how it is measured (STATUS "memory")
    lease_timeout: float = 30.0
    queue_timeout: float = 300.0
    reconcile_every: float = 5.0
    load_timeout: float = 600.0  # for the wedged-load message only


@dataclass
class Waiter:
    request: int
    action: Action
    arrived: float


@dataclass
class Entry:
    """The ledger line of one compute model. `epoch` counts its state changes, so that an answer to a question asked
    before one is recognised as stale; `sink` is the ledger's list of effects."""

    spec: ModelSpec
    device: str = "gpu"
    sink: list[Effect] = field(default_factory=list, repr=False)
    state: ModelState = S.UNLOADED
    epoch: int = 0
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
    pids: tuple[int, ...] = ()
    host_bytes: int = 0  # the host copy: estimated until the engine reports it
    host_held: bool = False
    asleep_estimate: int = 0  # what it holds on the device asleep, until measured
    asleep_measured: int | None = None
    unloading_asleep: bool = False
    sleeps: int = 0
    wakes: int = 0
    last_sleep_seconds: float | None = None
    last_wake_seconds: float | None = None
    wedged: str = ""  # why Triton cannot load it again; requests fail at once

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def bytes(self) -> int:
        return self.measured if self.measured is not None else self.spec.estimate

    @property
    def asleep_bytes(self) -> int:
        return self.asleep_measured if self.asleep_measured is not None else self.asleep_estimate

    @property
    def tier(self) -> str:
        return TIERS.get(self.state, "cold")

    # --- transitions ----------------------------------------------------------------------------------------------

    def log(self, text: str, level: int = logging.INFO) -> None:
        self.sink.append(Log(text, level))

    def set(self, state: ModelState) -> None:
        self.state, self.epoch = state, self.epoch + 1

    def fail(self, error: RequestError) -> None:
        """Every waiting request gets its one response: this error."""
        while self.waiters:
            self.sink.append(SendError(self.waiters.popleft().request, error))

    def unload(self, ask_triton: bool = True) -> None:
        """`ask_triton` False: Triton has unloaded it already; its processes are awaited and measured."""
        self.set(S.UNLOADING)
        self.sink.append(Unload(self.name, self.pids, ask_triton, self.bytes))

    def adopt(self, now: float, pids: tuple[int, ...], process_bytes: int | None) -> None:
        """Loaded outside the router: it joins the ledger, measured; a sleepable one is asked first whether it is
        asleep (a reloaded router adopts asleep models as asleep)."""
        self.set(S.READY)
        self.loaded_at, self.pids = now, pids
        self.log(f"{self.name} was loaded outside the router; now in the ledger")
        if self.spec.sleepable:
            self.sink.append(QueryResidency(self.name, self.pids))
        else:
            self.measure(process_bytes, None)

    def loaded(self, event: Loaded, now: float) -> None:
        self.wedged = ""
        if event.adopted:  # READY before the router's load was sent: not a load of the router's
            self.adopt(now, event.pids, event.process_bytes)
            return
        self._count_load()
        self.last_load_seconds = event.seconds
        self.set(S.READY)
        self.loaded_at, self.pids, self.last_error = now, event.pids, ""
        self.sink.append(Observe("rag_router_load_seconds", self.name, event.seconds))
        self.measure(event.process_bytes, event.device_delta)
        self.log(f"loaded {self.name} in {event.seconds:.2f} s, holds {format_bytes(self.bytes)}")
        if self.spec.sleepable:  # learn its exact weight bytes (its host copy's size) before the policy needs them
            self.sink.append(QueryResidency(self.name, self.pids))

    def _count_load(self) -> None:
        """A load the router made, counted once its outcome is known (a model found READY instead is adopted, not
        loaded: the counter metric cannot be taken back)."""
        self.loads += 1
        self.sink.append(Count("rag_router_loads_total", self.name))

    def evicted(self) -> None:
        """Counted as it is moved off the GPU to make room (slept or unloaded)."""
        self.evictions += 1
        self.sink.append(Count("rag_router_evictions_total", self.name))

    def load_failed(self, event: LoadFailed) -> None:
        self._count_load()
        self.last_load_seconds, self.wedged = event.seconds, event.wedged
        self.set(S.UNLOADED)
        self.last_error = event.error or "the model did not become ready"
        message = f"loading {self.name} failed: {self.last_error}"
        self.log(message)
        self.fail(Unavailable(message))
        if event.pids:  # a stub that failed to initialise may still hold memory
            self.pids = event.pids
            self.unload()

    def abandoned_load_ended(self, event: AbandonedLoadEnded, load_timeout: float) -> None:
        if event.timed_out:  # our own client timeout, not tritonserver's: it still waits for the dead stub
            self.wedged = (
                f"its python stub died while loading and tritonserver has not ended that load in "
                f"{load_timeout:.0f} s (router.load_timeout_seconds); restart tritonserver to load "
                f"{self.name} again (docs/ROUTER.md, Faults)"
            )
            self.log(f"{self.name}: {self.wedged}")
            return
        self.wedged = ""
        self.log(f"the load of {self.name} it gave up on ended ({event.error or 'loaded'}); it can load again")

    def unloaded(self, event: Unloaded) -> None:
        if event.error:  # e.g. a server without explicit model control: keep the model, stop trying to evict it
            self.log(f"could not unload {self.name}: {event.error}; it is no longer evicted")
            self.set(S.READY)
            self.evictable, self.last_error = False, event.error
            return
        self.set(S.UNLOADED)
        self.unreleased, self.last_unload_seconds = event.unreleased, event.seconds
        self.host_held, self.unloading_asleep = False, False
        self.pids = event.remaining if event.unreleased else ()
        if event.unreleased:
            self.log(
                f"{self.name} unloaded but {format_bytes(event.unreleased)} were not given back after "
                f"{event.seconds:.1f} s (processes {list(event.remaining)})"
            )
        self.log(f"unloaded {self.name} in {event.seconds:.2f} s")

    def answer(self, answer: ResidencyAnswer) -> None:
        """What the engine says of its weights (exact; prepare's estimate assumed bfloat16, FP8 halves them)."""
        weights = answer.host_bytes or answer.weight_bytes
        if weights:
            self.host_bytes = weights
            if self.measured is not None and self.asleep_measured is None:
                self.asleep_estimate = max(self.measured - weights, 0)
        self.host_held = answer.host_bytes > 0

    def slept(self, event: Slept) -> None:
        self.answer(event.answer)
        self.set(S.ASLEEP)
        self.sleeps, self.last_sleep_seconds = self.sleeps + 1, event.seconds
        self.sink.append(Count("rag_router_sleeps_total", self.name))
        self.measure_asleep(event.held)
        self.log(
            f"{self.name} asleep in {event.seconds:.3f} s (host copy {format_bytes(self.host_bytes)}, "
            f"holds {format_bytes(self.asleep_bytes)} on the device)"
        )

    def woke(self, event: Woke, now: float) -> None:
        self.answer(event.answer)
        self.set(S.READY)
        self.wakes, self.last_wake_seconds, self.loaded_at = self.wakes + 1, event.seconds, now
        self.sink.append(Count("rag_router_wakes_total", self.name))
        self.sink.append(Observe("rag_router_wake_seconds", self.name, event.seconds))
        self.log(f"{self.name} woken in {event.seconds:.3f} s")

    def residency_failed(self, action: str, error: str) -> None:
        """The engine may be gone (killed, unloaded outside) or may not sleep: unload it, which reloads it fresh on
        the next request; its waiting requests wait for that."""
        self.log(f"{action} of {self.name} failed ({error}); unloading it instead")
        self.last_error, self.unloading_asleep = f"{action} failed: {error}", False
        self.unload()

    def residency_status(self, event: ResidencyStatus) -> None:
        if event.error or event.answer is None:
            self.log(f"could not read the residency of {self.name}: {event.error or 'no answer'}")
            return
        if self.state not in (S.READY, S.ASLEEP):
            return  # a late answer: the model moved on (unloading, unloaded, sleeping) since it was asked
        self.answer(event.answer)
        if event.answer.asleep and self.state == S.READY and not self.leases:
            self.set(S.ASLEEP)
            self.measure_asleep(event.held)
        elif self.state == S.READY:
            self.measure(event.held, None)

    def reconcile(self, now: float, ready: bool, found: Held | None) -> None:
        """Follow Triton's index: loaded or unloaded outside the router (also from asleep); re-measure."""
        if self.state == S.ASLEEP and not ready:
            self.log(f"{self.name} was unloaded outside the router while asleep")
            self.unloading_asleep = True
            self.unload(ask_triton=False)
            return
        if self.state == S.ASLEEP and self.pids and found is not None:
            self.measure_asleep(found.bytes)
        if self.state not in (S.READY, S.UNLOADED):
            return
        if ready and self.wedged:
            self.wedged = ""
        if ready and self.state == S.UNLOADED:
            self.adopt(now, found.pids if found else (), found.bytes if found else None)
        elif not ready and self.state == S.READY:
            self.log(f"{self.name} was unloaded outside the router")
            self.unload(ask_triton=False)
        elif ready and self.pids and found is not None:
            self.measure(found.bytes, None)

    # --- measurements ---------------------------------------------------------------------------------------------

    def _host_copy_in(self) -> int:
        """The part of a CPU measurement that is the host tier's: on the CPU the "device" is the RAM, where the
        engine's host copy of its weights lives too (kept after the first sleep, awake or not)."""
        return self.host_bytes if self.device == "cpu" and self.host_held else 0

    def measure(self, process_bytes: int | None, device_delta: int | None) -> None:
        if process_bytes is not None:
            self.measured = max(process_bytes - self._host_copy_in(), 0)
            self.measured_by = f"{self.device}: stub processes {list(self.pids)}"
        elif device_delta is not None:
            self.measured, self.measured_by = max(device_delta, 0), f"{self.device}: device delta across load"
        else:
            return
        self.sink.append(Remember(self.name, self.device, self.spec.estimate, self.bytes))

    def measure_asleep(self, held: int | None) -> None:
        """What an asleep model still holds on the device (its runtime, CUDA-graph pools)."""
        if held is not None:
            self.asleep_measured = max(held - self._host_copy_in(), 0)

    # --- what others read -----------------------------------------------------------------------------------------

    def view(self) -> ModelView:
        return ModelView(
            name=self.name,
            bytes=self.bytes,
            state=self.state,
            in_flight=len(self.leases),
            waiting=len(self.waiters),
            oldest_wait=self.waiters[0].arrived if self.waiters else math.inf,
            last_access=self.last_access,
            loaded_at=self.loaded_at,
            pinned=self.pinned,
            unreleased=self.unreleased,
            evictable=self.evictable,
            sleepable=self.spec.sleepable,
            asleep_bytes=self.asleep_bytes,
            host_bytes=self.host_bytes,
            host_held=self.host_held,
            unloading_asleep=self.unloading_asleep,
        )

    def row(self, now: float, reason: str) -> dict[str, Any]:
        """Its STATUS line (docs/ROUTER.md, The ledger: keys and meanings are an interface)."""
        return {
            "state": self.state.value,
            "tier": self.tier,
            "bytes": self.bytes,
            "estimate_bytes": self.spec.estimate,
            "measured_bytes": self.measured,
            "measured_by": self.measured_by,
            "in_flight": len(self.leases),
            "waiting": len(self.waiters),
            "pinned": self.pinned,
            "idle_seconds": None if self.last_access == -math.inf else round(now - self.last_access, 3),
            "loads": self.loads,
            "evictions": self.evictions,
            "last_load_seconds": self.last_load_seconds,
            "last_unload_seconds": self.last_unload_seconds,
            "sleepable": self.spec.sleepable,
            "weight_bytes": self.host_bytes,
            "asleep_bytes": self.asleep_bytes,
            "host_bytes": self.host_bytes if self.host_held else 0,
            "sleeps": self.sleeps,
            "wakes": self.wakes,
            "last_sleep_seconds": self.last_sleep_seconds,
            "last_wake_seconds": self.last_wake_seconds,
            "unreleased_bytes": self.unreleased,
            "last_error": self.last_error,
            "wedged": self.wedged,  # non-empty: tritonserver cannot load it again until it restarts
            "waiting_because": reason,
            "endpoints": list(self.spec.endpoints),
        }

"""The router's books as a state machine: typed events in, typed effects out, nothing else (no threads, no clock).

The router's Triton shell (triton/router/model.py) turns every request and every finished piece of blocking work into
an event, feeds it to `Ledger.handle()` on one thread, and carries out the effects it returns; effects that block run
on worker threads and come back as events. After each event the ledger asks `residency.decide()` (the policy) what
to do; the ledger is the bookkeeping around it (entries, leases, waiters, the plan, aliases, measurements), so every
state change is unit-tested without a server (tests/test_ledger.py). Time is each event's `now` (monotonic seconds);
lease ids come from the injected `lease_ids`. The vocabulary is in core/ledger_events.py, the lines in
core/ledger_entry.py.

Events (each with `now`):
- Request: ACQUIRE, PIN, UNPIN, PLAN, RECONCILE, STATUS or RELEASE, with the shell's request id, models, lease.
- Loaded / LoadFailed (with leftover pids, or `wedged`: a stub that died before its first message) /
  AbandonedLoadEnded (the load given up on ended): what a Load came to.
- Unloaded (unreleased bytes, or Triton's refusal); Slept, Woke, ResidencyFailed (a sleep or wake failed),
  ResidencyStatus (an encoder's answer to `status`).
- RepositoryStatus: Triton's index (READY per model) and what the shell measured, answering a QueryRepository.
- Tick: the timer (`deadline`): housekeeping every `reconcile_every` and the policy's own wake-up time. Stop.
Effects:
- Load, Unload, Sleep, Wake, QueryResidency, QueryRepository: blocking work; each is answered by an event.
- One reply per request: GrantLease, SendStatus (the STATUS JSON), SendEmpty (RELEASE), SendError (a
  core.errors RequestError: Unavailable, TimedOut, BadInput).
- Count, Observe, SetGauge: the rag_router_* metrics as data. Log: a line for the router's log (no prefix).
  Remember: a measurement to keep for the next start.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from triton_rag.core.errors import Internal, TimedOut, Unavailable
from triton_rag.core.ledger_entry import TIER_NAMES, Entry, LedgerConfig, ModelSpec, Waiter
from triton_rag.core.ledger_events import (
    AbandonedLoadEnded,
    Action,
    Effect,
    Event,
    GrantLease,
    Load,
    Loaded,
    LoadFailed,
    Log,
    QueryRepository,
    Reply,
    RepositoryStatus,
    Request,
    ResidencyFailed,
    ResidencyStatus,
    SendEmpty,
    SendError,
    SendStatus,
    SetGauge,
    Sleep,
    Slept,
    Stop,
    Unloaded,
    Wake,
    Woke,
)
from triton_rag.core.residency import ModelState, decide, host_occupied_bytes, occupied_bytes
from triton_rag.core.units import format_bytes

S = ModelState
STOPPING = "the router is stopping (server shutdown or router reload); retry"


#: The per-model counters STATUS shows and the rag_router_*_total metrics count (the same events).
COUNTERS = ("loads", "evictions", "sleeps", "wakes")


class Ledger:
    """One compute model per entry; `handle()` one event at a time (one thread owns it)."""

    def __init__(
        self, models: Sequence[ModelSpec], config: LedgerConfig, lease_ids: Callable[[], int], now: float
    ) -> None:
        self.config, self.policy, self.lease_ids = config, config.policy, lease_ids
        self._out: list[Effect] = []  # the effects of the event at hand; the entries write into it too
        self.entries: dict[str, Entry] = {}
        self.aliases: dict[str, str] = {}  # model and endpoint names -> model
        for spec in models:
            asleep = max(spec.estimate - spec.weight_bytes, 0)
            entry = Entry(spec, config.device, self._out, host_bytes=spec.weight_bytes, asleep_estimate=asleep)
            if spec.remembered is not None:
                entry.measured, entry.measured_by = spec.remembered, "remembered from a load"
            self.entries[spec.name] = entry
            self.aliases.update({spec.name: spec.name} | dict.fromkeys(spec.endpoints, spec.name))
        self.now = now
        self.plan: list[str] = []
        self.leases: dict[int, tuple[str, float]] = {}  # lease -> (model, granted at)
        self.reasons: dict[str, str] = {}
        self.wake_at: float | None = None
        self.next_housekeeping = now + config.reconcile_every
        #: Requests wait for the first look at the repository: models loaded before this router (a reload) count.
        self.reconciled = False
        self.held: list[Request] = []
        self.first_query: int | None = None
        self.queries: dict[int, list[int]] = {}  # outstanding QueryRepository -> RECONCILE requests it answers
        self.query_count = 0
        self.stopped = False
        self.published: dict[tuple[str, str, str], float] = {}

    # --- the interface ------------------------------------------------------------------------------------------

    @property
    def deadline(self) -> float:
        """When the shell sends a Tick if nothing else happens first."""
        return self.next_housekeeping if self.wake_at is None else min(self.wake_at, self.next_housekeeping)

    def start(self, carried: Mapping[str, Mapping[str, int]] | None = None) -> list[Effect]:
        """The gauges before any event (the budgets among them). `carried`: per model, the counters (COUNTERS) a
        router before this one counted, as the metrics that outlive a reload still hold them, so that STATUS goes
        on from them as the Prometheus counters do (never back to 0 while those keep counting)."""
        for name, counts in (carried or {}).items():
            entry = self.entries.get(name)
            if entry is not None:
                for counter in COUNTERS:
                    setattr(entry, counter, getattr(entry, counter) + int(counts.get(counter, 0)))
        self._publish()
        return self._take()

    def handle(self, event: Event) -> list[Effect]:
        """Apply `event`, let the policy decide, and return what to do. A bug is logged, not raised: the shell's
        loop must outlive any one bad event, and a request that was neither answered nor queued is answered."""
        self.now = max(self.now, event.now)
        #: Every request this event could answer (a Stop, a repository answer and a grant take several off the
        #: books before answering them): after a bug, whichever of them is neither answered nor pending gets one.
        owed = self.pending() | ({event.request} if isinstance(event, Request) else set())
        try:
            if self.stopped:  # leases still come back and STATUS still reads; nothing new starts
                if isinstance(event, Request) and event.action == Action.RELEASE:
                    self._emit(SendEmpty(event.request))
                elif isinstance(event, Request) and event.action == Action.STATUS:
                    self._send_status(event.request)
                elif isinstance(event, Request):
                    self._emit(SendError(event.request, Unavailable(STOPPING)))
                return self._take()
            self._dispatch(event)
            if not self.stopped:
                if self.now >= self.next_housekeeping:
                    self._housekeeping()
                    self.next_housekeeping = self.now + self.config.reconcile_every
                self._decide()
        except Exception:
            self._log(f"internal error on {type(event).__name__}:\n{traceback.format_exc()}", logging.ERROR)
            answered = {e.request for e in self._out if isinstance(e, Reply)}
            for request in sorted(owed - answered - self.pending()):
                self._emit(SendError(request, Internal("internal error in the router; see the server log")))
        return self._take()

    def pending(self) -> set[int]:
        """Requests not answered yet: waiting for a model, for the first look at the repository, or a RECONCILE."""
        waiting = {w.request for entry in self.entries.values() for w in entry.waiters}
        return waiting | {r.request for r in self.held} | {r for rs in self.queries.values() for r in rs}

    def status(self) -> dict[str, Any]:
        """The STATUS JSON (docs/ROUTER.md, The ledger: keys and meanings are an interface)."""
        views = [e.view() for e in self.entries.values()]
        return {
            "budget_bytes": self.policy.budget,
            "high_watermark": self.policy.high_watermark,
            "min_residency_seconds": self.policy.min_residency,
            "memory": self.config.memory,
            "occupied_bytes": occupied_bytes(views),
            "host_budget_bytes": self.policy.host_budget,
            "host_occupied_bytes": host_occupied_bytes(views),
            "plan": list(self.plan),
            "models": {e.name: e.row(self.now, self.reasons.get(e.name, "")) for e in self.entries.values()},
        }

    # --- plumbing -----------------------------------------------------------------------------------------------

    def _take(self) -> list[Effect]:
        out = list(self._out)
        self._out.clear()
        return out

    def _emit(self, effect: Effect) -> None:
        self._out.append(effect)

    def _log(self, text: str, level: int = logging.INFO) -> None:
        self._out.append(Log(text, level))

    def _send_status(self, request: int) -> None:
        self._emit(SendStatus(request, json.dumps(self.status())))

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, Request):
            self._on_request(event)
        elif isinstance(event, Stop):
            self._stop()
        elif isinstance(event, RepositoryStatus):
            self._on_repository(event)
        elif isinstance(event, Loaded):
            self.entries[event.model].loaded(event, self.now)
        elif isinstance(event, LoadFailed):
            self.entries[event.model].load_failed(event)
        elif isinstance(event, AbandonedLoadEnded):
            self.entries[event.model].abandoned_load_ended(event, self.config.load_timeout)
            if not event.timed_out and not event.error:  # loaded after all: a look at Triton takes it in
                self._query_repository()
        elif isinstance(event, Unloaded):
            self.entries[event.model].unloaded(event)
        elif isinstance(event, Slept):
            self.entries[event.model].slept(event)
        elif isinstance(event, Woke):
            self.entries[event.model].woke(event, self.now)
        elif isinstance(event, ResidencyFailed):
            self.entries[event.model].residency_failed(event.action, event.error)
        elif isinstance(event, ResidencyStatus):
            self.entries[event.model].residency_status(event)
        # a Tick brings only time: housekeeping and the policy follow every event

    # --- requests -----------------------------------------------------------------------------------------------

    def _on_request(self, event: Request) -> None:
        if not self.reconciled:  # (the models were checked by parse_request)
            self.held.append(event)
            if self.first_query is None:
                self.first_query = self._query_repository()
        else:
            self._serve(event)

    def _serve(self, event: Request) -> None:
        action, request = event.action, event.request
        if action in (Action.ACQUIRE, Action.PIN):
            entry = self.entries[event.models[0]]
            if entry.wedged:
                self._emit(SendError(request, Unavailable(f"{entry.name}: {entry.wedged}")))
                return
            entry.waiters.append(Waiter(request, action, event.now))
            if action == Action.ACQUIRE and entry.name in self.plan:
                del self.plan[: self.plan.index(entry.name) + 1]  # the plan advances past this use
            return
        if action == Action.RELEASE:
            held = self.leases.pop(event.lease or 0, None)
            if held is not None:
                self.entries[held[0]].leases.discard(event.lease or 0)
                self.entries[held[0]].last_access = self.now
            self._emit(SendEmpty(request))
            return
        if action == Action.UNPIN:
            self.entries[event.models[0]].pinned = False
        elif action == Action.PLAN:
            self.plan = list(event.models)
        elif action == Action.RECONCILE:
            self._query_repository(replies=[request])
            return
        elif action == Action.STOP:
            self._stop()
        self._send_status(request)

    def _grant(self, entry: Entry) -> None:
        entry.last_access = self.now
        while entry.waiters:
            waiter = entry.waiters.popleft()
            if waiter.action == Action.PIN:
                entry.pinned = True
                self._send_status(waiter.request)
                continue
            lease = self.lease_ids()  # random in the shell: only its holder can release it
            entry.leases.add(lease)
            self.leases[lease] = (entry.name, self.now)
            self._emit(GrantLease(waiter.request, lease))

    def _stop(self) -> None:
        """Nobody may be left waiting for an answer."""
        self.stopped = True
        held, self.held = self.held, []
        for request in held:
            if request.action in (Action.ACQUIRE, Action.PIN):
                self._emit(SendError(request.request, Unavailable(STOPPING)))
            elif request.action == Action.RECONCILE:
                self._send_status(request.request)
            else:
                self._serve(request)
        for replies in self.queries.values():
            for request_id in replies:
                self._send_status(request_id)
        self.queries.clear()
        for entry in self.entries.values():
            entry.fail(Unavailable(STOPPING))

    # --- the repository ---------------------------------------------------------------------------------------

    def _query_repository(self, replies: list[int] | None = None) -> int:
        self.query_count += 1
        entries = self.entries.values()
        self._emit(
            QueryRepository(
                query=self.query_count,
                epochs=tuple((e.name, e.epoch) for e in entries),
                adopt=tuple(e.name for e in entries if e.state == S.UNLOADED),
                measure=tuple((e.name, e.pids) for e in entries if e.state in (S.READY, S.ASLEEP) and e.pids),
                unreleased=tuple((e.name, e.pids) for e in entries if e.state == S.UNLOADED and e.unreleased),
            )
        )
        self.queries[self.query_count] = replies or []
        return self.query_count

    def _on_repository(self, event: RepositoryStatus) -> None:
        """Align the ledger with Triton: models loaded or unloaded through the repository API, re-measured bytes,
        memory an unload left behind. A model whose state changed since the query was sent is left alone."""
        replies = self.queries.pop(event.query.query, [])
        held_requests: list[Request] = []
        if event.query.query == self.first_query:  # off the books first: after a bug, the safety net answers them
            self.reconciled = True
            held_requests, self.held = self.held, []
        epochs = dict(event.query.epochs)
        current = [e for e in self.entries.values() if epochs.get(e.name) == e.epoch]
        for entry in current:
            held = event.unreleased.get(entry.name)
            if held is not None and entry.state == S.UNLOADED and entry.unreleased:  # a slow stub gives it back
                entry.unreleased = held.bytes if held.bytes is not None else entry.unreleased
                entry.pids = held.pids if entry.unreleased else ()
        for entry in current if event.ready is not None else []:
            entry.reconcile(self.now, bool(event.ready and event.ready.get(entry.name)), event.found.get(entry.name))
        for request in held_requests:
            self._serve(request)
        for request_id in replies:
            self._send_status(request_id)

    # --- time and the policy ----------------------------------------------------------------------------------

    def _housekeeping(self) -> None:
        """Take back leases whose holder vanished, give up on requests that waited too long, look at Triton."""
        now = self.now
        for lease, (name, granted) in list(self.leases.items()):
            if now - granted > self.config.lease_timeout:
                self._log(f"lease {lease} on {name} expired after {now - granted:.0f} s; taking it back")
                del self.leases[lease]
                self.entries[name].leases.discard(lease)
        for entry in self.entries.values():
            while entry.waiters and now - entry.waiters[0].arrived > self.config.queue_timeout:
                waiter = entry.waiters.popleft()
                reason = self.reasons.get(entry.name) or entry.state.value
                message = f"waited {now - waiter.arrived:.0f} s for {entry.name} ({reason}); giving up"
                self._emit(SendError(waiter.request, TimedOut(message)))
        if not self.queries:  # one look at a time (a slow server must not pile them up)
            self._query_repository()

    def _decide(self) -> None:
        decision = decide([e.view() for e in self.entries.values()], self.policy, self.plan, self.now)
        self.reasons = dict(decision.reasons)
        for name, message in decision.fail:
            self.entries[name].fail(Unavailable(message))
        for name in decision.grant:
            self._grant(self.entries[name])
        for name in decision.sleep:
            entry = self.entries[name]
            entry.set(S.SLEEPING)
            entry.evicted()
            self._emit(Sleep(name, entry.pids))
        if decision.wake is not None:
            entry = self.entries[decision.wake]
            entry.set(S.WAKING)
            self._emit(Wake(entry.name))
        for name in decision.unload:
            entry = self.entries[name]
            entry.unloading_asleep = entry.state == S.ASLEEP
            entry.evicted()
            entry.unload()
        if decision.load is not None:
            entry = self.entries[decision.load]
            entry.set(S.LOADING)
            if entry.bytes > self.policy.budget:
                budget = format_bytes(self.policy.budget)
                warning = f"WARNING: {entry.name} holds {format_bytes(entry.bytes)}, more than the budget of {budget}"
                self._log(f"{warning}; it is served alone (everything else was evicted)", logging.WARNING)
            self._emit(Load(entry.name))
        self.wake_at = decision.wake_at
        self._publish()

    def _publish(self) -> None:
        """The gauges, as changes only."""
        values = {
            ("rag_router_budget_bytes", "", ""): float(self.policy.budget),
            ("rag_router_host_budget_bytes", "", ""): float(self.policy.host_budget),
        }
        for e in self.entries.values():
            values[("rag_router_resident_bytes", e.name, "")] = float(e.view().occupies)
            values[("rag_router_unreleased_bytes", e.name, "")] = float(e.unreleased)
            values[("rag_router_host_bytes", e.name, "")] = float(e.host_bytes if e.host_held else 0)
            for tier in TIER_NAMES:
                values[("rag_router_tier", e.name, tier)] = 1.0 if e.tier == tier else 0.0
        for (metric, model, tier), value in values.items():
            if self.published.get((metric, model, tier)) != value:
                self.published[(metric, model, tier)] = value
                self._emit(SetGauge(metric, value, model, tier))

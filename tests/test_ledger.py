# Over 400 lines: the scripted and the random sequences share one harness (Books) and read best side by side.
"""The router's ledger without a server: scripted event sequences and the effects they must produce (loads, grants,
releases, lease expiry, failed and wedged loads, a model served alone, plan prefetch, PIN/UNPIN, the admin key, the
host tier, timeouts, stop), and random sequences (Hypothesis) that check the invariants: never over budget (but for a
model served alone), every request answered exactly once (all of them after Stop), no lease outlives its timeout."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from triton_rag import contract
from triton_rag.core.errors import BadInput, Forbidden, Internal, TimedOut, Unavailable
from triton_rag.core.ledger import COUNTERS, STOPPING, Ledger
from triton_rag.core.ledger_entry import LedgerConfig, ModelSpec
from triton_rag.core.ledger_events import (
    AbandonedLoadEnded,
    Action,
    Count,
    Effect,
    Event,
    GrantLease,
    Held,
    Load,
    Loaded,
    LoadFailed,
    Log,
    QueryRepository,
    QueryResidency,
    RepositoryStatus,
    Request,
    ResidencyAnswer,
    ResidencyFailed,
    ResidencyStatus,
    SendEmpty,
    SendError,
    SendStatus,
    SetGauge,
    Sleep,
    Slept,
    Stop,
    Tick,
    Unload,
    Unloaded,
    Wake,
    Woke,
    parse_action,
    parse_request,
)
from triton_rag.core.residency import ModelState, Policy, occupied_bytes

GIB = 2**30
S = ModelState
KEY = "the-admin-key"


class Books:
    """A ledger, the effects it returned, and helpers that play the shell's part."""

    def __init__(
        self, specs: list[ModelSpec], budget: int = 4 * GIB, host_budget: int = 0, min_residency: float = 0.0, **kw: Any
    ) -> None:
        config = LedgerConfig(
            Policy(budget, high_watermark=1.0, min_residency=min_residency, host_budget=host_budget),
            device="cpu",
            memory="test",
            **kw,
        )
        self.ledger = Ledger(specs, config, itertools.count(1).__next__, now=0.0)
        self.effects: list[Effect] = list(self.ledger.start())
        self.ids = itertools.count(1)
        self.now = 0.0

    def send(self, event: Event) -> list[Effect]:
        out = self.ledger.handle(event)
        self.effects += out
        return out

    def request(self, action: str, *models: str, lease: int | None = None, dt: float = 0.1) -> int:
        self.now += dt
        request = next(self.ids)
        names = tuple(self.ledger.aliases[m] for m in models)  # as parse_request resolves them
        self.send(Request(request=request, action=Action(action), now=self.now, models=names, lease=lease))
        if not self.ledger.reconciled:  # the first request waits for the first look at the repository
            self.repository()
        return request

    def repository(self, ready: frozenset[str] = frozenset(), found: dict[str, Held] | None = None) -> list[Effect]:
        """Answer every outstanding look at the repository."""
        out: list[Effect] = []
        for query in [e for e in self.effects if isinstance(e, QueryRepository)]:
            if query.query in self.ledger.queries:
                names = [name for name, _ in query.epochs]
                event = RepositoryStatus(
                    now=self.now, query=query, ready={n: n in ready for n in names}, found=found or {}
                )
                out += self.send(event)
        return out

    def loaded(self, model: str, seconds: float = 1.0, pids: tuple[int, ...] = (100,)) -> list[Effect]:
        self.now += seconds
        return self.send(Loaded(model=model, now=self.now, seconds=seconds, pids=pids))

    def unloaded(self, model: str, unreleased: int = 0, remaining: tuple[int, ...] = ()) -> list[Effect]:
        self.now += 0.1
        return self.send(Unloaded(model=model, now=self.now, seconds=0.1, unreleased=unreleased, remaining=remaining))

    def tick(self, dt: float) -> list[Effect]:
        self.now += dt
        return self.send(Tick(now=self.now))

    def replies(self, request: int) -> list[Effect]:
        return [
            e
            for e in self.effects
            if isinstance(e, (GrantLease, SendStatus, SendEmpty, SendError)) and e.request == request
        ]

    def lease(self, request: int) -> int:
        (reply,) = self.replies(request)
        assert isinstance(reply, GrantLease), reply
        return reply.lease

    def error(self, request: int) -> Exception:
        (reply,) = self.replies(request)
        assert isinstance(reply, SendError), reply
        return reply.error

    def status(self, request: int) -> dict[str, Any]:
        (reply,) = self.replies(request)
        assert isinstance(reply, SendStatus), reply
        return dict(json.loads(reply.status_json))

    def state(self, model: str) -> ModelState:
        return self.ledger.entries[model].state

    def logs(self) -> list[str]:
        return [e.text for e in self.effects if isinstance(e, Log)]


def two_models(**kw: Any) -> Books:
    return Books([ModelSpec("a", 2 * GIB, ("a_endpoint",)), ModelSpec("b", 3 * GIB)], **kw)


def only(effects: list[Effect], kind: type) -> list[Any]:
    return [e for e in effects if isinstance(e, kind)]


# --- scripted sequences ------------------------------------------------------------------------------------------


def test_the_first_request_looks_at_the_repository_then_loads_then_grants() -> None:
    books = two_models()
    request = books.request("ACQUIRE", "a")
    assert only(books.effects, Load) == [Load("a")] and books.state("a") == S.LOADING
    assert books.replies(request) == []
    assert SetGauge("rag_router_tier", 1.0, "a", "gpu") in books.effects  # loading is in the gpu tier
    books.loaded("a")
    assert only(books.effects, Count).count(Count("rag_router_loads_total", "a")) == 1  # counted at its outcome
    assert books.lease(request) == 1 and books.state("a") == S.READY
    assert "loaded a in 1.00 s, holds 2.00 GiB" in books.logs()
    model = books.ledger.status()["models"]["a"]
    assert model["loads"] == 1 and model["in_flight"] == 1 and model["state"] == "ready"


def test_release_returns_the_lease_and_an_unknown_lease_is_answered_too() -> None:
    books = two_models()
    lease = books.lease(acquire_loaded(books, "a"))
    release = books.request("RELEASE", lease=lease)
    assert books.replies(release) == [SendEmpty(release)]
    assert books.ledger.status()["models"]["a"]["in_flight"] == 0
    again = books.request("RELEASE", lease=lease)
    assert books.replies(again) == [SendEmpty(again)]


def acquire_loaded(books: Books, model: str) -> int:
    request = books.request("ACQUIRE", model)
    books.loaded(model)
    return request


def test_a_lease_nobody_releases_expires_on_the_housekeeping_tick() -> None:
    books = two_models(lease_timeout=30.0, reconcile_every=5.0)
    books.lease(acquire_loaded(books, "a"))
    books.tick(25.0)
    assert books.ledger.entries["a"].leases
    books.tick(10.0)
    assert not books.ledger.entries["a"].leases and not books.ledger.leases
    expired = [line for line in books.logs() if line.startswith("lease 1 on a expired after 3")]
    assert len(expired) == 1 and expired[0].endswith("s; taking it back")


def test_a_failed_load_fails_its_waiters_and_unloads_leftover_stubs_and_the_next_request_loads_again() -> None:
    books = two_models()
    first, second = books.request("ACQUIRE", "a"), books.request("ACQUIRE", "a_endpoint")
    books.send(LoadFailed(model="a", now=books.now + 1, error="corrupt weights", seconds=1.0, pids=(7,)))
    for request in (first, second):
        error = books.error(request)
        assert isinstance(error, Unavailable) and str(error) == "loading a failed: corrupt weights"
    assert only(books.effects, Unload) == [Unload("a", (7,), True, 2 * GIB)] and books.state("a") == S.UNLOADING
    assert books.ledger.entries["a"].last_error == "corrupt weights"
    books.unloaded("a")
    third = books.request("ACQUIRE", "a")
    assert only(books.effects, Load) == [Load("a"), Load("a")]
    books.loaded("a")
    assert books.lease(third) and books.ledger.entries["a"].last_error == ""


def test_a_load_that_ends_not_ready_says_so() -> None:
    books = two_models()
    request = books.request("ACQUIRE", "a")
    books.send(LoadFailed(model="a", now=1.0, error="", seconds=1.0))
    assert str(books.error(request)) == "loading a failed: the model did not become ready"


def test_a_wedged_stub_fails_fast_until_its_load_ends() -> None:
    books = two_models()
    first = books.request("ACQUIRE", "a")
    wedged = "its python stub (pid 9) died while loading and tritonserver still waits for it; a cannot load again"
    books.send(LoadFailed(model="a", now=6.0, error=wedged, seconds=6.0, wedged=wedged))
    assert "died while loading" in str(books.error(first))
    second = books.request("ACQUIRE", "a")
    assert str(books.error(second)) == f"a: {wedged}" and isinstance(books.error(second), Unavailable)
    other = books.request("ACQUIRE", "b")  # the other models keep loading and serving
    books.loaded("b")
    assert books.lease(other)
    books.send(AbandonedLoadEnded(model="a", now=books.now, error="", timed_out=False))
    assert "the load of a it gave up on ended (loaded); it can load again" in books.logs()
    books.repository(ready=frozenset({"a", "b"}), found={"a": Held((11,), GIB)})  # loaded after all: adopted
    assert books.state("a") == S.READY and "a was loaded outside the router; now in the ledger" in books.logs()
    assert books.lease(books.request("ACQUIRE", "a"))


def test_a_wedged_load_our_client_gave_up_on_stays_refused() -> None:
    books = two_models(load_timeout=600.0)
    books.request("ACQUIRE", "a")
    books.send(LoadFailed(model="a", now=6.0, error="died", seconds=6.0, wedged="died"))
    books.send(AbandonedLoadEnded(model="a", now=600.0, error="Deadline Exceeded", timed_out=True))
    refused = books.request("ACQUIRE", "a")
    assert "not ended that load in 600 s" in str(books.error(refused)) and "restart tritonserver" in str(
        books.error(refused)
    )
    books.repository(ready=frozenset({"a"}))  # the index shows it READY: the refusal lifts
    assert books.ledger.entries["a"].wedged == ""


def test_a_model_larger_than_the_budget_is_served_alone() -> None:
    specs = [ModelSpec("a", GIB, sleepable=True, weight_bytes=GIB // 2), ModelSpec("b", GIB), ModelSpec("big", 5 * GIB)]
    books = Books(specs, budget=4 * GIB, host_budget=8 * GIB)
    for model in ("a", "b"):
        books.request("RELEASE", lease=books.lease(acquire_loaded(books, model)))
    request = books.request("ACQUIRE", "big")
    assert {e.model for e in only(books.effects, Unload)} == {"a", "b"} and not only(books.effects, Sleep)
    reason = books.ledger.status()["models"]["big"]["waiting_because"]
    assert reason.startswith("larger than the budget (5.00 GiB > 4.00 GiB): served alone")
    books.unloaded("a")
    assert only(books.effects, Load)[-1] != Load("big")  # b still holds its memory
    books.unloaded("b")
    assert only(books.effects, Load)[-1] == Load("big")
    assert (
        "WARNING: big holds 5.00 GiB, more than the budget of 4.00 GiB; it is served alone (everything else was "
        "evicted)" in books.logs()
    )
    books.loaded("big")
    assert books.lease(request)


def test_plan_prefetches_and_acquire_advances_it() -> None:
    books = two_models(budget=3 * GIB)
    books.request("RELEASE", lease=books.lease(acquire_loaded(books, "a")))
    plan = books.request("PLAN", "b", "a_endpoint")
    assert books.status(plan)["plan"] == ["b", "a"]
    assert only(books.effects, Unload)[-1].model == "a"  # b is used first: a makes room for the prefetch
    books.unloaded("a")
    assert only(books.effects, Load)[-1] == Load("b")
    books.loaded("b")
    acquire = books.request("ACQUIRE", "b")
    assert books.lease(acquire) and books.ledger.plan == ["a"]


def test_pin_keeps_a_model_and_the_other_gets_a_clear_error_until_unpin() -> None:
    books = two_models(budget=3 * GIB)
    pin = books.request("PIN", "a")
    books.loaded("a")
    assert books.status(pin)["models"]["a"]["pinned"] is True
    refused = books.request("ACQUIRE", "b")
    message = str(books.error(refused))
    assert "pinned or non-evictable models hold the rest (a)" in message and isinstance(
        books.error(refused), Unavailable
    )
    unpin = books.request("UNPIN", "a")
    assert books.status(unpin)["models"]["a"]["pinned"] is False
    books.request("ACQUIRE", "b")
    assert only(books.effects, Unload)[-1].model == "a"


def test_the_admin_key_and_malformed_requests_are_refused_with_the_reason() -> None:
    with pytest.raises(Forbidden, match="PIN needs the admin key: the request parameter 'triton-rag-key'"):
        parse_action(["pin"], None, KEY)
    with pytest.raises(Forbidden, match="only STATUS and RELEASE are open"):
        parse_action(["ACQUIRE"], "wrong", KEY)
    assert parse_action([" status "], None, KEY) == Action.STATUS
    assert parse_action(["RELEASE"], None, KEY) == Action.RELEASE
    assert parse_action(["RECONCILE"], KEY, KEY) == Action.RECONCILE
    with pytest.raises(BadInput, match="unknown ACTION 'FLY'"):
        parse_action(["fly"], KEY, KEY)
    with pytest.raises(BadInput, match="exactly one value"):
        parse_action(["STATUS", "STATUS"], KEY, KEY)
    aliases = {"a": "a", "a_endpoint": "a"}
    with pytest.raises(BadInput, match="'gpt-5' is not a model the router manages"):
        parse_request(1, Action.PIN, ["gpt-5"], None, aliases, 0.0)
    with pytest.raises(BadInput, match="ACQUIRE needs exactly one model"):
        parse_request(1, Action.ACQUIRE, [], None, aliases, 0.0)
    with pytest.raises(BadInput, match="RELEASE needs the LEASE"):
        parse_request(1, Action.RELEASE, [], None, aliases, 0.0)
    assert parse_request(3, Action.PLAN, ["a_endpoint"], None, aliases, 1.0).models == ("a",)
    assert tuple(a.value for a in Action) == contract.ROUTER_ACTIONS


def test_status_counters_go_on_from_those_a_reloaded_router_left_in_the_metrics() -> None:
    """Issue 23: after a router reload (RouterControl.set_budget) the rag_router_*_total metrics keep their values,
    so the new ledger starts its STATUS counters from them; from then on every counted event moves both by one."""
    specs = [ModelSpec(n, 2 * GIB, sleepable=True, weight_bytes=GIB) for n in ("a", "b")]
    config = LedgerConfig(Policy(4 * GIB, high_watermark=1.0, min_residency=0.0), device="cpu", memory="test")
    ledger = Ledger(specs, config, itertools.count(1).__next__, now=0.0)
    carried = {"a": {"loads": 3, "evictions": 2, "sleeps": 1, "wakes": 1}, "gone": {"loads": 9}}
    ledger.start(carried=carried)
    status = ledger.status()["models"]
    assert {c: status["a"][c] for c in COUNTERS} == carried["a"]
    assert {c: status["b"][c] for c in COUNTERS} == dict.fromkeys(COUNTERS, 0)
    books = Books(specs)
    books.ledger = ledger
    acquire_loaded(books, "a")
    assert books.ledger.status()["models"]["a"]["loads"] == 4  # one more load: the metric's 3 + 1 as well


def test_an_encoder_whose_context_was_released_holds_nothing_asleep() -> None:
    """[router] sleep_releases_context: the engine says "context": "released"; the router then counts 0 bytes
    asleep (NVML lists no such process at all, which alone would read as "not measured")."""
    answer = ResidencyAnswer.parse({"state": "asleep", "weight_bytes": GIB, "host_bytes": GIB, "context": "released"})
    assert answer == ResidencyAnswer(asleep=True, weight_bytes=GIB, host_bytes=GIB, context_released=True)
    assert not ResidencyAnswer.parse({"state": "asleep", "context": "resident"}).context_released
    specs = [ModelSpec(n, 2 * GIB, sleepable=True, weight_bytes=GIB) for n in ("a", "b")]
    books = Books(specs, budget=3 * GIB, host_budget=4 * GIB)
    books.request("RELEASE", lease=books.lease(acquire_loaded(books, "a")))
    books.request("ACQUIRE", "b")
    assert only(books.effects, Sleep) == [Sleep("a", (100,))]
    books.send(Slept(model="a", now=books.now + 1, seconds=0.5, answer=answer, held=0))
    assert books.state("a") == S.ASLEEP and books.ledger.entries["a"].asleep_bytes == 0


def test_evictions_sleep_to_the_host_tier_and_wake() -> None:
    specs = [ModelSpec(n, 2 * GIB, sleepable=True, weight_bytes=GIB + GIB // 2) for n in ("a", "b")]
    books = Books(specs, budget=3 * GIB, host_budget=4 * GIB)
    books.request("RELEASE", lease=books.lease(acquire_loaded(books, "a")))
    assert only(books.effects, QueryResidency)[-1] == QueryResidency("a", (100,))
    answer = ResidencyAnswer(asleep=False, weight_bytes=GIB + GIB // 2, host_bytes=0)
    books.send(ResidencyStatus(model="a", now=books.now, answer=answer, held=2 * GIB))
    wanted = books.request("ACQUIRE", "b")
    assert only(books.effects, Sleep) == [Sleep("a", (100,))] and books.state("a") == S.SLEEPING
    asleep = ResidencyAnswer(asleep=True, weight_bytes=GIB + GIB // 2, host_bytes=GIB + GIB // 2)
    books.send(Slept(model="a", now=books.now + 1, seconds=1.0, answer=asleep, held=2 * GIB))
    assert books.state("a") == S.ASLEEP and books.ledger.entries["a"].tier == "host"
    assert books.ledger.entries["a"].asleep_bytes == GIB // 2  # on the CPU the host copy is taken out
    assert Count("rag_router_sleeps_total", "a") in books.effects
    books.loaded("b")
    books.request("RELEASE", lease=books.lease(wanted))
    again = books.request("ACQUIRE", "a")
    assert only(books.effects, Sleep)[-1] == Sleep("b", (100,))
    books.send(Slept(model="b", now=books.now + 1, seconds=1.0, answer=asleep, held=GIB))
    assert only(books.effects, Wake) == [Wake("a")] and books.state("a") == S.WAKING
    books.send(Woke(model="a", now=books.now + 1.2, seconds=0.2, answer=asleep))
    assert books.lease(again) and books.state("a") == S.READY and "a woken in 0.200 s" in books.logs()
    status = books.ledger.status()
    assert status["models"]["a"]["wakes"] == 1 and status["host_occupied_bytes"] == 2 * (GIB + GIB // 2)


def test_a_failed_wake_unloads_the_model_and_its_request_is_served_by_a_fresh_load() -> None:
    books = Books([ModelSpec("a", 2 * GIB, sleepable=True, weight_bytes=GIB)], host_budget=4 * GIB)
    entry = books.ledger.entries["a"]
    request = books.request("STATUS")
    entry.set(S.ASLEEP)
    entry.pids = (5,)
    wanted = books.request("ACQUIRE", "a")
    assert only(books.effects, Wake) == [Wake("a")] and books.status(request)
    books.send(ResidencyFailed(model="a", now=books.now, action="wake", error="stub gone"))
    assert "wake of a failed (stub gone); unloading it instead" in books.logs()
    assert only(books.effects, Unload) == [Unload("a", (5,), True, 2 * GIB)]
    assert entry.last_error == "wake failed: stub gone"
    books.unloaded("a")
    books.loaded("a")
    assert books.lease(wanted)


def test_a_waiter_gives_up_after_the_queue_timeout() -> None:
    books = two_models(queue_timeout=10.0, reconcile_every=5.0)
    request = books.request("ACQUIRE", "a")  # its load never ends
    books.tick(5.0)
    assert books.replies(request) == []
    books.tick(6.0)
    error = books.error(request)
    assert isinstance(error, TimedOut) and str(error) == "waited 11 s for a (loading); giving up"


def test_two_contenders_serve_their_queues_at_each_switch_even_with_no_minimum_residency() -> None:
    """Two models that fit one at a time, requests waiting for both, min_residency 0: each load first serves the
    requests that queued for it. (Found on the real server: each finished load was unloaded at once for the other
    model's waiters, before granting its own, and no request was ever answered.)"""
    books = Books([ModelSpec("a", 581 << 20), ModelSpec("b", 581 << 20)], budget=800 << 20, min_residency=0.0)
    for_a = [books.request("ACQUIRE", "a") for _ in range(3)]
    for_b = [books.request("ACQUIRE", "b") for _ in range(3)]
    out = books.loaded("a")
    assert not only(out, Unload) and {type(books.replies(r)[0]) for r in for_a} == {GrantLease}
    for request in for_a:
        books.request("RELEASE", lease=books.lease(request))
    assert only(books.effects, Unload)[-1].model == "a"  # now it makes room for b
    books.send(Unloaded(model="a", now=books.now, seconds=0.1, unreleased=0, remaining=()))
    books.loaded("b")
    assert {type(books.replies(r)[0]) for r in for_b} == {GrantLease}


def test_stop_fails_every_waiter_and_every_later_request_for_a_model() -> None:
    books = two_models()
    waiting = books.request("ACQUIRE", "a")
    books.send(Stop(now=books.now))
    assert isinstance(books.error(waiting), Unavailable) and str(books.error(waiting)) == STOPPING
    late = books.request("ACQUIRE", "b")
    assert str(books.error(late)) == STOPPING and not books.ledger.pending()
    assert books.status(books.request("STATUS"))  # still readable while it stops


def test_the_stop_action_refuses_new_leases_but_takes_back_the_ones_in_use() -> None:
    """What `serve` sends before tritonserver's shutdown: the endpoints' waiting requests end (UNAVAILABLE,
    "stopping") instead of waiting for a load the shutdown will never finish; a lease in use still comes back."""
    books = two_models()
    held = books.lease(acquire_loaded(books, "a"))
    waiting = books.request("ACQUIRE", "b")
    stop = books.request("STOP")
    assert books.status(stop)  # answered with the ledger
    assert str(books.error(waiting)) == STOPPING
    assert str(books.error(books.request("PIN", "a"))) == STOPPING
    release = books.request("RELEASE", lease=held)
    assert isinstance(books.replies(release)[0], SendEmpty)
    assert not books.ledger.pending()


def test_requests_held_for_the_first_look_are_answered_on_stop() -> None:
    books = two_models()
    books.now = 1.0
    books.send(Request(request=1, action=Action.ACQUIRE, now=1.0, models=("a",)))
    books.send(Request(request=2, action=Action.STATUS, now=1.0))
    books.send(Request(request=3, action=Action.RECONCILE, now=1.0))
    assert books.ledger.pending() == {1, 2, 3}
    books.send(Stop(now=2.0))
    assert str(books.error(1)) == STOPPING and books.status(2) and books.status(3)


def test_reconcile_follows_loads_and_unloads_outside_the_router_and_answers_after_the_look() -> None:
    books = two_models()
    books.request("STATUS")
    reconcile = books.request("RECONCILE")
    assert books.replies(reconcile) == []
    books.repository(ready=frozenset({"b"}), found={"b": Held((42,), 3 * GIB + 5)})
    status = books.status(reconcile)["models"]["b"]
    assert status["state"] == "ready" and status["measured_bytes"] == 3 * GIB + 5 and status["loads"] == 0
    assert status["measured_by"] == "cpu: stub processes [42]"
    books.request("RECONCILE")
    books.repository()
    assert only(books.effects, Unload)[-1] == Unload("b", (42,), False, 3 * GIB + 5)
    assert "b was unloaded outside the router" in books.logs()


def test_an_answer_to_an_older_look_leaves_a_model_that_moved_on_alone() -> None:
    books = two_models()
    books.request("STATUS")
    books.request("RECONCILE")
    query = only(books.effects, QueryRepository)[-1]
    acquire_loaded(books, "a")  # a changed state since the query was sent
    books.send(RepositoryStatus(now=books.now, query=query, ready={"a": False, "b": False}))
    assert books.state("a") == S.READY and not only(books.effects, Unload)


def test_memory_an_unload_keeps_is_counted_and_remeasured_until_it_is_back() -> None:
    books = two_models(reconcile_every=1.0)
    books.request("RELEASE", lease=books.lease(acquire_loaded(books, "a")))
    books.request("RECONCILE")
    books.repository()  # unloaded outside
    books.unloaded("a", unreleased=GIB, remaining=(100,))
    assert books.ledger.status()["occupied_bytes"] == GIB
    assert any(line.startswith("a unloaded but 1.00 GiB were not given back") for line in books.logs())
    assert SetGauge("rag_router_unreleased_bytes", float(GIB), "a", "") in books.effects
    books.tick(1.5)
    query = only(books.effects, QueryRepository)[-1]
    assert query.unreleased == (("a", (100,)),)
    books.send(RepositoryStatus(now=books.now, query=query, ready={}, unreleased={"a": Held((), 0)}))
    assert books.ledger.entries["a"].unreleased == 0 and books.ledger.entries["a"].pids == ()


def test_a_server_that_refuses_unloads_keeps_the_model_and_stops_evicting_it() -> None:
    books = two_models(budget=3 * GIB)
    books.request("RELEASE", lease=books.lease(acquire_loaded(books, "a")))
    books.request("ACQUIRE", "b")
    books.send(Unloaded(model="a", now=books.now, seconds=0.0, error="explicit model control is off"))
    assert books.state("a") == S.READY and not books.ledger.entries["a"].evictable
    assert "could not unload a: explicit model control is off; it is no longer evicted" in books.logs()


def test_a_bug_in_an_event_is_logged_and_its_request_still_answered() -> None:
    books = two_models()
    books.request("STATUS")
    books.ledger.entries["a"].spec = None  # type: ignore[assignment]
    request = books.request("STATUS")
    error = books.error(request)
    assert isinstance(error, Internal) and str(error) == "internal error in the router; see the server log"
    assert any(line.startswith("internal error on Request") for line in books.logs())


def test_a_bug_while_serving_held_requests_answers_every_one_of_them() -> None:
    """A repository answer takes the requests held for the first look off the books before serving them: a bug then
    must not leave them unanswered."""
    books = two_models()
    books.send(Request(request=1, action=Action.STATUS, now=0.1))
    books.send(Request(request=2, action=Action.PLAN, now=0.1, models=("a",)))
    books.send(Request(request=3, action=Action.RECONCILE, now=0.1))
    assert books.ledger.pending() == {1, 2, 3}
    def broken() -> dict[str, Any]:
        raise RuntimeError("a bug in STATUS")

    books.ledger.status = broken  # type: ignore[method-assign]
    books.repository()
    assert books.ledger.pending() == set()
    for request in (1, 2, 3):
        assert isinstance(books.error(request), Internal)
    assert any(line.startswith("internal error on RepositoryStatus") for line in books.logs())


def test_a_bug_in_the_first_look_at_the_repository_does_not_hold_requests_forever() -> None:
    books = two_models()
    books.send(Request(request=1, action=Action.ACQUIRE, now=0.1, models=("a",)))
    books.ledger.entries["a"].spec = None  # type: ignore[assignment]  (reconciling "a" now fails)
    books.repository()
    assert isinstance(books.error(1), Internal) and books.ledger.reconciled


def test_a_model_found_ready_instead_of_loaded_is_adopted_and_not_counted_as_a_load() -> None:
    books = two_models()
    request = books.request("ACQUIRE", "a")
    books.send(Loaded(model="a", now=books.now + 0.1, seconds=0.0, pids=(7,), process_bytes=GIB, adopted=True))
    assert books.lease(request) == 1 and books.state("a") == S.READY
    assert Count("rag_router_loads_total", "a") not in books.effects
    assert books.ledger.status()["models"]["a"]["loads"] == 0
    assert "a was loaded outside the router; now in the ledger" in books.logs()


# --- random sequences --------------------------------------------------------------------------------------------

SPECS = [
    ModelSpec("a", 2 * GIB, sleepable=True, weight_bytes=GIB),
    ModelSpec("b", 3 * GIB),
    ModelSpec("c", GIB, sleepable=True, weight_bytes=GIB // 2),
    ModelSpec("big", 5 * GIB),
]
BUDGET, LEASE_TIMEOUT, RECONCILE_EVERY = 4 * GIB, 6.0, 2.0
ACTIONS = ["ACQUIRE", "ACQUIRE", "ACQUIRE", "PIN", "UNPIN", "PLAN", "STATUS", "RECONCILE"]


class LedgerMachine(RuleBasedStateMachine):
    """The shell's part played at random: requests, releases, time, and each piece of work answered (or failed)
    in any order; Triton's own set of loaded models behind it."""

    def __init__(self) -> None:
        super().__init__()
        self.books = Books(
            SPECS,
            budget=BUDGET,
            host_budget=2 * GIB,
            min_residency=1.0,
            lease_timeout=LEASE_TIMEOUT,
            queue_timeout=30.0,
            reconcile_every=RECONCILE_EVERY,
        )
        self.work: list[Any] = []  # outstanding blocking effects (and abandoned loads)
        self.loaded_in_triton: set[str] = set()
        self.issued: set[int] = set()
        self.answered: set[int] = set()
        self.leases: list[int] = []
        self.stopped = False
        self.pid = itertools.count(1000)

    def send(self, event: Event) -> None:
        books = self.books
        due = not books.ledger.stopped and event.now >= books.ledger.next_housekeeping
        out = books.send(event)
        for effect in out:
            if isinstance(effect, (GrantLease, SendStatus, SendEmpty, SendError)):
                assert effect.request not in self.answered, f"request {effect.request} answered twice"
                self.answered.add(effect.request)
                if isinstance(effect, GrantLease):
                    self.leases.append(effect.lease)
            elif isinstance(effect, (Load, Unload, Sleep, Wake, QueryResidency, QueryRepository)):
                self.work.append(effect)
        if due:  # housekeeping ran: no lease is older than its timeout
            assert all(books.ledger.now - granted <= LEASE_TIMEOUT for _, granted in books.ledger.leases.values())

    @rule(action=st.sampled_from(ACTIONS), models=st.lists(st.sampled_from([s.name for s in SPECS]), max_size=3))
    def request(self, action: str, models: list[str]) -> None:
        if action in ("ACQUIRE", "PIN", "UNPIN"):
            models = models[:1] or ["a"]
        request = 1 + len(self.issued)
        self.issued.add(request)
        self.books.now += 0.1
        self.send(Request(request=request, action=Action(action), now=self.books.now, models=tuple(models)))

    @precondition(lambda self: self.leases)
    @rule(index=st.integers(0, 100))
    def release(self, index: int) -> None:
        lease = self.leases.pop(index % len(self.leases))
        request = 1 + len(self.issued)
        self.issued.add(request)
        self.send(Request(request=request, action=Action.RELEASE, now=self.books.now, lease=lease))

    @rule(dt=st.sampled_from([0.3, 0.3, 1.0, 2.5, 7.0]))
    def tick(self, dt: float) -> None:
        self.books.now += dt
        self.send(Tick(now=self.books.now))

    @precondition(lambda self: self.work)
    @rule(ok=st.sampled_from([True, True, True, False]), amount=st.integers(0, 4))
    def finish_oldest(self, ok: bool, amount: int) -> None:
        self.finish(0, ok, amount)

    @precondition(lambda self: self.work)
    @rule(index=st.integers(0, 100), ok=st.sampled_from([True, True, True, False]), amount=st.integers(0, 4))
    def finish(self, index: int, ok: bool, amount: int) -> None:
        effect = self.work.pop(index % len(self.work))
        books = self.books
        books.now += 0.2
        now = books.now
        if isinstance(effect, Load):
            pids = (next(self.pid),)
            if ok:
                self.loaded_in_triton.add(effect.model)
                self.send(Loaded(model=effect.model, now=now, seconds=0.2, pids=pids))
            elif amount == 0:  # the wedged stub; its load ends later, failed
                self.send(LoadFailed(model=effect.model, now=now, error="died", seconds=5.0, wedged="died"))
                self.work.append(AbandonedLoadEnded(model=effect.model, now=0.0, error="gone", timed_out=amount > 2))
            else:
                self.send(LoadFailed(model=effect.model, now=now, error="bad", seconds=0.2, pids=pids[: amount % 2]))
        elif isinstance(effect, AbandonedLoadEnded):
            self.send(AbandonedLoadEnded(model=effect.model, now=now, error=effect.error, timed_out=effect.timed_out))
        elif isinstance(effect, Unload):
            self.loaded_in_triton.discard(effect.model)
            if not ok and amount == 0 and effect.ask_triton:
                self.loaded_in_triton.add(effect.model)
                self.send(Unloaded(model=effect.model, now=now, seconds=0.1, error="refused"))
                return
            occupies = books.ledger.entries[effect.model].view().occupies
            unreleased = 0 if ok else min(occupies, amount * GIB // 4)
            self.send(Unloaded(model=effect.model, now=now, seconds=0.1, unreleased=unreleased, remaining=effect.pids))
        elif isinstance(effect, (Sleep, Wake)):
            answer = ResidencyAnswer(isinstance(effect, Sleep), GIB, GIB)
            if not ok:
                action = "sleep" if isinstance(effect, Sleep) else "wake"
                self.send(ResidencyFailed(model=effect.model, now=now, action=action, error="stub gone"))
            elif isinstance(effect, Sleep):
                self.send(Slept(model=effect.model, now=now, seconds=0.1, answer=answer))
            else:
                self.send(Woke(model=effect.model, now=now, seconds=0.1, answer=answer))
        elif isinstance(effect, QueryResidency):
            status = ResidencyAnswer(False, GIB, 0) if ok else None
            self.send(ResidencyStatus(model=effect.model, now=now, answer=status, error="" if ok else "no stub"))
        else:
            entries = books.ledger.entries
            left = {name: Held(pids, entries[name].unreleased // 2) for name, pids in effect.unreleased}
            ready = {name: name in self.loaded_in_triton for name, _ in effect.epochs} if ok else None
            self.send(RepositoryStatus(now=now, query=effect, ready=ready, unreleased=left))

    @precondition(lambda self: not self.stopped and len(self.issued) > 15)
    @rule()
    def stop(self) -> None:
        self.stopped = True
        self.send(Stop(now=self.books.now))

    @invariant()
    def never_over_budget_unless_served_alone(self) -> None:
        views = [e.view() for e in self.books.ledger.entries.values()]
        occupied = occupied_bytes(views)
        if occupied > BUDGET:
            holders = [v for v in views if v.occupies]
            assert len(holders) == 1 and holders[0].bytes > BUDGET, (occupied, holders)

    @invariant()
    def one_load_or_wake_at_a_time(self) -> None:
        states = [e.state for e in self.books.ledger.entries.values()]
        assert sum(s in (S.LOADING, S.WAKING) for s in states) <= 1

    @invariant()
    def every_request_answered_once_or_still_waiting(self) -> None:
        pending = self.books.ledger.pending()
        assert not pending & self.answered
        assert self.issued == self.answered | pending
        if self.stopped:
            assert not pending


LedgerMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestLedgerMachine = LedgerMachine.TestCase

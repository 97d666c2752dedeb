"""The router's policy as pure functions: eviction order, Belady plans, watermark, fairness, and a property test that
drives random workloads through `decide()` and checks the budget, the in-flight rule and liveness."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triton_rag.core.residency import (
    ModelState,
    ModelView,
    Policy,
    decide,
    host_occupied_bytes,
    occupied_bytes,
    victim_order,
)
from triton_rag.core.units import PolicyError, parse_bytes

GIB = 2**30
S = ModelState


def ready(name: str, size: int, **kw: object) -> ModelView:
    return ModelView(name, size, state=S.READY, **kw)  # type: ignore[arg-type]


def wanted(name: str, size: int, since: float = 0.0, **kw: object) -> ModelView:
    return ModelView(name, size, waiting=1, oldest_wait=since, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12GiB", 12 * GIB),
        ("1536 MiB", 1536 * 2**20),
        ("16GB", 16 * 10**9),
        ("17179869184", 16 * GIB),
        ("1.5gib", 3 * GIB // 2),
    ],
)
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "twelve", "12 parsecs", "-1GiB", "0", "nan"])
def test_parse_bytes_rejects(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_bytes(text)


def test_policy_rejects_impossible_settings() -> None:
    with pytest.raises(PolicyError, match="watermark"):
        Policy(GIB, high_watermark=1.5)
    with pytest.raises(PolicyError, match="budget"):
        Policy(0)


def test_load_when_it_fits() -> None:
    decision = decide([wanted("a", GIB), ready("b", GIB)], Policy(4 * GIB), [], now=10)
    assert decision.load == "a" and decision.unload == ()


def test_ready_model_with_waiters_is_granted() -> None:
    decision = decide([ModelView("a", GIB, state=S.READY, waiting=3, oldest_wait=1)], Policy(4 * GIB), [], now=2)
    assert decision.grant == ("a",)


def test_idle_lru_victim_is_unloaded_before_the_load() -> None:
    models = [wanted("c", 2 * GIB), ready("a", 2 * GIB, last_access=5), ready("b", 2 * GIB, last_access=1)]
    decision = decide(models, Policy(4 * GIB, high_watermark=1.0), [], now=10)
    assert decision.unload == ("b",)
    assert decision.load is None  # the load waits for b's memory to come back


def test_model_in_flight_is_never_unloaded_and_is_closed_after_min_residency() -> None:
    busy = ready("a", 3 * GIB, in_flight=2, loaded_at=0)
    early = decide([busy, wanted("b", 3 * GIB, since=1)], Policy(4 * GIB, min_residency=5), [], now=2)
    assert early.unload == () and "a" not in early.closed and early.wake_at == 5
    late = decide([busy, wanted("b", 3 * GIB, since=1)], Policy(4 * GIB, min_residency=5), [], now=6)
    assert late.unload == () and "a" in late.closed
    # a closed model takes no new requests: its waiters wait for its next turn
    queued = dataclasses.replace(busy, waiting=4, oldest_wait=5.5)
    assert "a" not in decide([queued, wanted("b", 3 * GIB, since=1)], Policy(4 * GIB, min_residency=5), [], 6).grant
    drained = dataclasses.replace(queued, in_flight=0)
    assert decide([drained, wanted("b", 3 * GIB, since=1)], Policy(4 * GIB, min_residency=5), [], 6).unload == ("a",)


def test_busy_model_within_min_residency_keeps_serving() -> None:
    queued = ready("a", 3 * GIB, in_flight=1, waiting=2, oldest_wait=1.5, loaded_at=1)
    decision = decide([queued, wanted("b", 3 * GIB, since=1.2)], Policy(4 * GIB, min_residency=5), [], now=2)
    assert decision.grant == ("a",) and decision.wake_at == 6


def test_pinned_model_is_never_evicted_and_impossible_requests_fail() -> None:
    models = [ready("a", 3 * GIB, pinned=True), wanted("b", 2 * GIB)]
    decision = decide(models, Policy(4 * GIB), [], now=1)
    assert decision.unload == () and decision.load is None
    (failed,) = decision.fail
    assert failed[0] == "b" and "pinned" in failed[1] and "a" in failed[1]


def test_model_larger_than_budget_is_served_alone() -> None:
    """A measurement above the budget (the runtime counted in, say) must not refuse the model forever."""
    decision = decide([wanted("huge", 20 * GIB)], Policy(16 * GIB), [], now=0)
    assert decision.load == "huge" and decision.fail == ()
    assert "served alone" in decision.reasons["huge"]
    crowded = decide([ready("small", 2 * GIB), wanted("huge", 20 * GIB)], Policy(16 * GIB), [], now=0)
    assert crowded.unload == ("small",) and crowded.load is None and "served alone" in crowded.reasons["huge"]
    alone = decide([ModelView("small", 2 * GIB), wanted("huge", 20 * GIB)], Policy(16 * GIB), [], now=1)
    assert alone.load == "huge"
    host = Policy(16 * GIB, host_budget=64 * GIB)
    sleepable = ready("small", 2 * GIB, sleepable=True, host_bytes=GIB, asleep_bytes=GIB // 2)
    unloaded = decide([sleepable, wanted("huge", 20 * GIB)], host, [], now=0)  # nothing may stay: no sleep first
    assert unloaded.unload == ("small",) and unloaded.sleep == ()
    pinned = decide([ready("small", 2 * GIB, pinned=True), wanted("huge", 20 * GIB)], Policy(16 * GIB), [], now=0)
    ((name, message),) = pinned.fail
    assert name == "huge" and "only be served alone" in message and "small" in message


def test_idle_sleepable_victim_sleeps_and_wakes_within_its_asleep_bytes() -> None:
    host = Policy(16 * GIB, host_budget=32 * GIB)
    a = ready("a", 10 * GIB, sleepable=True, host_bytes=9 * GIB, asleep_bytes=GIB)
    decision = decide([a, wanted("b", 10 * GIB)], host, [], now=0)
    assert decision.sleep == ("a",) and decision.unload == () and decision.load is None
    asleep = dataclasses.replace(a, state=S.ASLEEP, host_held=True)
    assert occupied_bytes([asleep]) == GIB
    assert decide([asleep, wanted("b", 10 * GIB)], host, [], now=0).load == "b"
    woken = decide([dataclasses.replace(asleep, waiting=1, oldest_wait=0), ready("b", 10 * GIB)], host, [], now=1)
    assert woken.unload == ("b",) and woken.wake is None  # b cannot sleep: unloaded
    room = decide([dataclasses.replace(asleep, waiting=1, oldest_wait=0), ModelView("b", 10 * GIB)], host, [], now=2)
    assert room.wake == "a" and room.load is None


def test_host_budget_decides_between_sleep_and_unload() -> None:
    a = ready("a", 10 * GIB, sleepable=True, host_bytes=9 * GIB, asleep_bytes=GIB, last_access=1)
    small_host = decide([a, wanted("b", 10 * GIB)], Policy(16 * GIB, host_budget=8 * GIB), [], now=5)
    assert small_host.unload == ("a",) and small_host.sleep == ()
    no_tier = decide([a, wanted("b", 10 * GIB)], Policy(16 * GIB), [], now=5)
    assert no_tier.unload == ("a",) and no_tier.sleep == ()
    # host room is made by unloading the least recently used asleep model
    old = ModelView("old", 4 * GIB, state=S.ASLEEP, sleepable=True, host_bytes=9 * GIB, host_held=True, last_access=0)
    decision = decide([old, a, wanted("b", 10 * GIB)], Policy(16 * GIB, host_budget=12 * GIB), [], now=5)
    assert decision.unload == ("old",) and decision.sleep == () and "host memory" in decision.reasons["b"]
    unloading = dataclasses.replace(old, state=S.UNLOADING, unloading_asleep=True)
    assert decide([unloading, a, wanted("b", 10 * GIB)], Policy(16 * GIB, host_budget=12 * GIB), [], now=6).sleep == ()
    gone = ModelView("old", 4 * GIB, sleepable=True, host_bytes=9 * GIB)
    assert decide([gone, a, wanted("b", 10 * GIB)], Policy(16 * GIB, host_budget=12 * GIB), [], now=7).sleep == ("a",)


def test_asleep_models_are_unloaded_last_for_what_they_hold() -> None:
    asleep = [
        ModelView(f"s{i}", 8 * GIB, state=S.ASLEEP, sleepable=True, asleep_bytes=3 * GIB, host_held=True, last_access=i)
        for i in range(3)
    ]
    decision = decide([*asleep, wanted("b", 10 * GIB)], Policy(16 * GIB, host_budget=64 * GIB), [], now=5)
    assert decision.unload == ("s0",) and decision.load is None


def test_unreleased_memory_counts_and_makes_the_load_wait() -> None:
    models = [ModelView("a", 3 * GIB, unreleased=3 * GIB), wanted("b", 2 * GIB)]
    decision = decide(models, Policy(4 * GIB), [], now=0)
    assert decision.load is None and decision.fail == ()
    assert decision.reasons == {"b": "waiting for memory that is being released"}
    released = [ModelView("a", 3 * GIB), wanted("b", 2 * GIB)]
    assert decide(released, Policy(4 * GIB), [], now=0).load == "b"


def test_one_load_at_a_time() -> None:
    models = [ModelView("a", GIB, state=S.LOADING), wanted("b", GIB)]
    decision = decide(models, Policy(8 * GIB), [], now=0)
    assert decision.load is None and decision.reasons == {"b": "another model is loading or waking"}
    waking = [ModelView("a", GIB, state=S.WAKING), wanted("b", GIB)]
    assert decide(waking, Policy(8 * GIB), [], now=0).load is None


def test_oldest_waiter_is_the_contender() -> None:
    models = [wanted("a", GIB, since=5), wanted("b", GIB, since=3)]
    assert decide(models, Policy(8 * GIB), [], now=6).load == "b"


def test_victim_order_lru_outside_the_plan_then_belady() -> None:
    models = [
        ready("p_soon", GIB, last_access=1),
        ready("p_late", GIB, last_access=2),
        ready("old", GIB, last_access=3),
        ready("recent", GIB, last_access=9),
    ]
    order = [m.name for m in victim_order(models, ["p_soon", "x", "p_late"])]
    assert order == ["old", "recent", "p_late", "p_soon"]


def test_belady_evicts_the_model_used_furthest_in_the_plan() -> None:
    models = [ready("a", 2 * GIB, last_access=1), ready("b", 2 * GIB, last_access=9), wanted("c", 2 * GIB)]
    # LRU alone would evict a; the plan uses a next and b only later
    decision = decide(models, Policy(4 * GIB, high_watermark=1.0), ["c", "a", "b"], now=10)
    assert decision.unload == ("b",)


def test_plan_prefetches_the_next_model_when_it_fits() -> None:
    models = [ready("a", 2 * GIB, in_flight=1), ModelView("b", 2 * GIB)]
    assert decide(models, Policy(8 * GIB), ["a", "b"], now=0).load == "b"


def test_plan_prefetch_only_evicts_idle_models_used_later() -> None:
    models = [ready("a", 3 * GIB, in_flight=1), ModelView("b", 3 * GIB)]
    decision = decide(models, Policy(4 * GIB), ["a", "b"], now=0)
    assert decision.load is None and decision.unload == ()  # a is busy: no prefetch
    idle_later = [ready("a", 3 * GIB), ModelView("b", 3 * GIB)]
    assert decide(idle_later, Policy(4 * GIB), ["b", "a"], now=0).unload == ("a",)
    assert decide(idle_later, Policy(4 * GIB), ["a", "b"], now=0).unload == ()  # a is used before b


def test_high_watermark_evicts_idle_lru_but_not_the_most_recent() -> None:
    models = [
        ready("a", 3 * GIB, last_access=1),
        ready("b", 3 * GIB, last_access=2),
        ready("c", 3 * GIB, last_access=3),
    ]
    decision = decide(models, Policy(10 * GIB, high_watermark=0.5), [], now=5)
    assert decision.unload == ("a", "b")
    alone = decide([ready("a", 9 * GIB, last_access=1)], Policy(10 * GIB, high_watermark=0.5), [], now=5)
    assert alone.unload == ()


def test_non_evictable_model_is_left_alone() -> None:
    models = [ready("a", 3 * GIB, evictable=False), wanted("b", 3 * GIB)]
    (failed,) = decide(models, Policy(4 * GIB), [], now=0).fail
    assert failed[0] == "b"


# --- property test: a small world that carries out decisions --------------------------------------------------


@dataclasses.dataclass
class World:
    models: dict[str, ModelView]
    policy: Policy
    now: float = 0.0
    granted: int = 0
    failed: int = 0
    arrived: int = 0

    def step(self) -> None:
        views = list(self.models.values())
        decision = decide(views, self.policy, [], self.now)
        for name, _ in decision.fail:
            self.failed += self.models[name].waiting
            self.models[name] = dataclasses.replace(self.models[name], waiting=0, oldest_wait=math.inf)
        for name in decision.grant:
            m = self.models[name]
            self.granted += m.waiting
            self.models[name] = dataclasses.replace(
                m, in_flight=m.in_flight + m.waiting, waiting=0, oldest_wait=math.inf, last_access=self.now
            )
        for name in decision.unload:
            m = self.models[name]
            assert m.in_flight == 0, f"unloading {name} with requests in flight"
            assert not m.pinned
            self.models[name] = dataclasses.replace(m, state=S.UNLOADING, unloading_asleep=m.state == S.ASLEEP)
        for name in decision.sleep:
            m = self.models[name]
            assert m.in_flight == 0 and m.sleepable and not m.pinned and m.state == S.READY
            self.models[name] = dataclasses.replace(m, state=S.SLEEPING, host_held=True)
        for started in (decision.load, decision.wake):
            if started is not None:
                m = self.models[started]
                self.models[started] = dataclasses.replace(m, state=S.LOADING if m.state == S.UNLOADED else S.WAKING)
        views = list(self.models.values())
        assert sum(m.state in (S.LOADING, S.WAKING) for m in views) <= 1
        occupying = [m for m in views if m.occupies]
        alone = len(occupying) == 1 and occupying[0].bytes > self.policy.budget
        assert alone or occupied_bytes(views) <= self.policy.budget
        assert host_occupied_bytes(views) <= self.policy.host_budget
        if decision.wake_at is not None:
            assert decision.wake_at > self.now or decision.grant or decision.unload

    def apply(self, event: tuple[str, int], names: list[str]) -> None:
        kind, index = event
        name = names[index % len(names)]
        m = self.models[name]
        if kind == "arrive":
            self.arrived += 1
            self.models[name] = dataclasses.replace(m, waiting=m.waiting + 1, oldest_wait=min(m.oldest_wait, self.now))
        elif kind == "finish" and m.in_flight:
            self.models[name] = dataclasses.replace(m, in_flight=m.in_flight - 1)
        elif kind == "loaded" and m.state in (S.LOADING, S.WAKING):
            self.models[name] = dataclasses.replace(m, state=S.READY, loaded_at=self.now)
        elif kind == "loaded" and m.state == S.SLEEPING:
            self.models[name] = dataclasses.replace(m, state=S.ASLEEP)
        elif kind == "unloaded" and m.state == S.UNLOADING:
            self.models[name] = dataclasses.replace(m, state=S.UNLOADED, host_held=False, unloading_asleep=False)
        elif kind == "tick":
            self.now += 0.5 + index % 4
        self.step()

    def settle(self) -> None:
        """Let every outstanding load, unload and request finish; time passes. Must end with nobody waiting."""
        for _ in range(200):
            for name, m in list(self.models.items()):
                if m.state in (S.LOADING, S.WAKING):
                    self.models[name] = dataclasses.replace(m, state=S.READY, loaded_at=self.now)
                elif m.state == S.SLEEPING:
                    self.models[name] = dataclasses.replace(m, state=S.ASLEEP)
                elif m.state == S.UNLOADING:
                    gone = dataclasses.replace(m, state=S.UNLOADED, host_held=False, unloading_asleep=False)
                    self.models[name] = gone
                if self.models[name].in_flight:
                    self.models[name] = dataclasses.replace(self.models[name], in_flight=0)
            self.now += 1.0
            self.step()
            moving = (S.LOADING, S.UNLOADING, S.SLEEPING, S.WAKING)
            if not any(m.waiting or m.in_flight or m.state in moving for m in self.models.values()):
                return
        raise AssertionError(f"requests still waiting after settling: {self.models}")


events = st.lists(
    st.tuples(st.sampled_from(["arrive", "arrive", "finish", "loaded", "unloaded", "tick"]), st.integers(0, 7)),
    max_size=120,
)


@settings(max_examples=2000, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 20), st.booleans()), min_size=1, max_size=4),
    budget=st.integers(4, 16),
    host_budget=st.integers(0, 24),
    watermark=st.sampled_from([0.5, 0.9, 1.0]),
    script=events,
)
def test_residency_never_exceeds_budget_and_every_request_ends(
    sizes: list[tuple[int, bool]], budget: int, host_budget: int, watermark: float, script: list[tuple[str, int]]
) -> None:
    """Device and host budgets hold (a model larger than the budget only ever alone), nothing in flight is evicted,
    and every request ends, granted: with no pinned models, every model can be served."""
    names = [f"m{i}" for i in range(len(sizes))]
    world = World(
        {
            n: ModelView(n, s * GIB, sleepable=sleeps, host_bytes=s * GIB, asleep_bytes=GIB // 2 if sleeps else 0)
            for n, (s, sleeps) in zip(names, sizes, strict=True)
        },
        Policy(budget * GIB, high_watermark=watermark, min_residency=2.0, host_budget=host_budget * GIB),
    )
    for event in script:
        world.apply(event, names)
    world.settle()
    assert world.granted == world.arrived and world.failed == 0

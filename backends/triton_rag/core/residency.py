# Over 400 lines: decide() and the helpers it alone uses are one policy, read (and property-tested) together.
"""Which compute models to load, evict, grant or fail: the router's policy as a pure function of plain data.

The router's ledger (core/ledger.py) hands a snapshot to `decide()` after every event and turns the returned
`Decision` into effects that the router (triton/router/) carries out. Nothing here sleeps, locks or calls a server,
so every rule below is unit- and property-tested on its own (tests/test_residency.py).

Two tiers below the GPU: a *sleepable* model (the PyTorch engine) is evicted by putting it to sleep: its weights
leave the device for a host-RAM copy while its process, compiled code and CUDA graphs stay, and waking it is one
host-to-device copy. The host copies are bounded by `host_budget`; past it, or for models that cannot sleep, eviction
is a full unload (the cold tier).

Rules, in the order `decide()` applies them:
1. Memory: `occupied` = bytes of every model loading, ready, waking, sleeping or unloading, what asleep models still
   hold on the device (`asleep_bytes`), plus bytes unloads did not give back. A load or wake starts only if
   `occupied + need <= budget`; at most one load or wake runs at a time (so each one's memory delta is its own).
2. A request for a model larger than what pinned models and models the server will not unload leave fails at once
   with a message that says which. A model larger than the whole budget is served alone: everything else is
   evicted first (STATUS says why). Memory an unload has not given back yet makes requests wait (the router fails
   them after its queue timeout).
3. The next model to load (the *contender*) is the unloaded model with the oldest waiting request (FIFO across
   models, so nothing starves).
4. Making room evicts idle models first (no request in flight, none waiting; to the host tier where they can sleep
   and the host budget allows, making host room by unloading the least recently used asleep models; else a full
   unload), in victim order: models absent from the plan, least recently used first; then models in the plan, the
   one whose next use is furthest away first (Belady). Busy models are evicted only if idle ones are not enough, and
   only after they have been resident for `min_residency` seconds: such a model is *closed* (it takes no new
   requests, which wait for its next turn), and is unloaded as soon as its requests in flight finish. A model with
   requests in flight is never unloaded; a pinned model is never evicted. Asleep models are unloaded last, for what
   they still hold on the device.
5. Thrashing bound: while two models contend for room that fits one, residency switches at most once per
   `min_residency` (plus the load time), and each switch serves every request that queued for the new model.
6. Plan prefetch: with no contender and no load running, the first planned model that is not resident is loaded if
   it fits after evicting only idle models whose next planned use is later than its own.
7. High watermark: above `high_watermark * budget`, idle models that are not in the plan are evicted in victim
   order, never the most recently used model (evicting it would only make the next request reload it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from triton_rag.core.units import PolicyError, format_bytes


class ModelState(str, Enum):
    """Where a compute model is (STATUS `state`: the values); a str, so it compares and serializes as its value."""

    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    SLEEPING = "sleeping"
    ASLEEP = "asleep"
    WAKING = "waking"

    def __str__(self) -> str:
        return self.value


#: States in which a model holds its full `bytes` on the device.
OCCUPYING = (ModelState.LOADING, ModelState.READY, ModelState.UNLOADING, ModelState.SLEEPING, ModelState.WAKING)
#: States that hold the device while they last: one at a time.
TRANSITIONS = (ModelState.LOADING, ModelState.WAKING)


@dataclass(frozen=True)
class Policy:
    budget: int
    high_watermark: float = 0.9
    #: Seconds a busy model stays open to new requests after its load, before another model may displace it.
    min_residency: float = 3.0
    #: Host RAM the asleep models' weight copies may take; 0 turns the host tier off (every eviction unloads).
    host_budget: int = 0

    def __post_init__(self) -> None:
        if self.budget <= 0:
            raise PolicyError(f"the budget must be positive, got {self.budget}")
        if not 0.0 < self.high_watermark <= 1.0:
            raise PolicyError(f"the high watermark is a fraction of the budget in (0, 1], got {self.high_watermark}")
        if self.min_residency < 0:
            raise PolicyError(f"min_residency must be >= 0 seconds, got {self.min_residency}")
        if self.host_budget < 0:
            raise PolicyError(f"the host budget must be >= 0 bytes, got {self.host_budget}")


@dataclass(frozen=True)
class ModelView:
    """One compute model as the policy sees it."""

    name: str
    #: Measured bytes when the model has been measured, else the estimate (weights plus workspace).
    bytes: int
    state: ModelState = ModelState.UNLOADED
    in_flight: int = 0
    waiting: int = 0
    #: Arrival time of the oldest waiting request (only meaningful when waiting > 0).
    oldest_wait: float = math.inf
    last_access: float = -math.inf
    loaded_at: float = -math.inf
    pinned: bool = False
    #: Bytes an earlier unload of this model did not give back (they still occupy memory).
    unreleased: int = 0
    #: False when the server refuses to unload it (a server not in explicit model-control mode).
    evictable: bool = True
    #: Its engine can sleep: weights to a host copy, device memory freed, process kept.
    sleepable: bool = False
    #: Device bytes it still holds while asleep (runtime, CUDA graphs' pools), measured after a sleep.
    asleep_bytes: int = 0
    #: Host RAM its weight copy takes (an estimate until its first sleep).
    host_bytes: int = 0
    #: Its host copy exists (made by the first sleep, kept until unloaded): counted in the host budget.
    host_held: bool = False
    #: Unloading from asleep: it holds only `asleep_bytes` on the device meanwhile.
    unloading_asleep: bool = False

    @property
    def occupies(self) -> int:
        asleep = self.state == ModelState.ASLEEP or (self.state == ModelState.UNLOADING and self.unloading_asleep)
        resident = self.asleep_bytes if asleep else self.bytes if self.state in OCCUPYING else 0
        return resident + self.unreleased

    @property
    def host_occupies(self) -> int:
        return self.host_bytes if self.host_held and self.state != ModelState.UNLOADED else 0

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and self.waiting == 0


@dataclass(frozen=True)
class Decision:
    #: Ready models whose waiting requests are granted now.
    grant: tuple[str, ...] = ()
    #: Models to start unloading.
    unload: tuple[str, ...] = ()
    #: Models to put to sleep (host tier).
    sleep: tuple[str, ...] = ()
    #: The model to start loading (at most one load or wake at a time).
    load: str | None = None
    #: The asleep model to wake.
    wake: str | None = None
    #: (model, message): fail every request waiting for that model.
    fail: tuple[tuple[str, str], ...] = ()
    #: Ready models that take no new requests: they are draining so another model can be loaded.
    closed: frozenset[str] = frozenset()
    #: Decide again at this time even if nothing happens (a busy model's minimum residency ends).
    wake_at: float | None = None
    #: Why a waiting model is not loading yet, for STATUS.
    reasons: dict[str, str] = field(default_factory=dict)


def occupied_bytes(models: Sequence[ModelView]) -> int:
    return sum(model.occupies for model in models)


def host_occupied_bytes(models: Sequence[ModelView]) -> int:
    return sum(model.host_occupies for model in models)


def need_bytes(model: ModelView, policy: Policy) -> int:
    """Device bytes loading or waking `model` adds; a model larger than the budget needs the whole budget (it is
    served alone)."""
    return min(model.bytes, policy.budget) - (model.asleep_bytes if model.state == ModelState.ASLEEP else 0)


def next_use(plan: Sequence[str]) -> dict[str, int]:
    """Index of each model's first appearance in the plan."""
    positions: dict[str, int] = {}
    for index, name in enumerate(plan):
        positions.setdefault(name, index)
    return positions


def victim_order(candidates: Sequence[ModelView], plan: Sequence[str]) -> list[ModelView]:
    """Eviction order: models absent from the plan (least recently used first), then planned models whose next use
    is furthest away first (Belady's rule)."""
    positions = next_use(plan)
    unplanned = sorted((m for m in candidates if m.name not in positions), key=lambda m: (m.last_access, m.name))
    planned = sorted((m for m in candidates if m.name in positions), key=lambda m: -positions[m.name])
    return unplanned + planned


def _evictable(model: ModelView) -> bool:
    return model.state == ModelState.READY and model.evictable and not model.pinned


def _cold_evictable(model: ModelView) -> bool:
    """An asleep model that a full unload may take (for what it holds on the device, or for host room); requests
    waiting for it do not keep it (it is not the contender, and it can be loaded again)."""
    return model.state == ModelState.ASLEEP and model.evictable and not model.pinned


class _Evictions:
    """Sleep or unload, victim by victim: sleep where the model can and its host copy fits the host budget, making
    host room by unloading the least recently used asleep models; otherwise unload."""

    def __init__(
        self, models: Sequence[ModelView], policy: Policy, keep: frozenset[str], unload_only: bool = False
    ) -> None:
        self.policy = policy
        #: The contender needs the whole budget (served alone): an asleep victim would be unloaded next anyway, so
        #: sleeping it first only adds its sleep time (5 s for a first 8B sleep, BENCHMARKS.md) to the swap.
        self.unload_only = unload_only
        self.host_free = policy.host_budget - host_occupied_bytes(models)
        self.asleep = sorted(
            (m for m in models if _cold_evictable(m) and m.name not in keep), key=lambda m: (m.last_access, m.name)
        )
        #: Host bytes that unloads under way will free.
        self.host_pending = sum(m.host_occupies for m in models if m.state == ModelState.UNLOADING)
        self.waiting_for_host = False
        self.sleep: list[str] = []
        self.unload: list[str] = []

    def evict(self, victim: ModelView, now_unload: bool = True) -> int:
        """Evict `victim` (or only plan to, if it is still draining or waits for host room); returns the device
        bytes that frees once done."""
        extra = 0 if victim.host_held else victim.host_bytes
        if victim.sleepable and self.policy.host_budget > 0 and not self.unload_only:
            if extra <= self.host_free:
                self.host_free -= extra
                if now_unload:
                    self.sleep.append(victim.name)
                return victim.bytes - victim.asleep_bytes
            if extra <= self.host_free + self.host_pending + sum(m.host_occupies for m in self.asleep):
                while self.host_free + self.host_pending < extra:  # it sleeps once their host copies are freed
                    extra_victim = self.asleep.pop(0)
                    self.unload.append(extra_victim.name)
                    self.host_pending += extra_victim.host_occupies
                self.waiting_for_host = True
                return victim.bytes - victim.asleep_bytes
        if now_unload:
            self.unload.append(victim.name)
        return victim.bytes

    def unload_asleep(self, shortfall: int) -> int:
        """Unload asleep models, least recently used first, for the device bytes they still hold."""
        freed = 0
        while freed < shortfall and self.asleep:
            victim = self.asleep.pop(0)
            self.unload.append(victim.name)
            self.host_pending += victim.host_occupies
            freed += victim.asleep_bytes + victim.unreleased
        return freed


def _held(model: ModelView) -> bool:
    """Resident (or about to be) and out of eviction's reach: pinned, or the server will not unload it."""
    return model.state in (ModelState.LOADING, ModelState.READY) and (model.pinned or not model.evictable)


def _impossible(model: ModelView, models: Sequence[ModelView], policy: Policy) -> str | None:
    """Why `model` can never fit while things stay as they are, or None. Unreleased memory is not counted here: it
    may still come back (a slow stub exit), so it makes requests wait, and the router's queue timeout bounds that."""
    needs = f"{model.name} needs {format_bytes(model.bytes)}"
    holders = [m for m in models if m.name != model.name and _held(m)]
    fixed = sum(m.bytes for m in holders)
    if holders and model.bytes > policy.budget:
        return (
            f"{needs}, more than the whole budget of {format_bytes(policy.budget)}, so it can only be served alone, "
            f"but pinned or non-evictable models stay resident ({', '.join(sorted(m.name for m in holders))})"
        )
    if min(model.bytes, policy.budget) + fixed > policy.budget:
        return (
            f"{needs} but only {format_bytes(policy.budget - fixed)} of the {format_bytes(policy.budget)} budget "
            f"can be freed: pinned or non-evictable models hold the rest ({', '.join(sorted(m.name for m in holders))})"
        )
    return None


@dataclass
class _Room:
    """What making room for a model takes: busy models to close, why it waits, and when to look again (the
    evictions themselves are in the `_Evictions` it was given)."""

    closed: set[str] = field(default_factory=set)
    waiting_on: list[str] = field(default_factory=list)
    wake_at: float | None = None
    enough: bool = False


def _make_room(
    shortfall: int,
    candidates: Sequence[ModelView],
    plan: Sequence[str],
    policy: Policy,
    now: float,
    evictions: _Evictions,
) -> _Room:
    """Idle victims first, then busy ones past their minimum residency (closed until their requests finish), then
    asleep models for what they still hold."""
    room = _Room()
    ordered = victim_order([m for m in candidates if m.idle], plan)
    ordered += victim_order([m for m in candidates if not m.idle], plan)
    freed = 0
    for victim in ordered:
        if freed >= shortfall:
            break
        # a model that has not yet served the requests that queued for its load stays open for them (rule 5), even
        # at min_residency 0: else two contenders unload each other as each load finishes, serving nobody
        unserved = victim.waiting > 0 and victim.oldest_wait <= victim.loaded_at
        settled = victim.idle or (now - victim.loaded_at >= policy.min_residency and not unserved)
        if settled:
            room.closed.add(victim.name)
            freed += evictions.evict(victim, now_unload=victim.in_flight == 0)
            if victim.in_flight:
                room.waiting_on.append(f"{victim.name} (draining)")
        else:
            freed += victim.bytes
            until = victim.loaded_at + policy.min_residency
            room.wake_at = until if room.wake_at is None else min(room.wake_at, until)
            room.waiting_on.append(f"{victim.name} (minimum residency)")
    if freed < shortfall:
        freed += evictions.unload_asleep(shortfall - freed)
    room.enough = freed >= shortfall
    return room


def decide(models: Sequence[ModelView], policy: Policy, plan: Sequence[str], now: float) -> Decision:
    by_name = {model.name: model for model in models}
    occupied = occupied_bytes(models)
    moving = any(model.state in TRANSITIONS for model in models)
    fail: list[tuple[str, str]] = []
    reasons: dict[str, str] = {}
    closed: set[str] = set()
    start: ModelView | None = None
    wake_at: float | None = None

    contenders = []
    for model in models:
        if model.waiting and model.state in (ModelState.UNLOADED, ModelState.ASLEEP):
            message = _impossible(model, models, policy)
            if message is None:
                contenders.append(model)
            else:
                fail.append((model.name, message))
    contender = min(contenders, key=lambda m: (m.oldest_wait, m.name), default=None)
    evictions = _Evictions(
        models,
        policy,
        keep=frozenset({contender.name}) if contender else frozenset(),
        unload_only=contender is not None and contender.bytes >= policy.budget,
    )

    if contender is not None and moving:
        reasons[contender.name] = "another model is loading or waking"
    elif contender is not None:
        sizes = f"{format_bytes(contender.bytes)} > {format_bytes(policy.budget)}"
        alone = f"larger than the budget ({sizes}): served alone"
        shortfall = occupied + need_bytes(contender, policy) - policy.budget
        if shortfall <= 0:
            start = contender
            if contender.bytes > policy.budget:
                reasons[contender.name] = alone
        else:
            candidates = [m for m in models if _evictable(m)]
            room = _make_room(shortfall, candidates, plan, policy, now, evictions)
            closed, wake_at = room.closed, room.wake_at
            if not room.enough:
                reasons[contender.name] = "waiting for memory that is being released"
            else:
                evicted = evictions.sleep + evictions.unload
                parts = [f"evicting {', '.join(evicted)}"] if evicted else []
                parts += [f"waiting for {', '.join(room.waiting_on)}"] if room.waiting_on else []
                parts += ["waiting for host memory that asleep models release"] if evictions.waiting_for_host else []
                reasons[contender.name] = "making room: " + "; ".join(parts)
            if contender.bytes > policy.budget:
                reasons[contender.name] = f"{alone}; {reasons[contender.name]}"

    positions = next_use(plan)
    if contender is None and not moving:
        away = (ModelState.UNLOADED, ModelState.ASLEEP)
        planned = [name for name in positions if name in by_name and by_name[name].state in away]
        if planned and _impossible(by_name[planned[0]], models, policy) is None:
            target = by_name[planned[0]]
            shortfall = occupied + need_bytes(target, policy) - policy.budget
            later = [
                m
                for m in models
                if _evictable(m) and m.idle and positions.get(m.name, math.inf) > positions[target.name]
            ]
            trial = _Evictions(models, policy, keep=frozenset({target.name}))
            for victim in victim_order(later, plan):
                if shortfall <= 0:
                    break
                shortfall -= trial.evict(victim)
            if shortfall <= 0:
                if trial.sleep or trial.unload:  # the prefetch itself starts once their memory is back
                    evictions = trial
                else:
                    start = target

    if start is None and not (evictions.sleep or evictions.unload):
        excess = occupied - policy.high_watermark * policy.budget
        ready = [m for m in models if m.state == ModelState.READY]
        most_recent = max(ready, key=lambda m: (m.last_access, m.name)).name if ready else None
        sweepable = [m for m in ready if _evictable(m) and m.idle and m.name not in positions and m.name != most_recent]
        for victim in victim_order(sweepable, plan):
            if excess <= 0:
                break
            excess -= evictions.evict(victim)
        host_excess = host_occupied_bytes(models) - policy.host_budget
        while host_excess > 0 and evictions.asleep:  # the host budget shrank (a router reload): unload asleep models
            victim = evictions.asleep.pop(0)
            evictions.unload.append(victim.name)
            host_excess -= victim.host_occupies

    grant = tuple(m.name for m in models if m.waiting and m.state == ModelState.READY and m.name not in closed)
    return Decision(
        grant=grant,
        unload=tuple(dict.fromkeys(evictions.unload)),
        sleep=tuple(dict.fromkeys(n for n in evictions.sleep if n not in evictions.unload)),
        load=start.name if start is not None and start.state == ModelState.UNLOADED else None,
        wake=start.name if start is not None and start.state == ModelState.ASLEEP else None,
        fail=tuple(fail),
        closed=frozenset(closed),
        wake_at=wake_at,
        reasons=reasons,
    )

"""What the router's ledger (core/ledger.py) speaks: the events it takes, the effects it returns, and the parsing of
a request into its event. Plain frozen data: the shell builds events from requests and finished work, and carries out
effects; tests script both (tests/test_ledger.py).

Events carry `now` (monotonic seconds; a request's is its arrival). Effects that block (Load, Unload, Sleep, Wake,
QueryResidency, QueryRepository) are answered by events; replies, metrics, logs and Remember are done at once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from triton_rag.core.admin import key_matches
from triton_rag.core.errors import BadInput, Forbidden, RequestError


class Action(str, Enum):
    """The router's ACTION input (contract.ROUTER_ACTIONS, in that order)."""

    ACQUIRE = "ACQUIRE"
    RELEASE = "RELEASE"
    STATUS = "STATUS"
    PIN = "PIN"
    UNPIN = "UNPIN"
    PLAN = "PLAN"
    RECONCILE = "RECONCILE"
    #: The server is shutting down: every waiting and later ACQUIRE/PIN is refused (UNAVAILABLE, "stopping"), so the
    #: endpoints' requests end instead of waiting for a model the shutdown will not load; leases keep working.
    STOP = "STOP"


#: Actions anyone may send: reading the ledger, and returning a lease (whose id only its holder knows).
OPEN_ACTIONS = (Action.STATUS, Action.RELEASE)


# --- events -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Request:
    request: int  # the shell's id of the request (its response sender)
    action: Action
    now: float  # arrival
    models: tuple[str, ...] = ()
    lease: int | None = None


@dataclass(frozen=True, kw_only=True)
class Loaded:
    """A Load ended with the model READY; `adopted`: it was READY before the load was sent (loaded from outside)."""

    model: str
    now: float
    seconds: float
    pids: tuple[int, ...] = ()
    process_bytes: int | None = None  # what its stub processes hold, or None where not attributable
    device_delta: int | None = None  # the device's used memory across the load
    adopted: bool = False


@dataclass(frozen=True, kw_only=True)
class LoadFailed:
    model: str
    now: float
    error: str
    seconds: float
    pids: tuple[int, ...] = ()  # stubs left behind (they may hold memory)
    wedged: str = ""  # why Triton cannot load it again (a stub that died before its first message)


@dataclass(frozen=True, kw_only=True)
class AbandonedLoadEnded:
    """The load call the router gave up on (wedged) ended: with `error` ("" = loaded), or our own client timeout."""

    model: str
    now: float
    error: str
    timed_out: bool


@dataclass(frozen=True, kw_only=True)
class Unloaded:
    model: str
    now: float
    seconds: float
    error: str = ""  # Triton refused (a server without explicit model control)
    unreleased: int = 0  # bytes its processes still held after the unload timeout
    remaining: tuple[int, ...] = ()  # those processes


@dataclass(frozen=True)
class ResidencyAnswer:
    """An encoder's RESIDENCY output (contract.RESIDENCY_OUTPUT), as the ledger needs it."""

    asleep: bool = False
    weight_bytes: int = 0
    host_bytes: int = 0
    #: Its CUDA context checkpointed to host memory ([router] sleep_releases_context): it holds no device memory.
    context_released: bool = False

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> ResidencyAnswer:
        return cls(
            data.get("state") == "asleep",
            int(data.get("weight_bytes") or 0),
            int(data.get("host_bytes") or 0),
            data.get("context") == "released",
        )


@dataclass(frozen=True, kw_only=True)
class Slept:
    model: str
    now: float
    seconds: float
    answer: ResidencyAnswer
    held: int | None = None  # what its processes hold on the device asleep


@dataclass(frozen=True, kw_only=True)
class Woke:
    model: str
    now: float
    seconds: float
    answer: ResidencyAnswer


@dataclass(frozen=True, kw_only=True)
class ResidencyFailed:
    model: str
    now: float
    action: str  # "sleep" or "wake"
    error: str


@dataclass(frozen=True, kw_only=True)
class ResidencyStatus:
    model: str
    now: float
    answer: ResidencyAnswer | None
    error: str = ""
    held: int | None = None  # what its processes hold, measured after the answer


@dataclass(frozen=True)
class Held:
    """Processes and the memory they hold (None: not attributable to processes)."""

    pids: tuple[int, ...]
    bytes: int | None


@dataclass(frozen=True, kw_only=True)
class RepositoryStatus:
    """The shell's answer to a QueryRepository: READY per model (None: the server could not say), the processes it
    found for `query.adopt` models READY in the index, what `query.measure` pids hold, and what is left of
    `query.unreleased`."""

    now: float
    query: QueryRepository
    ready: Mapping[str, bool] | None
    found: Mapping[str, Held] = field(default_factory=dict)
    unreleased: Mapping[str, Held] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Tick:
    now: float


@dataclass(frozen=True, kw_only=True)
class Stop:
    now: float


Event = (
    Request
    | Loaded
    | LoadFailed
    | AbandonedLoadEnded
    | Unloaded
    | Slept
    | Woke
    | ResidencyFailed
    | ResidencyStatus
    | RepositoryStatus
    | Tick
    | Stop
)

# --- effects ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    model: str


@dataclass(frozen=True)
class Unload:
    model: str
    pids: tuple[int, ...]
    ask_triton: bool  # False: Triton already unloaded it; only its processes are awaited
    bytes: int  # counted as unreleased if its processes stay but cannot be measured


@dataclass(frozen=True)
class Sleep:
    model: str
    pids: tuple[int, ...]


@dataclass(frozen=True)
class Wake:
    model: str


@dataclass(frozen=True)
class QueryResidency:
    model: str
    pids: tuple[int, ...]


@dataclass(frozen=True)
class QueryRepository:
    """Read Triton's index; find the stubs of `adopt` models READY there; measure `measure` and `unreleased` pids.
    `epochs` lets the answer skip models whose state changed meanwhile."""

    query: int
    epochs: tuple[tuple[str, int], ...]
    adopt: tuple[str, ...] = ()
    measure: tuple[tuple[str, tuple[int, ...]], ...] = ()
    unreleased: tuple[tuple[str, tuple[int, ...]], ...] = ()


@dataclass(frozen=True)
class GrantLease:
    request: int
    lease: int


@dataclass(frozen=True)
class SendStatus:
    request: int
    status_json: str


@dataclass(frozen=True)
class SendEmpty:
    request: int


@dataclass(frozen=True)
class SendError:
    request: int
    error: RequestError


@dataclass(frozen=True)
class Count:
    metric: str
    model: str
    amount: float = 1.0


@dataclass(frozen=True)
class Observe:
    metric: str
    model: str
    value: float


@dataclass(frozen=True)
class SetGauge:
    metric: str
    value: float
    model: str = ""
    tier: str = ""


@dataclass(frozen=True)
class Log:
    text: str  # without the "router: " prefix (the shell's logger adds it)
    level: int = logging.INFO


@dataclass(frozen=True)
class Remember:
    model: str
    device: str
    estimate: int
    bytes: int


Reply = GrantLease | SendStatus | SendEmpty | SendError
Work = Load | Unload | Sleep | Wake | QueryResidency | QueryRepository
Effect = Work | Reply | Count | Observe | SetGauge | Log | Remember


# --- requests ---------------------------------------------------------------------------------------------------


def parse_action(values: Sequence[str] | None, given_key: object, key: str) -> Action:
    """The ACTION input, checked against the admin key (BadInput, Forbidden)."""
    if not values or len(values) != 1:
        raise BadInput("ACTION must hold exactly one value")
    text = values[0].strip().upper()
    if text not in Action.__members__:
        raise BadInput(f"unknown ACTION {text!r}; one of {', '.join(a.value for a in Action)}")
    action = Action(text)
    if action not in OPEN_ACTIONS and not key_matches(given_key if isinstance(given_key, str) else None, key):
        raise Forbidden(
            f"{action.value} needs the admin key: the request parameter 'triton-rag-key' must hold the value of "
            f"TRITON_RAG_ADMIN_KEY (docs/ROUTER.md, Access control); only STATUS and RELEASE are open"
        )
    return action


def parse_request(
    request: int, action: Action, names: Sequence[str], lease: int | None, aliases: Mapping[str, str], now: float
) -> Request:
    """The rest of a request (MODELS by model or endpoint name, LEASE), checked (BadInput)."""
    models = []
    for name in names:
        if name not in aliases:
            raise BadInput(f"{name!r} is not a model the router manages ({', '.join(sorted(aliases))})")
        models.append(aliases[name])
    if action in (Action.ACQUIRE, Action.PIN, Action.UNPIN) and len(models) != 1:
        raise BadInput(f"{action.value} needs exactly one model in MODELS")
    if action == Action.RELEASE and lease is None:
        raise BadInput("RELEASE needs the LEASE that ACQUIRE returned")
    return Request(request=request, action=action, now=now, models=tuple(models), lease=lease)

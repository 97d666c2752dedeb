"""The router's `rag_router_*` families on Triton's /metrics endpoint, and the ledger's metric effects applied to
them. Names, labels and help texts are a documented interface (docs/ROUTER.md, Metrics): keep them as they are."""

from __future__ import annotations

from typing import Any

import triton_python_backend_utils as pb_utils

from triton_rag.core.ledger import COUNTERS
from triton_rag.core.ledger_entry import TIER_NAMES
from triton_rag.core.ledger_events import Count, Observe, SetGauge

LOAD_BUCKETS = [0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128]
WAKE_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 4]


class Metrics:
    """One metric per family and model (per tier for rag_router_tier); `apply` carries out a metric effect."""

    def __init__(self, names: list[str]) -> None:
        family = pb_utils.MetricFamily
        resident = family("rag_router_resident_bytes", "Bytes the router's ledger holds per model", family.GAUGE)
        loads = family("rag_router_loads_total", "Loads started by the router per model", family.COUNTER)
        evictions = family(
            "rag_router_evictions_total",
            "Models the router moved off the GPU to make room (slept to host RAM or unloaded)",
            family.COUNTER,
        )
        unreleased = family("rag_router_unreleased_bytes", "Bytes an unload did not give back", family.GAUGE)
        seconds = family("rag_router_load_seconds", "Time to load a model (load_model until ready)", family.HISTOGRAM)
        budget = family("rag_router_budget_bytes", "The router's memory budget", family.GAUGE)
        host_budget = family("rag_router_host_budget_bytes", "Host RAM the host tier may hold", family.GAUGE)
        host = family("rag_router_host_bytes", "Host RAM a model's weight copy holds (host tier)", family.GAUGE)
        tier = family(
            "rag_router_tier", "1 for the tier (gpu, host, cold) a model is in, 0 for the others", family.GAUGE
        )
        sleeps = family("rag_router_sleeps_total", "Evictions to the host tier per model", family.COUNTER)
        wakes = family("rag_router_wakes_total", "Wakes from the host tier per model", family.COUNTER)
        wake_seconds = family("rag_router_wake_seconds", "Time to wake a model from the host tier", family.HISTOGRAM)
        per_model = {
            "rag_router_resident_bytes": (resident, None),
            "rag_router_loads_total": (loads, None),
            "rag_router_evictions_total": (evictions, None),
            "rag_router_unreleased_bytes": (unreleased, None),
            "rag_router_load_seconds": (seconds, LOAD_BUCKETS),
            "rag_router_host_bytes": (host, None),
            "rag_router_sleeps_total": (sleeps, None),
            "rag_router_wakes_total": (wakes, None),
            "rag_router_wake_seconds": (wake_seconds, WAKE_BUCKETS),
        }
        #: (family name, model, tier) -> metric; "" where a label is absent.
        self.metrics: dict[tuple[str, str, str], Any] = {
            ("rag_router_budget_bytes", "", ""): budget.Metric(labels={}),
            ("rag_router_host_budget_bytes", "", ""): host_budget.Metric(labels={}),
        }
        for metric_name, (metric_family, buckets) in per_model.items():
            for n in names:
                extra = {"buckets": buckets} if buckets else {}
                self.metrics[(metric_name, n, "")] = metric_family.Metric(labels={"model": n}, **extra)
        for n in names:
            for t in TIER_NAMES:
                self.metrics[("rag_router_tier", n, t)] = tier.Metric(labels={"model": n, "tier": t})
        # A family must outlive its metrics (Triton refuses to update a metric whose family was collected).
        self._families = [budget, host_budget, tier] + [f for f, _ in per_model.values()]

    def counters(self) -> dict[str, dict[str, int]]:
        """Per model, the values of the counters STATUS shows too (`core.ledger.COUNTERS`). Triton keeps a metric's
        value across a reload of the model that made it (a family of the same name and labels comes back with it),
        so a new router starts its STATUS from these."""
        models = {model for (_, model, _) in self.metrics if model}
        return {
            model: {
                counter: int(self.metrics[(f"rag_router_{counter}_total", model, "")].value()) for counter in COUNTERS
            }
            for model in models
        }

    def apply(self, effect: Count | Observe | SetGauge) -> None:
        if isinstance(effect, Count):
            self.metrics[(effect.metric, effect.model, "")].increment(effect.amount)
        elif isinstance(effect, Observe):
            self.metrics[(effect.metric, effect.model, "")].observe(effect.value)
        else:
            self.metrics[(effect.metric, effect.model, effect.tier)].set(effect.value)

"""The gateway's Prometheus metrics, per route: requests by status, errors, latency, inputs. Served at the gateway's
own `GET /metrics` (Triton's port has the models' and the router's).

With several worker processes (`gateway.workers`) every worker writes its samples to files in prometheus_client's
multiprocess directory, which the parent process makes before it starts them and names in $PROMETHEUS_MULTIPROC_DIR;
`/metrics`, whichever worker answers it, adds up all of them."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

#: prometheus_client reads it when it is imported: set, its metrics are kept in files there (multiprocess mode).
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Latency buckets (seconds): from a lone query (a few ms) to a long PDF (minutes).
BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class GatewayMetrics:
    """One registry per application (tests run several in one process); in multiprocess mode the samples are the
    directory's, so /metrics reads them from there."""

    def __init__(self) -> None:
        self.shared_dir = os.environ.get(MULTIPROCESS_ENV)
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "rag_gateway_requests_total",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "rag_gateway_errors_total",
            "Requests answered with an error (status >= 400), by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "rag_gateway_request_seconds",
            "Time from request to response, by route",
            ["route"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.inputs = Counter(
            "rag_gateway_inputs_total",
            "Texts embedded, documents reranked, files converted, by route",
            ["route"],
            registry=self.registry,
        )
        self.triton_calls = Counter(
            "rag_gateway_triton_requests_total",
            "gRPC requests sent to Triton, by model and outcome",
            ["model", "outcome"],
            registry=self.registry,
        )

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        if status >= 400:
            self.errors.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        if self.shared_dir:
            every_worker = CollectorRegistry()
            MultiProcessCollector(every_worker, path=self.shared_dir)
            return bytes(generate_latest(every_worker))
        return bytes(generate_latest(self.registry))

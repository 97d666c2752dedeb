"""The gateway's Prometheus metrics, per route: requests by status, errors, latency, inputs. Served at the gateway's
own `GET /metrics` (Triton's port has the models' and the router's)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

#: Latency buckets (seconds): from a lone query (a few ms) to a long PDF (minutes).
BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class GatewayMetrics:
    """One registry per application (tests run several in one process)."""

    def __init__(self) -> None:
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
        return bytes(generate_latest(self.registry))

"""The gateway's Prometheus metrics, per route: requests by status, errors, latency, inputs. Served at the gateway's
own `GET /metrics` (Triton's port has the models' and the router's).

With several worker processes (`gateway.workers`) every worker writes its samples to files in prometheus_client's
multiprocess directory, which the parent process makes before it starts them; `/metrics`, whichever worker answers
it, adds up all of them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

#: Latency buckets (seconds): from a lone query (a few ms) to a long PDF (minutes).
BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class GatewayMetrics:
    """One registry per application (tests run several in one process). `shared_dir`: prometheus_client's
    multiprocess directory (the process was started with $PROMETHEUS_MULTIPROC_DIR naming it, so its samples are
    written there), which /metrics reads every worker's samples from."""

    def __init__(self, shared_dir: str | None = None) -> None:
        self.shared_dir = shared_dir
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
        #: Each (route, status)'s series, looked up once: `labels` takes a lock and checks its values every call.
        self._series: dict[tuple[str, int], tuple[Counter, Counter | None, Histogram]] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        series = self._series.get((route, status))
        if series is None:
            code = str(status)
            errors = self.errors.labels(route, code) if status >= 400 else None
            series = (self.requests.labels(route, code), errors, self.latency.labels(route))
            self._series[(route, status)] = series
        requests, errors, latency = series
        requests.inc()
        if errors is not None:
            errors.inc()
        latency.observe(seconds)

    def render(self) -> bytes:
        if self.shared_dir:
            every_worker = CollectorRegistry()
            MultiProcessCollector(every_worker, path=self.shared_dir)
            return bytes(generate_latest(every_worker))
        return bytes(generate_latest(self.registry))

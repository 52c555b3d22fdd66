"""Prometheus metrics of one replica, served as text by its GET /metrics.

Each replica keeps its own registry and Serve routes a GET /metrics to one replica; with several replicas,
scrape each (or use Ray's metrics export). The `speculation` label is radar, off or tree:D with D <= 16: a
bounded label set.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from radar.serve.protocol import Speculation


class Metrics:
    """The counters, gauges and histograms of one replica, in a registry of its own."""

    def __init__(self):
        disable_created_metrics()  # the *_created series only double the output
        r = self.registry = CollectorRegistry()
        self.requests = Counter("radar_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("radar_prompt_tokens", "Prompt tokens decoded", ["speculation"], registry=r)
        self.completion_tokens = Counter("radar_completion_tokens", "Tokens generated", ["speculation"], registry=r)
        self.tau = Histogram("radar_tau", "Mean tokens per target call, per request", ["speculation"], registry=r,
                             buckets=(1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 8, 10))
        self.draft_calls = Histogram("radar_draft_calls_per_cycle", "Mean draft calls per cycle, per request",
                                     ["speculation"], registry=r, buckets=(0, 1, 2, 3, 4, 5, 6, 8, 12, 16))
        self.time_per_token = Histogram(
            "radar_time_per_token_seconds", "Decode time per generated token, per request", ["speculation"],
            registry=r, buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1))
        self.latency = Histogram("radar_request_latency_seconds", "Completion latency (queue + decode)", registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.queue_wait = Histogram("radar_queue_wait_seconds", "Wait for the decoder", registry=r,
                                    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60))
        self.queue_depth = Gauge("radar_queue_depth", "Requests waiting for the decoder", registry=r)
        self.in_flight = Gauge("radar_in_flight", "Completion requests inside this replica (waiting or decoding)",
                               registry=r)
        self.timeouts = Counter("radar_timeouts", "Requests that hit the timeout", registry=r)

    def count_request(self, route: str, status: int) -> None:
        """One HTTP request answered with `status`."""
        self.requests.labels(route, str(status)).inc()

    def record(self, prompt_tokens: int, spec: Speculation, latency_s: float) -> None:
        """One finished completion."""
        label = spec.method
        self.prompt_tokens.labels(label).inc(prompt_tokens)
        self.completion_tokens.labels(label).inc(spec.generated_tokens)
        self.tau.labels(label).observe(spec.tau)
        if label != "off":
            self.draft_calls.labels(label).observe(spec.draft_calls_per_cycle)
        if spec.generated_tokens:
            self.time_per_token.labels(label).observe(spec.decode_s / spec.generated_tokens)
        self.latency.observe(latency_s)
        self.queue_wait.observe(spec.queue_s)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
